"""Running the engines of one compare.py part, each in its own benchmark process, one after another.

Each engine runs as `python -m common.benchmark.bench` leading its own process group, so
a time limit, SIGTERM or SIGINT ends it and everything it started (tokenizer or compile workers) at
once: no engine may outlive compare.py and keep holding the device while the next step starts.
"""

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from common.benchmark.bench import EXIT_OUT_OF_MEMORY, HF_ENGINES
from common.benchmark.report import failure_summary, hf_dtype
from common.benchmark.vllm_baseline import VLLM_ENGINE

ROOT = Path(__file__).resolve().parents[2]
STDERR_TAIL_LINES = 25


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived: stop the running engine, keep what was measured."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.name = signal.Signals(signum).name


@contextmanager
def stop_on_signals():
    """While inside, SIGTERM and SIGINT raise Interrupted in the main thread (wherever it waits),
    so the caller can end the running engine's process group and write its results."""
    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it ended on its own in between
    proc.communicate()


def run_one(cmd: list[str], out_path: Path, timeout: float, env: dict | None = None) -> tuple[dict | None, dict | None]:
    """Run one bench subprocess; return (its result, None) or (None, a failure record).
    An exception while it runs (Interrupted, KeyboardInterrupt) ends its process group first."""
    out_path.unlink(missing_ok=True)  # a stale file from an earlier run must not pass for this one
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return None, {"kind": "timeout", "seconds": timeout, "error": f"timed out after {timeout:g} s"}
    except BaseException:
        _kill_group(proc)
        raise
    seconds = time.perf_counter() - start
    if proc.returncode == 0 and out_path.exists():
        return json.loads(out_path.read_text()), None
    if proc.returncode == EXIT_OUT_OF_MEMORY and out_path.exists():
        refused = json.loads(out_path.read_text())
        return None, {"kind": "out_of_memory", "seconds": seconds, "error": refused["message"],
                      "estimate_bytes": refused["estimate_bytes"], "limit_bytes": refused["limit_bytes"]}
    tail = "\n".join((stderr or stdout).strip().splitlines()[-STDERR_TAIL_LINES:])
    return None, {"kind": "error", "seconds": seconds, "error": f"exit code {proc.returncode}\n{tail}"}


def bench_command(engine: str, part, args, device: str, model: str, dtype: str | None, out_path: Path,
                  rate: float | None) -> list[str]:
    """The bench process's command line for one engine of a part (args: compare.py's own). vLLM's
    runs under the vLLM virtualenv's interpreter, on the local directory the cycles load from."""
    python = sys.executable
    if engine == VLLM_ENGINE:
        python, model = args.vllm_python, args.vllm_model_dir
    cmd = [python, "-m", "common.benchmark.bench", "--engine", engine, "--workload", part.workload,
           "--device", device, "--model", model, "--weights", args.weights, "--out", str(out_path)]
    if args.quick:
        cmd.append("--quick")
    if part.num_requests:
        cmd += ["--num-requests", str(part.num_requests)]
    if part.prompt_len:
        cmd += ["--prompt-len", str(part.prompt_len)]
    if part.output_len:
        cmd += ["--output-len", "{}-{}".format(*part.output_len)]
    if dtype:
        cmd += ["--dtype", dtype]
    for option in list(part.options) + list(args.option):
        cmd += ["--option", option]
    if part.workload == "online":
        cmd += ["--burstiness", str(args.burstiness)]
        for flag, value in (("--slo-ttft", args.slo_ttft), ("--slo-tpot", args.slo_tpot), ("--request-rate", rate)):
            if value is not None:
                cmd += [flag, str(value)]
    return cmd


@dataclass
class PartRun:
    """What one part measured: its results, the engines not measured, and the engine a signal
    interrupted (None when none was)."""
    results: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    interrupted: Interrupted | None = None


def run_part(part, engines: list[str], args, device: str, model: str, out_dir: Path, timeout: float) -> PartRun:
    """Run each engine (at each of the part's request rates) in turn. A signal ends the loop with
    the running engine recorded as interrupted; its process group is gone by then."""
    run, running = PartRun(), None
    bar = tqdm([(e, r) for e in engines for r in part.request_rates], desc=part.name, unit="run")
    try:
        for engine, rate in bar:
            bar.set_postfix_str(engine if rate is None else f"{engine} @ {rate:g} req/s")
            baseline = engine in HF_ENGINES or engine == VLLM_ENGINE
            dtype = hf_dtype(run.results, args.dtype) if baseline else args.dtype
            out_path = out_dir / (f"{engine}.json" if rate is None else f"{engine}-rate{rate:g}.json")
            running = engine
            result, failure = run_one(bench_command(engine, part, args, device, model, dtype, out_path, rate),
                                      out_path, timeout, **_vllm_env(engine))
            running = None
            _record(run, engine, rate, result, failure)
    except Interrupted as stop:   # between two engines, `running` is None: nothing was cut short
        run.failures.append({"engine": running, "kind": "interrupted", "signal": stop.name,
                             "error": f"stopped by {stop.name}" + (" while it ran" if running else "")})
        run.interrupted = stop
    finally:
        bar.close()
    return run


def _vllm_env(engine: str) -> dict:
    """The vLLM virtualenv does not have this project installed: it finds it on PYTHONPATH."""
    if engine != VLLM_ENGINE:
        return {}
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {"env": os.environ | {"PYTHONPATH": path}}


def _record(run: PartRun, engine: str, rate, result: dict | None, failure: dict | None) -> None:
    if result is None:
        run.failures.append({"engine": engine} | failure | ({} if rate is None else {"request_rate": rate}))
        tqdm.write(f"NOT MEASURED {engine}: {failure_summary(failure)}"
                   + (f"\n{failure['error']}" if failure["kind"] != "timeout" else ""))
        return
    run.results.append(result)
    if result["ignored_options"]:
        tqdm.write(f"note: {engine} does not take option(s) {', '.join(result['ignored_options'])}")
