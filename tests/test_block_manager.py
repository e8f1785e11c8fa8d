"""BlockManager unit and property tests, for every cycle with a paged KV cache."""

import importlib

import pytest
from hypothesis import given, settings, strategies as st

from conftest import CYCLES

PAGED = [c for c in CYCLES if int(c[5]) >= 3]


def parts(name):
    bm = importlib.import_module(f"{name}.block_manager")
    seq = importlib.import_module(f"{name}.sequence")
    sp = importlib.import_module(f"{name}.sampling_params")
    return bm.BlockManager, seq.Sequence, sp.SamplingParams


def make_seq(Sequence, SamplingParams, seq_id, tokens, max_tokens=8):
    return Sequence(seq_id, None, tokens, SamplingParams(max_tokens=max_tokens), None)


@pytest.mark.parametrize("name", PAGED)
def test_blocks_come_on_demand_and_go_back(name):
    BlockManager, Sequence, SP = parts(name)
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq(Sequence, SP, 0, [10, 11, 12, 13, 14])      # 5 tokens: 2 blocks
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 2
    for t in (15, 16, 17):                                     # fills block 2 up to 8 tokens
        seq.token_ids.append(t)
        bm.append_slot(seq)
    assert len(seq.block_table) == 2
    seq.token_ids.append(18)                                   # the 9th token opens block 3
    bm.append_slot(seq)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 1
    slots = [bm.slot(seq, p) for p in range(len(seq))]
    assert len(set(slots)) == len(slots)
    assert slots[4] == seq.block_table[1] * 4
    bm.free(seq)
    assert bm.num_free_blocks == 4 and seq.block_table == []


@pytest.mark.parametrize("name", PAGED)
def test_refuses_what_does_not_fit(name):
    BlockManager, Sequence, SP = parts(name)
    bm = BlockManager(num_blocks=2, block_size=4)
    assert not bm.can_allocate(make_seq(Sequence, SP, 0, list(range(100, 109))))   # 9 tokens: 3 blocks
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)


@pytest.mark.parametrize("name", PAGED)
@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["new", "grow", "free"]), st.integers(0, 7), st.integers(1, 9)),
                    max_size=60))
def test_random_allocate_append_free_keeps_the_pool_consistent(name, ops):
    BlockManager, Sequence, SP = parts(name)
    bm = BlockManager(num_blocks=12, block_size=4)
    live, next_id = [], 0
    for op, pick, n in ops:
        if op == "new":
            # distinct token ids per sequence: no prefix is shared, so no block may be shared
            seq = make_seq(Sequence, SP, next_id, [1000 * (next_id + 1) + i for i in range(n)])
            next_id += 1
            if bm.can_allocate(seq):
                bm.allocate(seq)
                live.append(seq)
        elif op == "grow" and live:
            seq = live[pick % len(live)]
            seq.token_ids.append(1000 * (seq.seq_id + 1) + len(seq))
            if bm.can_append(seq):
                bm.append_slot(seq)
            else:
                seq.token_ids.pop()
        elif op == "free" and live:
            bm.free(live.pop(pick % len(live)))
        held = [b for s in live for b in s.block_table]
        assert len(held) == len(set(held)), "a block is in two live tables"
        assert len(held) + bm.num_free_blocks == bm.num_blocks, "free + used != total"
        for s in live:
            assert len(s.block_table) == bm.blocks_for(len(s))
    for s in live:
        bm.free(s)
    assert bm.num_free_blocks == bm.num_blocks
