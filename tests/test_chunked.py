"""Cycle 9: chunked prefill in mixed batches, under one token budget per step.

The reference is cycle 8 (the same int8 engine, whose steps are whole prompts or decodes): greedy
tokens must be identical whatever the budget, with prefix caching on or off and with preemption
forced. The scheduler is also tested alone, without a model, and the attention backends on mixed
steps (decode rows and chunks after a computed prefix) against an explicit float64 reference.
"""

import importlib
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import SMOLLM2, cycle

C8, C9 = "cycle8_graphs", "cycle9_chunked"
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [list(range(5, 45)), [7, 8, 9], [3 + i % 90 for i in range(130)], [11], list(range(50, 83)),
           list(range(5, 45)) + [60, 61]]   # the last shares the first's two full blocks of 16

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models run on one thread


def greedy(name, n=8):
    return cycle(name).SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def tokens(llm, name, prompts=PROMPTS, n=8):
    return [o.token_ids for o in llm.generate(prompts, greedy(name, n))]


# --- tokens equal cycle 8's -------------------------------------------------------------------

@pytest.mark.parametrize("ckpt", ["qwen3", "llama"])
def test_tokens_equal_cycle8_at_every_budget(ckpt, tiny_llms):
    reference = tokens(tiny_llms(C8, ckpt), C8)
    for budget in (16, 64, 512, None):          # None: the device's default (4096), nothing is split
        for caching in (True, False):
            llm = tiny_llms(C9, ckpt, max_num_batched_tokens=budget, enable_prefix_caching=caching)
            assert tokens(llm, C9) == reference, (budget, caching)
    assert tokens(tiny_llms(C9, ckpt, enable_chunked_prefill=False), C9) == reference


def test_preemption_mid_prompt_changes_nothing(tiny_llms):
    """A pool of 36 blocks of 4 tokens cannot hold the 130-token prompt beside the others: sequences
    are preempted, some with a prompt half computed, and recomputed."""
    reference = tokens(tiny_llms(C8), C8, n=10)
    small = tiny_llms(C9, num_kv_blocks=36, block_size=4, max_num_batched_tokens=16)
    assert tokens(small, C9, n=10) == reference
    assert small.stats["preemptions"] > 0
    assert small.scheduler.block_manager.num_free_blocks == 36


def test_a_threshold_below_the_budget_changes_nothing(tiny_llms):
    reference = tokens(tiny_llms(C8), C8)
    llm = tiny_llms(C9, max_num_batched_tokens=64, long_prefill_token_threshold=8)
    assert tokens(llm, C9) == reference


def test_an_abort_mid_prompt_frees_its_blocks(tiny_llms):
    llm = tiny_llms(C9, max_num_batched_tokens=16)
    request = llm.add_request(list(range(10, 110)), greedy(C9))
    assert llm.step() == []                                   # 16 of 100 tokens: nothing to sample yet
    assert llm.scheduler.running[0].num_computed_tokens == 16   # its first chunk is in the cache
    bm = llm.scheduler.block_manager
    assert bm.num_free_blocks < bm.num_blocks and llm.abort_request(request)
    assert bm.num_free_blocks == bm.num_blocks and not llm.has_unfinished_requests()


def test_a_fully_cached_prompt_still_samples(tiny_llms):
    """The same 32-token prompt twice: the second run hits its first block and computes the rest,
    its last token included, so there is a row to sample (a chunk of cached blocks only would not)."""
    llm = tiny_llms(C9, max_num_batched_tokens=8)
    prompt = [list(range(20, 52))]
    first = tokens(llm, C9, prompt)
    assert tokens(llm, C9, prompt) == first and llm.stats["prefix_cache_hit_tokens"] == 16


@pytest.mark.slow
def test_tokens_equal_cycle8_on_real_smollm2():
    c8 = cycle(C8).LLM(SMOLLM2, device="cpu")
    c9 = cycle(C9).LLM(SMOLLM2, device="cpu", max_num_batched_tokens=32, num_kv_blocks=6)
    text = "Explain in two sentences why the sky is blue, and why sunsets are red."
    prompts = [c8.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                add_generation_prompt=True) for q in (text, "Hi!", "2+2=")]
    assert tokens(c9, C9, prompts, 6) == tokens(c8, C8, prompts, 6)
    assert c9.stats["preemptions"] > 0


# --- the scheduler alone ----------------------------------------------------------------------

