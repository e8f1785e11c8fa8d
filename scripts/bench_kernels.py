"""Our Triton kernels alone, on a CUDA GPU: decode attention (cycle 6) and the int8 matmul (cycle 7).

    python scripts/bench_kernels.py --out results/kernels.json

1. Decode attention: 256 sequences x 1,024 tokens of context, Qwen3-0.6B's heads (16 query heads,
   8 KV heads, head_dim 128), bf16, one query token per sequence, blocks scattered through the
   pool. Our triton kernel against the sdpa path with its gather (and flash-attn if it imports).
   Bandwidth = bytes of K and V the step must read / time, against the GPU's peak.
2. The int8 matmul at batch 1, 2, 4, 8, 16 on Qwen3-0.6B's layer shapes, against the bf16 matmul
   on the same (float) weight.

Times: CUDA events around each call, after warm-up, median of the repeats. Prints a table and
writes the figures as JSON. Sized to finish well under a minute on an H100 (compiles included).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from anywhere in the checkout

from cycle6_flash import attention                                  # noqa: E402
from cycle6_flash.model import AttentionMetadata                    # noqa: E402
from cycle7_int8 import quantization                                # noqa: E402

PEAK_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}   # HBM bandwidth from the data sheets
BATCH, CONTEXT, HEADS, KV_HEADS, HEAD_DIM = 256, 1024, 16, 8, 128
# Qwen3-0.6B (common/configs/Qwen3-0.6B): hidden 1024, intermediate 3072, 16 x 128 query, 8 x 128 KV.
LAYERS = {"q_proj": (2048, 1024), "k_proj/v_proj": (1024, 1024), "o_proj": (1024, 2048),
          "gate_proj/up_proj": (3072, 1024), "down_proj": (1024, 3072)}   # (out, in)
ROWS = (1, 2, 4, 8, 16)


def time_ms(fn, warmup: int = 5, repeats: int = 30) -> float:
    """Median milliseconds of fn() between CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_bandwidth() -> float | None:
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BYTES_PER_S.items() if key in name), None)


