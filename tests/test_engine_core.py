"""The engine core in its own process (common/serving/engine_core.py, engine_client.py), on a real port.

A server on the tiny character checkpoint (every token is one character, so text comparisons mean
something) whose engine core runs in a spawned process: streams, aborts and 16 concurrent clients
against offline generate(); then the core is killed with SIGKILL, and every waiting client hears it
at once and /health answers 503. A second server, started as users start it (`python -m ...serve`),
must exit non-zero within seconds of losing its core. Every wait is bounded.
"""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import CYCLES, cycle, free_port

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from common.serving.chat_template import chat_prompt_ids  # noqa: E402
from common.serving.engine_client import EngineCoreClient  # noqa: E402
from common.serving.server import build_app, parse_metrics  # noqa: E402
from test_server import TEMPLATE  # noqa: E402

NAME = CYCLES[-1]
MODEL = "tiny"
TIMEOUT_S = 60        # spawning a core imports torch and loads the model: slow on a busy machine

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(char_checkpoint):
    engine = EngineCoreClient(NAME, char_checkpoint, {"device": "cpu"}, num_threads=1)
    engine.tokenizer.chat_template = TEMPLATE     # the front end renders templates, not the core
    dead = []
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(build_app(engine, MODEL), host="127.0.0.1", port=port, log_level="warning"))
    engine.on_dead = dead.append   # here the test watches the death; `serve` exits instead
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT_S
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    reference = cycle(NAME).LLM(char_checkpoint, device="cpu")
    reference.tokenizer.chat_template = TEMPLATE
    yield {"base": f"http://127.0.0.1:{port}", "engine": engine, "reference": reference, "dead": dead}
    srv.should_exit = True
    thread.join(TIMEOUT_S)
    assert not engine.process.is_alive()