def scheduler_for(budget, num_blocks=64, block_size=4, threshold=0, chunked=True):
    """Cycle 9's Scheduler (which owns its BlockManager) on a Config-like namespace, no model."""
    config = SimpleNamespace(block_size=block_size, enable_prefix_caching=True, max_num_seqs=8,
                             max_num_batched_tokens=budget, enable_chunked_prefill=chunked,
                             long_prefill_token_threshold=threshold)
    processor = importlib.import_module(f"{C9}.output_processor").OutputProcessor(None, {2})
    return importlib.import_module(f"{C9}.scheduler").Scheduler(config, num_blocks, processor)


def simulate(budget, prompts, max_tokens=4, num_blocks=64, block_size=4, threshold=0, abort_at=None):
    """Drive cycle 9's Scheduler as the engine does, with token 1 for every row that samples
    (its real postprocess: computed tokens advance, finished sequences leave). Returns the steps as
    [(seq_id, first token, tokens, was a decode)] and the block manager."""
    scheduler = scheduler_for(budget, num_blocks, block_size, threshold)
    Sequence = importlib.import_module(f"{C9}.sequence").Sequence
    SamplerOutput = importlib.import_module(f"{C9}.sampler").SamplerOutput
    scheduler.add([Sequence(i, None, prompt, greedy(C9, max_tokens), None) for i, prompt in enumerate(prompts)],
                  detokenize=False)
    steps = []
    while scheduler.has_unfinished():
        seqs, num_tokens = scheduler.schedule()
        steps.append([(s.seq_id, s.num_computed_tokens, n, len(s) > s.num_prompt_tokens and n == 1)
                      for s, n in zip(seqs, num_tokens)])
        samples = sum(s.num_computed_tokens + n == len(s) for s, n in zip(seqs, num_tokens))
        scheduler.postprocess(seqs, num_tokens, SamplerOutput([1] * samples))
        if abort_at is not None and len(steps) == abort_at:
            for seq in list(scheduler.running) + list(scheduler.waiting):
                scheduler.abort(seq.seq_id)
    return steps, scheduler.block_manager


PROMPT_LENGTHS = [3, 50, 7, 33, 120, 1, 16]


@pytest.mark.parametrize("budget, threshold", [(8, 0), (16, 0), (16, 6), (64, 0), (1000, 0)])
def test_budget_is_never_exceeded_and_chunks_add_up(budget, threshold):
    prompts = [[10 + (i * 7 + j) % 50 for j in range(n)] for i, n in enumerate(PROMPT_LENGTHS)]
    steps, bm = simulate(budget, prompts, threshold=threshold, num_blocks=128)   # room for all: no preemption
    assert all(sum(n for _, _, n, _ in step) <= budget for step in steps)
    if threshold:
        assert all(n <= threshold for step in steps for _, _, n, _ in step)
    for i, prompt in enumerate(prompts):
        # The prompt's chunks, in order: each starts where the last ended (a cached prefix first).
        chunks = [(start, n) for step in steps for seq_id, start, n, decode in step if seq_id == i and not decode]
        assert chunks[0][0] % bm.block_size == 0 and chunks[-1][0] + chunks[-1][1] == len(prompt)
        assert all(a + n == b for (a, n), (b, _) in zip(chunks, chunks[1:]))
    # Some step holds a prompt chunk and decodes together (unless the budget takes every prompt at once).
    assert budget >= sum(PROMPT_LENGTHS) or any(any(d for *_, d in step) and not all(d for *_, d in step) for step in steps)
    assert bm.num_free_blocks == bm.num_blocks


def test_decodes_come_first_and_a_long_prompt_does_not_stall_them():
    """While the 120-token prompt is computed in chunks, every step still decodes the short ones."""
    prompts = [[5, 6], [7, 8, 9], list(range(10, 130))]
    steps, _ = simulate(16, prompts, max_tokens=12)
    long_steps = [step for step in steps if any(seq_id == 2 and not d for seq_id, _, _, d in step)]
    assert len(long_steps) >= 120 // 16
    for step in long_steps[1:]:
        assert [seq_id for seq_id, *_ in step if seq_id != 2] == [0, 1]   # the decodes, first
        assert step[-1][0] == 2


@pytest.mark.parametrize("abort_at", [1, 2, 3])
def test_no_block_leaks_after_aborts_mid_prompt(abort_at):
    prompts = [list(range(10, 70)), list(range(10, 40)), [3, 4]]
    steps, bm = simulate(16, prompts, abort_at=abort_at)
    assert len(steps) == abort_at
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)


