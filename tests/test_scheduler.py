"""Continuous batching: the scheduler and the engine loop, for every cycle that has them."""

import pytest

from conftest import CYCLES, EXACT_CYCLES, cycle

BATCHING = [c for c in CYCLES if int(c[5]) >= 4]
EXACT = [c for c in BATCHING if c in EXACT_CYCLES]


def greedy(name, n):
    return cycle(name).SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("name", BATCHING)
def test_requests_leave_independently(name, tiny_llms):
    llm = tiny_llms(name)
    ids = [llm.add_request([5, 6, 7, 8], greedy(name, n)) for n in (2, 5, 9)]
    finished_at = {}
    step = 0
    while llm.has_unfinished_requests():
        step += 1
        for out in llm.step():
            if out.finished:
                finished_at[out.request_id] = step
    # step 1 is the prefill (first token of all three); each later step adds one token
    assert [finished_at[i] for i in ids] == [2, 5, 9]


@pytest.mark.parametrize("name", BATCHING)
def test_describe_and_load_are_what_the_engine_is_and_holds(name, tiny_llms):
    """The public face common/ reads (the server's gauges): two requests, one slot, 4-token blocks."""
    llm = tiny_llms(name, max_num_seqs=1, block_size=4, num_kv_blocks=16)
    engine = llm.describe()
    assert (engine["max_num_seqs"], engine["block_size"], engine["num_kv_blocks"]) == (1, 4, 16)
    assert engine["max_model_len"] == 512 and engine["device"] == "cpu"
    assert llm.load()["num_running"] == llm.load()["num_waiting"] == 0
    a = llm.add_request(list(range(10, 16)), greedy(name, 3))     # 6 prompt tokens: 2 blocks
    llm.add_request([7, 8, 9], greedy(name, 3))
    llm.step()                                                    # a's prefill; b waits for the slot
    load = llm.load()
    assert (load["num_running"], load["num_waiting"], load["free_kv_blocks"]) == (1, 1, 14)
    llm.abort_request(a)
    assert llm.load()["num_waiting"] == 1 and llm.load()["free_kv_blocks"] == 16
    while llm.has_unfinished_requests():
        llm.step()
    assert llm.load()["free_kv_blocks"] == 16


@pytest.mark.parametrize("name", BATCHING)
def test_a_waiting_request_joins_as_soon_as_a_slot_frees(name, tiny_llms):
    llm = tiny_llms(name, max_num_seqs=2)
    ids = [llm.add_request([9, 10, 11], greedy(name, n)) for n in (2, 8, 3)]
    log = []
    while llm.has_unfinished_requests():
        done = [o for o in llm.step() if o.finished]
        log.append(([s.seq_id for s in llm.scheduler.running], [o.request_id for o in done]))
    # request 0 finishes at step 2; request 2 is admitted (prefilled) at step 3, next to request 1
    assert log[1][1] == [ids[0]]
    assert ids[2] in log[2][0] and ids[1] in log[2][0]


@pytest.mark.parametrize("name", EXACT)
def test_a_small_pool_preempts_but_changes_nothing(name, tiny_llms):
    prompts = [[20 + i, 21 + i, 22 + i, 23 + i, 24 + i, 25 + i] for i in range(20)]
    params = [greedy(name, 6 + i % 5) for i in range(20)]
    reference = [o.token_ids for o in tiny_llms(name).generate(prompts, params)]
    # block_size 4: each request needs up to 4 blocks; 8 blocks hold two requests at their longest
    small = tiny_llms(name, num_kv_blocks=8, block_size=4)
    outs = small.generate(prompts, params)
    assert [o.token_ids for o in outs] == reference
    assert small.stats["preemptions"] > 0
    assert small.scheduler.block_manager.num_free_blocks == small.scheduler.block_manager.num_blocks
    assert small.stats["free_kv_blocks"] == 8


@pytest.mark.parametrize("name", BATCHING)
def test_seeded_sampling_survives_preemption(name, tiny_llms):
    sp = cycle(name).SamplingParams
    prompts = [[30 + i] * 6 for i in range(10)]
    params = [sp(temperature=1.0, top_p=0.9, max_tokens=8, ignore_eos=True, seed=i) for i in range(10)]
    reference = [o.token_ids for o in tiny_llms(name).generate(prompts, params)]
    small = tiny_llms(name, num_kv_blocks=8, block_size=4)
    assert [o.token_ids for o in small.generate(prompts, params)] == reference
    assert small.stats["preemptions"] > 0


@pytest.mark.parametrize("name", BATCHING)
def test_a_request_larger_than_the_pool_is_refused(name, tiny_llms):
    llm = tiny_llms(name, num_kv_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="whole pool"):
        llm.generate([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], greedy(name, 10))
    assert not llm.has_unfinished_requests()
    assert len(llm.generate([[1, 2, 3]], greedy(name, 4))[0].token_ids) == 4


@pytest.mark.parametrize("name", BATCHING)
def test_generate_refuses_a_busy_engine_and_loses_nothing(name, tiny_llms):
    llm = tiny_llms(name)
    rid = llm.add_request([3, 4, 5], greedy(name, 3))
    with pytest.raises(RuntimeError, match="idle"):
        llm.generate([[1, 2]], greedy(name, 2))
    done = []
    while llm.has_unfinished_requests():
        done += [o for o in llm.step() if o.finished]
    assert [o.request_id for o in done] == [rid] and len(done[0].token_ids) == 3


@pytest.mark.parametrize("name", BATCHING)
def test_trace_prints_one_line_per_step(name, tiny_checkpoints, capsys):
    llm = cycle(name).LLM(tiny_checkpoints["qwen3"][0], device="cpu", trace=True)
    llm.generate([[1, 2, 3], [4, 5]], [greedy(name, 2), greedy(name, 4)])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step")]
    assert len(lines) == llm.stats["steps"] == 4
    assert "prefill" in lines[0] and "decode" in lines[1]
