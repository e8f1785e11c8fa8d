"""The shared suite: every cycle in CYCLES against the HF oracle, against cycle 1, and on bad input."""

import pytest
import torch

from conftest import CYCLES, EXACT_CYCLES, INT8_CYCLES, SMOLLM2, cycle

TINY = ["qwen3", "qwen3_untied", "llama"]
PROMPTS = [[5, 17, 42, 9, 33], list(range(10, 21)), [7] * 3 + list(range(40, 54))]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """HF's model, its own KV cache, greedy, never stopping at EOS (like ignore_eos)."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         min_new_tokens=0, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def greedy(c, max_tokens=12, **kw):
    return c.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.mark.parametrize("ckpt", TINY)
@pytest.mark.parametrize("name", EXACT_CYCLES)
def test_greedy_tokens_equal_hf_on_tiny_models(name, ckpt, tiny_llms, tiny_checkpoints):
    hf = tiny_checkpoints[ckpt][1]
    llm = tiny_llms(name, ckpt)
    outs = llm.generate(PROMPTS, greedy(cycle(name)))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(hf, prompt, 12)
        assert out.prompt_token_ids == prompt
        assert out.finish_reason == "length"


@pytest.mark.parametrize("name", CYCLES)
def test_seeded_sampling_is_reproducible_and_matches_cycle1(name, tiny_llms):
    c, c1 = cycle(name), cycle("cycle1_naive")
    def params(mod, seed):
        return mod.SamplingParams(temperature=0.9, top_k=50, top_p=0.95, max_tokens=10, ignore_eos=True, seed=seed)
    llm = tiny_llms(name, "qwen3")
    first = [o.token_ids for o in llm.generate(PROMPTS, [params(c, s) for s in (1, 2, 3)])]
    again = [o.token_ids for o in llm.generate(PROMPTS, [params(c, s) for s in (1, 2, 3)])]
    assert first == again
    assert first[0] != [o.token_ids for o in llm.generate(PROMPTS[:1], params(c, 99))][0]
    if name in EXACT_CYCLES:
        ref = [o.token_ids for o in tiny_llms("cycle1_naive", "qwen3").generate(PROMPTS, [params(c1, s) for s in (1, 2, 3)])]
        assert first == ref


@pytest.mark.parametrize("name", CYCLES)
def test_more_requests_than_a_batch_keep_order_and_lengths(name, tiny_llms):
    c = cycle(name)
    llm = tiny_llms(name, "llama", max_num_seqs=2)
    prompts = [[10 + i] * (3 + 2 * i) for i in range(5)]
    params = [greedy(c, max_tokens=2 + i) for i in range(5)]
    outs = llm.generate(prompts, params)
    assert [len(o.token_ids) for o in outs] == [2, 3, 4, 5, 6]
    assert [o.prompt_token_ids for o in outs] == prompts
    for o in outs:
        assert 0 < o.metrics.ttft_s <= o.metrics.latency_s
    if name in EXACT_CYCLES:
        alone = [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
        assert [o.token_ids for o in outs] == alone


@pytest.mark.parametrize("name", CYCLES)
def test_stops_at_eos_and_keeps_it(name, tiny_llms):
    c = cycle(name)
    llm = tiny_llms(name, "qwen3")
    free = llm.generate(PROMPTS[1], greedy(c, max_tokens=8))[0].token_ids
    eos = free[3]
    saved = set(llm.eos_token_ids)
    llm.eos_token_ids.clear()                  # in place: the OutputProcessor checks this same set
    llm.eos_token_ids.add(eos)
    try:
        out = llm.generate(PROMPTS[1], c.SamplingParams(temperature=0, max_tokens=8))[0]
        ignored = llm.generate(PROMPTS[1], greedy(c, max_tokens=8))[0]
    finally:
        llm.eos_token_ids.clear()
        llm.eos_token_ids.update(saved)
    stop = free.index(eos)
    assert out.token_ids == free[:stop + 1] and out.finish_reason == "stop"
    assert ignored.token_ids == free and ignored.finish_reason == "length"


@pytest.mark.parametrize("name", CYCLES)
def test_stats_are_reported(name, tiny_llms):
    llm = tiny_llms(name, "qwen3")
    outs = llm.generate(PROMPTS, greedy(cycle(name), max_tokens=5))
    s = llm.stats
    for key in ("weight_bytes", "kv_cache_peak_bytes", "peak_memory_bytes", "output_tokens", "wall_s"):
        assert key in s
    assert s["output_tokens"] == sum(len(o.token_ids) for o in outs) == 15
    model = llm.model_runner.model   # on an x86 CPU, linear weights are packed for oneDNN: buffers, not Parameters
    packed = sum(t.numel() for n, t in model.state_dict().items() if n.endswith("packed_weight"))
    params = (sum(p.numel() for p in model.parameters()) + packed) * 4
    if name not in INT8_CYCLES:
        assert s["weight_bytes"] == params
    assert s["peak_memory_bytes"] > 0 and s["wall_s"] > 0


BAD_INPUTS = [
    ("empty list", lambda c: ([], None), ValueError, "empty"),
    ("empty string", lambda c: ([""], None), ValueError, "empty"),
    ("empty token list", lambda c: ([[]], None), ValueError, "empty"),
    ("id too large", lambda c: ([[1, 2, 100000]], None), ValueError, "vocabulary"),
    ("negative id", lambda c: ([[1, -3]], None), ValueError, "vocabulary"),
    ("float id", lambda c: ([[1, 2.5]], None), TypeError, "int"),
    ("too long", lambda c: ([[5] * 500], c.SamplingParams(max_tokens=20)), ValueError, "allows"),
    ("wrong prompt type", lambda c: ([3.5], None), TypeError, "prompt 0"),
    ("prompts not a list", lambda c: (42, None), TypeError, "prompts"),
    ("params count", lambda c: ([[1, 2], [3, 4]], [c.SamplingParams()] * 3), ValueError, "3 sampling params"),
    ("params type", lambda c: ([[1, 2]], [{"temperature": 0}]), TypeError, "SamplingParams"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
@pytest.mark.parametrize("name", CYCLES)
def test_bad_input_is_refused_and_engine_stays_usable(name, case, tiny_llms):
    c = cycle(name)
    llm = tiny_llms(name, "qwen3")
    _, make, error, words = case
    prompts, params = make(c)
    with pytest.raises(error, match=words):
        llm.generate(prompts, params)
    assert len(llm.generate([[5, 6, 7]], greedy(c, max_tokens=3))[0].token_ids) == 3


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"),
])
@pytest.mark.parametrize("name", CYCLES)
def test_invalid_sampling_params_are_refused(name, kwargs, words):
    with pytest.raises(ValueError, match=words):
        cycle(name).SamplingParams(**kwargs)


CHAT = ["What is the capital of France?", "Name three primary colors.",
        "Write a haiku about the sea.", "What is 12 times 12?"]


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_hf):
    """HF generate's greedy tokens on real SmolLM2 weights, stopping at EOS like our engines."""
    source, model = smollm2_hf
    from common.engine.model_source import eos_token_ids, load_tokenizer
    tok = load_tokenizer(source)
    eos = eos_token_ids(source, tok)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in CHAT]
    refs = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                             eos_token_id=eos, pad_token_id=eos[0])[0, ids.shape[1]:].tolist()
        if any(t in eos for t in out):  # keep the EOS, drop HF's padding after it
            out = out[:next(i for i, t in enumerate(out) if t in eos) + 1]
        refs.append(out)
    return prompts, refs


@pytest.mark.slow
@pytest.mark.parametrize("name", EXACT_CYCLES)
def test_greedy_tokens_equal_hf_on_real_smollm2(name, smollm2_reference):
    prompts, refs = smollm2_reference
    llm = cycle(name).LLM(SMOLLM2, device="cpu")
    outs = llm.generate(prompts, cycle(name).SamplingParams(temperature=0, max_tokens=24))
    assert [o.token_ids for o in outs] == refs
    assert "Paris" in outs[0].text
