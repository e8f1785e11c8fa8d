"""The mixed-arrivals workload (chapter 11): streaming clients decode while long prompts arrive.

    python -m common.benchmark.mixed_arrivals --cycles cycle8_graphs,cycle9_chunked --budgets 128,256,512,default
    python -m common.benchmark.mixed_arrivals --quick --cycles cycle8_graphs,cycle9_chunked --budgets 64

Short prompts that ask for many tokens (the streams) all arrive at 0; long prompts that ask for few
tokens arrive one by one while the streams decode. An engine whose step is a prefill or a decode
(cycles 4-8) stops every stream for each long prompt's whole prefill; one that spends a token
budget per step (cycle 9) keeps decoding them beside a chunk. Measured, as a streaming client sees
it (common/benchmark/online.py's driver and definitions): the streams' ITL p50, p99 and max and
TPOT p99, the long prompts' TTFT, output throughput. Each engine (and each budget of a cycle that
takes one) runs in a fresh process, one after the other, on the same seeded requests and arrivals.
"""

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from common.benchmark.machine import machine_info
from common.benchmark.online import drive_steps
from common.benchmark.report import cycle_number
from common.benchmark.tables import cell, format_columns
from common.benchmark.workloads import SAFE_ID_RANGE
from common.engine.metrics import percentile

# streams: count, prompt tokens, output tokens; long prompts: count, prompt tokens, output tokens,
# when the first arrives and the gap between them (seconds). The CPU size fits SmolLM2-135M on 2
# cores: 1-2k-token prompts (about a second of prefill each) while 4 streams decode.
SIZES = {
    "cpu": dict(streams=4, stream_prompt=(16, 32), stream_output=96, long=3, long_prompt=(1024, 2048),
                long_output=8, first_long_s=1.0, long_every_s=3.0),
    "cuda": dict(streams=32, stream_prompt=(32, 128), stream_output=512, long=8, long_prompt=(8192, 8192),
                 long_output=16, first_long_s=0.5, long_every_s=0.5),
    "quick": dict(streams=2, stream_prompt=(8, 8), stream_output=12, long=1, long_prompt=(96, 96),
                  long_output=2, first_long_s=0.05, long_every_s=0.1),
}


def make_requests(size: dict, max_model_len: int, seed: int = 0) -> tuple[list[list[int]], list[int], list[float]]:
    """Prompts (random ids), max_tokens and arrival times: the streams first, then the long prompts."""
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(*SAFE_ID_RANGE) for _ in range(n)]
    prompts, outputs, arrivals = [], [], []
    for _ in range(size["streams"]):
        prompts.append(ids(rng.randint(*size["stream_prompt"])))
        outputs.append(size["stream_output"])
        arrivals.append(0.0)
    for k in range(size["long"]):
        n = min(rng.randint(*size["long_prompt"]), max_model_len - size["long_output"])
        prompts.append(ids(n))
        outputs.append(size["long_output"])
        arrivals.append(size["first_long_s"] + k * size["long_every_s"])
    return prompts, outputs, arrivals


def metrics(records, num_streams: int) -> dict:
    """The streams' inter-token latencies and TPOT, the long prompts' TTFT, throughput."""
    streams, longs = records[:num_streams], records[num_streams:]
    itl = [b - a for r in streams for a, b in zip(r.token_times_s, r.token_times_s[1:])]
    tpot = [(r.finish_s - r.token_times_s[0]) / (r.num_output_tokens - 1) for r in streams if r.num_output_tokens > 1]
    ttft = [r.token_times_s[0] - r.arrival_s for r in longs if r.token_times_s]
    duration = max(r.finish_s for r in records)
    return {"stream_itl_p50_s": percentile(itl, 50), "stream_itl_p99_s": percentile(itl, 99),
            "stream_itl_max_s": max(itl, default=None), "stream_tpot_p99_s": percentile(tpot, 99),
            "long_ttft_mean_s": sum(ttft) / len(ttft) if ttft else None, "long_ttft_max_s": max(ttft, default=None),
            "output_throughput": sum(r.num_output_tokens for r in records) / duration, "duration_s": duration,
            "stream_token_times_s": [r.token_times_s for r in streams],   # for an ITL-over-time chart
            "long_arrival_s": [r.arrival_s for r in longs]}


