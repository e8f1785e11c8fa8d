"""Prefix caching: hash chains, ref counts, eviction order, and exactness, for cycles 5 onward."""

import importlib

import pytest

from conftest import CYCLES, EXACT_CYCLES, cycle

PREFIX = [c for c in CYCLES if int(c[5]) >= 5]
EXACT = [c for c in PREFIX if c in EXACT_CYCLES]


def parts(name):
    bm = importlib.import_module(f"{name}.block_manager")
    seq = importlib.import_module(f"{name}.sequence")
    return bm, seq.Sequence, cycle(name).SamplingParams


def new_seq(name, seq_id, tokens):
    _, Sequence, SP = parts(name)
    return Sequence(seq_id, None, tokens, SP(max_tokens=4), None)


def admit(bm, seq):
    """What the scheduler does at admission: look the prompt up, then allocate with its hits."""
    hashes = bm.prompt_block_hashes(seq)
    bm.allocate(seq, bm.cached_blocks(seq, hashes), hashes)


def run_to_cache(bm, seq):
    """Admit and pretend the prompt's K/V was computed, as the engine does after a prefill."""
    admit(bm, seq)
    bm.cache_full_blocks(seq, num_computed_tokens=len(seq))


def cached(bm, seq):
    return bm.cached_blocks(seq, bm.prompt_block_hashes(seq))


@pytest.mark.parametrize("name", PREFIX)
def test_chained_hash_depends_on_the_parent(name):
    mod, _, _ = parts(name)
    block = [1, 2, 3, 4]
    assert mod.chain_hash(block, None) != mod.chain_hash(block, mod.chain_hash([9, 9, 9, 9], None))
    # a token changed in the parent block changes this block's hash; so does the order of its tokens
    assert mod.chain_hash(block, mod.chain_hash([1, 2, 3, 4], None)) != mod.chain_hash(block, mod.chain_hash([1, 2, 3, 5], None))
    assert mod.chain_hash([1, 2, 3, 4], 5) != mod.chain_hash([4, 3, 2, 1], 5)


@pytest.mark.parametrize("name", PREFIX)
def test_a_prefix_is_reused_and_ref_counts_return_to_zero(name):
    mod, _, _ = parts(name)
    bm = mod.BlockManager(num_blocks=10, block_size=4)
    a = new_seq(name, 0, list(range(100, 110)))                 # 10 tokens: blocks [0-3][4-7][8-9]
    run_to_cache(bm, a)
    b = new_seq(name, 1, list(range(100, 108)) + [7, 7, 7])    # shares two full blocks
    admit(bm, b)
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    bm.free(a)
    bm.free(b)
    assert all(blk.ref_count == 0 for blk in bm.blocks) and bm.num_free_blocks == 10


@pytest.mark.parametrize("name", PREFIX)
def test_a_fully_cached_prompt_still_computes_its_last_token(name):
    mod, _, _ = parts(name)
    bm = mod.BlockManager(num_blocks=10, block_size=4)
    prompt = list(range(50, 58))                                # exactly two full blocks
    run_to_cache(bm, new_seq(name, 0, prompt))
    again = new_seq(name, 1, prompt)
    admit(bm, again)
    assert again.num_cached_tokens == 4 < len(prompt)           # the block holding the last token is recomputed


@pytest.mark.parametrize("name", PREFIX)
def test_a_hash_collision_is_never_served(name, monkeypatch):
    mod, _, _ = parts(name)
    monkeypatch.setattr(mod, "chain_hash", lambda tokens, parent: 42)
    bm = mod.BlockManager(num_blocks=10, block_size=4)
    run_to_cache(bm, new_seq(name, 0, [1, 2, 3, 4, 5]))
    other = new_seq(name, 1, [6, 7, 8, 9, 10])
    admit(bm, other)
    assert other.num_cached_tokens == 0


@pytest.mark.parametrize("name", PREFIX)
def test_freed_blocks_stay_cached_until_evicted_least_recently_freed_first(name):
    mod, _, _ = parts(name)
    bm = mod.BlockManager(num_blocks=4, block_size=4)
    a, b = new_seq(name, 0, [1] * 5), new_seq(name, 1, [2] * 5)      # one cacheable block each
    run_to_cache(bm, a)
    run_to_cache(bm, b)
    bm.free(a)                                                     # a's blocks freed first
    bm.free(b)
    hit_b = new_seq(name, 2, [2] * 5)
    admit(bm, hit_b)
    assert hit_b.num_cached_tokens == 4                            # still cached after being freed
    bm.free(hit_b)
    filler = new_seq(name, 3, [3] * 8)                             # takes the 2 least recently freed blocks
    admit(bm, filler)
    a_again, b_again = new_seq(name, 4, [1] * 5), new_seq(name, 5, [2] * 5)
    assert cached(bm, a_again) == []                               # a's prefix block was evicted
    assert len(cached(bm, b_again)) == 1                           # b's, freed later, survives


