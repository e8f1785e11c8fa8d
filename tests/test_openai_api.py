"""The OpenAI API surface as vLLM serves it: prompt and content forms, nulls and defaults, what is
refused (and that nothing is silently ignored), /tokenize, limits and access, /metrics, and faults.

Servers run on a tiny character-level Qwen3 checkpoint (tests/conftest.py), cycle 5 (it has the
prefix cache counters), each on a free port in a thread (tests/test_server.py's `serve`), with the
`openai` client or raw HTTP. Every wait is bounded.
"""

import asyncio
import json
import math
import pathlib
import re
import threading
import time

import httpx
import pytest

from conftest import cycle
from test_server import MODEL, TEMPLATE, TIMEOUT_S, serve

openai = pytest.importorskip("openai")

from common.serving import openai_protocol as protocol  # noqa: E402
from common.serving.chat_template import chat_prompt_ids  # noqa: E402
from common.serving.engine_client import InProcessEngine  # noqa: E402
from common.serving.metrics import escape, parse_metrics  # noqa: E402
from common.serving.sampling import (build_sampling_params, default_max_tokens, generation_defaults,  # noqa: E402
                                     unusable_defaults)
from common.serving.server import ServerOptions, build_app  # noqa: E402

CYCLE = "cycle5_prefix"
ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def new_llm(checkpoint, template=TEMPLATE):
    llm = cycle(CYCLE).LLM(checkpoint, device="cpu")
    llm.tokenizer.chat_template = template
    return llm


@pytest.fixture(scope="module")
def api(char_checkpoint):
    """One shared server (neutral defaults) and an offline engine on the same weights."""
    llm, reference = new_llm(char_checkpoint), new_llm(char_checkpoint)
    with serve(build_app(InProcessEngine(llm), MODEL)) as base:
        yield {"base": base, "llm": llm, "reference": reference}


@pytest.fixture
def client(api):
    return openai.OpenAI(base_url=api["base"] + "/v1", api_key="none", timeout=TIMEOUT_S, max_retries=0)


def post(base, path, body, **kwargs):
    return httpx.post(base + path, json=body, timeout=TIMEOUT_S, **kwargs)


def offline(api, prompts, max_tokens):
    params = cycle(CYCLE).SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.text for o in api["reference"].generate(prompts, params)]


def metrics(base) -> dict:
    return parse_metrics(httpx.get(base + "/metrics", timeout=TIMEOUT_S).text)


GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


# --- prompt and content forms ---------------------------------------------------------------------