def run_one(engine: str, budget: int | None, device: str, model: str, size_key: str, seed: int) -> dict:
    """One engine on the workload, in this process."""
    import importlib

    cycle = importlib.import_module(engine)
    options = {"max_num_batched_tokens": budget} if budget else {}
    llm = cycle.LLM(model, device=device, **options)
    size = SIZES[size_key]
    prompts, outputs, arrivals = make_requests(size, llm.source.config.max_position_embeddings, seed)
    params = [cycle.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outputs]
    llm.generate([prompts[0]], params[0])            # warm-up: first-call costs are no one's ITL
    started = time.perf_counter()
    records = drive_steps(llm, prompts, params, arrivals)
    return {"engine": engine, "max_num_batched_tokens": llm.config.max_num_batched_tokens,
            "budget": budget or "default", "wall_s": time.perf_counter() - started, "size": size_key,
            "workload": size, "model": model, "weights": llm.source.weights, "weights_note": llm.source.fallback_reason,
            "device": device, **metrics(records, size["streams"])}


def run_server(base_url: str, model: str, name: str, size_key: str, seed: int, max_model_len: int) -> dict:
    """The same requests and arrivals against a running OpenAI-compatible server (ours or vLLM's),
    streamed by our HTTP client (common/benchmark/http_bench.py): one token time per streamed chunk."""
    import asyncio
    from types import SimpleNamespace

    from common.benchmark.http_bench import run_http, server_identity

    size = SIZES[size_key]
    prompts, outputs, arrivals = make_requests(size, max_model_len, seed)
    requests = [SimpleNamespace(prompt_token_ids=p, max_tokens=n, ignore_eos=True) for p, n in zip(prompts, outputs)]
    asyncio.run(run_http(base_url, model, requests[:1], [0.0]))     # warm-up, as run_one's
    started = time.perf_counter()
    records = asyncio.run(run_http(base_url, model, requests, arrivals))
    if any(r.finish_s is None for r in records):
        raise SystemExit(f"{name}: {sum(r.finish_s is None for r in records)} request(s) failed (see above)")
    return {"engine": name, "max_num_batched_tokens": "server's", "budget": "server's", "server": server_identity(base_url),
            "wall_s": time.perf_counter() - started, "size": size_key, "workload": size, "model": model,
            **metrics(records, size["streams"])}


def format_table(rows: list[dict]) -> str:
    header = ["engine", "budget", "stream ITL p50 s", "ITL p99 s", "ITL max s", "TPOT p99 s",
              "long TTFT mean s", "long TTFT max s", "tok/s"]
    body = [[r["engine"], str(r["max_num_batched_tokens"]), cell(r["stream_itl_p50_s"]), cell(r["stream_itl_p99_s"]),
             cell(r["stream_itl_max_s"]), cell(r["stream_tpot_p99_s"]), cell(r["long_ttft_mean_s"]),
             cell(r["long_ttft_max_s"]), cell(r["output_throughput"], fmt="{:.1f}")] for r in rows]
    return "\n".join(format_columns(header, body))


