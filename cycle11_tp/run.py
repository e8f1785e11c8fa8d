"""python -m <cycle>.run "prompt" ... : generate from the command line (common/engine/cli.py).
Under torchrun, ranks > 0 serve the engine's steps instead (worker.py); rank 0 is the engine."""

from common.engine.cli import main

from .worker import torchrun_worker

if __name__ == "__main__":
    if not torchrun_worker():
        main(__package__)
