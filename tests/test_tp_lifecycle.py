"""Cycle 11's ranks never outlive the engine (cycle11_tp/executor.py, worker.py), whatever ends it.

Rank 0 (the engine) starts ranks 1..N-1 as fresh interpreters (`python -m cycle11_tp.worker`).
Here, on a tiny tensor_parallel_size=3 checkpoint on the CPU:

- an engine in a child process ends by SIGKILL, SIGTERM, Ctrl+C (SIGINT to its process group, as a
  terminal sends it), a plain exit or llm.shutdown(): every worker exits too;
- a worker killed under a live engine: the next generate() raises WorkerDied naming its rank;
- a worker that dies while starting, or never connects: LLM(...) raises at once (WorkerDied) or
  at the start-up time limit (TimeoutError), and leaves no process;
- a server (`python -m cycle11_tp.serve`): a killed worker makes the next request a 503 and the
  server exit; SIGTERM or Ctrl+C stops the server, its engine core and every worker.

Every case also checks that /dev/shm holds no entry it did not hold before. Every wait is bounded.
A process counts as gone once it has exited, reaped or not: an orphaned worker is reparented to
PID 1, which in a container may never reap it (a zombie runs no code and holds no memory).
"""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import cycle11_tp
from conftest import free_port, save_tiny_checkpoint
from cycle11_tp import executor
from cycle11_tp.executor import WorkerDied

NAME = "cycle11_tp"
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60         # starting a tp=3 engine spawns three interpreters that import torch: slow on a busy machine

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tp_checkpoint(tmp_path_factory):
    """6 heads, 3 KV heads, intermediate 96: splits over 3 ranks. The character tokenizer's 98 ids
    as the vocabulary (not divisible by 3: every rank's vocab rows are padded)."""
    path = tmp_path_factory.mktemp("tiny_tp")
    save_tiny_checkpoint(path, "qwen3", vocab_size=98, num_attention_heads=6, num_key_value_heads=3,
                         intermediate_size=96)
    return str(path)


# --- processes, as /proc sees them (no psutil: not a dependency) -------------------------------------

def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process, None if there is no such pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()      # the name, in parentheses, may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def _identity(pid: int) -> tuple[int, int]:
    """A pid with its start time: a later process that reuses the pid is not mistaken for this one."""
    stat = _stat(pid)
    assert stat is not None, f"process {pid} is not running"
    return pid, stat[2]


def _running(identity: tuple[int, int]) -> bool:
    pid, started = identity
    stat = _stat(pid)
    return stat is not None and stat[2] == started and stat[0] not in "ZX"