def test_completion_prompt_forms_each_get_their_choice_index(api, client):
    texts = ["Hello", "abc"]
    ids = [api["llm"].tokenizer(t).input_ids for t in texts]
    expected = offline(api, texts, 6)
    for prompt in (texts, ids):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, **GREEDY)
        assert [c.index for c in out.choices] == [0, 1]
        assert [c.text for c in out.choices] == expected
        assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == sum(map(len, ids))
    assert client.completions.create(model=MODEL, prompt=ids[1], max_tokens=6, **GREEDY).choices[0].text == expected[1]
    chunks = list(client.completions.create(model=MODEL, prompt=texts, max_tokens=6, stream=True, **GREEDY,
                                            stream_options={"include_usage": True, "continuous_usage_stats": True}))
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in (0, 1)]
    assert streamed == expected and {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    running = [c.usage.completion_tokens for c in chunks]                # usage in every chunk, then the total
    assert running == sorted(running) and running[-1] == 12 and chunks[-1].choices == []
    too_long = post(api["base"], "/v1/completions", {"model": MODEL, "prompt": ["ok", "x" * 600]})
    assert too_long.status_code == 400 and "prompt 1" in too_long.json()["error"]["message"]


def test_chat_content_as_string_as_text_parts_and_null_for_assistant(api, client):
    def chat(messages):
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, **GREEDY)

    plain = chat([{"role": "user", "content": "one\ntwo"}])
    parts = chat([{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}, {"role": "user", "content": "b"}]
    assert chat(turns).usage.completion_tokens == 5
    for bad, param in ([{"role": "user", "content": None}], "messages[0].content"), \
                      ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"), \
                      ([{"role": "tool", "content": "x"}], "messages[0].role"):
        response = post(api["base"], "/v1/chat/completions", {"model": MODEL, "messages": bad})
        assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_max_completion_tokens_wins_over_max_tokens(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=9,
                                         max_completion_tokens=4, **GREEDY)
    assert out.usage.completion_tokens == 4 and out.choices[0].finish_reason == "length"


# --- nulls, defaults, temperature -------------------------------------------------------------------

def test_nulls_mean_the_default(api):
    body = {"model": None, "prompt": "Hi", "max_tokens": 3, "temperature": None, "top_p": None, "top_k": None,
            "n": None, "stream": None, "seed": None, "stop": None, "logprobs": None, "echo": None,
            "presence_penalty": None, "stream_options": None, "ignore_eos": True}
    response = post(api["base"], "/v1/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3


def test_generation_config_gives_the_defaults_and_vllm_mode_the_neutral_ones(tmp_path, capsys):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True}))
    auto, neutral = generation_defaults(str(tmp_path), "auto"), generation_defaults(str(tmp_path), "vllm")
    assert auto == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert neutral == {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    assert "generation_config.json" in capsys.readouterr().err    # a changed default is never silent
    sp = cycle(CYCLE).SamplingParams
    params = build_sampling_params(protocol.CompletionRequest(prompt="x", temperature=None), auto, sp, 4)
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.95, 20)
    params = build_sampling_params(protocol.CompletionRequest(prompt="x", temperature=0.2, top_k=3), auto, sp, 4)
    assert (params.temperature, params.top_p, params.top_k) == (0.2, 0.95, 3)   # the request wins
    (tmp_path / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.1, "max_new_tokens": 7}))
    penalized = generation_defaults(str(tmp_path), "auto")
    assert unusable_defaults(penalized, sp) == []          # the engine has repetition_penalty: it applies
    params = build_sampling_params(protocol.CompletionRequest(prompt="x"), penalized, sp, 4)
    assert (params.max_tokens, params.repetition_penalty) == (4, 1.1)
    assert default_max_tokens(protocol.CompletionRequest(prompt="x"), penalized, False, 0) == 7


def test_temperature_nan_or_inf_refused_and_tiny_is_greedy(api, client):
    for literal in ("NaN", "Infinity", "-Infinity"):
        response = httpx.post(api["base"] + "/v1/completions", timeout=TIMEOUT_S,
                              headers={"content-type": "application/json"},
                              content=f'{{"model": "{MODEL}", "prompt": "x", "temperature": {literal}}}')
        assert response.status_code == 400 and response.json()["error"]["param"] == "temperature", literal
    args = dict(model=MODEL, prompt="Hello", max_tokens=8, extra_body={"ignore_eos": True})
    greedy = client.completions.create(**args, temperature=0).choices[0].text
    assert len(greedy) == 8
    # Sent as is, 1e-44 would overflow the logits to inf, and the sampler would pick token 0 each step.
    assert client.completions.create(**args, temperature=1e-44).choices[0].text == greedy
    assert build_sampling_params(protocol.CompletionRequest(prompt="x", temperature=5e-6), {}, cycle(CYCLE).SamplingParams,
                                 1).temperature == 0


# --- what is refused -----------------------------------------------------------------------------------

REFUSED_EXAMPLES = [          # (endpoint, field, a value a client would send)
    ("completions", "prompt_logprobs", 1), ("completions", "spaces_between_special_tokens", False),
    ("completions", "logit_bias", {"5": -100}),
    ("chat", "response_format", {"type": "json_object"}), ("chat", "tools", [{"type": "function"}]),
    ("completions", "suffix", "end"), ("completions", "best_of", 2), ("completions", "n", 2), ("chat", "n", 3),
    ("chat", "echo", True), ("chat", "chat_template", "{{ 'x' }}"), ("completions", "use_beam_search", True),
    ("completions", "stream_options", {"include_usage": True}),        # without stream
]


def _request(endpoint: str, **fields) -> tuple[str, dict]:
    if endpoint == "chat":
        return "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                        "max_tokens": 2, **fields}
    return "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, **fields}


