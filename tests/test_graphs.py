"""Cycle 8 (bonus): decode over static buffers, replayed as a CUDA graph where it can be.

On the CPU there is no graph, and decode runs cycle 7's eager path. With `pad_eager` set, a CPU
decode step goes through the static buffers as a replay would (copied in, padded to its bucket,
the recorded forward run eagerly), so these tests exercise the buffer plumbing and the padding
rows. The reference is cycle 7 (the same int8 engine without the idea), with the int8 matmul path
pinned so both engines compute the same thing: greedy and seeded tokens must be identical.
"""

import importlib

import pytest
import torch

from conftest import SMOLLM2, cycle

C7, C8 = "cycle7_int8", "cycle8_graphs"
graphs_mod = importlib.import_module(f"{C8}.cuda_graphs")
PROMPTS = [[5, 17, 42, 9, 33], list(range(10, 21)), [7] * 3 + list(range(40, 54))] + \
          [[20 + i, 30 + i, 40 + i] for i in range(7)] + [list(range(60, 90)) + [i] for i in range(3)]


def mixed_params(name, n=len(PROMPTS)):
    """Greedy and seeded rows, different lengths: the batch shrinks through several buckets."""
    sp = cycle(name).SamplingParams
    return [sp(temperature=0.8, top_p=0.9, seed=i, max_tokens=2 + i % 9, ignore_eos=True) if i % 4 == 3
            else sp(temperature=0, max_tokens=1 + (5 * i) % 13, ignore_eos=True) for i in range(n)]


def tokens(llm, name, prompts=PROMPTS, params=None):
    return [o.token_ids for o in llm.generate(prompts, params or mixed_params(name, len(prompts)))]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models run on one thread


# --- buckets ----------------------------------------------------------------------------------

def test_buckets():
    assert graphs_mod.batch_buckets(256) == [1, 2, 4, 8] + list(range(16, 257, 16))
    assert graphs_mod.batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert graphs_mod.batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert graphs_mod.batch_buckets(5) == [1, 2, 4, 5]
    assert graphs_mod.batch_buckets(1) == [1]
    buckets = graphs_mod.batch_buckets(64)
    assert [graphs_mod.bucket_for(buckets, n) for n in (1, 2, 3, 5, 9, 16, 17, 33, 64)] == \
        [1, 2, 4, 8, 16, 16, 32, 48, 64]
    with pytest.raises(ValueError, match="largest bucket"):
        graphs_mod.bucket_for(buckets, 65)


def test_graph_mode():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert graphs_mod.graph_mode(cpu, "sdpa", False)[0] is False
    assert graphs_mod.graph_mode(cuda, "flash_attn", False) == (True, "captured")
    assert graphs_mod.graph_mode(cuda, "flash_attn", True) == (False, "enforce_eager=True")
    captured, why = graphs_mod.graph_mode(cuda, "sdpa", False)
    assert not captured and "gathers" in why


# --- tokens equal cycle 7's -------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    dict(),
    dict(max_num_seqs=5),                                    # more requests than rows: joins and leaves
    dict(num_kv_blocks=12, block_size=4, max_num_seqs=6),    # preemption with cached blocks
], ids=["default", "max_num_seqs", "preemption"])
@pytest.mark.parametrize("ckpt", ["qwen3", "llama"])
@pytest.mark.parametrize("through_buffers", [False, True], ids=["eager", "buffers"])
def test_tokens_equal_cycle7_on_tiny_models(ckpt, options, through_buffers, tiny_llms, monkeypatch):
    c7 = tiny_llms(C7, ckpt, int8_matmul="cast", **options)
    c8 = tiny_llms(C8, ckpt, int8_matmul="cast", **options)
    monkeypatch.setattr(c8.model_runner.graphs, "pad_eager", through_buffers)
    assert tokens(c8, C8) == tokens(c7, C7)
    assert c8.stats["preemptions"] == c7.stats["preemptions"]
    if "num_kv_blocks" in options:
        assert c8.stats["preemptions"] > 0
    assert c8.scheduler.block_manager.num_free_blocks == c8.scheduler.block_manager.num_blocks