def _still_running(identities, timeout: float) -> list[int]:
    """Wait up to `timeout` for every process to exit; the pids still running then."""
    deadline = time.monotonic() + timeout
    while (left := [pid for pid, started in identities if _running((pid, started))]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _workers_of(pid: int) -> list[int]:
    """The tensor-parallel workers whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) and stat[1] == pid:
            with contextlib.suppress(OSError):
                if f"{NAME}.worker" in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
    return sorted(found)


def _kill(identities) -> None:
    """Cleanup after a failed test: nothing of it may outlive it."""
    for identity in identities:
        if _running(identity):
            with contextlib.suppress(ProcessLookupError):
                os.kill(identity[0], signal.SIGKILL)


def _kill_group(leader: int) -> None:
    """Cleanup: every process left in the session a test started (start_new_session=True: its
    leader's pid is the group's id; the workers are in it too)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(leader, signal.SIGKILL)


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _shm_held() -> set[str]:
    """The /dev/shm entries some running process maps or holds open."""
    held = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            held |= {line.rsplit("/", 1)[1] for line in (entry / "maps").read_text().splitlines() if "/dev/shm/" in line}
            held |= {os.readlink(fd).rsplit("/", 1)[1] for fd in (entry / "fd").iterdir()
                     if os.readlink(fd).startswith("/dev/shm/")}
    return held


def _shm_left_behind(before: set[str], timeout: float = 10.0) -> set[str]:
    """New /dev/shm entries that no running process holds: what a dead process leaked. (A live
    segment of another program, on a shared machine, is not this test's leak.) Waits a little:
    multiprocessing's resource tracker unlinks what its process leaked when it exits itself."""
    deadline = time.monotonic() + timeout
    while True:
        left = _shm() - before
        if left:
            left -= _shm_held()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _env() -> dict:
    """The repository importable from any interpreter started here (workers inherit it too)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"exited with status {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"still waiting after {timeout} s:\n{log.read_text()}"
        time.sleep(0.1)


# --- an engine in a process of its own ----------------------------------------------------------------

# The engine as a user's script: it builds LLM(tp=3), says its workers' pids, generates once, waits
# for a line on stdin (the test has noted the pids, or sends a signal instead), then ends as argv[2]
# says: "exit" (falls off the end: the executor's finalizer runs at exit) or "shutdown".
ENGINE_SCRIPT = """
import signal, sys
import cycle11_tp
signal.signal(signal.SIGINT, signal.default_int_handler)   # Ctrl+C, even if the test runner ignores it
llm = cycle11_tp.LLM(sys.argv[1], tensor_parallel_size=3, device="cpu")
print("workers", *[p.pid for p in llm.executor.processes], flush=True)
out = llm.generate(["hello"], cycle11_tp.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
print("generated", len(out[0].token_ids), flush=True)
sys.stdin.readline()
if sys.argv[2] == "shutdown":
    llm.shutdown()
    print("stopped", *[p.returncode for p in llm.executor.processes], flush=True)
"""

SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}


@pytest.mark.parametrize("end", ["SIGKILL", "SIGTERM", "SIGINT", "exit", "shutdown"])
def test_no_worker_outlives_the_engine(tp_checkpoint, tmp_path, end):
    """SIGKILL and SIGTERM run none of the engine's code: the workers must see their parent gone
    (worker.watch_parent). Otherwise the engine stops them itself before it exits, so they are gone
    the moment it is: Ctrl+C (which the workers ignore) and a plain exit through the executor's
    finalizer, shutdown() at once, by the stop message (status 0, not killed after STOP_TIMEOUT_S)."""
    shm_before, log = _shm(), tmp_path / "engine.log"
    with open(log, "w") as out:
        engine = subprocess.Popen([sys.executable, "-c", ENGINE_SCRIPT, tp_checkpoint, end], stdin=subprocess.PIPE,
                                  stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=_env(), start_new_session=True)
    workers = []
    try:
        _wait_for(lambda: "generated 4" in log.read_text(), engine, log, 3 * TIMEOUT_S)
        pids = [int(p) for p in re.search(r"^workers (.*)$", log.read_text(), re.M).group(1).split()]
        assert len(pids) == 2
        workers = [_identity(pid) for pid in pids]
        if end == "SIGINT":            # as a terminal's Ctrl+C: to the whole process group
            os.killpg(engine.pid, signal.SIGINT)
        elif end in SIGNALS:
            engine.send_signal(SIGNALS[end])
        else:
            engine.stdin.write(b"\n")
        engine.stdin.close()
        engine.wait(TIMEOUT_S)
        text = log.read_text()
        grace = TIMEOUT_S if end in ("SIGKILL", "SIGTERM") else 0
        assert not _still_running(workers, grace), f"workers outlived the engine ({end}):\n{text}"
        if end == "shutdown":
            assert re.search(r"^stopped 0 0$", text, re.M), text
            assert engine.returncode == 0, text
        assert not _shm_left_behind(shm_before)
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait(TIMEOUT_S)
        engine.stdin.close()
        _kill_group(engine.pid)
        _kill(workers)


# --- in this process ----------------------------------------------------------------------------------

def test_a_killed_worker_makes_generate_raise_naming_its_rank(tp_checkpoint):
    """Killed between two generate() calls: the next step finds it gone, before or inside a collective."""
    params = cycle11_tp.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    shm_before = _shm()
    llm = cycle11_tp.LLM(tp_checkpoint, tensor_parallel_size=3, device="cpu")
    processes = list(llm.executor.processes)
    workers = [_identity(p.pid) for p in processes]
    try:
        assert len(llm.generate(["hello"], params)[0].token_ids) == 4
        os.kill(processes[1].pid, signal.SIGKILL)           # rank 2
        with pytest.raises(WorkerDied) as error:
            llm.generate(["hello"], params)
        assert "rank 2" in str(error.value) and str(processes[1].pid) in str(error.value)
    finally:
        llm.shutdown()
        _kill(workers)
    assert not _still_running(workers, TIMEOUT_S)
    assert all(p.poll() is not None for p in processes)     # reaped, too: no zombie of ours
    assert not _shm_left_behind(shm_before)


@pytest.fixture
def started_workers(monkeypatch):
    """Rank 2 is the command the test sets, rank 1 the real worker; every process is recorded."""
    started, real = [], executor.start_worker
    rank2_command = []

    def start(rank, world_size, port):
        process = subprocess.Popen(rank2_command) if rank == 2 else real(rank, world_size, port)
        started.append(process)
        return process

    monkeypatch.setattr(executor, "start_worker", start)
    yield rank2_command, started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(TIMEOUT_S)


def test_a_worker_that_dies_starting_fails_the_engine_at_once(tp_checkpoint, started_workers, monkeypatch):
    """Not at the start-up time limit: the limit is set to TIMEOUT_S here, so that a death the
    engine missed shows up as a TimeoutError, not as WorkerDied. Rank 1 (still starting, or waiting
    for rank 2 in the group's rendezvous) does not read the stop message: close() kills it after
    STOP_TIMEOUT_S (shortened here; what is tested is that it ends, not when)."""
    rank2_command, started = started_workers
    rank2_command += [sys.executable, "-c", "raise SystemExit(3)"]
    monkeypatch.setattr(executor, "STARTUP_TIMEOUT_S", TIMEOUT_S)
    monkeypatch.setattr(executor, "STOP_TIMEOUT_S", 1.0)
    shm_before = _shm()
    with pytest.raises(WorkerDied, match=r"rank 2 .*status 3"):
        cycle11_tp.LLM(tp_checkpoint, tensor_parallel_size=3, device="cpu")
    assert len(started) == 2
    assert all(p.poll() is not None for p in started), "LLM(...) raised but left a worker running"
    assert not _shm_left_behind(shm_before)


def test_a_worker_that_never_connects_hits_the_start_up_time_limit(tp_checkpoint, started_workers, monkeypatch):
    """A rank that hangs before it connects: LLM(...) gives up after STARTUP_TIMEOUT_S (shortened
    here) and ends what it started. Neither rank reads the stop message (rank 1 is still starting or
    waits for rank 2 in the group's rendezvous), so close() kills both after STOP_TIMEOUT_S, shortened too."""
    rank2_command, started = started_workers
    rank2_command += [sys.executable, "-c", "import time; time.sleep(600)"]
    monkeypatch.setattr(executor, "STARTUP_TIMEOUT_S", 2.0)
    monkeypatch.setattr(executor, "STOP_TIMEOUT_S", 1.0)
    with pytest.raises(TimeoutError, match="did not start within"):
        cycle11_tp.LLM(tp_checkpoint, tensor_parallel_size=3, device="cpu")
    assert len(started) == 2
    assert all(p.poll() is not None for p in started), "LLM(...) raised but left a worker running"


# --- a server -----------------------------------------------------------------------------------------

def _healthy(base: str) -> bool:
    try:
        return httpx.get(base + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def tp_server(checkpoint: str, tmp_path: Path):
    """`python -m cycle11_tp.serve` at tensor_parallel_size=3, healthy; yields what a test needs.
    Whatever the test did, nothing it started survives it."""
    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", f"{NAME}.serve", checkpoint, "--port", str(port),
                                 "--served-model-name", "tiny", "--device", "cpu", "--tensor-parallel-size", "3"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=_env(), start_new_session=True)
    started = []
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for(lambda: _healthy(base), proc, log, 3 * TIMEOUT_S)
        core = int(re.search(r"engine core: pid (\d+)", log.read_text()).group(1))
        workers = _workers_of(core)
        assert len(workers) == 2, f"expected 2 workers under the engine core {core}, found {workers}"
        started = [_identity(core)] + [_identity(pid) for pid in workers]
        yield {"proc": proc, "base": base, "log": log, "core": started[0], "workers": started[1:]}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT_S)
        _kill_group(proc.pid)
        _kill(started)


def _complete(base: str, max_tokens: int = 4) -> httpx.Response:
    body = {"model": "tiny", "prompt": "hello", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return httpx.post(base + "/v1/completions", json=body, timeout=TIMEOUT_S)


def test_server_a_worker_killed_mid_request_is_a_503_and_the_server_exits(tp_checkpoint, tmp_path):
    """A request in flight when a worker dies gets a 503 (the engine is not running any more), and
    the server exits non-zero, its log naming the rank, leaving no process behind."""
    import concurrent.futures

    shm_before = _shm()
    with tp_server(tp_checkpoint, tmp_path) as server:
        response = _complete(server["base"])
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            long = pool.submit(_complete, server["base"], 400)   # hundreds of steps: in flight below
            _wait_for_a_step(server["base"])
            os.kill(server["workers"][0][0], signal.SIGKILL)                # rank 1
            response = long.result(TIMEOUT_S)
        status = server["proc"].wait(TIMEOUT_S)
        text = server["log"].read_text()
        assert response.status_code == 503, f"{response.status_code} {response.text}"
        assert status != 0 and "rank 1" in text, text            # the log says which rank died
        assert not _still_running([server["core"], *server["workers"]], TIMEOUT_S), text
    assert not _shm_left_behind(shm_before)


def test_server_a_worker_killed_while_idle_stops_the_server(tp_checkpoint, tmp_path):
    """No request needed: the executor's monitor sees the worker exit, the engine core ends, and
    the server exits as for a dead core."""
    shm_before = _shm()
    with tp_server(tp_checkpoint, tmp_path) as server:
        assert _complete(server["base"]).status_code == 200
        os.kill(server["workers"][1][0], signal.SIGKILL)                # rank 2
        status = server["proc"].wait(TIMEOUT_S)
        text = server["log"].read_text()
        assert status != 0 and "rank 2" in text, text
        assert not _still_running([server["core"], *server["workers"]], TIMEOUT_S), text
    assert not _shm_left_behind(shm_before)


def _wait_for_a_step(base: str) -> None:
    """Until /metrics counts a generated token of the long request (bounded)."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        text = httpx.get(base + "/metrics", timeout=TIMEOUT_S).text
        tokens = re.search(r"^vllm:generation_tokens_total\S* ([\d.e+]+)$", text, re.M)
        if tokens and float(tokens.group(1)) > 4:
            return
        time.sleep(0.05)
    raise AssertionError("the long request never started")


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl+C"])
def test_server_stopped_by_a_signal_stops_every_worker(tp_checkpoint, tmp_path, how):
    shm_before = _shm()
    with tp_server(tp_checkpoint, tmp_path) as server:
        assert _complete(server["base"]).status_code == 200
        if how == "SIGTERM":
            server["proc"].send_signal(signal.SIGTERM)
        else:                    # a terminal's Ctrl+C reaches the whole process group
            os.killpg(server["proc"].pid, signal.SIGINT)
        server["proc"].wait(TIMEOUT_S)
        text = server["log"].read_text()
        # The server waits for its core, the core stops its workers: all gone once the server is.
        assert not _still_running([server["core"], *server["workers"]], 0), text
    assert not _shm_left_behind(shm_before)
