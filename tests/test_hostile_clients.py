"""What a hostile client can send, and that none of it stops the server, stalls the others or grows it.

Two layers. The protocol layer, property-based (hypothesis): every sampling field of
common/engine/sampling_limits.py's table, in every cycle's SamplingParams, and every request the
front end's parsers see, are either accepted within their range or refused with a ValueError /
400 naming the field, never another exception (an OverflowError once became a 500, a top_k of
2**63 once killed the engine). Then a real server (tests/test_server.py's `serve`, on 127.0.0.1,
with an API key) driven by hostile requests, each answered 4xx, with the server healthy
and idle afterwards. Every wait is bounded.
"""

import json
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CYCLES, cycle
from test_server import MODEL, TEMPLATE, TIMEOUT_S, serve

from common.engine import sampling_limits as limits  # noqa: E402
from common.engine.detokenizer import IncrementalDetokenizer  # noqa: E402
from common.engine.inputs import prepare_requests  # noqa: E402
from common.serving import template_worker  # noqa: E402
from common.serving.engine_client import InProcessEngine, RequestStream  # noqa: E402
from common.serving.openai_protocol import APIError, CompletionRequest, normalize_prompts  # noqa: E402
from common.serving.sampling import NEUTRAL, build_sampling_params  # noqa: E402
from common.serving.server import MAX_UNKNOWN_RECORDED, ServerOptions, build_app  # noqa: E402

SERVER_CYCLE = "cycle4_batching"     # the server is common/: the first cycle that serves stands for all
KEY = "sekret"
BODY_LIMIT = 2**20
AUTH = {"Authorization": f"Bearer {KEY}"}
pytestmark = pytest.mark.usefixtures("one_thread")

# Values a JSON body can carry into a numeric field: huge ints, floats, NaN, infinities, bools, text.
hostile_numbers = st.one_of(st.integers(), st.integers(min_value=2**60, max_value=10**400),
                            st.integers(min_value=-10**400, max_value=-2**60), st.floats(allow_nan=True),
                            st.booleans(), st.none(), st.text(max_size=3),
                            st.sampled_from([2**63, 2**63 - 1, -2**63 - 1, 2**31, 10**400, -1, 0, 1, 21]))


# --- the protocol layer ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", CYCLES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(limits.LIMITS)), value=hostile_numbers)
def test_every_sampling_field_is_in_range_or_refused_naming_it(name, field, value):
    """The shared table, in every cycle: accepted means inside the documented range."""
    try:
        params = cycle(name).SamplingParams(**{field: value})
    except ValueError as error:
        assert str(error).startswith(f"{field} must be ")      # and then its range (max_tokens for min_tokens)
        assert limits.LIMITS[field].describe() in str(error) or field == "min_tokens"
        return
    limit, kept = limits.LIMITS[field], getattr(params, field)
    if limit.kind in ("int", "float") and kept is not None:
        assert kept in limit.extra or limit.low <= kept <= limit.high


@pytest.mark.parametrize("field, value", [("top_k", 2**63), ("repetition_penalty", 10**400),
                                          ("frequency_penalty", 10**400), ("min_p", 10**400),
                                          ("presence_penalty", -10**400), ("seed", 2**64)])
def test_huge_ints_are_a_value_error_naming_the_field_and_range(field, value):
    for name in CYCLES:
        with pytest.raises(ValueError, match=rf"^{field} must be .*\[.*\]|^{field} must be .*\)"):
            cycle(name).SamplingParams(temperature=1.0, **{field: value})


def test_top_k_up_to_the_vocabulary_only_and_the_sampler_takes_the_largest():
    """top_k=2**63 once crashed the sampler's torch.tensor mid-step; now the table refuses it, the
    vocabulary bound is checked where the vocabulary is known, and the largest accepted value runs."""
    import importlib

    import torch
    sp = cycle(SERVER_CYCLE).SamplingParams
    with pytest.raises(ValueError, match=r"top_k must be .* \[1, 98\]"):
        prepare_requests([[1, 2]], sp(top_k=99), None, 98, 64, sp)
    sampler = importlib.import_module(f"{SERVER_CYCLE}.sampler")
    params = [sp(top_k=98, temperature=1.0), sp(top_k=limits.LIMITS["top_k"].high, temperature=1.0)]
    assert torch.isfinite(sampler._top_k_top_p(torch.randn(2, 98), params)).all()


def test_a_prompt_longer_than_the_memory_plan_is_refused_naming_the_limit():
    sp = cycle(SERVER_CYCLE).SamplingParams
    with pytest.raises(ValueError, match="max_num_batched_tokens=4"):
        prepare_requests([[1, 2, 3, 4, 5]], sp(max_tokens=1), None, 98, 64, sp, max_prompt_tokens=4)
    assert len(prepare_requests([[1, 2, 3, 4]], sp(max_tokens=1), None, 98, 64, sp, max_prompt_tokens=4)) == 1