@pytest.mark.parametrize("endpoint, field, value", REFUSED_EXAMPLES)
def test_a_field_not_honoured_is_refused_naming_it(api, endpoint, field, value):
    response = post(api["base"], *_request(endpoint, **{field: value}))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_no_field_of_the_tables_is_silently_ignored(api):
    """Every refusable field, set to a value no default equals, gets 400 naming it."""
    for endpoint, table in (("completions", protocol.REFUSED_COMPLETIONS), ("chat", protocol.REFUSED_CHAT)):
        engine_lacks = [f for f in protocol.ENGINE_FIELDS if f not in cycle(CYCLE).SamplingParams.__dataclass_fields__]
        for field in [*table, *engine_lacks]:           # the engine's own fields are honoured
            response = post(api["base"], *_request(endpoint, **{field: 12345}))
            assert response.status_code == 400 and response.json()["error"]["param"] == field, (endpoint, field)


@pytest.mark.parametrize("endpoint, fields", [
    ("completions", {"repetition_penalty": 1.0, "logprobs": None, "presence_penalty": 0, "best_of": 1,
                     "skip_special_tokens": True, "user": "u1", "suffix": ""}),     # vLLM's benchmark sends the first
    ("chat", {"response_format": {"type": "text"}, "tool_choice": "none", "logprobs": False, "top_logprobs": 0,
              "parallel_tool_calls": True, "stop_token_ids": [], "chat_template_kwargs": {"enable_thinking": False}}),
])
def test_defaults_of_refused_fields_are_accepted(api, endpoint, fields):
    response = post(api["base"], *_request(endpoint, **fields))
    assert response.status_code == 200, response.text


def test_engine_fields_pass_through_when_the_sampling_params_has_them():
    """The day a cycle's SamplingParams gains a field (spaces_between_special_tokens: none has it
    yet), the server passes it on instead of refusing."""
    import dataclasses
    base = cycle(CYCLE).SamplingParams
    field = "spaces_between_special_tokens"
    with_field = dataclasses.make_dataclass("WithIt", [(field, bool, True)], bases=(base,), frozen=True)
    body = protocol.CompletionRequest(prompt="x", **{field: False})
    with pytest.raises(protocol.APIError) as refused:
        protocol.check_fields(body, protocol.REFUSED_COMPLETIONS, base)
    assert refused.value.param == field
    protocol.check_fields(body, protocol.REFUSED_COMPLETIONS, with_field)
    assert getattr(build_sampling_params(body, {}, with_field, 3), field) is False


def test_unknown_fields_are_logged_once(api, capfd):
    for _ in range(3):
        assert post(api["base"], *_request("completions", frobnicate_level=3)).status_code == 200
    err = capfd.readouterr().err
    assert err.count("'frobnicate_level'") == 1


