"""Rank 0's side of tensor parallelism: start the other ranks, send them every step, stop them.

vLLM's MultiprocExecutor, small. On one machine, ranks 1..N-1 are fresh Python interpreters
(`python -m cycle11_tp.worker`, the spawn way: nothing of this process is copied into them; and
a server's engine core, a daemonic process, may not fork multiprocessing children of its own).
Under torchrun they are torchrun's processes, on this node or on others, and torchrun watches them.

No worker outlives the engine: close() (also at exit, or when the engine is garbage-collected) sends
the stop message and waits; a worker whose parent dies exits by itself within a second
(worker.watch_parent); a worker that dies makes the next step raise WorkerDied, naming it, and
calls the failure callbacks at once (a server's engine core stops then, even while idle).
Nothing here creates shared memory: steps travel through the group's TCPStore (parallel_state.py).
"""

import os
import pickle
import subprocess
import sys
import threading
import time
import weakref

from .parallel_state import (STARTUP_TIMEOUT_S, StepChannel, TPGroup, connect_store, join_group,
                             torchrun_env)

STOP_TIMEOUT_S = 10.0   # how long close() waits for a worker to exit before it kills it


class WorkerDied(RuntimeError):
    """A tensor-parallel rank exited or failed: the engine cannot step any more."""


class Executor:
    def __init__(self, model: str, options: dict, config):
        n = config.tensor_parallel_size
        env = torchrun_env()    # its world size is n (LLM checked it): the engine is rank 0
        if env and env["rank"] != 0:
            raise ValueError(f"under torchrun the engine is rank 0; this process is rank {env['rank']}")
        host, port = (env["host"], env["port"]) if env else ("127.0.0.1", 0)
        self.store, port = connect_store(host, port, n, host_store=env is None)
        self.channel = StepChannel(self.store)
        # What every worker builds: the same engine options; torch threads shared out on one machine.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // n)
        self.store.set("engine", pickle.dumps((model, options, threads)))
        self.processes = [] if env else [start_worker(rank, n, port) for rank in range(1, n)]
        self.stopping = threading.Event()      # set when we stop them: an exit then is no failure
        self.failure_callbacks: list = []
        for rank, process in enumerate(self.processes, start=1):
            threading.Thread(target=monitor, args=(rank, process, self.stopping, self.failure_callbacks),
                             daemon=True, name=f"tp-worker-{rank}-monitor").start()
        self._finalizer = weakref.finalize(self, stop_workers, self.channel, self.processes, self.stopping)
        self._wait_joined(n)
        self.tp: TPGroup = join_group(self.store, 0, n, config.device)

    def send(self, message) -> None:
        """One message to every other rank: ("step", StepInputs, logits rows) or ("logits", rows)."""
        self.check()
        self.channel.send(message)

    def register_failure_callback(self, callback) -> None:
        """callback(message), from a monitor thread, as soon as a worker exits unasked (vLLM's
        executor has the same hook; its engine core marks itself dead with it)."""
        self.failure_callbacks.append(callback)

    def check(self) -> None:
        """Raise WorkerDied if a worker process has exited (on many nodes torchrun watches them)."""
        for rank, process in enumerate(self.processes, start=1):
            if process.poll() is not None:
                raise WorkerDied(f"tensor-parallel worker rank {rank} (pid {process.pid}) exited with status "
                                 f"{process.returncode}: the engine cannot step without it")

    def explain(self, error: Exception) -> None:
        """A collective failed: if a worker died, say which (it may take a moment to be reaped)."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            self.check()
            time.sleep(0.05)
        raise WorkerDied(f"a tensor-parallel collective failed: {error}") from error

    def close(self) -> None:
        self._finalizer()

    def _wait_joined(self, n: int) -> None:
        """Until every worker has connected: a worker that dies meanwhile is reported at once."""
        keys = [f"joined/{rank}" for rank in range(1, n)]
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.store.check(keys):
            try:
                self.check()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"tensor-parallel workers did not start within {STARTUP_TIMEOUT_S:.0f} s")
            except (WorkerDied, TimeoutError):
                self.stopping.set()
                kill_workers(self.processes)     # not started: none could read a stop message
                raise
            time.sleep(0.02)


def start_worker(rank: int, world_size: int, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", f"{__package__}.worker", str(rank), str(world_size), str(port), str(os.getpid())]
    # The worker imports this very package, wherever the engine was started from.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    # c10d logs a warning each time a store wait times out: an idle worker's wait is expected to.
    return subprocess.Popen(command, env={**os.environ, "PYTHONPATH": path, "TORCH_CPP_LOG_LEVEL": "ERROR"})


def monitor(rank: int, process: subprocess.Popen, stopping: threading.Event, callbacks: list) -> None:
    """Wait for the worker's exit; unless we were stopping it, tell the callbacks."""
    status = process.wait()
    if not stopping.is_set():
        for callback in callbacks:
            callback(f"tensor-parallel worker rank {rank} (pid {process.pid}) exited with status {status}")


def kill_workers(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


def stop_workers(channel: StepChannel, processes: list[subprocess.Popen], stopping: threading.Event) -> None:
    """The stop message, then wait; a worker still there after STOP_TIMEOUT_S is killed."""
    stopping.set()
    try:
        channel.send(None)
    except Exception:  # noqa: BLE001  (a store already gone: the workers notice it themselves)
        pass
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
