"""Benchmark every cycle (and the HuggingFace baselines, and vLLM when present) and show what each cycle adds.

    python compare.py --plot                            # the course suite: every lesson on its home workload
    python compare.py --cycles 1,4-5 --workload shared_prefix --plot   # one workload
    python compare.py --quick --cycles 1 --out /tmp/smoke  # a smoke test in seconds
    python compare.py --workload online --cycles 3,4 --request-rate 0.5,1,2 --plot  # requests arriving over time
    python compare.py --workload online --base-url http://127.0.0.1:8000/v1 --model NAME  # any OpenAI-compatible server
    python compare.py --workload mixed_arrivals --cycles 8,9 --budgets 256,default --plot  # streams beside long prompts

Without --workload it runs the course suite (common/benchmark/suite.py): the throughput workload for
every engine, then each lesson's home workload for the two cycles of its step, and prints first the
summary "what each cycle adds" (common/benchmark/summary.py), then one table per workload.

Each engine runs in its own subprocess (python -m common.benchmark.bench) one after another, so engines never
share memory, caches or a warmed-up allocator. Results go to DIR/results.json (a suite: one folder per
workload under DIR, and DIR/summary.png with --plot). Under each table, the engines that were not
measured and why (timed out, refused for memory, failed, interrupted, or unable to run the workload).
SIGTERM or SIGINT ends the running engine's process group and writes what was measured so far.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from common.benchmark.machine import machine_info
from common.benchmark.report import (EXIT_FAILED, EXIT_INCOMPLETE, EXIT_OK, cycle_number, exit_status,  # noqa: F401
                                     format_part, mark_same_tokens)
from common.benchmark.runner import Interrupted, PartRun, run_part, stop_on_signals
from common.benchmark.suite import Part, part_engines, single_part, suite
from common.benchmark.summary import format_summary, summarize
from common.benchmark.vllm_baseline import choose_vllm_python
from common.benchmark.workloads import WORKLOADS, parse_length_range, unsupported_reason
from common.engine.args import add_model_args, parse_options
from common.engine.device import default_model, resolve_device

ROOT = Path(__file__).resolve().parent

# Seconds one engine may take, start-up included, before it is stopped: on CUDA every engine finishes
# in well under a minute (python -m common.benchmark.estimate); on 2 CPU cores cycle 1 takes minutes.
DEFAULT_TIMEOUT_S = {"cuda": 300, "cpu": 1800}

EPILOG = """exit status: 0 every engine measured; 1 an engine failed (crashed); 3 no crash, but an engine
timed out or was refused for memory (its row is missing); 128 + N stopped by signal N (SIGTERM: 143,
SIGINT: 130). Engines that cannot run the workload at all (cycle 1 on nano_vllm_bench) are skipped
with a note and do not change the status."""


def find_cycles() -> list[str]:
    """Every cycle package in the repository, in cycle order."""
    names = [p.parent.name for p in ROOT.glob("cycle*_*/__init__.py") if cycle_number(p.parent.name) is not None]
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark the cycles and the HF baselines: the course suite, "
                                "or one workload.", epilog=EPILOG)
    p.add_argument("--cycles", default=None, help="comma-separated numbers or names (default: every cycle present)")
    add_model_args(p, option_help="engine option passed to every engine that takes it, e.g. max_num_seqs=8 "
                                  "(repeatable); the HF baselines run in the cycles' dtype")
    p.add_argument("--workload", default=None, choices=(*WORKLOADS, "mixed_arrivals"),
                   help="run this one workload (default: the course suite, each lesson on its home workload)")
    p.add_argument("--quick", action="store_true", help="tiny workload sizes: a smoke test")
    p.add_argument("--num-requests", type=int, default=None, help="--workload: override the size's request count")
    p.add_argument("--prompt-len", type=int, default=None, help="--workload: give every prompt this many tokens of its own")
    p.add_argument("--output-len", type=parse_length_range, metavar="N|LO-HI", help="--workload: max_tokens, N or LO-HI")
    p.add_argument("--plot", action="store_true", help="also write PNG charts")
    p.add_argument("--out", default=None, help="output folder (default: results/<device>-<workload or suite>)")
    p.add_argument("--no-hf", action="store_true", help="skip the HuggingFace baselines")
    p.add_argument("--vllm-python", default=None, metavar="PATH", help="add a row for the real vLLM, run by this "
                   "interpreter (default: this one, if it can import vllm; else no vLLM row)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help=f"stop an engine that runs longer than this, start-up included, and go on with the next "
                        f"(default: {DEFAULT_TIMEOUT_S['cuda']} on CUDA, {DEFAULT_TIMEOUT_S['cpu']} on CPU)")
    online = p.add_argument_group("--workload online (defaults per device in common/benchmark/online.py)")
    online.add_argument("--request-rate", default=None, help="requests/s; inf: all at once; a comma list sweeps")
    online.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps (1: Poisson)")
    online.add_argument("--slo-ttft", type=float, default=None, help="goodput's time-to-first-token target, s")
    online.add_argument("--slo-tpot", type=float, default=None, help="goodput's time-per-output-token target, s")
    p.add_argument("--budgets", default="default", help="--workload mixed_arrivals: the max_num_batched_tokens "
                   "to sweep for a cycle that chunks (9 on), e.g. 128,256,default")
    online.add_argument("--base-url", default=None, help="benchmark this OpenAI-compatible server (e.g. "
                        "http://127.0.0.1:8000/v1) instead of the cycles; --model names its model")
    return p


def check_args(args) -> None:
    """Refuse a combination that cannot mean anything, before any work starts."""
    parse_options(args.option)  # a malformed --option fails now, not in every subprocess
    if (args.base_url or args.request_rate) and args.workload != "online":
        raise SystemExit("--request-rate and --base-url go with --workload online")
    if args.workload is None and (args.num_requests or args.prompt_len or args.output_len):
        raise SystemExit("--num-requests, --prompt-len and --output-len go with --workload NAME: the suite sizes each "
                         "workload itself (common/benchmark/suite.py)")
    if args.timeout is not None and args.timeout <= 0:
        raise SystemExit(f"--timeout must be a positive number of seconds, got {args.timeout:g}")


def suite_parts(device_kind: str, quick: bool, cycles: list[str]) -> list[Part]:
    """The suite's parts whose step can be shown with the cycles selected: a home part runs only
    when both cycles of its step are present (the throughput part always runs)."""
    parts = []
    for part in suite(device_kind, quick):
        if part.hf or len(part_engines(part, cycles, hf_allowed=False)) == len(part.cycles):
            parts.append(part)
        else:
            print(f"skipping the {part.name} part: it compares cycles {' and '.join(map(str, part.cycles))}")
    return parts


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


def runnable(part: Part, cycles: list[str], args) -> tuple[list[str], list[dict]]:
    """The part's engines that can run its workload, and a 'skipped' record for each that cannot.
    A cycle named with --cycles for one workload that cannot run it is a usage error."""
    engines, skipped = [], []
    for engine in part_engines(part, cycles, hf_allowed=not args.no_hf, vllm_allowed=args.vllm_python is not None):
        reason = unsupported_reason(engine, part.workload)
        if reason and args.workload and args.cycles:
            raise SystemExit(f"error: {engine} cannot run the {part.workload} workload: {reason}")
        if reason:
            skipped.append({"engine": engine, "kind": "skipped", "error": reason})
            print(f"skipping {engine}: it cannot run the {part.workload} workload: {reason}")
        else:
            engines.append(engine)
    return engines, skipped


def part_record(part: Part, run: PartRun, engines: list[str]) -> dict:
    """A part's results.json (a single workload's is the whole file, as it always was)."""
    mark_same_tokens(run.results)
    return {"part": dataclasses.asdict(part), "engines": engines, "results": run.results, "failures": run.failures,
            "exit_status": exit_status(run.failures),
            "interrupted": run.interrupted and {"signal": run.interrupted.name,
                                                "engine": run.failures[-1]["engine"]}}


def plot_part(record: dict, out_dir: Path, suite_run: bool) -> None:
    from common.benchmark.plots import plot_online, plot_results

    if not record["results"]:
        return
    # In the suite only the online part draws the c3/c4 timeline: there the two differ.
    timeline = not suite_run or record["part"]["workload"] == "online"
    for path in plot_results(record["results"], out_dir, timeline=timeline) + plot_online(record["results"], out_dir):
        print(f"plot: {path}")


def run_all(parts: list[Part], cycles: list[str], args, device: str, model: str, out_dir: Path,
            timeout: float, suite_run: bool) -> dict[str, dict]:
    """Every part in turn, each into its own folder (a single workload: out_dir itself). A signal
    ends the run after writing the interrupted part's record."""
    records = {}
    with stop_on_signals():
        for part in parts:
            part_dir = out_dir / part.name if suite_run else out_dir
            part_dir.mkdir(parents=True, exist_ok=True)
            engines, run = [], PartRun()
            try:
                engines, skipped = runnable(part, cycles, args)
                run = run_part(part, engines, args, device, model, part_dir, timeout)
                run.failures[:0] = skipped
            except Interrupted as stop:   # between two parts: no engine was running
                run = PartRun(failures=[{"engine": None, "kind": "interrupted", "signal": stop.name,
                                         "error": f"stopped by {stop.name}"}], interrupted=stop)
            records[part.name] = part_record(part, run, engines)
            if run.interrupted:
                break
    return records