def plot_itl_over_time(rows: list[dict], path: Path) -> Path:
    """One panel per engine run: every gap between two tokens of a stream, at the time it ended,
    and the long prompts' arrivals as dashed lines: where a prefill stalls the streams, it shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 1.9 * len(rows) + 0.6), sharex=True, squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        for times in row["stream_token_times_s"]:
            ax.plot(times[1:], [b - a for a, b in zip(times, times[1:])], ".", markersize=3)
        for t in row["long_arrival_s"]:
            ax.axvline(t, color="black", linestyle="--", linewidth=0.7)
        ax.set_title(f"{row['engine']}, max_num_batched_tokens {row['max_num_batched_tokens']}", fontsize=8)
        ax.set_ylabel("ITL s", fontsize=8)
    axes[-1, 0].set_xlabel("time since the first arrival, s (dashed: a long prompt arrives)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Streams decoding while long prompts arrive (chapter 11).")
    p.add_argument("--cycles", default="cycle8_graphs,cycle9_chunked", help="comma-separated cycle packages")
    p.add_argument("--budgets", default="default",
                   help="max_num_batched_tokens to sweep for cycles from 9 on, e.g. 128,256,512,default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--quick", action="store_true", help="a smoke test of seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for results.json (default: print only)")
    p.add_argument("--plot", action="store_true", help="with --out: also itl_over_time.png")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one engine may take, start-up included")
    p.add_argument("--base-url", default=None, help="measure this running server instead (e.g. "
                   "http://127.0.0.1:8000/v1); --name labels its row, --model is the served model's name")
    p.add_argument("--name", default="server", help="--base-url: the row's name")
    p.add_argument("--max-model-len", type=int, default=8192, help="--base-url: the served model's context length")
    p.add_argument("--one", nargs=2, metavar=("ENGINE", "BUDGET"), help=argparse.SUPPRESS)   # a child process
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    size_key = "quick" if args.quick else ("cuda" if args.device == "cuda" else "cpu")
    if args.one:
        engine, budget = args.one
        row = run_one(engine, None if budget == "default" else int(budget), args.device, args.model, size_key, args.seed)
        print("RESULT " + json.dumps(row))
        return 0
    if args.base_url:
        rows = [run_server(args.base_url, args.model, args.name, size_key, args.seed, args.max_model_len)]
        return _report(rows, args)
    budgets = args.budgets.split(",")
    # The budget is swept for cycles that chunk (9 on); the others refuse a prompt longer than it.
    runs = [(c, b) for c in args.cycles.split(",") for b in (budgets if cycle_number(c) >= 9 else ["default"])]
    rows = []
    for engine, budget in runs:   # a fresh process each: no engine warms another's caches
        command = [sys.executable, "-m", "common.benchmark.mixed_arrivals", "--one", engine, budget, "--device",
                   args.device, "--model", args.model, "--seed", str(args.seed)] + ["--quick"] * args.quick
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:    # subprocess.run kills the child before raising
            print(f"{engine} budget {budget}: no result within --timeout {args.timeout:g} s", file=sys.stderr)
            return 3
        lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{engine} budget {budget} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(lines[-1][len("RESULT "):]))
    return _report(rows, args)


def _report(rows: list[dict], args) -> int:
    """Print the table; with --out, store results.json (and the ITL chart with --plot)."""
    print(format_table(rows))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        record = {"workload": "mixed_arrivals", "machine": machine_info(torch.device(args.device)), "results": rows}
        (out / "results.json").write_text(json.dumps(record, indent=1))
        print(f"wrote {out / 'results.json'}")
        if args.plot:
            print(f"wrote {plot_itl_over_time(rows, out / 'itl_over_time.png')}")
    return 0


def from_compare(args, cycles: list[str], device, model: str) -> int:
    """`compare.py --workload mixed_arrivals`: the same run, with compare.py's cycles, device, model,
    --quick, --out, --plot, --timeout and --budgets."""
    argv = ["--cycles", ",".join(cycles), "--budgets", args.budgets, "--device", device.type, "--model", model]
    argv += ["--quick"] * args.quick + ["--plot"] * args.plot + ["--out", args.out] * bool(args.out)
    return main(argv + ["--timeout", str(args.timeout)] * bool(args.timeout))


if __name__ == "__main__":
    raise SystemExit(main())
