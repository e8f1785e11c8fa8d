"""The int8 matmul paths on this CPU, timed alone (chapter 7), against cycle 6's packed float32 layer.

    python scripts/int8_matmul_cpu.py --out docs/results/cpu-int8-matmul-<name>

On SmolLM2-135M's linear shapes (q/o 576 x 576, k/v 192 x 576, gate/up 1536 x 576, down 576 x 1536,
the tied lm_head 49152 x 576) at M = 1, 4, 16, 64 rows (decode batches) and 512 (a prefill chunk; the
lm_head sees one row per sequence, so not 512), in the engine's two CPU dtypes. Each repeat runs every
path once, in turn; the tables give the median of the repeats. On one thread, timed in that thread's
CPU time (time.thread_time): on a machine other jobs share, a wall clock mostly measures the
scheduler (a thread preempted for a 4 ms slice), the CPU time only this thread's work (what other
jobs do to the caches and memory bandwidth still shows).
"step" sums one decode step's layers (30 x the seven per layer, plus lm_head): what the choice is
made on. Every path's largest error against float64 x @ dequantize(q)^T, relative to that
product's largest magnitude, says how exact it is (float32 rounding: ~1e-7; bf16: ~1e-3).
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common.engine.cpu_gemm import PackedLinear
from cycle7_int8.quantization import dequantize, matmul_function, quantize_absmax

SHAPES = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (192, 576), "gate_proj/up_proj": (1536, 576),
          "down_proj": (576, 1536), "lm_head": (49152, 576)}
PER_LAYER = {"q_proj/o_proj": 2, "k_proj/v_proj": 2, "gate_proj/up_proj": 2, "down_proj": 1}
LAYERS = 30
ROWS = (1, 4, 16, 64, 512)
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu_flags() -> dict:
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return {flag: flag in flags for flag in FLAGS}


def dynamic_w8a8(q: torch.Tensor, scale: torch.Tensor):
    """torch's dynamic quantization (x86 engine: fbgemm, VNNI): int8 activations with one scale per
    call (w8a8 has one per row), through torch's deprecated quantized tensors."""
    torch.backends.quantized.engine = "x86"
    wq = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0)
    packed = torch.ops.quantized.linear_prepack(wq, None)
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, False)


def paths(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> dict:
    """name -> function of x [M, K] in dtype; the first is the float baseline cycle 6 runs."""
    w = dequantize(q, scale).to(dtype)
    s = scale.to(dtype)
    int8pack, cast, w8a8 = (matmul_function(name) for name in ("int8pack_mm", "cast", "w8a8"))
    if dtype == torch.float32:
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data = w
        return {"fp32 packed (cycle 6)": PackedLinear(linear), "cast": lambda x: cast(x, q, s),
                "int8pack_mm": lambda x: int8pack(x, q, s),
                "int8pack_mm, x in bf16": lambda x: int8pack(x.bfloat16(), q, s.bfloat16()).float(),
                "w8a8 per tensor (x86 quantized engine)": dynamic_w8a8(q, scale), "w8a8": lambda x: w8a8(x, q, s)}
    return {"bf16 linear (cycle 6)": lambda x: F.linear(x, w), "cast": lambda x: cast(x, q, s),
            "int8pack_mm": lambda x: int8pack(x, q, s), "w8a8": lambda x: w8a8(x, q, s)}


def time_paths(fns: dict, x: torch.Tensor, repeats: int) -> dict:
    for fn in fns.values():
        fn(x)   # one-time costs (packing, allocator growth) outside the timing
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.thread_time()
            fn(x)
            times[name].append(time.thread_time() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def rel_error(fns: dict, q, scale, dtype) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, q.shape[1], generator=gen).to(dtype)
    want = x.double() @ dequantize(q, scale.to(dtype).float()).double().t()
    return {name: ((fn(x).double() - want).abs().max() / want.abs().max()).item() for name, fn in fns.items()}


def measure(dtype: torch.dtype, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    out = {"ms": {}, "rel_error": {}}
    for shape_name, (n, k) in SHAPES.items():
        q, scale = quantize_absmax(torch.randn(n, k, generator=gen) * 0.05)
        fns = paths(q, scale, dtype)
        out["rel_error"][shape_name] = rel_error(fns, q, scale, dtype)
        for m in ROWS:
            if shape_name == "lm_head" and m > 64:
                continue
            x = torch.randn(m, k, generator=gen).to(dtype)
            out["ms"][f"{shape_name} M={m}"] = time_paths(fns, x, repeats if n * m < 2**22 else max(3, repeats // 3))
            print(dtype, shape_name, m, {p: round(v, 3) for p, v in out["ms"][f"{shape_name} M={m}"].items()}, flush=True)
    out["step_ms"] = {}
    for m in ROWS[:-1]:
        layer = {p: sum(PER_LAYER[s] * out["ms"][f"{s} M={m}"][p] for s in PER_LAYER) for p in fns}
        out["step_ms"][f"M={m}"] = {p: LAYERS * layer[p] + out["ms"][f"lm_head M={m}"][p] for p in fns}
    return out


def table(result: dict) -> str:
    names = list(next(iter(result["step_ms"].values())))
    lines = ["| one decode step's linear layers, ms (median) | " + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for rows, ms in result["step_ms"].items():
        lines.append(f"| {rows} | " + " | ".join(f"{ms[n]:.1f}" for n in names) + " |")
    err = {n: max(e[n] for e in result["rel_error"].values()) for n in names}
    lines.append("| largest relative error | " + " | ".join(f"{err[n]:.0e}" for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(1)   # thread_time counts this thread only (module docstring)
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"processor": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                               if line.startswith("model name")), platform.processor()),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_flags": cpu_flags(),
            "loadavg_start": open("/proc/loadavg").read().strip(), "repeats": args.repeats,
            "timing": "median of thread_time per call, one torch thread; a machine shared with other jobs"}
    results = {str(dtype).removeprefix("torch."): measure(dtype, args.repeats) for dtype in (torch.float32, torch.bfloat16)}
    info["loadavg_end"] = open("/proc/loadavg").read().strip()
    (args.out / "results.json").write_text(json.dumps({"machine": info, **results}, indent=1))
    text = [f"machine: {info['processor']}, {info['cpu_count']} CPUs, torch {info['torch']} "
            f"({info['cpu_capability']}), flags: {', '.join(f for f, on in info['cpu_flags'].items() if on)}",
            f"{info['timing']}; loadavg at start: {info['loadavg_start']}; at end: {info['loadavg_end']}"]
    for dtype, result in results.items():
        text += ["", f"activations {dtype}:", table(result)]
    (args.out / "table.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
