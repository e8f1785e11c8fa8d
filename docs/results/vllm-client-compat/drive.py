"""vLLM's own serving benchmark client (vllm.benchmarks.serve) against a running server, one backend.

    /work/venvs/vllm/bin/python drive.py BACKEND BASE_URL MODEL TOKENIZER_DIR RESULT_DIR

Builds vLLM's parser with add_cli_args, parses a small load (8 random prompts, 32 tokens in, 16
out, ignore_eos, all at once) and calls main(args), as `vllm bench serve` would.
"""

import argparse
import sys

from vllm.benchmarks.serve import add_cli_args, main

backend, base_url, model, tokenizer, result_dir = sys.argv[1:6]
parser = argparse.ArgumentParser()
add_cli_args(parser)
args = parser.parse_args([
    "--backend", backend, "--base-url", base_url, "--model", model, "--tokenizer", tokenizer,
    "--endpoint", "/v1/completions" if backend == "openai" else "/v1/chat/completions",
    "--dataset-name", "random", "--random-input-len", "32", "--random-output-len", "16",
    "--num-prompts", "8", "--ignore-eos", "--seed", "0", "--disable-tqdm",
    "--save-result", "--result-dir", result_dir, "--result-filename", f"{backend}.json",
])
result = main(args)
print(f"completed {result['completed']} of {args.num_prompts}, failed {result.get('failed', 'n/a')}")
sys.exit(0 if result["completed"] == args.num_prompts else 1)
