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
