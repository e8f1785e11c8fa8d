"""int8 AbsMax quantization (cycle 7): error bounds, edge cases, layers, and the engine's memory."""

import importlib

import pytest
import torch

from conftest import CYCLES, INT8_CYCLES, SMOLLM2, cycle

INT8 = [c for c in CYCLES if c in INT8_CYCLES]


def q(name):
    return importlib.import_module(f"{name}.quantization")


@pytest.mark.parametrize("name", INT8)
def test_round_trip_error_is_at_most_half_a_step(name):
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 3
    qw, scale = q(name).quantize_absmax(w)
    assert qw.dtype == torch.int8 and scale.shape == (64,)
    assert qw.abs().max() <= 127
    err = (q(name).dequantize(qw, scale) - w).abs()
    assert (err <= scale.unsqueeze(1) / 2 + 1e-6).all()
    assert (qw.abs().amax(dim=1) == 127).all()                # the largest weight of each row maps to ±127


@pytest.mark.parametrize("name", INT8)
def test_an_all_zero_row_does_not_divide_by_zero(name):
    w = torch.zeros(3, 8)
    w[1] = torch.arange(8.0) - 4
    qw, scale = q(name).quantize_absmax(w)
    assert torch.isfinite(scale).all() and (qw[0] == 0).all() and (qw[2] == 0).all()
    assert torch.equal(q(name).dequantize(qw, scale)[0], torch.zeros(8))


@pytest.mark.parametrize("matmul", ["cast", "int8pack_mm", "triton"])
@pytest.mark.parametrize("name", INT8)
def test_int8_linear_matches_float_within_the_scale_bound(name, matmul):
    gen = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(64, 32, bias=True)
    x = torch.randn(5, 64, generator=gen)
    qw, scale = q(name).quantize_absmax(lin.weight.data)
    layer = q(name).Int8Linear(qw, scale, lin.bias.data, matmul)
    got, want = layer(x), lin(x)
    # |x . (w - w_q)| <= sum|x| * scale / 2 for every output channel
    bound = x.abs().sum(dim=1, keepdim=True) * scale.unsqueeze(0) / 2
    assert ((got - want).abs() <= bound + 1e-5).all()
    # and it is exactly the float product with the dequantized weights (not some other rounding)
    dequantized = x @ q(name).dequantize(qw, scale).T + lin.bias.data
    torch.testing.assert_close(got, dequantized, atol=1e-5, rtol=1e-5)


def rounding_bound(x, qw, scale, unit):
    """How far two fp32-accumulated evaluations of x @ (qw * scale)^T can differ by rounding alone:
    each is within (K + 2) * unit * (|x| @ |qw|^T) * scale of the exact value (K products summed,
    then one multiply by the scale), so the two are within twice that of each other."""
    K = x.shape[1]
    return 2 * (K + 2) * unit * (x.abs().double() @ qw.abs().double().t()) * scale.double()