def test_stop_strings_are_capped_in_number_and_length():
    sp = cycle(SERVER_CYCLE).SamplingParams
    with pytest.raises(ValueError, match="^stop must be at most"):
        sp(stop=["x"] * (limits.MAX_STOP_STRINGS + 1))
    with pytest.raises(ValueError, match="^stop must be at most"):
        sp(stop="x" * (limits.MAX_STOP_CHARS + 1))
    assert len(sp(stop=["x" * limits.MAX_STOP_CHARS] * limits.MAX_STOP_STRINGS).stop) == limits.MAX_STOP_STRINGS


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                                        max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(body=st.fixed_dictionaries({}, optional={k: json_values | hostile_numbers for k in (
    "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "min_tokens", "stop_token_ids", "logprobs", "echo")}))
def test_any_completions_body_is_params_or_a_400(body):
    """The parsing a handler does before the engine: pydantic, prompts, SamplingParams. Whatever
    the JSON, the outcome is a request or a 4xx naming a field, never another exception."""
    from pydantic import ValidationError
    try:
        request = CompletionRequest(**body)
        normalize_prompts(request.prompt if request.prompt is not None else "x")
        build_sampling_params(request, dict(NEUTRAL), cycle(SERVER_CYCLE).SamplingParams,
                              request.max_tokens if isinstance(request.max_tokens, int) else 16)
    except ValidationError:
        pass          # the server answers these 400 (its RequestValidationError handler)
    except APIError as error:
        assert error.status == 400


def test_the_server_and_the_engine_share_one_stop_string_rule():
    """engine_client's streams use IncrementalDetokenizer.process, the engine's rule, not a copy."""
    calls = []

    class Recording(IncrementalDetokenizer):
        def process(self, new_token_ids, finish_reason):
            calls.append(list(new_token_ids))
            return super().process(new_token_ids, finish_reason)

    class Chars:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(96 + i) for i in ids)

    stream = RequestStream(0, [1], Recording(Chars(), [1], stop=("c",)))
    delta = stream._feed([1, 2, 3, 4], None, None)
    assert calls == [[1, 2, 3, 4]] and delta.new_token_ids == [1, 2, 3] and delta.finish_reason == "stop"
    assert delta.delta_text == "ab"


def test_the_template_worker_bounds_its_compiled_cache():
    from collections import OrderedDict
    env, compiled = template_worker._environment(), OrderedDict()
    for i in range(3 * template_worker.MAX_COMPILED):
        assert template_worker._render(env, compiled, {"template": f"{i}{{{{ x }}}}", "variables": {"x": 1}}) == f"{i}1"
    assert len(compiled) == template_worker.MAX_COMPILED


# --- a real server ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hostile(char_checkpoint):
    llm = cycle(SERVER_CYCLE).LLM(char_checkpoint, device="cpu")
    llm.tokenizer.chat_template = TEMPLATE
    # A 1 MiB body limit: the tiny char tokenizer takes ~3 s on it (16 MiB, the default, ~50 s)
    options = ServerOptions(served_model_name=MODEL, api_keys=[KEY], trust_request_chat_template=True,
                            max_body_bytes=BODY_LIMIT)
    app = build_app(InProcessEngine(llm), options)
    with serve(app) as base:
        yield {"base": base, "llm": llm, "server": app.state.server}


def post(base, path, body, headers=AUTH, **kwargs):
    data = json.dumps(body) if not isinstance(body, (bytes, str)) else body
    return httpx.post(base + path, content=data, headers={**headers, "content-type": "application/json"},
                      timeout=TIMEOUT_S, **kwargs)


def error_of(response) -> dict:
    return response.json()["error"]


def assert_healthy_and_idle(hostile):
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        stats = hostile["server"].engine.snapshot
        if stats.get("num_requests_running", 0) == 0 and stats.get("num_requests_waiting", 0) == 0:
            break
        time.sleep(0.05)
    assert httpx.get(hostile["base"] + "/health", timeout=TIMEOUT_S).status_code == 200
    out = post(hostile["base"], "/v1/completions", {"prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert out.status_code == 200, out.text


CMPL = {"prompt": "Hello", "max_tokens": 4}


@pytest.mark.parametrize("field, value", [
    ("top_k", 2**63), ("repetition_penalty", 10**400), ("frequency_penalty", 10**400), ("min_p", 10**400),
    ("presence_penalty", -10**400), ("seed", 2**64), ("logprobs", 21), ("stop", ["x"] * 40),
    ("stop", "y" * 1000), ("stop_token_ids", [2**40]), ("top_k", 99), ("max_tokens", -5),
    ("max_tokens", 2**63)], ids=lambda v: str(v)[:12])
def test_out_of_range_sampling_fields_are_a_400_naming_the_field(hostile, field, value):
    for temperature in (1.0, 0):    # greedy too: it would share a batch with sampled requests
        out = post(hostile["base"], "/v1/completions", {**CMPL, "temperature": temperature, field: value})
        assert out.status_code == 400, (field, out.text)
        message = error_of(out)["message"]
        assert message.startswith(f"{field} must be") and (" in " in message or "at most" in message)
    assert_healthy_and_idle(hostile)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {**CMPL, "prompt": "ok \ud800 ok"}),
    ("/v1/completions", {**CMPL, "prompt": ["fine", "\udfff"]}),
    ("/tokenize", {"prompt": "\ud800"}),
    ("/v1/completions", {"prompt": [-1], "echo": True, "max_tokens": 1}),
    ("/v1/completions", {"prompt": [2**40], "echo": True, "max_tokens": 1}),
    ("/v1/completions", {"prompt": [-1], "echo": True, "max_tokens": 0}),
    ("/v1/completions", {"prompt": [10**6], "echo": True, "max_tokens": 0}),
    ("/v1/completions", {"prompt": [10**6], "echo": True, "max_tokens": 0, "logprobs": 1}),
    ("/v1/completions", {**CMPL, "prompt": ["a"] * 2049}),
])
def test_what_was_a_500_or_a_200_is_a_400(hostile, path, body):
    out = post(hostile["base"], path, body)
    assert out.status_code == 400, out.text
    assert_healthy_and_idle(hostile)


def test_echo_with_max_tokens_0_returns_the_prompt_and_its_logprobs(hostile):
    ids = hostile["llm"].tokenizer("Hello there").input_ids
    zero = post(hostile["base"], "/v1/completions", {"prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 2,
                                                     "temperature": 0})
    one = post(hostile["base"], "/v1/completions", {"prompt": ids, "echo": True, "max_tokens": 1, "logprobs": 2,
                                                    "temperature": 0})
    assert zero.status_code == one.status_code == 200, zero.text
    z, o = zero.json()["choices"][0], one.json()["choices"][0]
    assert z["text"] == hostile["llm"].tokenizer.decode(ids) and z["finish_reason"] == "length"
    n = len(ids)
    assert z["logprobs"]["token_logprobs"] == o["logprobs"]["token_logprobs"][:n]
    assert z["logprobs"]["token_logprobs"][0] is None and len(z["logprobs"]["tokens"]) == n
    assert zero.json()["usage"]["completion_tokens"] == 0
    assert_healthy_and_idle(hostile)


def test_every_route_that_computes_needs_the_key(hostile):
    base = hostile["base"]
    for path, body in [("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]}),
                       ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1 }}"}),
                       ("/v1/completions", CMPL)]:
        assert post(base, path, body, headers={}).status_code == 401, path
        assert post(base, path, body).status_code == 200, path
    assert httpx.get(base + "/health", timeout=TIMEOUT_S).status_code == 200
    assert httpx.get(base + "/metrics", timeout=TIMEOUT_S).status_code == 200     # documented: open


def test_unknown_fields_are_logged_once_each_in_a_bounded_record(hostile, capfd):
    capfd.readouterr()
    for r in range(3):
        body = {**CMPL, **{f"junk_{r}_{i}": 1 for i in range(1500)}}
        assert post(hostile["base"], "/v1/completions", body).status_code == 200
    lines = [l for l in capfd.readouterr().err.splitlines() if "unknown to this server" in l]
    assert len(hostile["server"]._unknown_logged) <= MAX_UNKNOWN_RECORDED
    assert 1 <= len(lines) <= 3


@pytest.mark.parametrize("template", [
    "{{ 'a' * 10**9 }}",
    "{{ messages | tojson(indent=1000000000) }}",
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "{% for i in range(99999) %}{{ 'abcdefghij' * 99 }}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
])
def test_client_templates_over_their_limits_are_a_400(hostile, template):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "chat_template": template}
    out = post(hostile["base"], "/v1/chat/completions", body)
    assert out.status_code == 400 and error_of(out)["param"] == "chat_template", out.text
    assert_healthy_and_idle(hostile)