def test_errors_carry_param(api):
    cases = [({"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature"),
             ({"model": MODEL, "prompt": []}, "prompt"),
             ({"model": MODEL, "prompt": [1, 2, 100000]}, "prompt"),
             ({"model": "other", "prompt": "x"}, "model"),
             ({"model": MODEL, "prompt": "x" * 600}, "prompt"),
             ({"model": MODEL, "prompt": "x", "max_tokens": 600}, "max_tokens"),
             ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p")]
    for body, param in cases:
        response = post(api["base"], "/v1/completions", body)
        assert response.status_code in (400, 404) and response.json()["error"]["param"] == param, (body, response.text)


# --- echo, tokenize ------------------------------------------------------------------------------------------

def test_echo_returns_the_prompt_and_max_tokens_zero_runs_nothing(api, client):
    before = metrics(api["base"])["generation_tokens_total"]
    out = client.completions.create(model=MODEL, prompt=["Hello", "abc"], max_tokens=0, echo=True)
    assert [c.text for c in out.choices] == ["Hello", "abc"] and out.usage.completion_tokens == 0
    assert metrics(api["base"])["generation_tokens_total"] == before
    echoed = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, echo=True, **GREEDY)
    assert echoed.choices[0].text == "Hello" + offline(api, ["Hello"], 5)[0]
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, echo=True, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == echoed.choices[0].text
    response = post(api["base"], "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"


def test_tokenize_and_detokenize_as_vllm(api):
    tokenizer = api["llm"].tokenizer
    out = post(api["base"], "/tokenize", {"model": MODEL, "prompt": "Hi there", "return_token_strs": True}).json()
    assert out["tokens"] == tokenizer("Hi there").input_ids and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == 512 and out["token_strs"] == list("Hi there")
    messages = [{"role": "user", "content": "Hi"}]
    chat = post(api["base"], "/tokenize", {"messages": messages}).json()
    assert chat["tokens"] == chat_prompt_ids(tokenizer, messages) and chat["token_strs"] is None
    assert post(api["base"], "/detokenize", {"tokens": out["tokens"]}).json() == {"prompt": "Hi there"}
    bad = post(api["base"], "/detokenize", {"tokens": [5, 1000]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


# --- chat templates: isolation -------------------------------------------------------------------------

RAISING_TEMPLATE = ("{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no booms here') }}"
                    "{% endif %}{{ m['content'] }}\n{% endfor %}")


def test_a_template_that_raises_fails_its_request_only(char_checkpoint):
    llm = new_llm(char_checkpoint, RAISING_TEMPLATE)
    with serve(build_app(InProcessEngine(llm), MODEL)) as base:
        bad = post(base, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "boom"}]})
        assert bad.status_code == 400 and "no booms here" in bad.json()["error"]["message"]
        kwargs = post(base, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                      "chat_template_kwargs": {"tokenize": True}})
        assert kwargs.status_code == 400 and kwargs.json()["error"]["param"] == "chat_template_kwargs.tokenize"
        ok = post(base, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "fine"}],
                                                  "max_tokens": 3, "ignore_eos": True})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        assert httpx.get(base + "/health", timeout=TIMEOUT_S).status_code == 200


def test_a_request_template_needs_trust_and_stays_in_the_sandbox(char_checkpoint):
    llm = new_llm(char_checkpoint)
    options = ServerOptions(MODEL, trust_request_chat_template=True)
    with serve(build_app(InProcessEngine(llm), options)) as base:
        def tokenize(template):
            return post(base, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}], "chat_template": template})

        assert tokenize("<{{ messages[0]['content'] }}>").json()["tokens"] == llm.tokenizer("<Hi>").input_ids
        escape_attempt = tokenize("{{ ''.__class__.__mro__[1].__subclasses__() }}")
        assert escape_attempt.status_code == 400 and "SecurityError" in escape_attempt.json()["error"]["message"]
        assert tokenize("{% for %}").status_code == 400                  # a syntax error
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                "chat_template": "{{ messages[0]['content'] }}:"}
        assert post(base, "/v1/chat/completions", body).status_code == 200


# --- limits and access -----------------------------------------------------------------------------------------

def test_api_key_guards_v1_only(char_checkpoint, monkeypatch):
    llm = new_llm(char_checkpoint)
    with serve(build_app(InProcessEngine(llm), ServerOptions(MODEL, api_keys=["s3cret"]))) as base:
        assert httpx.get(base + "/v1/models", timeout=TIMEOUT_S).status_code == 401
        wrong = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer nope"}, timeout=TIMEOUT_S)
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == 401
        assert httpx.get(base + "/health", timeout=TIMEOUT_S).status_code == 200
        good = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", timeout=TIMEOUT_S, max_retries=0)
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).models.list()


def test_api_key_from_the_environment_and_cors_origins(monkeypatch):
    from common.serving.server import build_parser, server_options
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    args = build_parser("cycle5_prefix").parse_args(["m", "--allowed-origins", '["https://a.example"]'])
    options = server_options(args, {})
    assert options.api_keys == ["from-env"] and options.allowed_origins == ["https://a.example"]
    args = build_parser("cycle5_prefix").parse_args(["m", "--api-key", "cli", "--allowed-origins", "https://b,https://c"])
    assert server_options(args, {}).api_keys == ["cli"]          # the flag wins over the environment
    assert server_options(args, {}).allowed_origins == ["https://b", "https://c"]


