"""Benchmark every cycle (and the HuggingFace baselines) on one workload and compare them.

    python compare.py                                   # all cycles + HF, throughput workload
    python compare.py --cycles 1,4-5 --workload shared_prefix --plot
    python compare.py --quick --cycles 1 --out /tmp/smoke  # a smoke test in seconds
    python compare.py --workload online --cycles 3,4 --request-rate 0.5,1,2 --plot  # requests arriving over time
    python compare.py --workload online --base-url http://127.0.0.1:8000/v1 --model NAME  # any OpenAI-compatible server

Each engine runs in its own subprocess (python -m common.benchmark.bench) one after another, so engines never
share memory, caches or a warmed-up allocator. Results go to DIR/results.json (and DIR/*.png with
--plot); a table is printed at the end, and under it the engines that were not measured and why
(timed out, refused for memory, failed, or unable to run the workload at all).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from common.benchmark.bench import EXIT_OUT_OF_MEMORY, HF_ENGINES, machine_info
from common.engine.cli import parse_options
from common.engine.device import default_model, resolve_device
from common.engine.memory import GIB
from common.engine.metrics import PEAK_WITH_LOADING
from common.benchmark.online import format_online_table, parse_rates
from common.benchmark.workloads import WORKLOADS, unsupported_reason

ROOT = Path(__file__).resolve().parent
STDERR_TAIL_LINES = 25
MIB = 2**20

# Seconds one engine may take, start-up included, before it is stopped. On CUDA every engine
# finishes the default workload in well under a minute (python -m common.benchmark.estimate); on 2 CPU cores
# cycle 1 takes a few minutes on the cpu sizes.
DEFAULT_TIMEOUT_S = {"cuda": 300, "cpu": 1800}

# Exit status: 0 every engine was measured (engines that cannot run the workload at all are skipped
# by design and do not count); 1 an engine failed (a crash: something to fix); 3 none failed, but
# some timed out or were refused for memory: expected outcomes when asked for, yet rows are missing.
EXIT_OK, EXIT_FAILED, EXIT_INCOMPLETE = 0, 1, 3
EPILOG = """exit status: 0 every engine measured; 1 an engine failed (crashed); 3 no crash, but an engine
timed out or was refused for memory (its row is missing). Engines that cannot run the workload at
all (cycle 1 on nano_vllm_bench) are skipped with a note and do not change the status."""


def find_cycles() -> list[str]:
    """Every cycle package in the repository, in cycle order."""
    names = [p.parent.name for p in ROOT.glob("cycle[0-9]_*/__init__.py")]
    return sorted(names, key=lambda n: (cycle_number(n), n))


def select_cycles(spec: str | None, available: list[str]) -> list[str]:
    """'1,4-7,cycle5_prefix' -> package names in cycle order; None -> all available. A range takes
    the cycles present within it, so '1-7' is the original course even when a bonus cycle 8 exists."""
    if spec is None:
        return available
    chosen = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        lo, dash, hi = item.partition("-")
        if dash and lo.isdigit() and hi.isdigit():
            if int(lo) > int(hi):
                raise SystemExit(f"--cycles: empty range {item!r}")
            matches = [c for c in available if int(lo) <= cycle_number(c) <= int(hi)]
        else:
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
    p = argparse.ArgumentParser(description="Benchmark the cycles and the HF baselines on one workload.",
                                epilog=EPILOG)
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
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help=f"stop an engine that runs longer than this, start-up included, and go on with the next "
                        f"(default: {DEFAULT_TIMEOUT_S['cuda']} on CUDA, {DEFAULT_TIMEOUT_S['cpu']} on CPU)")
    online = p.add_argument_group("--workload online (defaults per device in common/benchmark/online.py)")
    online.add_argument("--request-rate", default=None, help="requests/s; inf: all at once; a comma list sweeps")
    online.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps (1: Poisson)")
    online.add_argument("--slo-ttft", type=float, default=None, help="goodput's time-to-first-token target, s")
    online.add_argument("--slo-tpot", type=float, default=None, help="goodput's time-per-output-token target, s")
    online.add_argument("--base-url", default=None, help="benchmark this OpenAI-compatible server (e.g. "
                        "http://127.0.0.1:8000/v1) instead of the cycles; --model names its model")
    return p


def bench_command(engine: str, args, device: str, model: str, dtype: str | None, out_path: Path) -> list[str]:
    cmd = [sys.executable, "-m", "common.benchmark.bench", "--engine", engine, "--workload", args.workload,
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


def run_one(cmd: list[str], out_path: Path, timeout: float) -> tuple[dict | None, dict | None]:
    """Run one bench subprocess; return (its result, None) or (None, a failure record).

    The subprocess leads its own process group, so a timeout kills it and anything it started
    (tokenizer or compile workers) at once instead of leaving them to hold the device."""
    out_path.unlink(missing_ok=True)  # a stale file from an earlier run must not pass for this one
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it ended on its own in between
        proc.communicate()
        return None, {"kind": "timeout", "seconds": timeout, "error": f"timed out after {timeout:g} s"}
    seconds = time.perf_counter() - start
    if proc.returncode == 0 and out_path.exists():
        return json.loads(out_path.read_text()), None
    if proc.returncode == EXIT_OUT_OF_MEMORY and out_path.exists():
        refused = json.loads(out_path.read_text())
        return None, {"kind": "out_of_memory", "seconds": seconds, "error": refused["message"],
                      "estimate_bytes": refused["estimate_bytes"], "limit_bytes": refused["limit_bytes"]}
    tail = "\n".join((stderr or stdout).strip().splitlines()[-STDERR_TAIL_LINES:])
    return None, {"kind": "error", "seconds": seconds, "error": f"exit code {proc.returncode}\n{tail}"}


def failure_summary(failure: dict) -> str:
    """The one line the table's 'not measured' section shows for a failure."""
    if failure["kind"] == "timeout":
        return f"timed out after {failure['seconds']:g} s"
    if failure["kind"] == "out_of_memory":
        estimate = failure.get("estimate_bytes")
        return f"out of memory (est. {estimate / GIB:.1f} GiB)" if estimate else "out of memory"
    if failure["kind"] == "skipped":
        return f"skipped: {failure['error']}"
    lines = failure["error"].splitlines()
    return f"failed ({lines[0]}): {lines[-1][:160]}" if len(lines) > 1 else f"failed: {lines[0]}"


