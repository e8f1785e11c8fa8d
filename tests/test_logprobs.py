"""Logprobs: the OpenAI forms (common/serving/logprobs.py), and the engine's against HF's log_softmax."""

import math

import pytest

from common.serving.logprobs import chat_logprobs, completion_logprobs, echo_completion_logprobs

WORDS = {1: "Hello", 2: ",", 3: " world", 4: "!", 5: "\u00e9", 6: "x"}
decode = WORDS.__getitem__


def test_completion_form_lists_every_position():
    lps = [{3: -0.1, 6: -2.5}, {6: -0.3, 5: -1.0, 4: -4.0}]      # the chosen 4 is outside the top 2
    out = completion_logprobs([3, 4], lps, decode)
    assert out["tokens"] == [" world", "!"]
    assert out["token_logprobs"] == [-0.1, -4.0]
    assert out["top_logprobs"] == [{" world": -0.1, "x": -2.5}, {"x": -0.3, "\u00e9": -1.0, "!": -4.0}]
    assert out["text_offset"] == [0, 6]


def test_echo_puts_the_prompt_first_with_none():
    prompt = [1, 2]
    out = echo_completion_logprobs(prompt, [None, {2: -0.5}], [3], [{3: -0.25}], decode)
    assert out["tokens"] == ["Hello", ",", " world"]
    assert out["token_logprobs"] == [None, -0.5, -0.25]
    assert out["top_logprobs"][0] is None
    assert out["text_offset"] == [0, 5, 6]


def test_offsets_start_where_a_streamed_chunk_starts_and_minus_inf_is_finite():
    out = completion_logprobs([4], [{4: -math.inf}], decode, text_offset=11)
    assert out["text_offset"] == [11]
    assert out["token_logprobs"] == [-9999.0]
    assert completion_logprobs([], [], decode)["text_offset"] == []


def test_chat_form_has_exactly_k_alternatives_and_bytes():
    lps = [{6: -0.3, 5: -1.0, 4: -4.0}]                           # top 2, then the chosen 4
    out = chat_logprobs([4], lps, decode, top_logprobs=2)
    (entry,) = out["content"]
    assert entry["token"] == "!" and entry["logprob"] == -4.0 and entry["bytes"] == [33]
    assert [t["token"] for t in entry["top_logprobs"]] == ["x", "\u00e9"]
    assert entry["top_logprobs"][1]["bytes"] == [0xC3, 0xA9]
    assert chat_logprobs([4], lps, decode)["content"][0]["top_logprobs"] == []


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError):
        completion_logprobs([1, 2], [None], decode)
    with pytest.raises(ValueError):
        chat_logprobs([1], [], decode)


# --- the engine's logprobs against HF's log_softmax over the same weights ----------------------

import torch  # noqa: E402

from conftest import CYCLES, INT8_CYCLES, SMOLLM2, cycle  # noqa: E402

LAST = CYCLES[-1]
FLOAT = {name: ({"quantization": None} if name in INT8_CYCLES else {}) for name in CYCLES}
PROMPTS = [[5, 17, 42, 9, 77, 3, 120, 64, 11, 8], [300, 12, 7]]