def test_cors_allows_the_given_origins_only(char_checkpoint):
    llm = new_llm(char_checkpoint)
    options = ServerOptions(MODEL, allowed_origins=["https://a.example"], api_keys=["k"])
    with serve(build_app(InProcessEngine(llm), options)) as base:
        def preflight(origin):
            return httpx.options(base + "/v1/completions", timeout=TIMEOUT_S, headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type"})

        allowed = preflight("https://a.example")          # no API key on a preflight, as browsers send it
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://a.example"
        assert "access-control-allow-origin" not in preflight("https://evil.example").headers


def test_body_over_the_limit_gets_413(char_checkpoint):
    llm = new_llm(char_checkpoint)
    with serve(build_app(InProcessEngine(llm), ServerOptions(MODEL, max_body_bytes=1000))) as base:
        big = {"model": MODEL, "prompt": "x" * 2000}
        assert post(base, "/v1/completions", big).status_code == 413
        chunked = httpx.post(base + "/v1/completions", timeout=TIMEOUT_S, headers={"content-type": "application/json"},
                             content=(json.dumps(big)[i:i + 100].encode() for i in range(0, 2100, 100)))
        assert chunked.status_code == 413 and chunked.json()["error"]["code"] == 413
        assert post(base, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2}).status_code == 200


def test_past_max_waiting_requests_429_with_retry_after(char_checkpoint):
    llm = new_llm(char_checkpoint)
    gate, step = threading.Event(), llm.step

    def held_step():                 # the engine cannot run a step until the gate opens: requests wait
        assert gate.wait(TIMEOUT_S)
        return step()

    llm.step = held_step
    app = build_app(InProcessEngine(llm), ServerOptions(MODEL, max_waiting_requests=1))
    with serve(app) as base:
        async def run():
            async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
                first = asyncio.ensure_future(http.post(base + "/v1/completions", json=_request("completions")[1]))
                deadline = time.monotonic() + TIMEOUT_S
                while app.state.server.num_waiting < 1:                 # the first request is in the engine
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                second = await http.post(base + "/v1/completions", json=_request("completions")[1])
                gate.set()
                return await first, second

        first, second = asyncio.run(run())
        assert app.state.server.num_waiting == 0
    assert second.status_code == 429 and second.headers["retry-after"] == "1"
    assert second.json()["error"]["type"] == "rate_limit_error"
    assert first.status_code == 200


def _wait_idle(base) -> dict:
    deadline = time.monotonic() + TIMEOUT_S
    while (m := metrics(base))["num_requests_running"] or m["num_requests_waiting"] or m["kv_cache_usage_perc"]:
        assert time.monotonic() < deadline, f"server never went idle: {m}"
        time.sleep(0.05)
    return m


