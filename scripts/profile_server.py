"""Where a served decode step's time goes: cProfile of the engine core and of the HTTP front end.

    python scripts/profile_server.py                         # cycle6_flash, core in its own process
    python scripts/profile_server.py --no-engine-process     # the first version: the core in a thread
    python scripts/profile_server.py --rate 2 --num-prompts 32 --out docs/results/profile_served_cycle6

Starts `python -m CYCLE.serve SmolLM2 --profile-dir OUT` (the server profiles its event loop thread
into front_end.prof and the core into core.prof), drives it with vLLM's own client when VLLM_PY has
vLLM (`--vllm-python PATH` or `VLLM_PY=PATH`; the chapter's load: random dataset, 64 in / 32 out, --ignore-eos, seed 0), else with our own
HTTP client on random token ids at Poisson arrivals, stops the server with SIGINT (so both profiles
are written), and writes OUT/profile.md: each process's busy and idle time and the functions that
cost the most. cProfile slows Python-heavy code down, so read shares, not absolute times.
"""

import argparse
import os
import pathlib
import pstats
import signal
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from common.benchmark.http_bench import wait_healthy  # noqa: E402
from common.engine.model_source import resolve_model  # noqa: E402

SERVED = "smollm2"
# Functions whose cumulative time says what a process spent its time on (substring of pstats' key).
CORE_PARTS = {"llm.step (the engine's work)": "(step)", "waiting for commands (idle)": "(recv)",
              "sending outputs": "(send)"}
FRONT_PARTS = {"event loop waiting (idle)": "select.epoll", "detokenizing": "(update)",
               "tokenizing": "tokenization_utils_base.py", "SSE / JSON encoding": "(dumps)",
               "engine client: outputs to streams": "(_on_outputs)"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycle", default="cycle6_flash")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--rate", type=float, default=2.0)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--port", type=int, default=8777)
    p.add_argument("--vllm-python", default=os.environ.get("VLLM_PY"),
                   help="the python of a virtualenv with vLLM (default: $VLLM_PY); without one, our own HTTP client drives the load")
    p.add_argument("--out", default=None, help="default: docs/results/profile_served_CYCLE_{process,thread}")
    p.add_argument("--limit-s", type=int, default=1800, help="the server is killed after this")
    return p.parse_args()


def drive_vllm(args, model_dir: str, out: pathlib.Path) -> None:
    code = ("import argparse, sys\nfrom vllm.benchmarks import serve\np = argparse.ArgumentParser()\n"
            "serve.add_cli_args(p)\nserve.main(p.parse_args(sys.argv[1:]))\n")
    subprocess.run([args.vllm_python, "-c", code, "--backend", "openai", "--base-url", f"http://127.0.0.1:{args.port}",
                    "--endpoint", "/v1/completions", "--model", model_dir, "--tokenizer", model_dir,
                    "--served-model-name", SERVED, "--dataset-name", "random", "--random-input-len", str(args.input_len),
                    "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
                    "--request-rate", str(args.rate), "--ignore-eos", "--seed", "0", "--temperature", "0", "--disable-tqdm",
                    "--percentile-metrics", "ttft,tpot,itl,e2el", "--save-result", "--result-dir", str(out),
                    "--result-filename", "client.json"], check=True, timeout=args.limit_s)


def drive_ours(args) -> None:
    import asyncio
    import random

    from common.benchmark.http_bench import run_http
    from common.benchmark.workloads import Request
    rng = random.Random(0)
    requests = [Request(ids, args.output_len, True, ids)
                for ids in ([rng.randrange(1000, 40000) for _ in range(args.input_len)] for _ in range(args.num_prompts))]
    arrivals, t = [], 0.0
    for _ in requests:
        arrivals.append(t)
        t += rng.expovariate(args.rate)
    asyncio.run(asyncio.wait_for(run_http(f"http://127.0.0.1:{args.port}/v1", SERVED, requests, arrivals), args.limit_s))


def has_vllm(python: str | None) -> bool:
    return bool(python) and os.path.exists(python) and subprocess.run([python, "-c", "import vllm"], capture_output=True,
                                                     timeout=300).returncode == 0


def summarize(path: pathlib.Path, parts: dict[str, str], title: str) -> list[str]:
    stats = pstats.Stats(str(path))
    total = max(v[3] for v in stats.stats.values())   # the outermost call's cumulative time
    lines = [f"## {title} ({path.name}): {total:.1f} s profiled", "", "| part | seconds | share |", "|---|---|---|"]
    for label, needle in parts.items():
        seconds = sum(v[3] for k, v in stats.stats.items() if needle in f"{k[0]}({k[2]})" and _outermost(stats, k, needle))
        lines.append(f"| {label} | {seconds:.2f} | {seconds / total:.0%} |")
    lines += ["", "Top functions by own time:", "", "```"]
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:20]
    lines += [f"{v[2]:8.3f}s own {v[3]:8.3f}s cum {v[1]:8d} calls  {k[2]} ({pathlib.Path(k[0]).name}:{k[1]})"
              for k, v in rows]
    return lines + ["```", ""]


def _outermost(stats, key, needle: str) -> bool:
    """Count a function once: not when one of its callers matches the same part (recursion, wrappers)."""
    return not any(needle in f"{c[0]}({c[2]})" for c in stats.stats[key][4])


def main() -> None:
    args = parse_args()
    mode = "process" if args.engine_process else "thread"
    out = pathlib.Path(args.out or f"docs/results/profile_served_{args.cycle}_{mode}")
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", "real").path
    flag = "--engine-process" if args.engine_process else "--no-engine-process"
    log = open(out / "server.log", "w")
    server = subprocess.Popen(["timeout", "-k", "10", str(args.limit_s), sys.executable, "-m", f"{args.cycle}.serve",
                               model_dir, "--served-model-name", SERVED, "--port", str(args.port), "--dtype", "float32",
                               flag, "--profile-dir", str(out)], stdout=log, stderr=log, start_new_session=True)
    try:
        if not wait_healthy(f"http://127.0.0.1:{args.port}", 600):
            raise SystemExit(f"the server did not come up: see {out / 'server.log'}")
        client = "vLLM's vllm.benchmarks.serve" if has_vllm(args.vllm_python) else "common.benchmark.http_bench"
        started = time.perf_counter()
        drive_vllm(args, model_dir, out) if client.startswith("vLLM") else drive_ours(args)
        load_s = time.perf_counter() - started
    finally:
        # One SIGINT to `timeout`, which passes it to the server: uvicorn stops cleanly, the core is
        # told to stop, and both profiles get written (a second SIGINT would make uvicorn force-quit).
        os.kill(server.pid, signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    report = [f"# A served load, profiled: {args.cycle}, engine core in a {mode}", "",
              f"SmolLM2-135M-Instruct (real weights), fp32, CPU: {os.cpu_count()} cores; client: {client}; "
              f"{args.num_prompts} requests at {args.rate} req/s, {args.input_len} in / {args.output_len} out tokens, "
              f"--ignore-eos; the load took {load_s:.1f} s. Profiler: cProfile (it slows Python code: read shares).", ""]
    report += summarize(out / "core.prof", CORE_PARTS, "engine core")
    report += summarize(out / "front_end.prof", FRONT_PARTS, "front end (event loop thread)")
    (out / "profile.md").write_text("\n".join(report))
    print("\n".join(report))


if __name__ == "__main__":
    main()
