"""Each fused attention backend of cycle 6 against the explicit attention of cycle 5.

Random paged caches, ragged lengths, grouped-query heads, cached prefixes and decode steps."""

import importlib
import random
from pathlib import Path

import pytest
import torch

from conftest import CYCLES

FUSED = [c for c in CYCLES if int(c[5]) >= 6]


def build_step(name, device, dtype, is_prefill, seed=0, block_size=16, heads=8, kv_heads=2, head_dim=64,
               max_len=70):
    """A random paged cache and a scheduled step over it, laid out by the cycle's own ModelRunner."""
    runner_mod = importlib.import_module(f"{name}.model_runner")
    bm_mod = importlib.import_module(f"{name}.block_manager")
    seq_mod = importlib.import_module(f"{name}.sequence")
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 4 * -(-max_len // block_size) + 8   # room for 4 sequences, and blocks nobody uses
    bm = bm_mod.BlockManager(num_blocks, block_size)
    order = list(range(num_blocks))
    rng.shuffle(order)                               # blocks scattered through the pool
    seqs = []
    for i in range(4):
        # Sequence 0 is as long as allowed (several blocks when max_len > block_size) and, in a
        # prefill, starts with every full block cached; the others are random.
        length = max_len if i == 0 else rng.randint(1, max_len)
        seq = seq_mod.Sequence(i, None, [1] * length, importlib.import_module(f"{name}.sampling_params").SamplingParams(), None)
        seq.block_table = [order.pop() for _ in range(bm.blocks_for(length))]
        if is_prefill:                               # some sequences start with a cached prefix
            seq.num_cached_tokens = (length - 1) // block_size * block_size if i == 0 else \
                rng.choice([0, (length - 1) // block_size * block_size])
        seqs.append(seq)
    runner = object.__new__(runner_mod.ModelRunner)   # only its step layout, no model: set what _prepare reads
    runner.device, runner.block_size, runner.dense_layout = torch.device(device), block_size, True
    if hasattr(seqs[0], "num_computed_tokens"):   # cycle 9: each sequence's tokens past its computed ones
        for seq in seqs:
            seq.num_computed_tokens = seq.num_cached_tokens if is_prefill else len(seq) - 1
        _, _, meta = runner._prepare(seqs, [len(s) - s.num_computed_tokens for s in seqs])
    else:
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


def check(name, backend, device, dtype, is_prefill, atol, block_size=16, seeds=3, **shape):
    attention = importlib.import_module(f"{name}.attention")
    for seed in range(seeds):
        q, k_cache, v_cache, meta = build_step(name, device, dtype, is_prefill, seed, block_size, **shape)
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
    """flash-attn's paged path: 256-token blocks, contexts up to 600 tokens (up to 3 blocks), cached prefixes."""
    attention = importlib.import_module(f"{name}.attention")
    if attention.flash_attn_problem(torch.device("cuda"), torch.bfloat16):
        pytest.skip("flash-attn is not installed (or does not import)")
    check(name, "flash_attn", "cuda", torch.bfloat16, is_prefill, atol=2e-2, block_size=256, max_len=600)


# Our triton kernels (cycle 6 and 7 carry the same file). On a CPU they run in Triton's interpreter
# (conftest.py sets TRITON_INTERPRET=1), which is slow: a few shapes, not the cross product. Between
# them: GQA groups 1, 2, 3 and 8; head_dim 64 and 128; block sizes 16 and 256 with several blocks
# per sequence (contexts up to 70 and 300 tokens); prefill with and without a cached prefix, decode.
TRITON_SHAPES = [  # block_size, heads, kv_heads, head_dim, max_len
    (16, 2, 2, 64, 70),       # group 1, up to 5 blocks
    (16, 6, 2, 128, 70),      # group 3: a group that is not a power of two
    (256, 4, 2, 128, 300),    # group 2, Qwen3-0.6B's head_dim, 2 blocks of 256
    (256, 8, 1, 64, 300),     # group 8
    (16, 4, 2, 24, 40),       # head_dim 24 and 80: not powers of two, the tiles are padded and masked
    (16, 4, 1, 80, 40),
]


@pytest.mark.parametrize("is_prefill", [True, False], ids=["prefill", "decode"])
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "bs{}-h{}-kv{}-d{}".format(*s))
def test_triton_matches_explicit_attention(shape, is_prefill):
    block_size, heads, kv_heads, head_dim, max_len = shape
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # fp32 to 1e-5: the kernels' dots run in ieee fp32 (not tf32), so only the order of the sums differs.
    check("cycle6_flash", "triton", device, torch.float32, is_prefill, atol=1e-5, block_size=block_size,
          seeds=2 if block_size == 16 else 1, heads=heads, kv_heads=kv_heads, head_dim=head_dim, max_len=max_len)


def test_triton_kernels_are_the_same_in_cycles_6_to_8():
    """Cycles 7 and 8 carry cycle 6's attention unchanged: the kernel tests above cover all three.
    (Cycle 7's runner differs: it quantizes the model.)"""
    root = Path(__file__).resolve().parents[1]
    for name in ("attention.py", "triton_attention.py", "model.py"):
        assert (root / "cycle6_flash" / name).read_text() == (root / "cycle7_int8" / name).read_text(), name
    for name in ("attention.py", "triton_attention.py", "triton_int8.py"):
        assert (root / "cycle7_int8" / name).read_text() == (root / "cycle8_graphs" / name).read_text(), name


@pytest.mark.cuda
@pytest.mark.parametrize("is_prefill", [True, False], ids=["prefill", "decode"])
def test_triton_matches_explicit_attention_in_bf16_on_cuda(is_prefill):
    check("cycle6_flash", "triton", "cuda", torch.bfloat16, is_prefill, atol=2e-2, block_size=16,
          heads=16, kv_heads=8, head_dim=128, max_len=600)


@pytest.mark.parametrize("name", FUSED)
def test_backend_choice_and_refusal(name, tiny_checkpoints, monkeypatch):
    attention = importlib.import_module(f"{name}.attention")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention.select_backend(cpu, torch.float32, None) == ("sdpa", None)
    with pytest.raises(ValueError, match="CUDA only"):
        attention.select_backend(cpu, torch.float32, "flash_attn")
    with pytest.raises(ValueError, match="fp16/bf16 only"):
        attention.select_backend(cuda, torch.float32, "flash_attn")
    with pytest.raises(ValueError, match="unknown"):
        attention.select_backend(cpu, torch.float32, "magic")
    with pytest.raises(ValueError, match="multiple of 256"):
        attention.check_block_size("flash_attn", 16)
    # On CUDA in fp32 flash_attn is out (whether or not it is installed): triton, and a note saying why.
    # select_backend only reads the device's type, so this runs without a GPU.
    backend, note = attention.select_backend(cuda, torch.float32, None)
    assert backend == "triton" and "fp16/bf16" in note
    # On the CPU, triton only in the interpreter: without it a clear error that says how.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        attention.select_backend(cpu, torch.float32, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert attention.select_backend(cpu, torch.float32, "triton") == ("triton", None)
    with pytest.raises(ValueError, match="bf16"):     # the interpreter has no bf16 arithmetic
        attention.select_backend(cpu, torch.bfloat16, "triton")
    # A head too wide for our kernels: refused when asked for, and sdpa (said why) when not.
    with pytest.raises(ValueError, match="head_dim 512 is over the 256"):
        attention.select_backend(cpu, torch.float32, "triton", head_dim=512)
    backend, note = attention.select_backend(cuda, torch.float32, None, head_dim=512)
    assert backend == "sdpa" and "head_dim 512" in note
    assert attention.select_backend(cpu, torch.float32, "triton", head_dim=80) == ("triton", None)
    llm = importlib.import_module(name).LLM(tiny_checkpoints["llama"][0], device="cpu")
    llm.generate([[1, 2, 3]], importlib.import_module(name).SamplingParams(max_tokens=2))
    assert llm.stats["attention_backend"] == "sdpa" and llm.model_runner.block_size == 16
    assert llm.stats["attention_backend_note"] is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        importlib.import_module(name).LLM(tiny_checkpoints["llama"][0], device="cpu", attention_backend="triton")


@pytest.mark.parametrize("name", FUSED)
def test_the_engine_checks_the_models_head_size_before_loading_weights(name, tmp_path, monkeypatch):
    """The ModelRunner chooses the backend once the model's config is read: a triton engine asked for
    on a 320-wide head is refused before a weight loads; a default CUDA choice falls back to sdpa, said."""
    from conftest import save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path, "qwen3", head_dim=320)
    module = importlib.import_module(name)
    loads = []
    monkeypatch.setattr(f"{name}.model_runner.load_weights", lambda *a: loads.append(a), raising=False)
    with pytest.raises(ValueError, match="head_dim 320"):
        module.LLM(str(tmp_path), device="cpu", attention_backend="triton")
    assert loads == []
    select = importlib.import_module(f"{name}.model_runner").select_backend   # what the runner calls
    assert select(torch.device("cpu"), torch.float32, "triton", 80) == ("triton", None)
    backend, note = select(torch.device("cuda"), torch.float32, None, 320)
    assert backend == "sdpa" and "head_dim 320" in note


def test_dense_layout_is_built_for_sdpa_only(tiny_llms):
    """sdpa needs the [B, Tq] layout and mask; the kernels read lengths and block tables only."""
    sdpa = tiny_llms("cycle6_flash")
    triton = tiny_llms("cycle6_flash", attention_backend="triton")
    assert sdpa.model_runner.dense_layout and not triton.model_runner.dense_layout
    seq = importlib.import_module("cycle6_flash.sequence").Sequence(
        0, None, [5, 6, 7], importlib.import_module("cycle6_flash").SamplingParams(), None)
    triton.scheduler.block_manager.allocate(seq)
    try:
        _, _, meta = triton.model_runner._prepare([seq], is_prefill=True)
    finally:
        triton.scheduler.block_manager.free(seq)
    assert meta.mask is None and meta.query_index is None
    assert meta.block_tables.dtype == meta.context_lens.dtype == meta.cu_seqlens_q.dtype == torch.int32
    assert meta.context_lens.tolist() == [3] and meta.max_seqlen_q == 3


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         min_new_tokens=0, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def check_engine_against_hf(llm, hf, name):
    """Prompt A first; then B and C, which share A's first 40 tokens (two full 16-token blocks), so
    their prefill starts after a cached prefix. Every output must be HF's greedy tokens."""
    base = [(7 * i) % 90 + 3 for i in range(40)]
    params = importlib.import_module(name).SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [[base + [50, 51]], [base + [60, 61, 62], base[:33] + [70]]]
    for batch in prompts:
        outs = llm.generate(batch, params)
        for prompt, out in zip(batch, outs):
            assert out.token_ids == hf_greedy(hf, prompt, 6)
    assert llm.stats["prefix_cache_hit_tokens"] >= 2 * 32     # B and C each found two blocks of A


@pytest.mark.parametrize("name", ["cycle6_flash"])   # cycle 7 carries the same files (test above), but int8 is not exact
def test_triton_engine_equals_hf_with_prefix_hits(name, tiny_checkpoints):
    """The whole engine on our kernels (interpreted on a CPU, compiled on a GPU): prefill, prefill
    after a cached prefix, decode across block boundaries, token for token against HF in fp32."""
    path, hf = tiny_checkpoints["qwen3"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = importlib.import_module(name).LLM(path, device=device, dtype="float32", attention_backend="triton",
                                            num_kv_blocks=64)
    check_engine_against_hf(llm, hf, name)
    assert llm.stats["attention_backend"] == "triton" and llm.stats["attention_backend_note"] is None


@pytest.mark.parametrize("head_dim", [24, 80])
def test_triton_engine_equals_hf_at_any_head_size(head_dim, tmp_path):
    """Head sizes that are not a power of two (models with 80 or 96 exist): the kernels pad the
    tile and mask it; with a cached prefix, token for token against HF in fp32."""
    from conftest import save_tiny_checkpoint

    hf = save_tiny_checkpoint(tmp_path, "qwen3", head_dim=head_dim)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = importlib.import_module("cycle6_flash").LLM(str(tmp_path), device=device, dtype="float32",
                                                      attention_backend="triton", num_kv_blocks=64)
    check_engine_against_hf(llm, hf, "cycle6_flash")
    assert llm.stats["attention_backend"] == "triton"