def test_a_non_streamed_request_is_aborted_when_its_client_leaves(char_checkpoint):
    llm = new_llm(char_checkpoint)
    step = llm.step

    def slow_step():                 # 480 tokens take at least 4.8 s: the client leaves long before
        time.sleep(0.01)
        return step()

    llm.step = slow_step
    with serve(build_app(InProcessEngine(llm), MODEL)) as base:
        body = {"model": MODEL, "prompt": "go", "max_tokens": 480, "ignore_eos": True, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/completions", json=body, timeout=httpx.Timeout(TIMEOUT_S, read=0.5))
        after = _wait_idle(base)
    assert 0 < after["generation_tokens_total"] < 480
    assert after['request_success_total{finished_reason="abort"}'] == 1


# --- the engine failing ------------------------------------------------------------------------------------

def test_a_step_that_raises_answers_every_request_and_health_says_503(char_checkpoint):
    llm = new_llm(char_checkpoint)
    with serve(build_app(InProcessEngine(llm), MODEL)) as base:
        assert post(base, *_request("completions")).status_code == 200

        def broken_step():
            raise RuntimeError("injected fault")

        llm.step = broken_step
        failed = post(base, *_request("completions"))   # its step killed the engine: not running any more
        assert failed.status_code == 503 and "injected fault" in failed.json()["error"]["message"]
        assert httpx.get(base + "/health", timeout=TIMEOUT_S).status_code == 503
        later = post(base, *_request("completions", stream=True))
        assert later.status_code == 503     # at once: a request queued for the dead engine ends in ReadTimeout
        assert metrics(base)['request_success_total{finished_reason="error"}'] == 1


# --- /metrics ---------------------------------------------------------------------------------------------

def test_metrics_histograms_and_counters_as_vllm_names_them(char_checkpoint):
    llm = new_llm(char_checkpoint)
    with serve(build_app(InProcessEngine(llm), 'tiny "quoted"\\model')) as base:
        name = 'tiny "quoted"\\model'
        body = {"model": name, "prompt": "The same long prefix, twice over", "max_tokens": 5, "ignore_eos": True}
        for _ in range(2):
            assert post(base, "/v1/completions", body).status_code == 200
        stream = post(base, "/v1/completions", {**body, "stream": True, "max_tokens": 4, "stop": None})
        assert stream.status_code == 200
        text = httpx.get(base + "/metrics", timeout=TIMEOUT_S).text
    assert f'model_name="{escape(name)}"' in text and 'model_name="tiny \\"quoted\\"\\\\model"' in text
    m = parse_metrics(text)
    prompt_len = len(llm.tokenizer(body["prompt"]).input_ids)
    assert m["time_to_first_token_seconds_count"] == 3 and m["e2e_request_latency_seconds_count"] == 3
    assert m["request_queue_time_seconds_count"] == 3
    assert m["inter_token_latency_seconds_count"] == 4 + 4 + 3       # tokens - 1 per request
    assert m['request_success_total{finished_reason="length"}'] == 3
    assert m["prompt_tokens_total"] == 3 * prompt_len and m["generation_tokens_total"] == 14
    assert m['time_to_first_token_seconds_bucket{le="+Inf"}'] == 3
    assert m["prefix_cache_queries_total"] >= m["prefix_cache_hits_total"] > 0     # the repeated prompt hit
    assert m["num_preemptions_total"] == 0
    buckets = [v for k, v in m.items() if k.startswith("e2e_request_latency_seconds_bucket")]
    assert buckets == sorted(buckets)                                  # cumulative


# --- the table, the guide -------------------------------------------------------------------------------------

def _table_fields(text: str) -> set[str]:
    """Field names in the first column of a markdown table whose header starts with `| field |`."""
    start = text.index("| field | endpoint | here | why |")
    rows = text[start:].split("\n\n", 1)[0].splitlines()[2:]
    return {name for row in rows for name in re.findall(r"`([a-z_*]+)", row.split("|")[1])}


def test_the_field_table_names_every_refusable_field_in_the_code_and_the_guide():
    known = {*protocol.REFUSED_COMPLETIONS, *protocol.REFUSED_CHAT, *protocol.ENGINE_FIELDS}
    known = {"guided_*" if k.startswith("guided_") else k for k in known}
    honoured = {*protocol.CompletionRequest.model_fields, *protocol.ChatRequest.model_fields}
    for text in (protocol.__doc__, (ROOT / "docs" / "CYCLE_GUIDE.md").read_text()):
        fields = _table_fields(text)
        assert known <= fields, sorted(known - fields)
        assert honoured <= fields | {"stream_options"}, sorted(honoured - fields)


def test_guide_exercises_name_tests_of_this_file():
    """Chapter 9's exercises point at `tests/test_openai_api.py::NAME`: each NAME is a test here."""
    names = re.findall(r"tests/test_openai_api\.py::(\w+)", (ROOT / "docs" / "CYCLE_GUIDE.md").read_text())
    assert names and all(callable(globals().get(n)) for n in names), names


def test_histogram_buckets_are_cumulative_and_inf_catches_the_rest():
    from common.serving.metrics import Histogram
    h = Histogram("x", "x", (0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 7.0):
        h.observe(value)
    m = parse_metrics("\n".join(h.lines('model_name="m"')))
    assert [m['x_bucket{le="0.1"}'], m['x_bucket{le="1.0"}'], m['x_bucket{le="+Inf"}']] == [2, 3, 4]
    assert m["x_count"] == 4 and math.isclose(m["x_sum"], 7.65)
