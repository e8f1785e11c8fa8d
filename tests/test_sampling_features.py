"""The sampler's vLLM features against references written from their definitions, every cycle.

Each reference below is a plain loop over the vocabulary, written from the definition (vLLM's and
OpenAI's docs), not from the sampler's code: repetition penalty divides a positive logit / multiplies
a negative one of every token seen in the prompt or output; frequency and presence penalties
subtract per output occurrence / once per output token; min_p keeps the tokens at least min_p times
as likely as the top one, after temperature; min_tokens forbids EOS and stop_token_ids.
"""

import importlib
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import CYCLES

EOS = 3
CPU = torch.device("cpu")


def parts(name):
    return importlib.import_module(f"{name}.sampler"), importlib.import_module(f"{name}.sampling_params").SamplingParams


def seq(params, prompt, output, generator=None):
    return SimpleNamespace(sampling_params=params, generator=generator, token_ids=list(prompt) + list(output),
                           num_prompt_tokens=len(prompt))


def reference_penalties(logits: list[float], prompt, output, rep, freq, pres) -> list[float]:
    out = []
    for token, logit in enumerate(logits):
        count = output.count(token)
        if token in prompt or count:
            logit = logit / rep if logit > 0 else logit * rep
        logit -= freq * count
        if count:
            logit -= pres
        out.append(logit)
    return out


def reference_min_p_kept(logits: list[float], temperature: float, min_p: float) -> set[int]:
    scaled = [x / temperature for x in logits]
    total = sum(math.exp(x) for x in scaled)
    probs = [math.exp(x) / total for x in scaled]
    return {t for t, p in enumerate(probs) if p >= min_p * max(probs)}


@pytest.mark.parametrize("name", CYCLES)
def test_penalties_match_the_definition(name):
    sampler_mod, SP = parts(name)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 12, generator=gen) * 3          # both signs
    cases = [(SP(repetition_penalty=1.7), [1, 2, 2], [5, 5, 7]),
             (SP(frequency_penalty=0.6, presence_penalty=-0.4), [1, 9], [5, 5, 5, 0]),
             (SP(repetition_penalty=0.8, frequency_penalty=-1.1, presence_penalty=1.3), [4, 11], [11, 2, 2])]
    got = sampler_mod.apply_penalties(logits.clone(), [seq(p, pr, out) for p, pr, out in cases])
    for row, (p, prompt, output) in enumerate(cases):
        want = reference_penalties(logits[row].tolist(), prompt, output, p.repetition_penalty,
                                   p.frequency_penalty, p.presence_penalty)
        assert torch.allclose(got[row], torch.tensor(want), atol=1e-5), (row, got[row], want)


@pytest.mark.parametrize("name", CYCLES)
def test_greedy_picks_the_argmax_of_the_penalized_logits(name):
    sampler_mod, SP = parts(name)
    logits = torch.tensor([[0.0, 4.0, 3.5, -1.0, 1.0]])
    p = SP(temperature=0, repetition_penalty=2.0)           # token 1 was seen: 4 / 2 = 2 < 3.5
    out = sampler_mod.Sampler(CPU, 0)(logits, [seq(p, [1], [])])
    assert out.token_ids == [2]
    plain = sampler_mod.Sampler(CPU, 0)(logits, [seq(SP(temperature=0), [1], [])])
    assert plain.token_ids == [1]


@pytest.mark.parametrize("name", CYCLES)
def test_min_tokens_masks_eos_and_stop_token_ids_until_reached(name):
    sampler_mod, SP = parts(name)
    sampler = sampler_mod.Sampler(CPU, 0, eos_token_ids=[EOS])
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0, 8.0]])      # EOS (3) first, then token 4
    p = SP(temperature=0, min_tokens=2, stop_token_ids=[4])
    assert sampler(logits, [seq(p, [0], [1])]).token_ids == [2]     # 1 < 2 tokens: 3 and 4 masked
    assert sampler(logits, [seq(p, [0], [1, 1])]).token_ids == [EOS]  # reached: nothing masked
    assert sampler(logits, [seq(SP(temperature=0), [0], [])]).token_ids == [EOS]


@pytest.mark.parametrize("name", CYCLES)
@pytest.mark.parametrize("temperature,min_p", [(1.0, 0.2), (2.5, 0.2), (0.5, 0.05)])
def test_min_p_keeps_the_reference_set_after_temperature(name, temperature, min_p):
    sampler_mod, SP = parts(name)
    logits = torch.tensor([[2.0, 1.5, 0.5, 0.0, -1.0, -3.0]])
    p = SP(temperature=temperature, min_p=min_p)
    masked = sampler_mod._min_p(logits / temperature, [p])
    kept = {t for t in range(6) if torch.isfinite(masked[0, t])}
    assert kept == reference_min_p_kept(logits[0].tolist(), temperature, min_p)
    draws = sampler_mod.Sampler(CPU, 0)(logits.repeat(2000, 1), [seq(p, [0], [])] * 2000).token_ids
    assert set(draws) <= kept and len(set(draws)) > 1


@pytest.mark.parametrize("name", CYCLES)
def test_a_batch_that_asks_for_nothing_is_not_copied(name):
    """The fast path: no min_tokens, penalties or logprobs in the batch -> the logits go to the
    plain sampler as they are (the same tensor), and no logprobs are made."""
    sampler_mod, SP = parts(name)
    sampler = sampler_mod.Sampler(CPU, 0, eos_token_ids=[EOS])
    logits = torch.randn(2, 8)
    seqs = [seq(SP(), [1], [2]), seq(SP(temperature=0, min_tokens=1), [1], [2])]   # min_tokens reached
    assert sampler._process(logits, seqs, [s.sampling_params for s in seqs]) is logits
    assert sampler(logits, seqs).logprobs is None