def test_without_chunking_a_step_is_whole_prompts_or_decodes():
    scheduler = scheduler_for(16, chunked=False)
    Sequence = importlib.import_module(f"{C9}.sequence").Sequence
    scheduler.add([Sequence(i, None, list(range(10, 10 + n)), greedy(C9), None) for i, n in enumerate([3, 40, 5])])
    seqs, num_tokens = scheduler.schedule()
    assert [s.seq_id for s in seqs] == [0] and num_tokens == [3]      # 3 + 40 is over the budget
    seqs[0].num_computed_tokens, seqs[0].token_ids = 3, seqs[0].token_ids + [1]
    seqs, num_tokens = scheduler.schedule()
    assert [s.seq_id for s in seqs] == [1] and num_tokens == [40]     # alone, whole, over the budget


def test_a_prompt_that_runs_whole_must_fit_the_budget():
    """Prompt logprobs are gathered from one prefill, so such a prompt is not chunked: one longer
    than the budget is refused when it is added, before any work."""
    scheduler = scheduler_for(16)
    Sequence = importlib.import_module(f"{C9}.sequence").Sequence
    params = cycle(C9).SamplingParams(max_tokens=2, prompt_logprobs=1)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        scheduler.add([Sequence(0, None, list(range(10, 30)), params, None)])
    scheduler.add([Sequence(1, None, list(range(10, 26)), params, None)])   # 16 tokens: one step
    assert scheduler.schedule()[1] == [16]


# --- attention on mixed steps -----------------------------------------------------------------

