"""Cycles 1 and 2 have no block pool: they estimate a static batch's peak before running it and
refuse, with a ValueError naming the memory, a batch that cannot fit; the engine stays usable."""

import pytest
import torch

import common.engine.memory as memory
from common.engine.memory import MemoryEstimateError, static_batch_bytes
from conftest import cycle, save_tiny_checkpoint, tiny_config

STATIC_CYCLES = ["cycle1_naive", "cycle2_kvcache"]
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]


@pytest.fixture(scope="module")
def long_context_checkpoint(tmp_path_factory):
    """A tiny Llama that takes 4,000-token prompts, with 32 query heads: its [B, H, T, T] scores
    for 64 x 4,000 tokens (~250 GiB in fp32) exceed any machine that runs this suite."""
    path = tmp_path_factory.mktemp("long_ctx")
    save_tiny_checkpoint(path, "llama", max_position_embeddings=8192, num_attention_heads=32,
                         num_key_value_heads=2, head_dim=8)
    return str(path)


@pytest.mark.parametrize("name", STATIC_CYCLES)
def test_64_prompts_of_4000_tokens_are_refused_and_the_engine_answers_afterwards(name, long_context_checkpoint):
    c = cycle(name)
    llm = c.LLM(long_context_checkpoint, device="cpu")
    params = c.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    before = [o.token_ids for o in llm.generate(PROMPTS, params)]

    with pytest.raises(ValueError) as refused:
        llm.generate([[20 + i % 50] * 4000 for i in range(64)], c.SamplingParams(temperature=0, max_tokens=16))
    message = str(refused.value)
    assert isinstance(refused.value, MemoryEstimateError)
    assert "GiB" in message and "available RAM" in message
    assert "max_num_seqs (now 64)" in message and "longest 4000 tokens" in message and "largest 16" in message
    assert refused.value.estimate_bytes > refused.value.limit_bytes

    after = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in after] == before
    assert llm.stats["memory_estimate_bytes"] < llm.stats["memory_limit_bytes"]


def test_cycles_1_and_2_give_the_same_answer_after_a_refusal(long_context_checkpoint):
    answers = []
    for name in STATIC_CYCLES:
        c = cycle(name)
        llm = c.LLM(long_context_checkpoint, device="cpu")
        with pytest.raises(MemoryEstimateError):
            llm.generate([[30] * 4000] * 64, c.SamplingParams(temperature=0, max_tokens=4))
        answers.append([o.token_ids for o in llm.generate(PROMPTS, c.SamplingParams(temperature=0, max_tokens=5))])
    assert answers[0] == answers[1]


@pytest.mark.parametrize("name", STATIC_CYCLES)
def test_the_limit_decides_and_the_largest_group_counts(name, tiny_llms, monkeypatch):
    """With the limit pinned, a batch just over it is refused and one under it runs; the estimate
    is that of the largest static group, not of the whole request list."""
    llm = tiny_llms(name, max_num_seqs=2)
    c = cycle(name)
    params = c.SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    prompts = [[5] * 40, [6] * 40, [7] * 8]       # groups: 2 x 40 tokens, then 1 x 8
    dtype, config = llm.dtype, llm.source.config
    seq_len, kv = (42, 0) if name == "cycle1_naive" else (40, 43)
    need = static_batch_bytes(config, 2, seq_len, dtype, kv)["total"]
    monkeypatch.setattr(memory, "available_bytes", lambda device: (need - 1, "test limit"))
    with pytest.raises(MemoryEstimateError, match="test limit"):
        llm.generate(prompts, params)
    monkeypatch.setattr(memory, "available_bytes", lambda device: (need, "test limit"))
    assert [len(o.token_ids) for o in llm.generate(prompts, params)] == [3, 3, 3]


def test_estimate_grows_with_the_square_of_the_sequence_and_counts_the_cache():
    config = tiny_config("qwen3")
    short, long = (static_batch_bytes(config, 4, t, torch.float32) for t in (100, 200))
    assert long["attention"] == pytest.approx(4 * short["attention"], rel=0.01)
    assert long["activations"] < 2.1 * short["activations"]
    assert short["kv_cache"] == 0
    cached = static_batch_bytes(config, 4, 100, torch.bfloat16, kv_tokens=300)
    # K and V, every layer, every KV head, every position of every sequence, 2 bytes each
    assert cached["kv_cache"] == 2 * config.num_hidden_layers * 4 * 300 * config.num_key_value_heads * config.head_dim * 2


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_explicit_attention_peak_is_within_the_estimate(dtype):
    """What grouped_attention really holds at once (CUDA's allocator peak) is covered by the
    estimate, and not by a wide margin (the estimate sizes the default workload)."""
    from cycle1_naive.model import grouped_attention

    B, H, KVH, T, D = 4, 16, 8, 512, 128
    q = torch.randn(B, H, T, D, dtype=dtype, device="cuda")
    k, v = (torch.randn(B, KVH, T, D, dtype=dtype, device="cuda") for _ in range(2))
    mask = torch.ones(B, T, T, dtype=torch.bool, device="cuda").tril()
    grouped_attention(q, k, v, mask, D ** -0.5)   # cuBLAS allocates its workspace once, here
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grouped_attention(q, k, v, mask, D ** -0.5)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before
    config = tiny_config("qwen3", num_attention_heads=H, num_key_value_heads=KVH, head_dim=D)
    # the scores are the estimate's attention term; grouped_attention's copy of q and its output
    # are activations
    estimate = static_batch_bytes(config, B, T, dtype)["total"]
    assert measured <= estimate <= 1.5 * measured
