"""python -m <cycle>.serve MODEL --host 127.0.0.1 --port 8000 : an OpenAI-compatible server (common/serving/server.py).
Under torchrun, ranks > 0 serve the engine's steps instead (worker.py); rank 0 serves HTTP and is the engine."""

from common.serving.server import main

from .worker import torchrun_worker

if __name__ == "__main__":
    if not torchrun_worker():
        main(__package__)