def mixed_step(device, dtype, seed, block_size=16, heads=8, kv_heads=2, head_dim=64):
    """A random paged cache and a mixed step laid out by cycle 9's own ModelRunner: decode rows,
    chunks after a computed prefix that does not end on a block boundary, and fresh prompts."""
    runner_mod = importlib.import_module(f"{C9}.model_runner")
    Sequence = importlib.import_module(f"{C9}.sequence").Sequence
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    rows = [(rng.randint(1, 90), 1) for _ in range(3)] + [(37, 20), (0, 45), (rng.randint(1, 60), 5), (16, 1 + 16)]
    num_blocks = sum(-(-(c + n) // block_size) for c, n in rows) + 4
    order = list(range(num_blocks))
    rng.shuffle(order)
    seqs = []
    for i, (computed, n) in enumerate(rows):
        seq = Sequence(i, None, [1] * (computed + n), greedy(C9), None)
        seq.num_computed_tokens = computed
        seq.block_table = [order.pop() for _ in range(-(-(computed + n) // block_size))]
        seqs.append(seq)
    runner = object.__new__(runner_mod.ModelRunner)   # only its step layout: set what _prepare reads
    runner.device, runner.block_size, runner.dense_layout = torch.device(device), block_size, True
    _, _, meta = runner._prepare(seqs, [n for _, n in rows])
    q = torch.randn(int(meta.cu_seqlens_q[-1]), heads, head_dim, generator=gen).to(device, dtype)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(device, dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(device, dtype)
    return q, k_cache, v_cache, meta


def reference(q, k_cache, v_cache, meta, scale):
    """Row by row in float64: query i of a row with q_len queries and context_len keys sees key j
    iff j <= context_len - q_len + i."""
    q, k_cache, v_cache = q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu()
    cu, lens, tables = meta.cu_seqlens_q.tolist(), meta.context_lens.tolist(), meta.block_tables.cpu()
    group = q.shape[1] // k_cache.shape[2]
    out = torch.empty_like(q)
    for b, context_len in enumerate(lens):
        slots = torch.arange(context_len)
        keys = k_cache[tables[b, slots // k_cache.shape[1]], slots % k_cache.shape[1]]   # [S, KVH, D]
        values = v_cache[tables[b, slots // k_cache.shape[1]], slots % k_cache.shape[1]]
        queries = q[cu[b]:cu[b + 1]]                                                    # [Tq, H, D]
        scores = torch.einsum("thd,shd->hts", queries, keys.repeat_interleave(group, 1)) * scale
        positions = torch.arange(context_len - len(queries), context_len)
        scores = scores.masked_fill(slots[None, None, :] > positions[None, :, None], float("-inf"))
        out[cu[b]:cu[b + 1]] = torch.einsum("hts,shd->thd", scores.softmax(-1), values.repeat_interleave(group, 1))
    return out


def check_backend(backend, device, dtype, atol, seeds=2, **shape):
    attention = importlib.import_module(f"{C9}.attention")
    for seed in range(seeds):
        q, k_cache, v_cache, meta = mixed_step(device, dtype, seed, **shape)
        assert meta.is_prefill and meta.num_decodes == 3
        got = attention.ATTENTION[backend](q, k_cache, v_cache, meta, 0.125)
        torch.testing.assert_close(got.double().cpu(), reference(q, k_cache, v_cache, meta, 0.125), atol=atol, rtol=atol)


def test_sdpa_on_a_mixed_step():
    check_backend("sdpa", "cpu", torch.float32, atol=1e-5)


@pytest.mark.parametrize("shape", [dict(), dict(block_size=4, heads=6, kv_heads=2, head_dim=24),
                                   dict(block_size=32, heads=4, kv_heads=4, head_dim=80)],
                         ids=["bs16-g4-d64", "bs4-g3-d24", "bs32-g1-d80"])
def test_triton_on_a_mixed_step(shape):
    """Under Triton's interpreter on a CPU (conftest sets TRITON_INTERPRET=1), compiled on a GPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_backend("triton", device, torch.float32, atol=1e-5, seeds=1, **shape)


def test_the_triton_kernels_are_cycle8s():
    """The prefill kernel already puts a row's queries at the end of its context (cycle 6, for
    cached prefixes), so a chunk needs no new kernel: what changes is which rows go to which kernel
    (attention.py). tests/test_triton_compile.py compiles the file for sm_80 and sm_90."""
    assert (ROOT / C9 / "triton_attention.py").read_bytes() == (ROOT / C8 / "triton_attention.py").read_bytes()


@pytest.mark.cuda
def test_flash_attn_on_a_mixed_step():
    attention = importlib.import_module(f"{C9}.attention")
    if attention.flash_attn_problem(torch.device("cuda"), torch.bfloat16):
        pytest.skip("flash-attn is not installed (or does not import)")
    check_backend("flash_attn", "cuda", torch.bfloat16, atol=2e-2, block_size=256)


@pytest.mark.cuda
def test_triton_on_a_mixed_step_in_bf16_on_cuda():
    check_backend("triton", "cuda", torch.bfloat16, atol=2e-2, heads=16, kv_heads=8, head_dim=128)


# --- the home workload (common/benchmark/mixed_arrivals.py) -------------------------------------

def test_mixed_arrivals_requests_and_metrics():
    from common.benchmark.mixed_arrivals import SIZES, make_requests, metrics
    from common.benchmark.online import RequestRecord

    size = SIZES["cpu"]
    prompts, outputs, arrivals = make_requests(size, max_model_len=1500)
    streams, longs = slice(0, size["streams"]), slice(size["streams"], None)
    assert arrivals[streams] == [0.0] * size["streams"] and arrivals[longs] == [1.0, 4.0, 7.0]
    assert all(len(p) <= 1500 - size["long_output"] for p in prompts[longs]) and len(prompts[0]) <= 32
    assert (prompts, outputs, arrivals) == make_requests(size, max_model_len=1500)   # seeded
    # One stream with a 2 s stall, one even stream, one long prompt: ITL and TTFT from the right records.
    records = [RequestRecord(0.0, [0.1, 0.2, 2.2, 2.3], 2.3, num_output_tokens=4),
               RequestRecord(0.0, [0.1, 0.2, 0.3, 0.4], 0.4, num_output_tokens=4),
               RequestRecord(1.0, [2.2], 2.2, num_output_tokens=1)]
    m = metrics(records, num_streams=2)
    assert m["stream_itl_max_s"] == pytest.approx(2.0) and m["stream_itl_p50_s"] == pytest.approx(0.1)
    assert m["long_ttft_mean_s"] == pytest.approx(1.2) and m["output_throughput"] == pytest.approx(9 / 2.3)


def test_a_whole_prompt_waits_for_a_step_with_room():
    """Two streams decode; a 15-token prompt that asks for prompt logprobs cannot be chunked and
    does not fit the 14 tokens left of a 16-token budget: it waits until the streams finish."""
    scheduler = scheduler_for(16)
    Sequence = importlib.import_module(f"{C9}.sequence").Sequence
    SamplerOutput = importlib.import_module(f"{C9}.sampler").SamplerOutput
    scheduler.add([Sequence(i, None, [10 + i] * 3, greedy(C9, 3), None) for i in range(2)], detokenize=False)
    seqs, num_tokens = scheduler.schedule()
    scheduler.postprocess(seqs, num_tokens, SamplerOutput([1, 1]))
    whole = Sequence(2, None, list(range(30, 45)), cycle(C9).SamplingParams(max_tokens=2, prompt_logprobs=1), None)
    scheduler.add([whole], detokenize=False)
    totals = []
    while whole.num_computed_tokens == 0:
        seqs, num_tokens = scheduler.schedule()
        totals.append(sum(num_tokens))
        samples = sum(s.num_computed_tokens + n == len(s) for s, n in zip(seqs, num_tokens))
        scheduler.postprocess(seqs, num_tokens, SamplerOutput([1] * samples))
    assert totals == [2, 2, 15] and max(totals) <= 16
