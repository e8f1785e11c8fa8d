"""Benchmark every cycle (and the HuggingFace baselines) on one workload and compare them.

    python compare.py                                   # all cycles + HF, throughput workload
    python compare.py --cycles 1,4,5 --workload shared_prefix --plot
    python compare.py --quick --cycles 1 --out /tmp/smoke  # a smoke test in seconds
    python compare.py --workload online --cycles 3,4 --request-rate 0.5,1,2 --plot  # requests arriving over time
    python compare.py --workload online --base-url http://127.0.0.1:8000/v1 --model NAME  # any OpenAI-compatible server

Each engine runs in its own subprocess (python -m common.bench) one after another, so engines never
share memory, caches or a warmed-up allocator. Results go to DIR/results.json (and DIR/*.png with
--plot); a table is printed at the end.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from common.bench import HF_ENGINES, REFERENCE_CYCLE, machine_info
from common.cli import parse_options
from common.device import default_model, resolve_device
from common.metrics import PEAK_WITH_LOADING
from common.online import format_online_table, parse_rates
from common.workloads import WORKLOADS

ROOT = Path(__file__).resolve().parent
STDERR_TAIL_LINES = 25
MIB = 2**20


def find_cycles() -> list[str]:
    """Every cycle package in the repository, in cycle order."""
    names = [p.parent.name for p in ROOT.glob("cycle[0-9]_*/__init__.py")]
    return sorted(names, key=lambda n: (cycle_number(n), n))


def select_cycles(spec: str | None, available: list[str]) -> list[str]:
    """'1,4,cycle5_prefix' -> package names in cycle order; None -> all available."""
    if spec is None:
        return available
    chosen = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        matches = [c for c in available if c == item or (item.isdigit() and c.startswith(f"cycle{item}_"))]
        if not matches:
            raise SystemExit(f"--cycles: no cycle {item!r} in this repository (have: {', '.join(available) or 'none'})")
        chosen += matches
    return [c for c in available if c in chosen]  # cycle order, whatever order they were named in


def cycle_number(engine: str) -> int | None:
    """cycle4_batching -> 4; an HF engine -> None."""
    prefix = engine.partition("_")[0]
    return int(prefix[len("cycle"):]) if prefix.startswith("cycle") and prefix[len("cycle"):].isdigit() else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark the cycles and the HF baselines on one workload.")
    p.add_argument("--cycles", default=None, help="comma-separated numbers or names (default: every cycle present)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--model", default=None, help="default: Qwen/Qwen3-0.6B on CUDA, SmolLM2-135M-Instruct on CPU")
    p.add_argument("--weights", default="auto", choices=["auto", "real", "random"])
    p.add_argument("--dtype", default=None, help="default: bf16 on CUDA, fp32 on CPU; HF uses the cycles' dtype")
    p.add_argument("--workload", default="throughput", choices=WORKLOADS)
    p.add_argument("--quick", action="store_true", help="tiny workload sizes: a smoke test")
    p.add_argument("--num-requests", type=int, default=None, help="override the workload size's request count")
    p.add_argument("--prompt-len", type=int, default=None, help="give every prompt this many tokens of its own")
    p.add_argument("--plot", action="store_true", help="also write PNG bar charts")
    p.add_argument("--out", default=None, help="output folder (default: results/<device>-<workload>)")
    p.add_argument("--no-hf", action="store_true", help="skip the HuggingFace baselines")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="engine option passed to every engine that takes it, e.g. max_num_seqs=8 (repeatable)")
    online = p.add_argument_group("--workload online (defaults per device in common/online.py)")
    online.add_argument("--request-rate", default=None, help="requests/s; inf: all at once; a comma list sweeps")
    online.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps (1: Poisson)")
    online.add_argument("--slo-ttft", type=float, default=None, help="goodput's time-to-first-token target, s")
    online.add_argument("--slo-tpot", type=float, default=None, help="goodput's time-per-output-token target, s")
    online.add_argument("--base-url", default=None, help="benchmark this OpenAI-compatible server (e.g. "
                        "http://127.0.0.1:8000/v1) instead of the cycles; --model names its model")
    return p


def bench_command(engine: str, args, device: str, model: str, dtype: str | None, out_path: Path) -> list[str]:
    cmd = [sys.executable, "-m", "common.bench", "--engine", engine, "--workload", args.workload,
           "--device", device, "--model", model, "--weights", args.weights, "--out", str(out_path)]
    if args.quick:
        cmd.append("--quick")
    if args.num_requests:
        cmd += ["--num-requests", str(args.num_requests)]
    if args.prompt_len:
        cmd += ["--prompt-len", str(args.prompt_len)]
    if dtype:
        cmd += ["--dtype", dtype]
    for option in args.option:
        cmd += ["--option", option]
    if args.workload == "online":
        cmd += ["--burstiness", str(args.burstiness)]
        for flag, value in (("--slo-ttft", args.slo_ttft), ("--slo-tpot", args.slo_tpot)):
            if value is not None:
                cmd += [flag, str(value)]
    return cmd


def run_one(cmd: list[str], out_path: Path) -> tuple[dict | None, str]:
    """Run one bench subprocess; return its result, or None and the tail of its stderr."""
    out_path.unlink(missing_ok=True)  # a stale file from an earlier run must not pass for this one
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode == 0 and out_path.exists():
        return json.loads(out_path.read_text()), ""
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-STDERR_TAIL_LINES:])
    return None, f"exit code {proc.returncode}\n{tail}"


def hf_dtype(results: list[dict], requested: str | None) -> str | None:
    """HF must run in the cycles' dtype to be comparable: take cycle 1's (else the first cycle's)."""
    if requested or not results:
        return requested
    reference = next((r for r in results if r["engine"] == REFERENCE_CYCLE), results[0])
    return reference["dtype"]


def same_tokens_as_c1(result: dict, reference: dict | None) -> str:
    """Cycles 1-6 compute exactly what cycle 1 does, so greedy tokens must match; cycle 7 (int8) and
    HF are expected to drift and get '-'."""
    number = cycle_number(result["engine"])
    if reference is None or number is None or not 1 <= number <= 6:
        return "-"
    return "yes" if result["token_ids"] == reference["token_ids"] else "no"


def _cell(value, scale: float = 1, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value / scale)


def _peak_cell(result: dict) -> str:
    star = "*" if result.get("peak_memory_scope") == PEAK_WITH_LOADING else ""
    return _cell(result["peak_memory_bytes"], MIB, "{:.0f}") + star


def format_table(results: list[dict]) -> str:
    header = ["engine", "mean latency s", "throughput tok/s", "mean TTFT s", "peak mem MiB",
              "KV peak MiB", "weights MiB", "weights", "same tokens as c1"]
    rows = [[r["engine"], _cell(r["latency_mean_s"]), _cell(r["throughput_tok_s"], fmt="{:.1f}"),
             _cell(r["ttft_mean_s"]), _peak_cell(r),
             _cell(r["kv_cache_peak_bytes"], MIB, "{:.1f}"), _cell(r["weight_bytes"], MIB, "{:.0f}"),
             r["weights"], r["same_tokens_as_c1"]] for r in results]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if any(r.get("peak_memory_scope") == PEAK_WITH_LOADING for r in results):
        lines.append("* peak memory includes model loading (it could not be reset after loading)")
    return "\n".join(lines)


def resolve_once(model: str, weights: str):
    """Resolve the model in this process first, so a one-time download or GGUF conversion happens
    once, visibly, instead of racing or repeating inside every subprocess."""
    from common.model_source import resolve_model

    print(f"Resolving model {model} (weights: {weights}); a first use may convert a GGUF file once ...", flush=True)
    source = resolve_model(model, weights)
    print(f"  -> {source.path} ({source.weights} weights, from {source.origin})", flush=True)
    if source.fallback_reason:
        print(f"  FALLBACK: {source.fallback_reason}", flush=True)
    return source


DEFAULT_RATE = None   # an online run at the size's default rate (common/online.py)


def _online_rates(args) -> list:
    """The request rates to run each engine at: one None (not online, or the default rate) or the sweep."""
    if args.workload != "online" or not args.request_rate:
        return [DEFAULT_RATE]
    try:
        return parse_rates(args.request_rate)
    except ValueError as error:
        raise SystemExit(f"--request-rate: {error}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    parse_options(args.option)  # a malformed --option fails now, not in every subprocess
    if args.base_url or args.request_rate:
        if args.workload != "online":
            raise SystemExit("--request-rate and --base-url go with --workload online")
    if args.base_url:
        from common.http_bench import main_http

        return main_http(args)
    device = resolve_device(args.device)
    model = args.model or default_model(device)
    cycles = select_cycles(args.cycles, find_cycles())
    out_dir = Path(args.out or ROOT / "results" / f"{device.type}-{args.workload}")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        source = resolve_once(model, args.weights)
    except ValueError as error:
        raise SystemExit(f"error: {error}")

    hf_engines = [] if args.no_hf or args.workload == "online" else list(HF_ENGINES)  # online: cycles only
    rates = _online_rates(args)
    results, failures = [], []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    bar = tqdm([(e, r) for e in cycles + hf_engines for r in rates], desc="engines", unit="run")
    for engine, rate in bar:
        bar.set_postfix_str(engine if rate is None else f"{engine} @ {rate:g} req/s")
        dtype = hf_dtype(results, args.dtype) if engine in HF_ENGINES else args.dtype
        out_path = out_dir / (f"{engine}.json" if rate is None else f"{engine}-rate{rate:g}.json")
        cmd = bench_command(engine, args, str(device), model, dtype, out_path)
        if rate is not None and rate != DEFAULT_RATE:
            cmd += ["--request-rate", str(rate)]
        result, error = run_one(cmd, out_path)
        if result is None:
            failures.append({"engine": engine, "error": error})
            tqdm.write(f"FAILED {engine}: {error}")
            continue
        results.append(result)
        if result["ignored_options"]:
            tqdm.write(f"note: {engine} does not take option(s) {', '.join(result['ignored_options'])}")
    bar.close()

    machine = results[0]["machine"] if results else machine_info(device)
    run_info = {"machine": machine, "model": source.name, "weights": source.weights, "origin": source.origin,
                "weights_note": source.fallback_reason, "device": str(device), "workload": args.workload, "quick": args.quick, "num_requests": args.num_requests, "prompt_len": args.prompt_len, "options": args.option,
                "engines": cycles + hf_engines, "started": started, "argv": sys.argv}
    reference = next((r for r in results if r["engine"] == REFERENCE_CYCLE), None)
    run_info["request_rates"] = rates if args.workload == "online" else None
    for r in results:
        r["same_tokens_as_c1"] = same_tokens_as_c1(r, reference)
    (out_dir / "results.json").write_text(json.dumps({"run": run_info, "results": results, "failures": failures},
                                                     indent=1, default=str))

    print()
    if results:
        print(format_online_table(results) if args.workload == "online" else format_table(results))
    size = f" ({results[0]['workload_size']} size, {results[0]['num_requests']} requests)" if results else ""
    print(f"\nmachine: {machine['name']} ({machine['cpu_count']} CPUs), model: {source.name}, "
          f"weights: {source.weights}, device: {device}, workload: {args.workload}{size}")
    if any(r["same_tokens_as_c1"] == "no" for r in results):
        print("WARNING: some cycles' greedy tokens differ from cycle 1's: one of them computes something else.")
    if args.plot and results:
        from common.plots import plot_results

        for path in plot_results(results, out_dir):
            print(f"plot: {path}")
        if args.workload == "online":
            from common.plots import plot_online

            for path in plot_online(results, out_dir):
                print(f"plot: {path}")
    print(f"results: {out_dir / 'results.json'}")
    if failures:
        print(f"{len(failures)} engine(s) failed: {', '.join(f['engine'] for f in failures)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
