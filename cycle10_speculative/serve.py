"""python -m <cycle>.serve MODEL --host 127.0.0.1 --port 8000 : an OpenAI-compatible server (common/serving/server.py)."""

from common.serving.server import main

if __name__ == "__main__":
    main(__package__)
