"""Gathering each sequence's KV blocks on the CPU: indexing with a tensor against index_select.

    python scripts/bench_gather.py --out docs/results/cpu-block-gather.txt

One layer's pool shaped as SmolLM2-135M's ([728 blocks, 16 tokens, 3 KV heads, 64], float32, the
CPU budget's block count), B sequences with 32-128 tokens of context on randomly placed blocks,
and the two ways to copy their blocks into a dense [B, max_blocks, ...] tensor: `cache[tables]`
(what the cycles did) and `cache.index_select(0, tables.flatten())` (what gather_blocks does now).
Both give the same tensor; the script checks it, then prints ms per call (median of 50).
"""

import argparse
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 728, 16, 3, 64


def tables_for(batch: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, max_blocks] block tables on distinct random blocks, padded with block 0."""
    lengths = torch.randint(32, 129, (batch,), generator=generator).tolist()
    counts = [-(-n // BLOCK_SIZE) for n in lengths]
    blocks = torch.randperm(NUM_BLOCKS, generator=generator).tolist()
    width, rows, used = max(counts), [], 0
    for n in counts:
        rows.append(blocks[used:used + n] + [0] * (width - n))
        used += n
    return torch.tensor(rows, dtype=torch.int32)


def median_ms(fn, calls: int = 50) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="4,16,64")
    parser.add_argument("--out", help="also write the table here")
    args = parser.parse_args()
    from common.benchmark.machine import machine_info
    generator = torch.Generator().manual_seed(0)
    cache = torch.randn(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=generator)
    lines = [f"machine: {machine_info(torch.device('cpu'))}",
             f"one layer's K pool [{NUM_BLOCKS}, {BLOCK_SIZE}, {KV_HEADS}, {HEAD_DIM}] float32; ms per gather (median of 50)",
             f"{'B':>4} {'max blocks':>10} {'MiB copied':>10} {'cache[tables]':>14} {'index_select':>13} {'ratio':>6}"]
    for batch in map(int, args.batches.split(",")):
        tables = tables_for(batch, generator)
        flat = tables.flatten()
        assert torch.equal(cache[tables].flatten(), cache.index_select(0, flat).flatten())
        advanced = median_ms(lambda: cache[tables])
        selected = median_ms(lambda: cache.index_select(0, flat))
        mib = flat.numel() * cache[0].numel() * 4 / 2**20
        lines.append(f"{batch:>4} {tables.shape[1]:>10} {mib:>10.2f} {advanced:>14.3f} {selected:>13.3f} {advanced / selected:>5.1f}x")
    text = "\n".join(lines)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
