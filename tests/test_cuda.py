"""The CUDA path of every cycle (skipped without a GPU)."""

import pytest
import torch

from conftest import CYCLES, EXACT_CYCLES, cycle

PROMPTS = [[5, 17, 42, 9, 33], list(range(10, 21)), [7] * 3 + list(range(40, 54))]


@pytest.mark.cuda
@pytest.mark.parametrize("name", EXACT_CYCLES)
def test_fp32_greedy_on_cuda_equals_hf(name, tiny_checkpoints):
    path, hf = tiny_checkpoints["qwen3"]
    llm = cycle(name).LLM(path, device="cuda", dtype="float32")
    outs = llm.generate(PROMPTS, cycle(name).SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref


@pytest.mark.cuda
@pytest.mark.parametrize("name", CYCLES)
def test_bf16_default_on_cuda_runs_and_reports_gpu_memory(name, tiny_checkpoints):
    llm = cycle(name).LLM(tiny_checkpoints["llama"][0])
    assert llm.device.type == "cuda" and llm.dtype == torch.bfloat16
    sp = cycle(name).SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, ignore_eos=True, seed=3)
    first = [o.token_ids for o in llm.generate(PROMPTS, sp)]
    assert first == [o.token_ids for o in llm.generate(PROMPTS, sp)]
    assert all(len(t) == 8 for t in first)
    # The peak covers at least what stays allocated through generate: the weights and the KV cache
    # (the whole pool for the paged cycles, the reservation for cycle 2).
    s = llm.stats
    held = s["weight_bytes"] + s.get("kv_cache_pool_bytes", s["kv_cache_peak_bytes"])
    assert held <= s["peak_memory_bytes"] < torch.cuda.get_device_properties(0).total_memory


def _shared_prefix_prompts():
    """Prompt A (300 tokens) first, then B and C sharing A's first 280 tokens: past one 256-token block."""
    base = [(13 * i) % 500 + 3 for i in range(300)]
    return [[base], [base[:280] + [40, 41, 42], base[:280] + list(range(60, 90))]]


@pytest.mark.cuda
def test_flash_attn_engine_with_multi_block_prefix_hits(tiny_checkpoints):
    """flash-attn's paged path end to end: 256-token blocks, prompts over 256 tokens, prefix hits.
    bf16 only (flash-attn has no fp32), so the reference is the same engine on sdpa in bf16
    (same blocks, same weights): the tiny model's sharp distributions leave no near-ties to flip."""
    c6 = cycle("cycle6_flash")
    if c6.attention.flash_attn_problem(torch.device("cuda"), torch.bfloat16):
        pytest.skip("flash-attn is not installed (or does not import)")
    path = tiny_checkpoints["qwen3"][0]
    flash = c6.LLM(path, dtype="bfloat16", attention_backend="flash_attn", block_size=256, num_kv_blocks=16)
    sdpa = c6.LLM(path, dtype="bfloat16", attention_backend="sdpa", block_size=256, num_kv_blocks=16)
    params = c6.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for batch in _shared_prefix_prompts():
        got = [o.token_ids for o in flash.generate(batch, params)]
        assert got == [o.token_ids for o in sdpa.generate(batch, params)]
    assert flash.stats["prefix_cache_hit_tokens"] >= 2 * 256 and flash.scheduler.block_manager.block_size == 256
    assert flash.stats["attention_backend"] == "flash_attn"


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["cycle6_flash", "cycle7_int8"])
def test_cuda_default_backend_and_int8_path_are_reported(name, tiny_checkpoints):
    """bf16 on CUDA: flash_attn if it imports, else our triton kernels with the reason recorded;
    cycle 7's int8 path is our triton kernel, by the fixed table."""
    c = cycle(name)
    llm = c.LLM(tiny_checkpoints["qwen3"][0], num_kv_blocks=64)
    llm.generate(PROMPTS, c.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    problem = c.attention.flash_attn_problem(llm.device, llm.dtype)
    if problem:
        assert llm.stats["attention_backend"] == "triton" and "flash_attn not used" in llm.stats["attention_backend_note"]
    else:
        assert llm.stats["attention_backend"] == "flash_attn" and llm.stats["attention_backend_note"] is None
    if name == "cycle7_int8":
        assert llm.stats["int8_matmul"] == "triton" and llm.stats["int8_matmul_note"] is None