@pytest.mark.parametrize("rows", [1, 4, 5, 40], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("name", INT8)
def test_int8pack_bf16_is_the_dequantized_product_of_bf16_activations(name, rows):
    """The CPU's default path: x rounded to bf16, times the dequantized weight, summed in fp32 and
    rounded to bf16 once. Bound: that rounding (2^-8 of |x| @ |q|^T * s) and fp32's sums."""
    gen = torch.Generator().manual_seed(rows)
    qw, scale = q(name).quantize_absmax(torch.randn(48, 208, generator=gen))
    x = torch.randn(rows, 208, generator=gen)
    got = q(name).Int8Linear(qw, scale, None, "int8pack_bf16")(x)
    xb, sb = x.bfloat16().double(), scale.bfloat16().double()
    want = xb @ (qw.double() * sb.unsqueeze(1)).t()
    magnitude = (xb.abs() @ qw.abs().double().t()) * sb
    assert got.dtype == torch.float32 and ((got.double() - want).abs() <= 2.0 ** -8 * magnitude
                                           + rounding_bound(x, qw, scale, 2.0 ** -24)).all()
    with pytest.raises(ValueError, match="multiple of 16"):   # torch's kernel would crash on it
        q(name).Int8Linear(qw[:, :200].contiguous(), scale, None, "int8pack_bf16")


@pytest.mark.parametrize("rows", [1, 5, 40], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("name", INT8)
def test_w8a8_is_per_row_int8_activations_times_int8_weights(name, rows):
    """x quantized per row (AbsMax, as the weights are), then the exact int8 product: equal to
    dequantize(xq) @ dequantize(q)^T up to fp32's last multiplies, and within both halves of a step
    of the float product."""
    gen = torch.Generator().manual_seed(rows)
    qw, scale = q(name).quantize_absmax(torch.randn(48, 200, generator=gen))
    x = torch.randn(rows, 200, generator=gen) * 3
    x[0, :5] = 0
    got = q(name).Int8Linear(qw, scale, None, "w8a8")(x).double()
    xq, x_scale = q(name).quantize_absmax(x)
    w = q(name).dequantize(qw, scale).double()
    want = q(name).dequantize(xq, x_scale).double() @ w.t()
    assert (got - want).abs().max() <= 4 * 2.0 ** -24 * want.abs().max()
    bound = x_scale.double().unsqueeze(1) / 2 * w.abs().sum(1) + x.abs().double() @ (scale.double() / 2).expand(200, 48)
    assert ((got - x.double() @ w.t()).abs() <= bound + 1e-5).all()


@pytest.mark.parametrize("rows", [1, 5, 40], ids=lambda m: f"M{m}")   # decode tiles (<= 16 rows) and prefill tiles
@pytest.mark.parametrize("name", INT8)
def test_triton_int8_kernel_matches_dequantize_then_matmul(name, rows):
    """Our kernel (interpreted on a CPU) against the definition: dequantize the weight, then matmul.
    Shapes that are not multiples of any tile, so the edge masks are exercised."""
    kernel = importlib.import_module(f"{name}.triton_int8").int8_matmul
    gen = torch.Generator().manual_seed(rows)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    qw, scale = q(name).quantize_absmax(torch.randn(48, 200, generator=gen))
    x = torch.randn(rows, 200, generator=gen)
    want = x.double() @ q(name).dequantize(qw, scale).double().t()
    got = kernel(x.to(device), qw.to(device), scale.to(device)).cpu()
    assert got.dtype == torch.float32 and got.shape == (rows, 48)
    assert ((got.double() - want).abs() <= rounding_bound(x, qw, scale, 2.0 ** -24)).all()


@pytest.mark.cuda
@pytest.mark.parametrize("name", INT8)
def test_triton_int8_kernel_in_bf16_on_cuda(name):
    """bf16 activations: the kernel rounds its fp32 result to bf16 once; the cast path rounds the
    product and then the scaled product. Bound: three bf16 roundings (2^-8 each) of |x| @ |q|^T * s."""
    kernel = importlib.import_module(f"{name}.triton_int8").int8_matmul
    gen = torch.Generator().manual_seed(0)
    qw, scale = q(name).quantize_absmax(torch.randn(3072, 1024, generator=gen))
    for rows in (1, 16, 300):
        x = torch.randn(rows, 1024, generator=gen).bfloat16()
        got = kernel(x.cuda(), qw.cuda(), scale.bfloat16().cuda()).float().cpu()
        want = (x.double() @ q(name).dequantize(qw, scale.bfloat16().float()).double().t())
        bound = 3 * 2.0 ** -8 * (x.abs().double() @ qw.abs().double().t()) * scale.double()
        assert got.dtype == torch.float32 and ((got.double() - want).abs() <= bound + 1e-6).all()


@pytest.mark.parametrize("name", INT8)
def test_int8_path_is_a_fixed_choice_by_device(name, monkeypatch):
    """No timing: a CPU with AVX512-BF16 takes int8pack_bf16, another the cast path (measured in
    chapter 7), CUDA our triton kernel; int8_matmul overrides; an unknown or unusable choice is a
    clear error."""
    choose = q(name).choose_matmul
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native, path in ((True, "int8pack_bf16"), (False, "cast")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        for dtype in (torch.float32, torch.bfloat16):
            assert [choose(cpu, dtype, None) for _ in range(3)] == [(path, None)] * 3
            assert choose(cuda, dtype, None) == ("triton", None)   # reads only the device type: no GPU needed
    assert choose(cpu, torch.float32, "w8a8") == ("w8a8", None)
    assert choose(cpu, torch.float32, "int8pack_mm") == ("int8pack_mm", None)
    with pytest.raises(ValueError, match="unknown int8_matmul"):
        choose(cpu, torch.float32, "fast")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        choose(cpu, torch.float32, "triton")


@pytest.mark.parametrize("name", INT8)
def test_weights_are_int8_and_take_a_quarter_of_fp32(name, tiny_checkpoints):
    path = tiny_checkpoints["qwen3"][0]
    llm = cycle(name).LLM(path, device="cpu")
    fp = cycle("cycle6_flash").LLM(path, device="cpu")
    llm.generate([[1, 2, 3]], cycle(name).SamplingParams(max_tokens=2))
    fp.generate([[1, 2, 3]], cycle("cycle6_flash").SamplingParams(max_tokens=2))
    assert not any(isinstance(m, torch.nn.Linear) for m in llm.model_runner.model.modules())
    ratio = llm.stats["weight_bytes"] / fp.stats["weight_bytes"]
    assert ratio < 0.3, ratio                                 # int8 + scales + fp32 norms
    assert llm.stats["int8_matmul"] == q(name).default_matmul(torch.device("cpu"))   # the CPU's measured path
    assert llm.stats["int8_matmul_note"] is None


@pytest.mark.slow
@pytest.mark.parametrize("name", INT8)
def test_quality_against_cycle6_on_real_smollm2(name):
    """Teacher-forced next-token agreement and perplexity against the float engine."""
    from common.benchmark.quality import compare
    result = compare(cycle("cycle6_flash").LLM(SMOLLM2, device="cpu"), cycle(name).LLM(SMOLLM2, device="cpu"))
    assert result["next_token_agreement"] >= 0.9, result
    assert result["perplexity_candidate"] < result["perplexity_reference"] * 1.1, result


@pytest.mark.parametrize("name", INT8)
def test_triton_int8_engine_gives_the_cast_paths_tokens(name, tiny_llms):
    """End to end (the kernel interpreted on a CPU): the same int8 weights through our kernel and
    through the cast path differ only by rounding, so greedy tokens on the tiny model are equal."""
    prompts = [[5, 17, 42, 9, 33], list(range(10, 30))]
    params = cycle(name).SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    triton = tiny_llms(name, "qwen3", int8_matmul="triton")
    cast = tiny_llms(name, "qwen3", int8_matmul="cast")
    got = [o.token_ids for o in triton.generate(prompts, params)]
    assert triton.stats["int8_matmul"] == "triton"
    assert got == [o.token_ids for o in cast.generate(prompts, params)]
    kernel = importlib.import_module(f"{name}.triton_int8").int8_matmul
    model = triton.model_runner.model
    # cycle 11 keeps the (vocab-parallel) lm_head's and embedding's tables one level down
    lm_head, embed = getattr(model.lm_head, "linear", model.lm_head), model.model.embed_tokens
    embed = getattr(embed, "embedding", embed)
    assert lm_head.matmul is kernel                                   # the tied lm_head too
    assert lm_head.qweight is embed.qweight


@pytest.mark.parametrize("name", INT8)
def test_quantization_none_is_cycle_6_again(name, tiny_llms):
    """quantization=None keeps the float checkpoint: the same tokens and weight bytes as cycle 6,
    and the int8 engine's weights are smaller; a bad combination is refused before loading."""
    prompts = [[5, 6, 7, 8, 9], [11, 3, 4]]
    params = lambda c: cycle(c).SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    float_llm = tiny_llms(name, quantization=None)
    reference = tiny_llms("cycle6_flash")
    got = [o.token_ids for o in float_llm.generate(prompts, params(name))]
    assert got == [o.token_ids for o in reference.generate(prompts, params("cycle6_flash"))]
    assert float_llm.stats["quantization"] is None and float_llm.stats["int8_matmul"] is None
    assert float_llm.stats["weight_bytes"] == reference.stats["weight_bytes"]
    int8 = tiny_llms(name)
    int8.generate(prompts, params(name))
    assert int8.stats["quantization"] == "int8" and int8.stats["weight_bytes"] < reference.stats["weight_bytes"]
    for bad in (dict(quantization="int4"), dict(quantization=None, int8_matmul="cast")):
        with pytest.raises(ValueError, match="quantization"):
            cycle(name).LLM("/nonexistent/model", device="cpu", **bad)
