"""scripts/gpu_check.sh on the CPU: its plan (--dry-run runs nothing), checked against the GPU time it must fit."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRIORITY = ["pytest", "graphs", "throughput", "bench_kernels", "bench_step"]   # what only a GPU can tell, first


def dry_run() -> list[tuple[str, int, str, str]]:
    out = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--dry-run"], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=30).stdout
    steps = []
    for line in out.splitlines():
        name, limit, kind, command = line.split(maxsplit=3)
        steps.append((name, int(limit.rstrip("s")), kind, command))
    return steps


def test_priority_steps_come_first_and_fit_seven_minutes():
    steps = dry_run()
    names = [name for name, *_ in steps]
    assert names[:len(PRIORITY)] == PRIORITY
    assert all(kind == "priority" for _, _, kind, _ in steps[:len(PRIORITY)])
    assert all(kind == "rest" for _, _, kind, _ in steps[len(PRIORITY):])
    assert sum(limit for _, limit, kind, _ in steps if kind == "priority") <= 420
    assert len(set(names)) == len(names) and "nano_c78" in names and "serve_online" in names
    # The kernels are checked first (the CUDA tests, timed from a cold machine), the graphs next.
    assert "-m cuda" in steps[0][3] and "tests/test_graphs.py" in steps[1][3]
    assert "--profile" in dict((n, c) for n, _, _, c in steps)["bench_step"]


def test_dry_run_runs_nothing(tmp_path):
    """No OUT folder, no nvidia-smi: the plan only."""
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")}
    subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=30)
    assert not (tmp_path / "out").exists()