def offline(server, prompts, lengths):
    sp = cycle(NAME).SamplingParams
    return server["reference"].generate(prompts, [sp(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths])


def metrics(server) -> dict:
    return parse_metrics(httpx.get(server["base"] + "/metrics", timeout=TIMEOUT_S).text)


def test_the_core_is_another_process(server):
    assert server["engine"].process.pid != os.getpid() and server["engine"].alive
    assert httpx.get(server["base"] + "/health", timeout=TIMEOUT_S).status_code == 200


def test_streamed_equals_non_streamed_and_generate(server):
    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key="none", timeout=TIMEOUT_S, max_retries=0)
    args = dict(model=MODEL, prompt="Hello there", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert whole.choices[0].text == streamed == offline(server, ["Hello there"], [12])[0].text
    assert len(chunks) == 12 and chunks[-1].choices[0].finish_reason == "length"


def test_a_stop_string_is_found_in_the_front_end(server):
    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key="none", timeout=TIMEOUT_S, max_retries=0)
    base = offline(server, ["abc"], [16])[0].text
    stop = base[3:5]
    out = client.completions.create(model=MODEL, prompt="abc", max_tokens=16, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert out.text == base[:base.index(stop)] and out.finish_reason == "stop"
    _wait_idle(server)    # the core, which never saw the stop string, was told to drop the request


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

    assert asyncio.run(run_all()) == [o.text for o in offline(server, prompts, lengths)]


def test_the_engines_validation_is_a_400_and_queues_nothing(server):
    before = metrics(server)
    response = httpx.post(server["base"] + "/v1/completions", json={"model": MODEL, "prompt": [1, 2, 100000]},
                          timeout=TIMEOUT_S)
    assert response.status_code == 400 and "100000" in response.json()["error"]["message"]
    assert metrics(server)["prompt_tokens_total"] == before["prompt_tokens_total"]
    assert httpx.get(server["base"] + "/health", timeout=TIMEOUT_S).status_code == 200


def _wait_idle(server) -> dict:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        m = metrics(server)
        if m["num_requests_running"] == 0 and m["num_requests_waiting"] == 0 and m["kv_cache_usage_perc"] == 0:
            return m
        assert time.monotonic() < deadline, f"server never went idle: {m}"
        time.sleep(0.05)


def _first_chunk(lines) -> None:
    for line in lines:
        if line.startswith("data:"):
            assert json.loads(line[5:])["choices"]
            return


def test_a_dropped_stream_is_aborted_in_the_core(server):
    before = _wait_idle(server)
    body = {"model": MODEL, "prompt": "go", "max_tokens": 480, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=TIMEOUT_S) as http:
        with http.stream("POST", server["base"] + "/v1/completions", json=body) as response:
            lines = response.iter_lines()   # kept: a dropped iterator would close the stream now
            _first_chunk(lines)
            assert metrics(server)["num_requests_running"] == 1
    after = _wait_idle(server)   # running 0, waiting 0, KV usage 0: the core freed its blocks
    assert after["generation_tokens_total"] - before["generation_tokens_total"] < 480


def _post(server, path, body) -> dict:
    response = httpx.post(server["base"] + path, json={"model": MODEL, **body}, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_through_the_core_process_equal_generates(server, stream):
    """Greedy, with echo: the prompt's logprobs (first output only) and each step's tokens' logprobs
    cross the pipe and come out as generate() computes them in this process."""
    prompt, k, n = [40, 41, 42, 43, 44], 3, 6
    body = {"prompt": prompt, "echo": True, "logprobs": k, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    if stream:
        response = httpx.post(server["base"] + "/v1/completions", json={"model": MODEL, **body, "stream": True},
                              timeout=TIMEOUT_S)
        chunks = [json.loads(line[6:]) for line in response.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        parts = [c["choices"][0]["logprobs"] for c in chunks]
        got = {key: sum((p[key] for p in parts), []) for key in ("tokens", "token_logprobs", "top_logprobs")}
    else:
        got = _post(server, "/v1/completions", body)["choices"][0]["logprobs"]
    sp = cycle(NAME).SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=k, prompt_logprobs=k)
    want = server["reference"].generate([prompt], sp)[0]
    ids = want.prompt_token_ids + want.token_ids
    decode = server["reference"].tokenizer.decode
    assert got["tokens"] == [decode([t]) for t in ids]
    assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
    wanted = [d[t] for d, t in zip(want.prompt_logprobs[1:] + want.logprobs, ids[1:])]
    assert got["token_logprobs"][1:] == pytest.approx(wanted, abs=1e-5)
    for top, d in zip(got["top_logprobs"][1:], want.prompt_logprobs[1:] + want.logprobs):
        assert top == pytest.approx({decode([t]): v for t, v in d.items()}, abs=1e-5)


def test_chat_logprobs_through_the_core_process_equal_generates(server):
    messages = [{"role": "user", "content": "hi there"}]
    body = _post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 5, "temperature": 0,
                                                  "ignore_eos": True, "logprobs": True, "top_logprobs": 2})
    reference = server["reference"]
    sp = cycle(NAME).SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2)
    want = reference.generate([chat_prompt_ids(reference.tokenizer, messages)], sp)[0]
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [reference.tokenizer.decode([t]) for t in want.token_ids]
    assert [c["logprob"] for c in content] == pytest.approx([d[t] for d, t in zip(want.logprobs, want.token_ids)],
                                                            abs=1e-5)
    assert all(len(c["top_logprobs"]) == 2 for c in content)
    assert body["choices"][0]["message"]["content"] == want.text


