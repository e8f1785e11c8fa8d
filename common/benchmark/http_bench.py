"""The online benchmark against any OpenAI-compatible server (ours, or vLLM's on your GPU).

    python compare.py --workload online --base-url http://127.0.0.1:8000/v1 --model NAME

The same requests and arrival schedule as `--workload online` against the cycles (token-id
prompts, greedy, ignore_eos so every request generates its max_tokens), sent as streaming
/completions requests. A token's time is when its chunk arrives: with one token per chunk, as our
server and vLLM's send, the ITL is per token; the token count comes from the final usage chunk.
"""

import asyncio
import json
import sys
import time
from pathlib import Path

from common.benchmark.machine import machine_info
from common.engine.device import resolve_device
from common.benchmark.online import (RequestRecord, arrival_times, format_online_table, online_row, online_settings,
                           parse_rates)
from common.benchmark.workloads import make_workload, size_key

REQUEST_TIMEOUT_S = 600


async def _one(client, url: str, model: str, request, record: RequestRecord, start: float) -> None:
    await asyncio.sleep(max(0.0, record.arrival_s - (time.perf_counter() - start)))
    body = {"model": model, "prompt": request.prompt_token_ids, "max_tokens": request.max_tokens,
            "temperature": 0, "ignore_eos": request.ignore_eos, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                print(f"request failed: HTTP {response.status_code}: {(await response.aread())[:300]!r}", file=sys.stderr)
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("choices"):
                    record.token_times_s.append(time.perf_counter() - start)
                if chunk.get("usage"):
                    record.num_output_tokens = chunk["usage"]["completion_tokens"]
    except Exception as error:  # noqa: BLE001  (a failed request is counted as failed, not fatal)
        print(f"request failed: {error!r}", file=sys.stderr)
        return
    if record.token_times_s:
        record.finish_s = record.token_times_s[-1]
        record.num_output_tokens = record.num_output_tokens or len(record.token_times_s)


async def run_http(base_url: str, model: str, requests, arrivals: list[float]) -> list[RequestRecord]:
    import httpx

    records = [RequestRecord(a) for a in arrivals]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(_one(client, base_url.rstrip("/") + "/completions", model, r, rec, start)
                               for r, rec in zip(requests, records)))
    return records


def server_identity(base_url: str) -> dict:
    """What the server says it is (GET BASE/models), beside the URL it was reached at: a stored
    result then names the model served, not only the name the client asked for."""
    import httpx

    try:
        models = httpx.get(base_url.rstrip("/") + "/models", timeout=10).json().get("data", [])
    except (httpx.HTTPError, ValueError) as error:
        return {"base_url": base_url, "models": None, "error": repr(error)}
    return {"base_url": base_url, "models": models}


def main_http(args) -> int:
    """compare.py --base-url: one row per request rate, for the server at args.base_url."""
    from common.engine.model_source import load_tokenizer, resolve_model

    if not args.model:
        raise SystemExit("--base-url needs --model: the name the server serves (and a tokenizer to build prompts)")
    device = resolve_device(args.device)
    source = resolve_model(args.model, args.weights)
    work = make_workload("online", load_tokenizer(source), device.type, args.quick,
                         max_model_len=source.config.max_position_embeddings, num_requests=args.num_requests,
                         prompt_len=args.prompt_len, output_len=args.output_len)
    rates = parse_rates(args.request_rate) if args.request_rate else [None]
    results = []
    for rate in rates:
        settings = online_settings(size_key(device.type, args.quick), rate, args.burstiness, args.slo_ttft, args.slo_tpot)
        arrivals = arrival_times(len(work.requests), settings["request_rate"], settings["burstiness"])
        records = asyncio.run(run_http(args.base_url, args.model, work.requests, arrivals))
        results.append({"engine": f"http {args.base_url}", "model": source.name, "workload": "online",
                        "workload_size": work.device_size, "num_requests": len(work.requests),
                        "same_tokens_as_c1": "-", **online_row(records, settings)})
    out_dir = Path(args.out or Path("results") / "http-online")
    out_dir.mkdir(parents=True, exist_ok=True)
    # The machine is the client's (the one this runs on); the server may be elsewhere.
    run = {"argv": sys.argv, "base_url": args.base_url, "machine": machine_info(device),
           "server": server_identity(args.base_url)}
    results_json = json.dumps({"run": run, "results": results}, indent=1, default=str)
    (out_dir / "results.json").write_text(results_json)
    print(format_online_table(results))
    print(f"results: {out_dir / 'results.json'}")
    return 0 if all(r["failed"] == 0 for r in results) else 1


def wait_healthy(base_url: str, timeout_s: float) -> bool:
    """Poll BASE/health until it answers 200 (a server still loading refuses connections)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(base_url.rstrip("/") + "/health", timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


if __name__ == "__main__":   # python -m common.benchmark.http_bench wait http://127.0.0.1:8000 90 (scripts)
    if len(sys.argv) != 4 or sys.argv[1] != "wait":
        raise SystemExit("usage: python -m common.benchmark.http_bench wait SERVER_URL TIMEOUT_S")
    sys.exit(0 if wait_healthy(sys.argv[2], float(sys.argv[3])) else 1)