@pytest.mark.parametrize("name", EXACT)
def test_outputs_equal_with_caching_on_and_off(name, tiny_checkpoints):
    c = cycle(name)
    path = tiny_checkpoints["qwen3"][0]
    system = list(range(60, 100))                                  # 40 shared tokens: 2 full blocks of 16
    prompts = [system + [5 + i, 6 + i, 7] for i in range(6)] + [system, system]
    params = c.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    off = c.LLM(path, device="cpu", enable_prefix_caching=False)
    on = c.LLM(path, device="cpu")
    reference = [o.token_ids for o in off.generate(prompts, params)]
    # all arrive together: the first computes the shared blocks, the others wait one step and hit
    assert [o.token_ids for o in on.generate(prompts, params)] == reference
    assert on.stats["prefix_cache_hit_tokens"] == 7 * 32 and off.stats["prefix_cache_hit_tokens"] == 0
    assert on.stats["prefill_tokens"] < off.stats["prefill_tokens"]
    # the same prompts again: now every full prefix block is a hit
    assert [o.token_ids for o in on.generate(prompts, params)] == reference
    assert on.stats["prefix_cache_hit_rate"] > 0.6
    assert all(b.ref_count == 0 for b in on.scheduler.block_manager.blocks)


@pytest.mark.parametrize("name", EXACT)
def test_preemption_with_cached_blocks_loses_nothing(name, tiny_checkpoints):
    c = cycle(name)
    path = tiny_checkpoints["qwen3"][0]
    shared = list(range(70, 78))                                   # two full blocks of 4
    prompts = [shared + [10 + i, 11 + i] for i in range(12)]
    params = [c.SamplingParams(temperature=0, max_tokens=6 + i % 4, ignore_eos=True) for i in range(12)]
    reference = [o.token_ids for o in c.LLM(path, device="cpu", enable_prefix_caching=False).generate(prompts, params)]
    small = c.LLM(path, device="cpu", num_kv_blocks=10, block_size=4)
    assert [o.token_ids for o in small.generate(prompts, params)] == reference
    assert small.stats["preemptions"] > 0 and small.stats["prefix_cache_hit_tokens"] > 0
    assert small.scheduler.block_manager.num_free_blocks == 10


@pytest.mark.parametrize("name", PREFIX)
def test_random_sharing_keeps_ref_counts_exact(name):
    """Property test: prompts drawn from two tokens share prefixes often; after every operation each
    block's ref count equals the number of live block tables holding it, the free list holds
    exactly the unreferenced blocks, and a new token is never written into a shared block."""
    from hypothesis import given, settings, strategies as st

    mod, _, _ = parts(name)

    @settings(max_examples=60, deadline=None)
    @given(ops=st.lists(st.tuples(st.sampled_from(["new", "grow", "free"]), st.integers(0, 7),
                                  st.lists(st.integers(1, 2), min_size=1, max_size=12)), max_size=40))
    def run(ops):
        bm = mod.BlockManager(num_blocks=16, block_size=2)
        live, next_id = [], 0
        for op, pick, tokens in ops:
            if op == "new":
                seq = new_seq(name, next_id, tokens)
                next_id += 1
                hashes = bm.prompt_block_hashes(seq)
                hits = bm.cached_blocks(seq, hashes)
                if bm.can_allocate(seq, hits):
                    bm.allocate(seq, hits, hashes)
                    bm.cache_full_blocks(seq, num_computed_tokens=len(seq))
                    live.append(seq)
            elif op == "grow" and live:
                seq = live[pick % len(live)]
                seq.token_ids.append(tokens[0])
                if bm.can_append(seq):
                    bm.append_slot(seq)
                    # the newest token's K/V is written into a block nobody else reads
                    assert bm.blocks[seq.block_table[(len(seq) - 1) // bm.block_size]].ref_count == 1
                    bm.cache_full_blocks(seq, num_computed_tokens=len(seq))
                else:
                    seq.token_ids.pop()
            elif op == "free" and live:
                bm.free(live.pop(pick % len(live)))
            holders = {}
            for s in live:
                for b in s.block_table:
                    holders[b] = holders.get(b, 0) + 1
            assert all(bm.blocks[b].ref_count == n for b, n in holders.items())
            assert set(bm.free_block_ids) == {b.block_id for b in bm.blocks if b.ref_count == 0}
            for s in live:
                assert len(s.block_table) == bm.blocks_for(len(s))
        for s in live:
            bm.free(s)
        assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)

    run()