def test_the_new_sampling_fields_reach_the_core(server):
    """stop_token_ids, min_tokens and include_stop_str_in_output travel with the request: the
    answers equal generate()'s with the same SamplingParams, and each field changes the answer."""
    sp, reference = cycle(NAME).SamplingParams, server["reference"]
    base = offline(server, ["abc"], [12])[0]
    stop_id = base.token_ids[5]
    first = base.token_ids.index(stop_id)
    answers = []
    for extra in ({"stop_token_ids": [stop_id]}, {"stop_token_ids": [stop_id], "min_tokens": first + 1},
                  {"stop": [base.text[7:9]], "include_stop_str_in_output": True}):
        body = _post(server, "/v1/completions", {"prompt": "abc", "max_tokens": 12, "temperature": 0,
                                                 "ignore_eos": True, **extra})
        want = reference.generate(["abc"], sp(temperature=0, max_tokens=12, ignore_eos=True, **extra))[0]
        choice = body["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == (want.text, want.finish_reason)
        assert body["usage"]["completion_tokens"] == len(want.token_ids)
        answers.append(want)
    assert len(answers[0].token_ids) == first + 1 and answers[0].finish_reason == "stop"
    assert answers[1].token_ids[:first + 1] != answers[0].token_ids
    stop = base.text[7:9]
    assert answers[2].text == base.text[:base.text.index(stop) + 2] and answers[2].finish_reason == "stop"


def test_killing_the_core_fails_waiting_streams_at_once_and_health_is_503(server):
    """Last in this module: the server's core is dead afterwards."""
    body = {"model": MODEL, "prompt": "go", "max_tokens": 480, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=TIMEOUT_S) as http:
        with http.stream("POST", server["base"] + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            _first_chunk(lines)
            os.kill(server["engine"].process.pid, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data:")]   # a stream left waiting: ReadTimeout
    errors = [json.loads(line[5:]) for line in rest if "error" in line]
    assert errors and "engine core" in errors[-1]["error"]["message"]
    assert not server["engine"].alive and server["dead"]
    assert httpx.get(server["base"] + "/health", timeout=TIMEOUT_S).status_code == 503
    response = httpx.post(server["base"] + "/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=TIMEOUT_S)
    assert response.status_code >= 500


def test_serve_exits_non_zero_within_seconds_when_its_core_dies(char_checkpoint, tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", f"{NAME}.serve", char_checkpoint, "--port", str(port),
                             "--served-model-name", MODEL, "--device", "cpu"], stdout=log, stderr=log, env=env)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 3 * TIMEOUT_S
        while not _healthy(base):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        core_pid = int(re.search(r"engine core: pid (\d+)", (tmp_path / "serve.log").read_text()).group(1))
        assert core_pid != proc.pid
        os.kill(core_pid, signal.SIGKILL)
        status = proc.wait(TIMEOUT_S)   # a hang guard: it exits as soon as it sees the core gone
        assert status != 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT_S)
        log.close()


def _healthy(base: str) -> bool:
    try:
        return httpx.get(base + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_step_that_raises_fails_the_streams_and_marks_the_engine_dead(char_checkpoint):
    """In a thread (InProcessEngine) the core runs the same loop: a step that raises ends it."""
    from common.serving.engine_client import EngineDeadError, InProcessEngine

    llm = cycle(NAME).LLM(char_checkpoint, device="cpu")
    engine = InProcessEngine(llm)
    dead = []
    engine.on_dead = dead.append

    def broken_step():
        raise RuntimeError("out of cheese")

    async def run():
        engine.start()
        llm.step = broken_step
        stream = await engine.add([5, 6, 7], engine.sampling_params_cls(temperature=0, max_tokens=4))
        with pytest.raises(EngineDeadError, match="out of cheese"):
            await asyncio.wait_for(anext(stream), TIMEOUT_S)
        assert not engine.alive and dead
        with pytest.raises(EngineDeadError):
            await engine.add([5, 6], engine.sampling_params_cls(max_tokens=2))
        engine.shutdown()

    asyncio.run(run())


@pytest.mark.parametrize("name", sorted({"cycle4_batching", NAME}))
def test_add_request_without_detokenizing_returns_ids_only_and_ignores_stop_strings(name, char_checkpoint):
    llm = cycle(name).LLM(char_checkpoint, device="cpu")
    sp = cycle(name).SamplingParams
    text = llm.generate(["abc"], sp(temperature=0, max_tokens=8, ignore_eos=True))[0].text
    request_id = llm.add_request("abc", sp(temperature=0, max_tokens=8, ignore_eos=True, stop=[text[2:4]]),
                                 detokenize=False)
    outputs = []
    while llm.has_unfinished_requests():
        outputs += [o for o in llm.step() if o.request_id == request_id]
    assert [o.delta_text for o in outputs] == [""] * 8          # no text: the front end makes it
    assert outputs[-1].finish_reason == "length"                # the stop string was not looked for
    assert llm.tokenizer.decode(sum((o.new_token_ids for o in outputs), []), skip_special_tokens=True) == text
