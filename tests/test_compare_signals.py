"""SIGTERM and SIGINT stop compare.py without leaving its engine running, and keep what was measured."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _engine_pids(marker: str) -> list[int]:
    """Processes whose command line holds `marker` (our run's unique output folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in cmdline and "common.benchmark.bench" in cmdline and state != "Z":
                pids.append(int(entry.name))
    return pids


def _wait_for(predicate, seconds: float):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    return predicate()


def test_sigterm_ends_the_running_engine_and_results_name_it(tmp_path, tiny_checkpoints):
    """Cycle 4 on the online workload of a tiny checkpoint, twice: at once (rate inf, seconds), then
    at 0.001 requests/s, where it waits ~1,000 s for its arrivals: a slow engine. The signal
    arrives while the second runs: compare.py must end that engine's process group and write the
    first row and the interrupted engine."""
    path, _ = tiny_checkpoints["llama"]
    out, signum = tmp_path / "out", signal.SIGTERM
    proc = subprocess.Popen([sys.executable, "compare.py", "--workload", "online", "--cycles", "4", "--quick",
                             "--request-rate", "inf,0.001", "--device", "cpu", "--model", path, "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        slow = _wait_for(lambda: _engine_pids("rate0.001.json"), 180)
        assert slow, "the slow engine never started"
        time.sleep(2)   # inside the engine's run, not its start
        proc.send_signal(signum)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, stdout[-3000:]
    assert _wait_for(lambda: not _engine_pids(str(out)), 10), "an engine process survived compare.py"
    for pid in slow:
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    data = json.loads((out / "results.json").read_text())
    assert data["interrupted"] == {"signal": signal.Signals(signum).name, "engine": "cycle4_batching"}
    assert [(r["engine"], r["request_rate"]) for r in data["results"]] == [("cycle4_batching", float("inf"))]
    assert data["failures"] == [{"engine": "cycle4_batching", "kind": "interrupted", "signal": signal.Signals(signum).name,
                                 "error": f"stopped by {signal.Signals(signum).name} while it ran"}]
    assert data["exit_status"] == 128 + signum and "interrupted: stopped by" in stdout


def test_sigint_inside_run_one_ends_the_engines_process_group(tmp_path):
    """The same path for Ctrl-C, in this process: the engine and the child it started are gone
    when Interrupted reaches the caller."""
    from common.benchmark.runner import Interrupted, run_one, stop_on_signals

    pid_file = tmp_path / "child.pid"
    script = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    timer = subprocess.Popen([sys.executable, "-c", f"import os, time; time.sleep(5); os.kill({os.getpid()}, {int(signal.SIGINT)})"])
    with stop_on_signals(), pytest.raises(Interrupted, match="SIGINT"):
        run_one([sys.executable, "-c", script], tmp_path / "out.json", timeout=60)
    timer.wait()
    child = int(pid_file.read_text())
    assert _wait_for(lambda: not Path(f"/proc/{child}").exists()
                     or Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", 10)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # the handler is put back