def test_enforce_eager_and_stats(tiny_llms):
    eager = tiny_llms(C8, enforce_eager=True, int8_matmul="cast")
    default = tiny_llms(C8, int8_matmul="cast")
    assert tokens(eager, C8) == tokens(default, C8)
    s = default.stats
    assert s["cuda_graphs"] is False and "CPU" in s["cuda_graphs_note"]
    assert s["graph_buckets"] == [1, 2, 4, 8, 16, 32, 48, 64]            # CPU max_num_seqs 64
    assert s["compile"] is False and s["compile_s"] == 0.0                 # off on the CPU by default
    assert s["num_kv_blocks"] + 1 == default.model_runner.kv_cache.k[0].shape[0]       # + the scratch block
    assert not default.model_runner.graphs.replays and default.model_runner.graphs.fallback_note is None


# --- padding rows -----------------------------------------------------------------------------

def test_padding_rows_are_never_sampled_and_write_only_the_scratch_block(tiny_llms, monkeypatch):
    """Three running sequences decode in the bucket of 4 (padding forced on the CPU, as a replay
    pads): the model sees 4 rows, the sampler 3, and the only slots written are the three
    sequences' new slots and the scratch block."""
    llm = tiny_llms(C8, int8_matmul="cast")
    g = llm.model_runner.graphs
    monkeypatch.setattr(g, "pad_eager", True)
    fed, sampled = [], []
    forward, sample = type(llm.model_runner.model).forward.__get__(llm.model_runner.model), llm.model_runner.sampler.sample
    monkeypatch.setattr(llm.model_runner.model, "forward", lambda ids, *a: fed.append(ids.numel()) or forward(ids, *a))
    monkeypatch.setattr(llm.model_runner.sampler, "sample", lambda logits, *a: sampled.append(len(logits)) or sample(logits, *a))
    for prompt in PROMPTS[:3]:
        llm.add_request(prompt, cycle(C8).SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    llm.step()                                                     # the prefill
    pool = [t.clone() for t in llm.model_runner.kv_cache.k + llm.model_runner.kv_cache.v]
    seqs = list(llm.scheduler.running)
    llm.step()                                                     # the first decode
    bs, scratch = llm.scheduler.block_manager.block_size, g.scratch_block
    expected = {llm.scheduler.block_manager.slot(s, len(s) - 2) for s in seqs}        # the token fed this step
    for before, after in zip(pool, llm.model_runner.kv_cache.k + llm.model_runner.kv_cache.v):
        changed = (before != after).flatten(2).any(-1).flatten().nonzero().flatten().tolist()
        assert set(changed) - set(range(scratch * bs, (scratch + 1) * bs)) == expected
    assert fed[-1] == 4 and sampled[-1] == 3
    assert (g.block_tables[3] == scratch).all() and g.positions[3] == 0 and g.context_lens[3] == 1
    while llm.has_unfinished_requests():
        llm.step()


def test_eager_decode_runs_at_the_real_batch_size(tiny_llms, monkeypatch):
    """Without a graph to replay (the CPU), three sequences decode as three rows, not a bucket of 4."""
    llm = tiny_llms(C8, int8_matmul="cast")
    model = llm.model_runner.model
    fed, forward = [], type(model).forward.__get__(model)
    monkeypatch.setattr(model, "forward", lambda ids, *a: fed.append(ids.numel()) or forward(ids, *a))
    params = cycle(C8).SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    outs = llm.generate(PROMPTS[:3], params)
    assert fed[1:] == [3, 3] and [len(o.token_ids) for o in outs] == [3, 3, 3]   # after the prefill


# --- the static buffers -----------------------------------------------------------------------

def check_buffers(llm, seqs, bucket):
    """At a decode step through the buffers: row i holds seqs[i]'s newest token, its position, the
    slot its K/V goes to, its context length and its block table; every row past them is padding."""
    g, n, bs = llm.model_runner.graphs, len(seqs), llm.model_runner.block_size
    assert g.input_ids[:n].tolist() == [s.last_token for s in seqs]
    assert g.positions[:n].tolist() == [len(s) - 1 for s in seqs]
    assert g.slot_mapping[:n].tolist() == [s.block_table[(len(s) - 1) // bs] * bs + (len(s) - 1) % bs for s in seqs]
    assert g.context_lens[:n].tolist() == [len(s) for s in seqs]
    assert [g.block_tables[i, :len(s.block_table)].tolist() for i, s in enumerate(seqs)] == \
        [s.block_table for s in seqs]
    assert (g.block_tables[n:bucket] == g.scratch_block).all()
    assert (g.slot_mapping[n:bucket] == g.scratch_block * bs).all()
    assert (g.positions[n:bucket] == 0).all() and (g.context_lens[n:bucket] == 1).all()


def test_buffers_hold_the_step_and_padding(tiny_checkpoints):
    """Property test: random requests on a small pool (joins, growth, finishes, preemptions): at every
    decode step the static buffers hold exactly the step's sequences, then padding to the bucket."""
    from hypothesis import given, settings, strategies as st

    llm = cycle(C8).LLM(tiny_checkpoints["llama"][0], device="cpu", num_kv_blocks=14, block_size=4,
                        max_num_seqs=6, int8_matmul="cast")
    runner, g = llm.model_runner, llm.model_runner.graphs
    g.pad_eager = True
    run, forward, step, checked = runner.run, g._forward, [], []

    def recording(seqs, is_prefill, kv_cache=None):
        step[:] = [list(seqs)]
        return run(seqs, is_prefill, kv_cache)

    def checking(bucket, width):
        check_buffers(llm, step[0], bucket)
        checked.append(bucket)
        return forward(bucket, width)

    runner.run, g._forward = recording, checking
    sp = cycle(C8).SamplingParams

    @settings(max_examples=12, deadline=None)
    @given(requests=st.lists(st.tuples(st.integers(1, 14), st.integers(1, 12), st.booleans()),
                             min_size=1, max_size=12))
    def run_requests(requests):
        prompts = [[3 + (7 * i + j) % 90 for j in range(n)] for i, (n, _, _) in enumerate(requests)]
        params = [sp(temperature=0.7 if seeded else 0, seed=i, max_tokens=m, ignore_eos=True)
                  for i, (_, m, seeded) in enumerate(requests)]
        outs = llm.generate(prompts, params)
        assert [len(o.token_ids) for o in outs] == [m for _, m, _ in requests]

    run_requests()
    assert checked and set(checked) <= set(g.buckets)


# --- real weights -----------------------------------------------------------------------------

@pytest.mark.slow
def test_tokens_equal_cycle7_on_real_smollm2_with_preemption():
    from test_engines import CHAT
    c7 = cycle(C7).LLM(SMOLLM2, device="cpu", int8_matmul="cast", num_kv_blocks=10)
    c8 = cycle(C8).LLM(SMOLLM2, device="cpu", int8_matmul="cast", num_kv_blocks=10)
    prompts = [c7.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                add_generation_prompt=True) for q in CHAT]
    params = [cycle(C7).SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)] * len(CHAT)
    ref = [o.token_ids for o in c7.generate(prompts, params)]
    params = [cycle(C8).SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)] * len(CHAT)
    assert [o.token_ids for o in c8.generate(prompts, params)] == ref
    assert c8.stats["preemptions"] == c7.stats["preemptions"] > 0