@pytest.mark.parametrize("name", CYCLES)
def test_tiny_temperature_is_greedy(name):
    sampler_mod, SP = parts(name)
    logits = torch.tensor([[0.1, 3.0, 0.2]] * 50)
    out = sampler_mod.Sampler(CPU, 0)(logits, [seq(SP(temperature=1e-6), [0], [])] * 50)
    assert out.token_ids == [1] * 50
    assert SP(temperature=1e-45).greedy and not SP(temperature=1e-4).greedy


@pytest.mark.parametrize("name", CYCLES)
def test_logprobs_are_the_raw_log_softmax(name):
    """vLLM's default: logprobs of the model's output, before penalties and temperature."""
    sampler_mod, SP = parts(name)
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    params = [SP(temperature=0.7, logprobs=3, repetition_penalty=1.5, seed=1), SP(), SP(temperature=0, logprobs=0)]
    out = sampler_mod.Sampler(CPU, 0)(logits, [seq(p, [0, 1], [2]) for p in params])
    want = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[1] is None
    assert list(out.logprobs[2]) == [out.token_ids[2]]           # 0: the chosen token's only
    first = out.logprobs[0]
    top3 = want[0].topk(3).indices.tolist()
    assert list(first)[:3] == top3                                # most likely first
    assert out.token_ids[0] in first and len(first) == 3 + (out.token_ids[0] not in top3)
    for token, value in first.items():
        assert abs(value - want[0, token].item()) < 1e-6


@pytest.mark.parametrize("name", CYCLES)
@pytest.mark.parametrize("bad", [dict(temperature=float("nan")), dict(temperature=float("inf")),
                                 dict(min_p=1.5), dict(presence_penalty=2.5), dict(frequency_penalty=-3),
                                 dict(repetition_penalty=0), dict(min_tokens=-1), dict(min_tokens=65),
                                 dict(stop_token_ids=[1, -2]), dict(stop_token_ids=5), dict(logprobs=-1),
                                 dict(logprobs=21), dict(prompt_logprobs=1.5), dict(skip_special_tokens=None)])
def test_bad_values_are_refused_by_name(name, bad):
    _, SP = parts(name)
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        SP(**bad)


# --- through the engines: the same behaviour in every cycle -------------------------------------

from conftest import INT8_CYCLES, cycle  # noqa: E402

FLOAT = {name: ({"quantization": None} if name in INT8_CYCLES else {}) for name in CYCLES}
PROMPT = [5, 17, 42, 9, 77, 3, 120, 64]


def greedy_tokens(llm, SP, **fields):
    out = llm.generate([PROMPT], SP(temperature=0, max_tokens=8, ignore_eos=True, **fields))[0]
    return out.token_ids, out.finish_reason


@pytest.mark.parametrize("name", CYCLES)
def test_stop_token_ids_and_min_tokens_in_the_engine(name, tiny_llms, one_thread):
    llm = tiny_llms(name, dtype="float32", **FLOAT[name])
    SP = cycle(name).SamplingParams
    plain, _ = greedy_tokens(llm, SP)
    stop = next(t for i, t in enumerate(plain) if i >= 1 and t not in plain[:i])
    cut = plain.index(stop) + 1
    assert greedy_tokens(llm, SP, stop_token_ids=[stop]) == (plain[:cut], "stop")   # kept in token_ids
    first = plain[0]
    tokens, _ = greedy_tokens(llm, SP, stop_token_ids=[first], min_tokens=3)
    assert first not in tokens[:3]                       # masked until 3 tokens were generated


@pytest.mark.parametrize("name", CYCLES)
def test_penalized_greedy_tokens_are_the_same_in_every_cycle(name, tiny_llms, one_thread):
    """cycle 1 is the reference; a penalty changes the tokens, identically in every cycle."""
    fields = dict(repetition_penalty=1.8, frequency_penalty=0.5, presence_penalty=0.3)
    ref_llm = tiny_llms("cycle1_naive", dtype="float32")
    want, _ = greedy_tokens(ref_llm, cycle("cycle1_naive").SamplingParams, **fields)
    plain, _ = greedy_tokens(ref_llm, cycle("cycle1_naive").SamplingParams)
    assert want != plain
    llm = tiny_llms(name, dtype="float32", **FLOAT[name])
    assert greedy_tokens(llm, cycle(name).SamplingParams, **fields)[0] == want


@pytest.mark.parametrize("name", [c for c in CYCLES if c >= "cycle4"])
def test_include_stop_str_in_output(name, char_checkpoint, one_thread):
    llm = cycle(name).LLM(char_checkpoint, device="cpu", dtype="float32", **FLOAT[name])
    SP = cycle(name).SamplingParams
    full = llm.generate(["Hello"], SP(temperature=0, max_tokens=12, ignore_eos=True))[0].text
    stop = full[4:6]
    at = full.index(stop)
    cut = llm.generate(["Hello"], SP(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))[0]
    kept = llm.generate(["Hello"], SP(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop],
                                      include_stop_str_in_output=True))[0]
    assert cut.text == full[:at] and kept.text == full[:at + len(stop)]
    assert cut.finish_reason == kept.finish_reason == "stop"
