"""Sampler unit tests, run against every cycle's copy of the sampler."""

import importlib
from types import SimpleNamespace

import pytest
import torch

from conftest import CYCLES


def parts(name):
    sampler = importlib.import_module(f"{name}.sampler")
    params = importlib.import_module(f"{name}.sampling_params")
    return sampler, params.SamplingParams


def rows(params, generators=None):
    """What the sampler reads of a Sequence, with a one-token prompt and no output yet."""
    generators = generators or [None] * len(params)
    return [SimpleNamespace(sampling_params=p, generator=g, token_ids=[0], num_prompt_tokens=1)
            for p, g in zip(params, generators)]


def draw(sampler, logits, params, generators=None):
    return sampler(logits, rows(params, generators)).token_ids


@pytest.mark.parametrize("name", CYCLES)
def test_greedy_takes_the_argmax(name):
    sampler_mod, SP = parts(name)
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 4.9]])
    assert draw(sampler_mod.Sampler(torch.device("cpu"), 0), logits, [SP(temperature=0)] * 2) == [1, 0]


@pytest.mark.parametrize("name", CYCLES)
def test_top_k_and_top_p_masks(name):
    sampler_mod, SP = parts(name)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    masked = sampler_mod._top_k_top_p(logits.clone(), [SP(top_k=2)])
    assert torch.isinf(masked[0, 2:]).all() and torch.isfinite(masked[0, :2]).all()
    masked = sampler_mod._top_k_top_p(logits.clone(), [SP(top_p=0.79)])   # 0.5 + 0.3 reaches it
    assert torch.isfinite(masked[0, :2]).all() and torch.isinf(masked[0, 2:]).all()
    masked = sampler_mod._top_k_top_p(logits.clone(), [SP(top_p=0.81)])   # needs the third token too
    assert torch.isfinite(masked[0, :3]).all() and torch.isinf(masked[0, 3])
    masked = sampler_mod._top_k_top_p(logits.clone(), [SP(top_p=0.01)])   # the top token always stays
    assert torch.isfinite(masked[0, 0]) and torch.isinf(masked[0, 1:]).all()
    masked = sampler_mod._top_k_top_p(logits.clone(), [SP(top_k=-1)])
    assert torch.isfinite(masked).all()


@pytest.mark.parametrize("name", CYCLES)
def test_sampled_frequencies_follow_temperature(name):
    sampler_mod, SP = parts(name)
    sampler = sampler_mod.Sampler(torch.device("cpu"), 0)
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(4000, 1)
    def freq(t):
        toks = torch.tensor(draw(sampler, logits, [SP(temperature=t)] * 4000))
        return torch.bincount(toks, minlength=3).float() / 4000
    assert torch.allclose(freq(1.0), torch.tensor([0.7, 0.2, 0.1]), atol=0.03)
    assert freq(0.3)[0] > 0.9          # a low temperature sharpens towards the argmax
    assert freq(5.0)[0] < 0.45         # a high one flattens


@pytest.mark.parametrize("name", CYCLES)
def test_seed_makes_a_row_independent_of_its_batch(name):
    sampler_mod, SP = parts(name)
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    def gen(seed):
        return torch.Generator().manual_seed(seed)
    sp = SP(temperature=1.0, seed=7)
    alone = [draw(sampler_mod.Sampler(torch.device("cpu"), 1), logits[1:2], [sp], [gen(7)])[0] for _ in range(2)]
    batched = draw(sampler_mod.Sampler(torch.device("cpu"), 2), logits, [SP(), sp, SP()], [None, gen(7), None])[1]
    assert alone[0] == alone[1] == batched
