"""Each fused attention backend of cycle 6 against the explicit attention of cycle 5.

Random paged caches, ragged lengths, grouped-query heads, cached prefixes and decode steps."""

import importlib
import random

import pytest
import torch

from conftest import CYCLES

FUSED = [c for c in CYCLES if int(c[5]) >= 6]


def build_step(name, device, dtype, is_prefill, seed=0, block_size=16, heads=8, kv_heads=2, head_dim=64):
    """A random paged cache and a scheduled step over it, laid out by the cycle's own ModelRunner."""
    runner_mod = importlib.import_module(f"{name}.model_runner")
    bm_mod = importlib.import_module(f"{name}.block_manager")
    seq_mod = importlib.import_module(f"{name}.sequence")
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 64
    bm = bm_mod.BlockManager(num_blocks, block_size)
    order = list(range(num_blocks))
    rng.shuffle(order)                               # blocks scattered through the pool
    seqs = []
    for i in range(4):
        length = rng.randint(1, 70)
        seq = seq_mod.Sequence(i, None, [1] * length, importlib.import_module(f"{name}.sampling_params").SamplingParams(), None)
        seq.block_table = [order.pop() for _ in range(bm.blocks_for(length))]
        if is_prefill:                               # some sequences start with a cached prefix
            seq.num_cached_tokens = rng.choice([0, (length - 1) // block_size * block_size])
        seqs.append(seq)
    runner = runner_mod.ModelRunner(None, None, bm, None, torch.device(device))
    _, _, meta = runner._prepare(seqs, is_prefill)
    n = int(meta.cu_seqlens_q[-1])
    q = torch.randn(n, heads, head_dim, generator=gen).to(device, dtype)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(device, dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(device, dtype)
    return q, k_cache, v_cache, meta


def explicit_reference(q, k_cache, v_cache, meta, scale):
    """Cycle 5's attention: gather through the block tables, QK^T, mask, softmax, V."""
    c5 = importlib.import_module("cycle5_prefix.model")
    keys = c5.gather_blocks(k_cache.float(), meta.block_tables.long())
    values = c5.gather_blocks(v_cache.float(), meta.block_tables.long())
    out = c5.grouped_attention(q.float()[meta.query_index].transpose(1, 2), keys, values, meta.mask, scale)
    return out.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])[meta.token_index]


def check(name, backend, device, dtype, is_prefill, atol, block_size=16):
    attention = importlib.import_module(f"{name}.attention")
    for seed in range(3):
        q, k_cache, v_cache, meta = build_step(name, device, dtype, is_prefill, seed, block_size)
        got = attention.ATTENTION[backend](q, k_cache, v_cache, meta, 0.125)
        want = explicit_reference(q, k_cache, v_cache, meta, 0.125)
        torch.testing.assert_close(got.float(), want, atol=atol, rtol=atol)


@pytest.mark.parametrize("is_prefill", [True, False], ids=["prefill", "decode"])
@pytest.mark.parametrize("name", FUSED)
def test_sdpa_matches_explicit_attention_on_cpu(name, is_prefill):
    check(name, "sdpa", "cpu", torch.float32, is_prefill, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("is_prefill", [True, False], ids=["prefill", "decode"])
@pytest.mark.parametrize("name", FUSED)
def test_sdpa_matches_explicit_attention_on_cuda(name, is_prefill):
    check(name, "sdpa", "cuda", torch.bfloat16, is_prefill, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("is_prefill", [True, False], ids=["prefill", "decode"])
@pytest.mark.parametrize("name", FUSED)
def test_flash_attn_matches_explicit_attention(name, is_prefill):
    pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    check(name, "flash_attn", "cuda", torch.bfloat16, is_prefill, atol=2e-2, block_size=256)


@pytest.mark.parametrize("name", FUSED)
def test_backend_choice_and_refusal(name, tiny_checkpoints):
    attention = importlib.import_module(f"{name}.attention")
    assert attention.select_backend(torch.device("cpu"), None) == "sdpa"
    with pytest.raises(ValueError, match="flash-attn"):
        attention.select_backend(torch.device("cpu"), "flash_attn")
    with pytest.raises(ValueError, match="unknown"):
        attention.select_backend(torch.device("cpu"), "magic")
    llm = importlib.import_module(name).LLM(tiny_checkpoints["llama"][0], device="cpu")
    llm.generate([[1, 2, 3]], importlib.import_module(name).SamplingParams(max_tokens=2))
    assert llm.stats["attention_backend"] == "sdpa" and llm.block_manager.block_size == 16