def exit_status(failures: list[dict]) -> int:
    kinds = {f["kind"] for f in failures} - {"skipped"}
    if "error" in kinds:
        return EXIT_FAILED
    return EXIT_INCOMPLETE if kinds else EXIT_OK


def hf_dtype(results: list[dict], requested: str | None) -> str | None:
    """HF must run in the cycles' dtype to be comparable: take the reference cycle's."""
    if requested or not results:
        return requested
    return (reference_result(results) or results[0])["dtype"]


def is_exact(result: dict) -> bool:
    """A cycle without quantization computes what cycle 1 computes: in fp32 its greedy tokens must
    equal cycle 1's. int8 (cycle 7 on) and HF's own kernels are expected to differ."""
    return cycle_number(result["engine"]) is not None and not result.get("int8_path")


def reference_result(results: list[dict]) -> dict | None:
    """The lowest-numbered exact cycle that ran: cycle 1 when present."""
    exact = [r for r in results if is_exact(r)]
    return min(exact, key=lambda r: cycle_number(r["engine"]), default=None)


def token_agreement(token_ids: list[list[int]], reference: list[list[int]]) -> tuple[float, float | None]:
    """Share of requests whose tokens equal the reference's, and the mean index of the first
    differing token over the others (a sequence that stopped early differs where it ends)."""
    first_diffs = []
    for ours, theirs in zip(token_ids, reference):
        if ours != theirs:
            first_diffs.append(next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                                    min(len(ours), len(theirs))))
    share = 1 - len(first_diffs) / len(reference) if reference else 1.0
    return share, (sum(first_diffs) / len(first_diffs) if first_diffs else None)