# --- CUDA -------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype, compile", [("float32", False), ("bfloat16", False), ("float32", True)])
def test_graph_replay_tokens_equal_eager_on_cuda(dtype, compile, tiny_checkpoints):
    """The replayed graphs (compiled small ops or not) against the plain eager forward."""
    path = tiny_checkpoints["qwen3"][0]
    graphs = cycle(C8).LLM(path, device="cuda", dtype=dtype, max_num_seqs=32, compile=compile)
    if not graphs.model_runner.graphs.graphs:
        pytest.skip(f"no capture on this machine: {graphs.model_runner.graphs.note}")
    eager = cycle(C8).LLM(path, device="cuda", dtype=dtype, max_num_seqs=32, enforce_eager=True,
                          int8_matmul=graphs.config.int8_matmul, compile=False)
    assert graphs.model_runner.graphs.buckets == [1, 2, 4, 8, 16, 32] and sorted(graphs.model_runner.graphs.graphs) == [1, 2, 4, 8, 16, 32]
    assert not eager.model_runner.graphs.graphs
    assert tokens(graphs, C8) == tokens(eager, C8)
    s = graphs.stats
    assert s["cuda_graphs"] and s["cuda_graph_bytes"] > 0
    assert s["compile"] == compile and (s["compile_s"] > 0) == compile


@pytest.mark.cuda
def test_one_sync_per_decode_step_on_cuda(tiny_checkpoints):
    """torch warns at every synchronizing CUDA call in sync debug mode: a decode step has one, reading
    the sampled tokens (its inputs reach the device through pinned memory, non_blocking)."""
    import warnings

    llm = cycle(C8).LLM(tiny_checkpoints["qwen3"][0], device="cuda", max_num_seqs=8, compile=False)
    for prompt in PROMPTS[:5]:
        llm.add_request(prompt, cycle(C8).SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    llm.step()                                                       # prefill (eager, not lean)
    llm.step()                                                       # first decode
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(5):
                llm.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 5, [str(w.message) for w in syncs]
