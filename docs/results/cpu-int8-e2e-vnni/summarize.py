"""Cycle 7's paths against cycle 6 in these runs: throughput ratio and token agreement (the share of
requests with cycle 6's tokens, and the mean first difference), as compare.py's table computes them.
    python docs/results/cpu-int8-e2e-vnni/summarize.py > docs/results/cpu-int8-e2e-vnni/summary.md"""
import json
from pathlib import Path

from common.benchmark.report import token_agreement

HERE = Path(__file__).parent
RUNS = [("n4", "2 threads", {"int8pack_bf16": "n4", "w8a8": "n4-w8a8"}),
        ("n16", "2 threads", {"int8pack_bf16": "n16", "w8a8": "n16-w8a8"}),
        ("n16-second", "2 threads", {"int8pack_bf16": "n16-second", "w8a8": "n16-w8a8-second"}),
        ("n16-1thread", "OMP_NUM_THREADS=1", {"int8pack_bf16": "n16-1thread", "w8a8": "n16-1thread-w8a8",
                                              "cast": "n16-1thread-cast"})]


def row(folder: str, engine: str) -> dict:
    return next(r for r in json.loads((HERE / folder / "results.json").read_text())["results"] if r["engine"] == engine)


print("| run | threads | requests | cycle 6 tok/s | path | cycle 7 tok/s | c7 / c6 | same tokens as c6 |")
print("|---|---|---|---|---|---|---|---|")
for base, threads, paths in RUNS:
    c6 = row(base, "cycle6_flash")
    for path, folder in paths.items():
        c7 = row(folder, "cycle7_int8")
        assert c7["int8_path"] == path
        share, first = token_agreement(c7["token_ids"], c6["token_ids"])
        print(f"| {base} | {threads} | {c6['num_requests']} | {c6['throughput_tok_s']:.1f} | {path} | "
              f"{c7['throughput_tok_s']:.1f} | {c7['throughput_tok_s'] / c6['throughput_tok_s']:.2f}x | "
              f"{share:.0%} (first diff @ {first:.1f}) |")