def same_tokens(result: dict, reference: dict | None) -> dict:
    """The 'same tokens' verdict of one engine against the reference cycle.

    fp32 (engine and reference): exact cycles must match token for token: 'yes' or 'no', and 'no'
    is a bug. Otherwise (bf16/fp16, where kernels that add in another order may flip a near-tie,
    and int8 and HF in any dtype) the share of equal requests and the mean first difference."""
    if reference is None or len(result["token_ids"]) != len(reference["token_ids"]):
        return {"cell": "-", "reference": None}
    share, first_diff = token_agreement(result["token_ids"], reference["token_ids"])
    exact = is_exact(result) and result["dtype"] == reference["dtype"] == "float32"
    record = {"reference": reference["engine"], "exact_required": exact, "share": share, "first_diff_mean": first_diff}
    if exact:
        return record | {"cell": "yes" if share == 1 else "no"}
    if result is reference:
        return record | {"cell": "reference"}
    cell = f"{share:.0%}" + (f" (first diff @ {first_diff:.0f})" if first_diff is not None else "")
    return record | {"cell": cell}


def _cell(value, scale: float = 1, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value / scale)


def _peak_cell(result: dict) -> str:
    star = "*" if result.get("peak_memory_scope") == PEAK_WITH_LOADING else ""
    return _cell(result["peak_memory_bytes"], MIB, "{:.0f}") + star


def format_table(results: list[dict], failures: list[dict] = ()) -> str:
    reference = next((r["same_tokens"]["reference"] for r in results if r.get("same_tokens", {}).get("reference")), None)
    header = ["engine", "mean latency s", "throughput tok/s", "mean TTFT s", "peak mem MiB",
              "KV peak MiB", "weights MiB", "weights", "attention", "int8",
              f"same tokens as c{cycle_number(reference) if reference else 1}"]
    rows = [[r["engine"], _cell(r["latency_mean_s"]), _cell(r["throughput_tok_s"], fmt="{:.1f}"),
             _cell(r["ttft_mean_s"]), _peak_cell(r),
             _cell(r["kv_cache_peak_bytes"], MIB, "{:.1f}"), _cell(r["weight_bytes"], MIB, "{:.0f}"),
             r["weights"], r.get("attention_backend") or "-", r.get("int8_path") or "-",
             r.get("same_tokens", {}).get("cell", "-")] for r in results]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header] + rows] if rows else []
    if rows:
        lines.insert(1, "  ".join("-" * w for w in widths))
    if any(r.get("peak_memory_scope") == PEAK_WITH_LOADING for r in results):
        lines.append("* peak memory includes model loading (it could not be reset after loading)")
    if failures:
        width = max(len(f["engine"]) for f in failures)
        lines += ["not measured:"] + [f"  {f['engine'].ljust(width)}  {failure_summary(f)}" for f in failures]
    return "\n".join(lines)


def resolve_once(model: str, weights: str):
    """Resolve the model in this process first, so a one-time download or GGUF conversion happens
    once, visibly, instead of racing or repeating inside every subprocess."""
    from common.engine.model_source import resolve_model

    print(f"Resolving model {model} (weights: {weights}); a first use may convert a GGUF file once ...", flush=True)
    source = resolve_model(model, weights)
    print(f"  -> {source.path} ({source.weights} weights, from {source.origin})", flush=True)
    if source.fallback_reason:
        print(f"  FALLBACK: {source.fallback_reason}", flush=True)
    return source


