"""N minutes of hostile and normal clients against a real server: does it stay up, fast and small?

    python scripts/soak_server.py --minutes 1                                   # a quick check
    python scripts/soak_server.py --minutes 10 --out docs/results/soak-cpu      # the stored run

Starts `python -m CYCLE.serve MODEL` on 127.0.0.1 (an API key, client templates allowed), then
runs NORMAL clients (greedy completions and chats, streamed and not, on a few fixed prompts) and
HOSTILE clients (out-of-range and huge numbers, lone surrogates,
bad echo ids, runaway templates, unknown fields by the thousand, too many prompts, oversized
bodies, wrong keys, clients that leave mid-stream) until the time or the request count runs out.
Then it waits for the server to go idle and writes OUT/soak.json and OUT/soak.txt:

- requests served, responses by status (normal and hostile apart), 5xx count;
- p50/p99 latency of the normal requests, and whether every greedy answer equals the first one
  for its prompt;
- RSS of the server and its engine core over time (psutil), and its growth;
- the end state from /metrics: running, waiting, KV usage back to the start value;
- the machine: processor, CPU flags, model, weights, the command.

Every wait is bounded; the server is stopped (SIGINT, then killed) however the run ends.
"""

import argparse
import asyncio
import json
import os
import pathlib
import platform
import random
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.benchmark.http_bench import wait_healthy  # noqa: E402
from common.serving.metrics import parse_metrics  # noqa: E402

KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
RUNAWAY = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
HOSTILE = [   # (path, body or raw bytes, headers override)
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "top_k": 2**63, "temperature": 1}, None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "top_k": 2**63, "temperature": 0}, None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "repetition_penalty": 10**400}, None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "min_p": -10**400}, None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "seed": 2**70}, None),
    ("/v1/completions", {"prompt": "ok \ud800", "max_tokens": 4}, None),
    ("/tokenize", {"prompt": "\udfff"}, None),
    ("/v1/completions", {"prompt": [-1], "echo": True, "max_tokens": 1}, None),
    ("/v1/completions", {"prompt": [2**40], "echo": True, "max_tokens": 0}, None),
    ("/v1/completions", {"prompt": [10**6], "echo": True, "max_tokens": 0, "logprobs": 1}, None),
    ("/v1/completions", {"prompt": ["a"] * 2049, "max_tokens": 1}, None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "stop": ["x"] * 1000}, None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "stop": "y" * 100000}, None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "logprobs": 10**9}, None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, **{f"junk{i}": i for i in range(1500)}}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "chat_template": RUNAWAY}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "chat_template": "{{ 'a' * 10**9 }}"}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "chat_template": "{{ messages | tojson(indent=10**9) }}"}, None),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1 }}"}, {}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4}, {"Authorization": "Bearer wrong"}),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": ', None),
    ("/v1/completions", b"x" * (17 * 2**20), None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**12}, None),
    ("/v1/completions", {"prompt": "hi", "n": 2**63}, None),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycle", default="cycle6_flash")
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests in all")
    p.add_argument("--normal-clients", type=int, default=4)
    p.add_argument("--hostile-clients", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/soak")
    return p.parse_args()


def cpu_flags() -> list[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma", "sse4")))
    except OSError:
        pass
    return []


def rss_mb(pid: int) -> float:
    """The server and its children (the engine core process), resident, in MB."""
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 1e6
    except psutil.Error:
        return float("nan")


class Tally:
    def __init__(self):
        self.status = {"normal": {}, "hostile": {}}
        self.latency, self.mismatch, self.first_text, self.count = [], 0, {}, 0
        self.hostile_slowest: dict[str, float] = {}    # attack -> its slowest answer, seconds

    def record(self, kind: str, status: int | str):
        self.status[kind][str(status)] = self.status[kind].get(str(status), 0) + 1
        self.count += 1


async def normal_client(client, base, tally, rng, stop_at, limit):
    while time.monotonic() < stop_at and tally.count < limit:
        prompt, stream = rng.choice(PROMPTS), rng.random() < 0.5
        chat = rng.random() < 0.3
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = {"max_tokens": 16, "temperature": 0, "ignore_eos": True, "stream": stream}
        body |= {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
        started = time.monotonic()
        try:
            text, status = await _send(client, base + path, body, stream, chat)
        except httpx.HTTPError as error:
            text, status = None, type(error).__name__
        tally.record("normal", status)
        if status == 200:
            tally.latency.append(time.monotonic() - started)
            key = (path, prompt)
            if tally.first_text.setdefault(key, text) != text:
                tally.mismatch += 1


async def _send(client, url, body, stream, chat):
    if not stream:
        r = await client.post(url, json=body, headers=AUTH)
        if r.status_code != 200:
            return None, r.status_code
        choice = r.json()["choices"][0]
        return (choice["message"]["content"] if chat else choice["text"]), 200
    text = ""
    async with client.stream("POST", url, json=body, headers=AUTH) as r:
        if r.status_code != 200:
            return None, r.status_code
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                choice = (json.loads(line[6:]).get("choices") or [{}])[0]
                text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
    return text, 200


async def hostile_client(client, base, tally, rng, stop_at, limit):
    while time.monotonic() < stop_at and tally.count < limit:
        if rng.random() < 0.15:       # a client that leaves mid-stream
            try:
                body = {"prompt": rng.choice(PROMPTS), "max_tokens": 64, "stream": True, "ignore_eos": True}
                async with client.stream("POST", base + "/v1/completions", json=body, headers=AUTH) as r:
                    async for _ in r.aiter_lines():
                        break
                tally.record("hostile", "left mid-stream")
            except httpx.HTTPError as error:
                tally.record("hostile", type(error).__name__)
            continue
        index = rng.randrange(len(HOSTILE))
        path, body, headers = HOSTILE[index]
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        started = time.monotonic()
        try:
            r = await client.post(base + path, content=content,
                                  headers={**AUTH, **headers} if headers is not None else AUTH)
            tally.record("hostile", r.status_code)
        except httpx.HTTPError as error:
            tally.record("hostile", type(error).__name__)
        took, name = time.monotonic() - started, f"{index}:{content[:60].decode(errors='replace')}"
        tally.hostile_slowest[name] = round(max(took, tally.hostile_slowest.get(name, 0)), 3)


async def sample_rss(pid, samples, started, stop_at):
    while time.monotonic() < stop_at:
        samples.append([round(time.monotonic() - started, 1), round(rss_mb(pid), 1)])
        await asyncio.sleep(5)


async def drive(args, base, pid) -> tuple[Tally, list]:
    tally, samples, rng = Tally(), [], random.Random(args.seed)
    started = time.monotonic()
    stop_at = started + args.minutes * 60
    limits = httpx.Limits(max_connections=args.normal_clients + args.hostile_clients + 2)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:   # a loaded CPU is slow, not broken
        jobs = [normal_client(client, base, tally, random.Random(rng.random()), stop_at, args.max_requests)
                for _ in range(args.normal_clients)]
        jobs += [hostile_client(client, base, tally, random.Random(rng.random()), stop_at, args.max_requests)
                 for _ in range(args.hostile_clients)]
        await asyncio.gather(sample_rss(pid, samples, started, stop_at), *jobs)
    samples.append([round(time.monotonic() - started, 1), round(rss_mb(pid), 1)])
    return tally, samples


def idle_state(base: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        m = parse_metrics(httpx.get(base + "/metrics", timeout=10).text)
        state = {k: m.get(k) for k in
                 ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")}
        if (state["num_requests_running"] == 0 and state["num_requests_waiting"] == 0) or time.monotonic() > deadline:
            return state
        time.sleep(1)


def summary(args, tally, samples, start_state, end_state, alive, command) -> dict:
    lat = sorted(tally.latency)
    pct = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None
    five = sum(n for kind in tally.status.values() for s, n in kind.items() if s.startswith("5"))
    rss = [mb for _, mb in samples]
    return {"command": command, "cycle": args.cycle, "model": args.model, "minutes": args.minutes,
            "machine": {"processor": _cpu_name(), "cpu_count": os.cpu_count(), "cpu_flags": cpu_flags(),
                        "platform": platform.platform(), "python": platform.python_version()},
            "requests": tally.count, "status": tally.status, "responses_5xx": five,
            "normal_latency_s": {"p50": pct(0.5), "p99": pct(0.99), "n": len(lat)},
            "greedy_mismatches": tally.mismatch, "hostile_slowest_s": tally.hostile_slowest, "server_alive_at_end": alive,
            "rss_mb": samples, "rss_growth_mb": round(rss[-1] - rss[0], 1) if rss else None,
            "start_state": start_state, "end_state": end_state,
            "idle_at_end": end_state["num_requests_running"] == 0 and end_state["num_requests_waiting"] == 0
            and end_state["kv_cache_usage_perc"] == start_state["kv_cache_usage_perc"]}


def _cpu_name() -> str:
    from common.benchmark.machine import _cpu_name as name
    return name()


def text_report(r: dict) -> str:
    lines = [f"soak: {r['cycle']} serving {r['model']} for {r['minutes']} min on {r['machine']['processor']} "
             f"({r['machine']['cpu_count']} CPUs; flags {' '.join(r['machine']['cpu_flags'])})",
             f"command: {r['command']}",
             f"requests: {r['requests']}; responses 5xx: {r['responses_5xx']}; server alive: {r['server_alive_at_end']}",
             f"normal: {r['status']['normal']}", f"hostile: {r['status']['hostile']}",
             f"normal latency p50 {r['normal_latency_s']['p50']} s, p99 {r['normal_latency_s']['p99']} s "
             f"({r['normal_latency_s']['n']} requests); greedy mismatches: {r['greedy_mismatches']}",
             f"RSS (server + core): {r['rss_mb'][0][1] if r['rss_mb'] else '?'} MB -> "
             f"{r['rss_mb'][-1][1] if r['rss_mb'] else '?'} MB (growth {r['rss_growth_mb']} MB)",
             f"end: {r['end_state']} (start {r['start_state']}); idle: {r['idle_at_end']}"]
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", f"{args.cycle}.serve", args.model, "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", "soak", "--api-key", KEY, "--trust-request-chat-template"]
    server = subprocess.Popen(command, cwd=ROOT)
    try:
        if not wait_healthy(base, 900):
            raise SystemExit("the server did not become healthy within 900 s")
        start_state = idle_state(base)
        tally, samples = asyncio.run(drive(args, base, server.pid))
        alive = server.poll() is None
        end_state = idle_state(base) if alive else {"num_requests_running": None, "num_requests_waiting": None,
                                                    "kv_cache_usage_perc": None}
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
    report = summary(args, tally, samples, start_state, end_state, alive,
                     " ".join(["python", "scripts/soak_server.py", *sys.argv[1:]]))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    (out / "soak.txt").write_text(text_report(report))
    print(text_report(report), end="")
    ok = report["responses_5xx"] == 0 and alive and report["greedy_mismatches"] == 0 and report["idle_at_end"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
