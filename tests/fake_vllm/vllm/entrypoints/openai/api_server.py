"""The fake vllm's OpenAI server: /health, and streaming /v1/completions that send one chunk per
token (max_tokens of them) and a final usage chunk, as vLLM's do. No model: the text is fixed.
It appends its command line and pid as one JSON line to FAKE_VLLM_CALLS, so a test can check the
engine arguments it was given and that it was stopped."""

import argparse
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):   # quiet
        pass

    def do_GET(self):  # noqa: N802  (http.server's name)
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for _ in range(body["max_tokens"]):
            self._send({"choices": [{"index": 0, "text": "x"}]})
        self._send({"choices": [], "usage": {"completion_tokens": body["max_tokens"]}})
        self.wfile.write(b"data: [DONE]\n\n")

    def _send(self, chunk: dict) -> None:
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.flush()


def main() -> None:
    p = argparse.ArgumentParser()
    for flag in ("--model", "--served-model-name", "--dtype", "--host", "--max-num-seqs", "--max-num-batched-tokens"):
        p.add_argument(flag)
    p.add_argument("--port", type=int)
    p.add_argument("--enforce-eager", action="store_true")
    args = p.parse_args()
    if os.environ.get("FAKE_VLLM_CALLS"):
        with open(os.environ["FAKE_VLLM_CALLS"], "a") as f:
            f.write(json.dumps({"server": vars(args), "pid": os.getpid()}) + "\n")
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
