"""The OpenAI-compatible server (common/serving/server.py) with the real `openai` client, on a real port.

Each engine listed in SERVER_CYCLES gets one server (uvicorn in a thread, on a free localhost port)
on a tiny Qwen3 checkpoint whose vocabulary is exactly the character tokenizer's (98 ids), so every
generated token is a character and text comparisons mean something; every wait is bounded, so a broken server fails a test instead of
hanging the suite. A new last cycle joins by being CYCLES[-1].
"""

import asyncio
import contextlib
import json
import threading
import time

import httpx
import pytest

from conftest import CYCLES, cycle, free_port

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from common.serving.chat_template import chat_prompt_ids  # noqa: E402
from common.serving.engine_client import InProcessEngine  # noqa: E402
from common.serving.server import build_app, parse_metrics  # noqa: E402

SERVER_CYCLES = sorted({"cycle4_batching", CYCLES[-1]})
MODEL = "tiny"
TIMEOUT_S = 30
# The tiny tokenizer has no chat template: give it one (printable ASCII, which it can encode).
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


@contextlib.contextmanager
def serve(app):
    """Run `app` with uvicorn in a thread on a free localhost port; yields its base URL."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT_S
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(TIMEOUT_S)


@pytest.fixture(scope="module", params=SERVER_CYCLES)
def server(request, char_checkpoint):
    name = request.param
    llm = cycle(name).LLM(char_checkpoint, device="cpu")
    llm.tokenizer.chat_template = TEMPLATE
    reference = cycle(name).LLM(char_checkpoint, device="cpu")   # offline generate() on the same weights
    reference.tokenizer.chat_template = TEMPLATE
    with serve(build_app(InProcessEngine(llm), MODEL)) as base:
        yield {"name": name, "base": base, "llm": llm, "reference": reference}


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key="none", timeout=TIMEOUT_S, max_retries=0)


def offline(server, prompt, max_tokens, chat=False):
    """What generate() gives for the same prompt on another engine of the same checkpoint."""
    llm, name = server["reference"], server["name"]
    if chat:
        prompt = chat_prompt_ids(llm.tokenizer, [{"role": "user", "content": prompt}])
    params = cycle(name).SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return llm.generate([prompt], params)[0]


def metrics(server) -> dict:
    return parse_metrics(httpx.get(server["base"] + "/metrics", timeout=TIMEOUT_S).text)


def test_health_and_models(server, client):
    assert httpx.get(server["base"] + "/health", timeout=TIMEOUT_S).status_code == 200
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_streamed_equals_non_streamed_and_generate(server, client):
    args = dict(model=MODEL, prompt="Hello there", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    expected = offline(server, "Hello there", 12)
    assert whole.choices[0].text == streamed == expected.text and len(streamed) >= 8
    assert whole.choices[0].finish_reason == "length" and chunks[-2].choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens == 12
    assert whole.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_chat_streamed_equals_non_streamed(server, client):
    args = dict(model=MODEL, messages=[{"role": "user", "content": "Hi!"}], max_tokens=10, temperature=0,
                extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert whole.choices[0].message.content == streamed == offline(server, "Hi!", 10, chat=True).text


def test_stop_string_ends_the_text_before_it(server, client):
    base = client.completions.create(model=MODEL, prompt="abc", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[3:5]
    assert len(stop) == 2
    out = client.completions.create(model=MODEL, prompt="abc", max_tokens=16, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert out.text == base[:base.index(stop)] and out.finish_reason == "stop"


def test_sixteen_concurrent_streams_each_equal_generate(server):
    prompts = [f"Question {i}: what is {i * 7}?" for i in range(16)]
    lengths = [4 + (i * 5) % 17 for i in range(16)]

    async def one(client, prompt, n):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def run_all():
        client = openai.AsyncOpenAI(base_url=server["base"] + "/v1", api_key="none", timeout=TIMEOUT_S, max_retries=0)
        return await asyncio.wait_for(asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, lengths))), 2 * TIMEOUT_S)

    texts = asyncio.run(run_all())
    llm = server["reference"]
    sp = cycle(server["name"]).SamplingParams
    expected = llm.generate(prompts, [sp(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths])
    assert texts == [o.text for o in expected]


@pytest.mark.parametrize("body, status", [
    ({"model": "nope", "prompt": "x"}, 404),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400),
    ({"model": MODEL, "prompt": "x" * 600}, 400),                  # longer than the model's 512 positions
    ({"model": MODEL, "prompt": [1, 2, 100000]}, 400),             # a token id outside the vocabulary
    ({"model": MODEL, "prompt": ""}, 400),
    ({"model": MODEL, "prompt": "x", "n": 2}, 400),
    ({"model": MODEL, "prompt": "x", "stop": [""]}, 400),
    ({"model": MODEL}, 400),                                       # no prompt
    ({"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400),
])
def test_bad_requests_get_openai_errors_and_the_server_stays_healthy(server, body, status):
    response = httpx.post(server["base"] + "/v1/completions", json=body, timeout=TIMEOUT_S)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == status and error["message"] and error["type"]
    assert httpx.get(server["base"] + "/health", timeout=TIMEOUT_S).status_code == 200


def test_malformed_json_and_bad_chat(server, client):
    response = httpx.post(server["base"] + "/v1/completions", content=b"{not json",
                          headers={"content-type": "application/json"}, timeout=TIMEOUT_S)
    assert response.status_code in (400, 422) and "error" in response.json()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}], max_tokens=4)
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=3, temperature=0).usage.completion_tokens >= 1


def _wait_idle(server) -> dict:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        m = metrics(server)
        if m["num_requests_running"] == 0 and m["num_requests_waiting"] == 0 and m["kv_cache_usage_perc"] == 0:
            return m
        assert time.monotonic() < deadline, f"server never went idle: {m}"
        time.sleep(0.05)


def test_a_dropped_stream_is_aborted_and_frees_its_blocks(server, client):
    before = _wait_idle(server)
    max_tokens = 480
    body = {"model": MODEL, "prompt": "go", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=TIMEOUT_S) as http:
        with http.stream("POST", server["base"] + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data:"):
                    assert json.loads(line[5:])["choices"]
                    break
            assert metrics(server)["num_requests_running"] == 1
    after = _wait_idle(server)   # running 0, waiting 0, KV usage 0
    assert after["generation_tokens_total"] - before["generation_tokens_total"] < max_tokens  # cut short
    out = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=5, temperature=0)
    assert out.usage.completion_tokens >= 1


def test_http_benchmark_client_times_every_token(server):
    from common.benchmark.http_bench import run_http
    from common.benchmark.online import serving_metrics
    from common.benchmark.workloads import Request

    requests = [Request([5, 6, 7], 6, True, [5, 6, 7]), Request([8, 9], 3, True, [8, 9])]
    records = asyncio.run(asyncio.wait_for(run_http(server["base"] + "/v1", MODEL, requests, [0.0, 0.05]), TIMEOUT_S))
    assert [r.num_output_tokens for r in records] == [6, 3]
    assert [len(r.token_times_s) for r in records] == [6, 3]   # one chunk per token
    assert records[1].token_times_s[0] >= 0.05
    assert serving_metrics(records, 10, 10)["completed"] == 2


def test_http_benchmark_records_the_server_it_measured(server):
    """A stored HTTP result names what answered: the server's own /v1/models, beside its URL."""
    from common.benchmark.http_bench import server_identity

    found = server_identity(server["base"] + "/v1")
    assert found["base_url"] == server["base"] + "/v1"
    assert [m["id"] for m in found["models"]] == [MODEL]
    assert found["models"][0]["root"] == server["llm"].source.name
    gone = server_identity(f"http://127.0.0.1:{free_port()}/v1")   # nothing listens there
    assert gone["models"] is None and gone["error"]


def test_mixed_arrivals_measures_a_server_as_it_measures_an_engine(server, monkeypatch):
    """chapter 11's workload over HTTP (how a server, ours or vLLM's, is compared): every stream's
    tokens are timed, the long prompt's first token comes after its arrival, and a refused request
    is an error, not a silently shorter run."""
    from common.benchmark import mixed_arrivals

    monkeypatch.setattr(mixed_arrivals, "SAFE_ID_RANGE", (5, 90))     # the character tokenizer's 98 ids
    size = mixed_arrivals.SIZES["quick"]
    row = mixed_arrivals.run_server(server["base"] + "/v1", MODEL, "ours", "quick", seed=0, max_model_len=512)
    assert [len(times) for times in row["stream_token_times_s"]] == [size["stream_output"]] * size["streams"]
    assert row["long_ttft_mean_s"] > 0 and row["stream_itl_p99_s"] >= row["stream_itl_p50_s"] > 0
    with pytest.raises(SystemExit, match="failed"):                   # ids past the vocabulary: every one a 400
        monkeypatch.setattr(mixed_arrivals, "SAFE_ID_RANGE", (1000, 2000))
        mixed_arrivals.run_server(server["base"] + "/v1", MODEL, "ours", "quick", seed=0, max_model_len=512)