def decode_step(block_size: int, gen: torch.Generator):
    """A random pool and a decode step over it: every sequence's blocks scattered through the pool."""
    blocks_per_seq = CONTEXT // block_size
    num_blocks = BATCH * blocks_per_seq
    shape = (num_blocks, block_size, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(num_blocks, generator=gen, device="cuda").view(BATCH, blocks_per_seq).to(torch.int32)
    q = torch.randn(BATCH, HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((BATCH,), CONTEXT, dtype=torch.int32, device="cuda")
    cu_q = torch.arange(BATCH + 1, dtype=torch.int32, device="cuda")
    cu_k = torch.arange(BATCH + 1, dtype=torch.int32, device="cuda") * CONTEXT
    # sdpa's dense layout for one query per sequence: query b is token b, and it sees every key.
    query_index = torch.arange(BATCH, device="cuda").view(BATCH, 1)
    mask = torch.ones(BATCH, 1, CONTEXT, dtype=torch.bool, device="cuda")
    meta = AttentionMetadata(False, None, cu_q, cu_k, 1, CONTEXT, lens, tables,
                             query_index, torch.arange(BATCH, device="cuda"), mask)
    return q, k_cache, v_cache, meta


def bench_decode(results: dict) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    kv_bytes = 2 * BATCH * CONTEXT * KV_HEADS * HEAD_DIM * 2       # K and V, bf16
    peak = peak_bandwidth()
    scale = HEAD_DIM ** -0.5
    backends = ["triton", "sdpa"]
    if attention.flash_attn_problem(torch.device("cuda"), torch.bfloat16) is None:
        backends.append("flash_attn")
    rows = []
    for backend in backends:
        block_size = attention.DEFAULT_BLOCK_SIZE[backend]            # 16, or 256 for flash_attn
        q, k_cache, v_cache, meta = decode_step(block_size, gen)
        fn = attention.ATTENTION[backend]
        error = None
        if backend != "sdpa":   # before timing, the same step through sdpa: a fast wrong kernel is no result
            want = attention.sdpa_attention(q, k_cache, v_cache, meta, scale).float()
            error = (fn(q, k_cache, v_cache, meta, scale).float() - want).abs().max().item()
        ms = time_ms(lambda: fn(q, k_cache, v_cache, meta, scale))
        gbs = kv_bytes / (ms / 1e3) / 1e9
        rows.append({"backend": backend, "block_size": block_size, "ms": ms, "kv_gb_per_s": gbs,
                     "percent_of_peak": None if peak is None else 100 * gbs * 1e9 / peak,
                     "max_abs_error_vs_sdpa": error})
        del q, k_cache, v_cache, meta
    results["decode_attention"] = {"batch": BATCH, "context": CONTEXT, "heads": HEADS, "kv_heads": KV_HEADS,
                                   "head_dim": HEAD_DIM, "dtype": "bfloat16", "kv_bytes": kv_bytes,
                                   "peak_bytes_per_s": peak, "rows": rows}
    print(f"\ndecode attention: {BATCH} sequences x {CONTEXT} context, {HEADS} q / {KV_HEADS} kv heads, "
          f"head_dim {HEAD_DIM}, bf16; K/V read {kv_bytes / 1e9:.2f} GB")
    print(f"{'backend':<12}{'block':>6}{'ms':>9}{'GB/s':>9}{'% peak':>8}{'vs sdpa':>9}{'max err':>10}")
    sdpa_ms = next(r["ms"] for r in rows if r["backend"] == "sdpa")
    for r in rows:
        pct = "-" if r["percent_of_peak"] is None else f"{r['percent_of_peak']:.0f}"
        err = "-" if r["max_abs_error_vs_sdpa"] is None else f"{r['max_abs_error_vs_sdpa']:.1e}"
        print(f"{r['backend']:<12}{r['block_size']:>6}{r['ms']:>9.3f}{r['kv_gb_per_s']:>9.0f}{pct:>8}"
              f"{sdpa_ms / r['ms']:>8.2f}x{err:>10}")


def bench_int8(results: dict) -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    int8 = quantization.matmul_function("triton")
    rows = []
    for name, (out_features, in_features) in LAYERS.items():
        weight = torch.randn(out_features, in_features, generator=gen, device="cuda", dtype=torch.bfloat16)
        qweight, scale = quantization.quantize_absmax(weight)
        scale = scale.to(torch.bfloat16)
        for m in ROWS:
            x = torch.randn(m, in_features, generator=gen, device="cuda", dtype=torch.bfloat16)
            # Both round to bf16 (the cast path twice): within 3 bf16 steps of |x| @ |q|^T * scale.
            bound = (x.float().abs() @ qweight.float().abs().t()) * scale.float() * 3 * 2 ** -8
            diff = (int8(x, qweight, scale).float() - quantization.cast_matmul(x, qweight, scale).float()).abs()
            error, within = diff.max().item(), bool((diff <= bound + 1e-3).all())
            bf16_ms = time_ms(lambda: x @ weight.t())
            int8_ms = time_ms(lambda: int8(x, qweight, scale))
            rows.append({"layer": name, "out": out_features, "in": in_features, "rows": m, "bf16_ms": bf16_ms,
                         "int8_triton_ms": int8_ms, "speedup": bf16_ms / int8_ms,
                         "max_abs_diff_vs_cast": error, "within_bf16_bound": within})
    results["int8_matmul"] = {"dtype": "bfloat16", "rows": rows}
    print("\nint8 matmul (our triton kernel) against the bf16 matmul, Qwen3-0.6B shapes")
    print(f"{'layer':<20}{'out x in':>12}{'batch':>6}{'bf16 ms':>9}{'int8 ms':>9}{'speedup':>9}{'ok':>4}")
    for r in rows:
        print(f"{r['layer']:<20}{r['out']:>6}x{r['in']:<5}{r['rows']:>6}{r['bf16_ms']:>9.4f}{r['int8_triton_ms']:>9.4f}"
              f"{r['speedup']:>8.2f}x{'yes' if r['within_bf16_bound'] else 'NO':>4}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU (the kernels are timed on the device)")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton
    results["triton"] = triton.__version__
    print(f"{results['device']}, torch {results['torch']}, triton {results['triton']}")
    bench_decode(results)
    bench_int8(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