def overall_status(records: dict[str, dict]) -> int:
    interrupted = next((r["interrupted"] for r in records.values() if r["interrupted"]), None)
    if interrupted:
        return 128 + {"SIGINT": 2, "SIGTERM": 15}[interrupted["signal"]]
    return exit_status([f for r in records.values() for f in r["failures"]])


def write_results(records: dict[str, dict], run_info: dict, out_dir: Path, suite_run: bool) -> list[dict] | None:
    """results.json (per part in a suite, and the suite's own with the summary); returns the summary."""
    status = overall_status(records)
    if not suite_run:
        record = next(iter(records.values()))
        (out_dir / "results.json").write_text(json.dumps({"run": run_info, **record, "exit_status": status},
                                                         indent=1, default=str))
        return None
    for name, record in records.items():
        (out_dir / name / "results.json").write_text(json.dumps({"run": run_info, **record}, indent=1, default=str))
    summary = summarize({name: r["results"] for name, r in records.items()})
    (out_dir / "results.json").write_text(json.dumps(
        {"run": run_info, "summary": summary, "parts": records, "exit_status": status}, indent=1, default=str))
    return summary


def report(records: dict, summary: list[dict] | None, run_info: dict, args, out_dir: Path) -> None:
    print()
    if summary is not None:
        print(format_summary(summary) + "\n")
    for record in records.values():
        print(format_part(record, title=summary is not None) + "\n")
    machine = run_info["machine"]
    flags = f", {' '.join(machine['cpu_flags'])}" if machine.get("cpu_flags") and not machine.get("gpu") else ""
    print(f"machine: {machine['name']} ({machine['cpu_count']} CPUs{flags}), model: {run_info['model']}, "
          f"weights: {run_info['weights']}, device: {run_info['device']}")
    if any(r["same_tokens"]["cell"] == "no" for rec in records.values() for r in rec["results"]):
        print("WARNING: in fp32 some cycles' greedy tokens differ from the reference cycle's: "
              "one of them computes something else.")
    if args.plot:
        for record in records.values():
            plot_part(record, out_dir / record["part"]["name"] if summary is not None else out_dir, summary is not None)
        if summary:
            from common.benchmark.plots import plot_summary

            print(f"plot: {plot_summary(summary, run_info, out_dir / 'summary.png')}")
    print(f"results: {out_dir / 'results.json'}")
    missing = [str(f["engine"]) for rec in records.values() for f in rec["failures"] if f["kind"] != "skipped"]
    if missing:
        print(f"{len(missing)} engine(s) not measured: {', '.join(missing)} (exit status {overall_status(records)})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.base_url:
        from common.benchmark.http_bench import main_http

        return main_http(args)
    device = resolve_device(args.device)
    model = args.model or default_model(device)
    timeout = args.timeout or DEFAULT_TIMEOUT_S["cuda" if device.type == "cuda" else "cpu"]
    cycles = select_cycles(args.cycles, find_cycles())
    if args.workload == "mixed_arrivals":      # chapter 11's workload has a runner of its own
        from common.benchmark.mixed_arrivals import from_compare
        return from_compare(args, cycles, device, model)
    suite_run = args.workload is None
    parts = suite_parts(device.type, args.quick, cycles) if suite_run else [single_part(args)]
    out_dir = Path(args.out or ROOT / "results" / f"{device.type}-{args.workload or 'suite'}")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        source = resolve_once(model, args.weights)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    args.vllm_python, no_vllm = choose_vllm_python(args.vllm_python, source.weights)
    args.vllm_model_dir = args.vllm_python and source.path   # vLLM's virtualenv cannot resolve our names
    print(no_vllm or f"vLLM row: {args.vllm_python}")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    records = run_all(parts, cycles, args, str(device), model, out_dir, timeout, suite_run)
    first = next((r for rec in records.values() for r in rec["results"]), None)
    run_info = {"machine": first["machine"] if first else machine_info(device), "model": source.name,
                "weights": source.weights, "origin": source.origin, "weights_note": source.fallback_reason,
                "device": str(device), "workload": args.workload or "suite", "quick": args.quick, "options": args.option,
                **{size: getattr(args, size) for size in ("num_requests", "prompt_len", "output_len")},
                "parts": [p.name for p in parts], "timeout_s": timeout, "started": started, "argv": sys.argv}
    summary = write_results(records, run_info, out_dir, suite_run)
    report(records, summary, run_info, args, out_dir)
    return overall_status(records)


if __name__ == "__main__":
    sys.exit(main())