DEFAULT_RATE = None   # an online run at the size's default rate (common/benchmark/online.py)


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
        from common.benchmark.http_bench import main_http

        return main_http(args)
    device = resolve_device(args.device)
    model = args.model or default_model(device)
    if args.timeout is not None and args.timeout <= 0:
        raise SystemExit(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    timeout = args.timeout or DEFAULT_TIMEOUT_S["cuda" if device.type == "cuda" else "cpu"]
    cycles = select_cycles(args.cycles, find_cycles())
    if args.cycles:  # named explicitly: a cycle that cannot run this workload is a usage error
        for engine in cycles:
            if unsupported_reason(engine, args.workload):
                raise SystemExit(f"error: {engine} cannot run the {args.workload} workload: "
                                 f"{unsupported_reason(engine, args.workload)}")
    out_dir = Path(args.out or ROOT / "results" / f"{device.type}-{args.workload}")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        source = resolve_once(model, args.weights)
    except ValueError as error:
        raise SystemExit(f"error: {error}")

    hf_engines = [] if args.no_hf or args.workload == "online" else list(HF_ENGINES)  # online: cycles only
    rates = _online_rates(args)
    results, failures = [], []
    for engine in cycles:  # the whole course was asked for: skip, visibly, what cannot run at all
        reason = unsupported_reason(engine, args.workload)
        if reason:
            failures.append({"engine": engine, "kind": "skipped", "error": reason})
            print(f"skipping {engine}: it cannot run the {args.workload} workload: {reason}")
    engines = [e for e in cycles + hf_engines if not unsupported_reason(e, args.workload)]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    bar = tqdm([(e, r) for e in engines for r in rates], desc="engines", unit="run")
    for engine, rate in bar:
        bar.set_postfix_str(engine if rate is None else f"{engine} @ {rate:g} req/s")
        dtype = hf_dtype(results, args.dtype) if engine in HF_ENGINES else args.dtype
        out_path = out_dir / (f"{engine}.json" if rate is None else f"{engine}-rate{rate:g}.json")
        cmd = bench_command(engine, args, str(device), model, dtype, out_path)
        if rate is not None and rate != DEFAULT_RATE:
            cmd += ["--request-rate", str(rate)]
        result, failure = run_one(cmd, out_path, timeout)
        if result is None:
            failures.append({"engine": engine} | failure | ({} if rate is None else {"request_rate": rate}))
            tqdm.write(f"NOT MEASURED {engine}: {failure_summary(failure)}"
                       + (f"\n{failure['error']}" if failure["kind"] != "timeout" else ""))
            continue
        results.append(result)
        if result["ignored_options"]:
            tqdm.write(f"note: {engine} does not take option(s) {', '.join(result['ignored_options'])}")
    bar.close()

    machine = results[0]["machine"] if results else machine_info(device)
    run_info = {"machine": machine, "model": source.name, "weights": source.weights, "origin": source.origin,
                "weights_note": source.fallback_reason, "device": str(device), "workload": args.workload, "quick": args.quick, "num_requests": args.num_requests, "prompt_len": args.prompt_len, "options": args.option,
                "engines": engines, "timeout_s": timeout, "started": started, "argv": sys.argv,
                "request_rates": rates if args.workload == "online" else None}
    reference = reference_result(results)
    for r in results:
        r["same_tokens"] = same_tokens(r, reference)
    status = exit_status(failures)
    (out_dir / "results.json").write_text(json.dumps({"run": run_info, "results": results, "failures": failures,
                                                      "exit_status": status}, indent=1, default=str))

    print()
    if args.workload == "online" and results:
        print(format_online_table(results))
    elif results or failures:
        print(format_table(results, failures))
    size = f" ({results[0]['workload_size']} size, {results[0]['num_requests']} requests)" if results else ""
    print(f"\nmachine: {machine['name']} ({machine['cpu_count']} CPUs), model: {source.name}, "
          f"weights: {source.weights}, device: {device}, workload: {args.workload}{size}")
    if any(r["same_tokens"]["cell"] == "no" for r in results):
        print(f"WARNING: in fp32 some cycles' greedy tokens differ from {reference['engine']}'s: "
              "one of them computes something else.")
    if args.plot and results:
        from common.benchmark.plots import plot_results

        for path in plot_results(results, out_dir):
            print(f"plot: {path}")
        if args.workload == "online":
            from common.benchmark.plots import plot_online

            for path in plot_online(results, out_dir):
                print(f"plot: {path}")
    print(f"results: {out_dir / 'results.json'}")
    missing = [f["engine"] for f in failures if f["kind"] != "skipped"]
    if missing:
        print(f"{len(missing)} engine(s) not measured: {', '.join(missing)} (exit status {status})")
    return status


if __name__ == "__main__":
    sys.exit(main())
