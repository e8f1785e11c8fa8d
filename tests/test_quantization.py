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


@pytest.mark.parametrize("matmul", ["cast", "int8pack_mm"])
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
    assert torch.allclose(layer(x), q(name).Int8Linear(qw, scale, lin.bias.data, "cast")(x), atol=1e-4)


@pytest.mark.parametrize("name", INT8)
def test_weights_are_int8_and_take_a_quarter_of_fp32(name, tiny_checkpoints):
    path = tiny_checkpoints["qwen3"][0]
    llm = cycle(name).LLM(path, device="cpu")
    fp = cycle("cycle6_flash").LLM(path, device="cpu")
    llm.generate([[1, 2, 3]], cycle(name).SamplingParams(max_tokens=2))
    fp.generate([[1, 2, 3]], cycle("cycle6_flash").SamplingParams(max_tokens=2))
    assert not any(isinstance(m, torch.nn.Linear) for m in llm.model.modules())
    ratio = llm.stats["weight_bytes"] / fp.stats["weight_bytes"]
    assert ratio < 0.3, ratio                                 # int8 + scales + fp32 norms
    assert llm.stats["int8_matmul"] in ("cast", "int8pack_mm")


@pytest.mark.slow
@pytest.mark.parametrize("name", INT8)
def test_quality_against_cycle6_on_real_smollm2(name):
    """Teacher-forced next-token agreement and perplexity against the float engine."""
    from common.quality import compare
    result = compare(cycle("cycle6_flash").LLM(SMOLLM2, device="cpu"), cycle(name).LLM(SMOLLM2, device="cpu"))
    assert result["next_token_agreement"] >= 0.9, result
    assert result["perplexity_candidate"] < result["perplexity_reference"] * 1.1, result