def hf_log_softmax(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row p is HF's log-distribution of the token after ids[:p + 1]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def assert_position(entry: dict, want: torch.Tensor, token: int, k: int, atol: float) -> None:
    assert abs(entry[token] - want[token].item()) < atol
    assert list(entry)[:k] == want.topk(k).indices.tolist()          # the top-k, most likely first
    for t, v in entry.items():
        assert abs(v - want[t].item()) < atol


def check_against_hf(out, model, k: int, prompt_k: int, atol: float = 1e-4) -> None:
    ids = out.prompt_token_ids + out.token_ids
    want = hf_log_softmax(model, ids)
    P = len(out.prompt_token_ids)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == P
    for p in range(1, P):
        assert_position(out.prompt_logprobs[p], want[p - 1], ids[p], prompt_k, atol)
    assert len(out.logprobs) == len(out.token_ids)
    for j, token in enumerate(out.token_ids):
        assert_position(out.logprobs[j], want[P - 1 + j], token, k, atol)


@pytest.mark.parametrize("name", CYCLES)
def test_logprobs_equal_hf_on_a_tiny_model(name, tiny_llms, tiny_checkpoints, one_thread):
    llm = tiny_llms(name, dtype="float32", **FLOAT[name])
    SP = cycle(name).SamplingParams
    asks = SP(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    plain = SP(temperature=0, max_tokens=4, ignore_eos=True)
    outs = llm.generate(PROMPTS, [asks, plain])
    check_against_hf(outs[0], tiny_checkpoints["qwen3"][1], k=3, prompt_k=2)
    assert outs[1].logprobs is None and outs[1].prompt_logprobs is None   # only who asks
    again = llm.generate(PROMPTS, plain)                                  # asking changes no token
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]


@pytest.mark.parametrize("name", [c for c in CYCLES if c >= "cycle5"])
def test_prompt_logprobs_skip_the_prefix_cache(name, tiny_llms, tiny_checkpoints, one_thread):
    """The first request fills the prefix cache with the prompt; the second asks for prompt
    logprobs, so it must compute every prompt position anyway."""
    llm = tiny_llms(name, dtype="float32", block_size=4, **FLOAT[name]) if name < "cycle6" else \
        tiny_llms(name, dtype="float32", **FLOAT[name])
    SP = cycle(name).SamplingParams
    prompt = list(range(40, 80))
    llm.generate([prompt], SP(temperature=0, max_tokens=2))
    out = llm.generate([prompt], SP(temperature=0, max_tokens=2, prompt_logprobs=1, logprobs=1))[0]
    check_against_hf(out, tiny_checkpoints["qwen3"][1], k=1, prompt_k=1)


@pytest.mark.parametrize("name", [c for c in CYCLES if c >= "cycle4"])
def test_streamed_outputs_carry_each_tokens_logprobs(name, tiny_llms, one_thread):
    llm = tiny_llms(name, dtype="float32", **FLOAT[name])
    SP = cycle(name).SamplingParams
    rid = llm.add_request(PROMPTS[0], SP(temperature=0, max_tokens=3, ignore_eos=True, logprobs=2, prompt_logprobs=0))
    deltas = []
    while llm.has_unfinished_requests():
        deltas += [o for o in llm.step() if o.request_id == rid]
    first, final = deltas[0], deltas[-1]
    assert len(first.prompt_logprobs) == len(PROMPTS[0])
    assert all(d.prompt_logprobs is None for d in deltas[1:-1])
    for d in deltas[:-1]:
        assert len(d.logprobs) == 1 and d.new_token_ids[0] in d.logprobs[0]
    assert final.finished and len(final.logprobs) == 3 == len(final.token_ids)
    assert [d.logprobs[-1] for d in deltas] == final.logprobs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cycle1_naive", "cycle4_batching", LAST])
def test_logprobs_equal_hf_on_real_smollm2(name, smollm2_hf):
    source, model = smollm2_hf
    llm = cycle(name).LLM(SMOLLM2, device="cpu", dtype="float32", **FLOAT[name])
    sp = cycle(name).SamplingParams(temperature=0, max_tokens=6, logprobs=5, prompt_logprobs=5)
    out = llm.generate(["The capital of France is"], sp)[0]
    check_against_hf(out, model, k=5, prompt_k=5)


# --- through the server: the OpenAI forms of a real response -------------------------------------

import httpx  # noqa: E402

from test_server import MODEL, TEMPLATE, TIMEOUT_S, serve  # noqa: E402

SERVED = "cycle6_flash"


@pytest.fixture(scope="module")
def served(char_checkpoint):
    from common.serving.engine_client import InProcessEngine
    from common.serving.server import build_app

    llm = cycle(SERVED).LLM(char_checkpoint, device="cpu", dtype="float32")
    llm.tokenizer.chat_template = TEMPLATE
    reference = cycle(SERVED).LLM(char_checkpoint, device="cpu", dtype="float32")
    with serve(build_app(InProcessEngine(llm), MODEL)) as base:
        yield base, reference


def post(base, path, body):
    response = httpx.post(base + path, json={"model": MODEL, **body}, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response.json()


def test_echo_with_logprobs_is_lm_evals_loglikelihood_form(served, one_thread):
    """lm-eval's local-completions: token-id prompts, echo, logprobs 1, max_tokens 1."""
    base, reference = served
    prompts = [[40, 41, 42, 43, 44], [50, 60, 70]]
    body = post(base, "/v1/completions", {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1,
                                          "temperature": 0})
    want = reference.generate(prompts, cycle(SERVED).SamplingParams(temperature=0, max_tokens=1, logprobs=1,
                                                                    prompt_logprobs=1))
    for choice in body["choices"]:
        out = want[choice["index"]]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(out.prompt_token_ids) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        wanted = [d[t] for d, t in zip(out.prompt_logprobs[1:] + out.logprobs,
                                       out.prompt_token_ids[1:] + out.token_ids)]
        assert lp["token_logprobs"][1:] == pytest.approx(wanted, abs=1e-5)
        assert all(1 <= len(top) <= 2 for top in lp["top_logprobs"][1:])


def test_chat_logprobs_have_k_alternatives(served, one_thread):
    base, _ = served
    body = post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                               "temperature": 0, "ignore_eos": True, "logprobs": True,
                                               "top_logprobs": 2})
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 4
    assert all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 for c in content)
    assert "".join(c["token"] for c in content) == body["choices"][0]["message"]["content"]


def test_streamed_completion_chunks_carry_their_tokens_logprobs(served, one_thread):
    base, _ = served
    with httpx.stream("POST", base + "/v1/completions", timeout=TIMEOUT_S,
                      json={"model": MODEL, "prompt": "abc", "max_tokens": 5, "temperature": 0, "ignore_eos": True,
                            "logprobs": 0, "stream": True}) as response:
        chunks = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    import json
    choices = [json.loads(c)["choices"][0] for c in chunks if c != "[DONE]"]
    tokens = [t for c in choices for t in c["logprobs"]["tokens"]]
    assert len(tokens) == 5 and "".join(tokens) == "".join(c["text"] for c in choices)
    assert all(len(top) == 1 for c in choices for top in c["logprobs"]["top_logprobs"])