def test_a_client_template_renders_like_the_models_own(hostile):
    messages = [{"role": "user", "content": "hi"}]
    own = post(hostile["base"], "/tokenize", {"messages": messages})
    client = post(hostile["base"], "/tokenize", {"messages": messages, "chat_template": TEMPLATE})
    assert own.status_code == client.status_code == 200 and own.json()["tokens"] == client.json()["tokens"]


def test_health_answers_while_the_largest_prompt_is_tokenized(hostile):
    """Ordering, not a duration: /health is answered while a /tokenize of a body near the limit is
    still running, and its latency is a small fraction of that tokenize's."""
    text = "Hello world, " * ((BODY_LIMIT - 100) // 13)
    done = {}

    def tokenize():
        started = time.perf_counter()
        out = post(hostile["base"], "/tokenize", {"prompt": text})
        done["status"], done["at"], done["took"] = out.status_code, time.perf_counter(), time.perf_counter() - started

    worker = threading.Thread(target=tokenize)
    worker.start()
    time.sleep(0.2)          # the body is sent and being tokenized (checked below: it is not done yet)
    started = time.perf_counter()
    health = httpx.get(hostile["base"] + "/health", timeout=TIMEOUT_S)
    answered, latency = time.perf_counter(), time.perf_counter() - started
    worker.join(TIMEOUT_S * 4)
    # 400 is the per-request token cap, said after tokenizing: the work this test needs was done
    assert health.status_code == 200 and done["status"] in (200, 400)
    assert answered < done["at"], "health waited for the tokenize to finish"
    assert latency < 0.1 * done["took"], (latency, done["took"])


def test_a_prompt_the_memory_plan_does_not_budget_is_a_400_saying_the_limit(char_checkpoint):
    """Admission: a prefill longer than max_num_batched_tokens (the step the plan was profiled at)."""
    llm = cycle(SERVER_CYCLE).LLM(char_checkpoint, device="cpu", max_num_batched_tokens=16)
    with serve(build_app(InProcessEngine(llm), MODEL)) as base:
        out = post(base, "/v1/completions", {"prompt": list(range(1, 21)), "max_tokens": 2})
        assert out.status_code == 400 and "max_num_batched_tokens=16" in error_of(out)["message"], out.text
        assert post(base, "/v1/completions", {"prompt": list(range(1, 17)), "max_tokens": 2}).status_code == 200


def test_the_prompt_tokens_of_one_request_are_capped(hostile):
    from common.serving.server import MAX_REQUEST_TOKENS
    per = MAX_REQUEST_TOKENS // 3 + 1
    out = post(hostile["base"], "/v1/completions", {"prompt": [[5] * per] * 3, "max_tokens": 1})
    assert out.status_code == 400 and f"at most {MAX_REQUEST_TOKENS} tokens" in error_of(out)["message"], out.text
    assert_healthy_and_idle(hostile)


def test_the_worker_pool_queue_is_bounded_and_says_when_to_retry():
    """Past its threads and queue, a job is refused at once (429, Retry-After), never queued."""
    import asyncio

    from common.serving.workers import WorkerPool
    release = threading.Event()

    async def run():
        pool = WorkerPool(threads=1, max_queued=1)
        held = [asyncio.ensure_future(pool.run(release.wait, TIMEOUT_S)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(APIError) as refused:
            await pool.run(lambda: None)
        release.set()
        assert await asyncio.gather(*held) == [True, True]
        assert await pool.run(lambda: 7) == 7          # the slots came back
        pool.shutdown()
        return refused.value

    error = asyncio.run(run())
    assert error.status == 429 and error.headers["Retry-After"]


def test_the_default_pool_takes_a_benchmark_burst():
    """vLLM's benchmark at --request-rate inf sends every request at once: a burst of 1,000 jobs
    (its saturation run sends 200) all queue with the server's default pool, none refused."""
    import asyncio

    from common.serving.workers import WorkerPool
    release = threading.Event()

    async def run():
        pool = WorkerPool()
        jobs = [asyncio.ensure_future(pool.run(release.wait, TIMEOUT_S)) for _ in range(1000)]
        await asyncio.sleep(0.05)
        release.set()
        results = await asyncio.gather(*jobs, return_exceptions=True)
        pool.shutdown()
        return results

    assert asyncio.run(run()) == [True] * 1000


def test_a_send_to_the_engine_core_never_blocks_the_event_loop(hostile):
    """A prompt's send may wait on a full pipe while the core runs a step; it waits in the sender
    thread: /health is answered while a send is held back, and the request completes after."""
    engine, gate = hostile["server"].engine, threading.Event()
    real_send = engine._conn.send

    def held_send(message):
        gate.wait(TIMEOUT_S * 3)
        real_send(message)

    engine._conn.send = held_send
    done = {}
    request = threading.Thread(target=lambda: done.update(out=post(hostile["base"], "/v1/completions", CMPL)))
    try:
        request.start()
        time.sleep(0.3)
        assert httpx.get(hostile["base"] + "/health", timeout=TIMEOUT_S).status_code == 200
        assert "out" not in done          # its send was still held: the loop answered meanwhile
    finally:
        gate.set()
        request.join(TIMEOUT_S)
        engine._conn.send = real_send
    assert done["out"].status_code == 200
