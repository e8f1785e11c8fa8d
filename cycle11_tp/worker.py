"""Ranks 1..N-1 of tensor parallelism: build this rank's slice of the model, then run every step
rank 0 sends, until it says stop (vLLM's WorkerProc, small).

    python -m cycle11_tp.worker RANK WORLD_SIZE PORT PARENT_PID    (started by executor.py)
    torchrun ... -m cycle11_tp.run|serve ...                       (torchrun_worker(): ranks > 0)

A worker holds no scheduler, no block manager and no sampler: rank 0 decides everything, and a
worker's execute() takes part in the same collectives as rank 0's. It exits when rank 0 says stop,
when its parent process dies (watch_parent), or when a collective fails because a rank died.
"""

import os
import pickle
import signal
import sys
import threading
import time

import torch

from common.engine.model_source import resolve_model

from .config import Config
from .model_runner import ModelRunner
from .parallel_state import StepChannel, connect_store, join_group, torchrun_env


def serve_steps(store, rank: int, world_size: int, local_rank: int, parent_pid: int) -> None:
    store.set(f"joined/{rank}", b"1")
    store.wait(["engine"])                       # rank 0 publishes it before it waits for us
    model, options, threads = pickle.loads(store.get("engine"))
    torch.set_num_threads(threads)
    config = Config(model, **options)
    if config.device.type == "cuda":             # one GPU per rank
        config = Config(model, **{**options, "device": f"cuda:{local_rank}"})
        torch.cuda.set_device(config.device)
    source = resolve_model(config.model, config.weights)
    runner = ModelRunner(config, source, tp=join_group(store, rank, world_size, config.device))
    channel, hidden = StepChannel(store), None
    alive = lambda: os.getppid() == parent_pid
    with torch.inference_mode():
        while (message := channel.recv(alive)) is not None:
            kind, *args = message
            if kind == "step":                   # (StepInputs, logits rows): the same forward as rank 0
                hidden, _ = runner.execute(*args)
            else:                                # ("logits", rows): more rows of the last step
                runner.model.compute_logits(hidden[args[0].start:args[0].stop])


def watch_parent(parent_pid: int) -> None:
    """Exit this process within a second of its parent's death, whatever the main thread waits on."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


def torchrun_worker() -> bool:
    """Under torchrun, ranks > 0 serve steps here and return True once stopped; rank 0 (and a
    process torchrun did not start) gets False and goes on to be the engine."""
    env = torchrun_env()
    if env is None or env["rank"] == 0:
        return False
    parent = os.getppid()                        # torchrun's agent
    watch_parent(parent)
    store, _ = connect_store(env["host"], env["port"], env["world_size"], host_store=False)
    serve_steps(store, env["rank"], env["world_size"], env["local_rank"], parent)
    return True


def main(argv: list[str]) -> None:
    rank, world_size, port, parent_pid = map(int, argv)
    # Ctrl+C reaches every process of the terminal's group: rank 0 decides when to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_parent(parent_pid)
    store, _ = connect_store("127.0.0.1", port, world_size, host_store=False)
    serve_steps(store, rank, world_size, local_rank=rank, parent_pid=parent_pid)


if __name__ == "__main__":
    main(sys.argv[1:])
