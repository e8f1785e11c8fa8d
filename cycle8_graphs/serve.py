"""python -m cycle8_graphs.serve MODEL --host 127.0.0.1 --port 8000 : an OpenAI-compatible server (common/serving/server.py)."""

from common.serving.server import main

if __name__ == "__main__":
    main("cycle8_graphs")
