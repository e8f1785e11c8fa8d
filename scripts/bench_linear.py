"""One linear layer on the CPU: torch's F.linear (MKL) against oneDNN with the weight packed once.

    python scripts/bench_linear.py                       # SmolLM2-135M's shapes, float32
    python scripts/bench_linear.py --rows 1,4,16 --out docs/results/cpu-linear-packing/linear.json
    python scripts/bench_linear.py --dtype bfloat16 --rows 4,64,640    # bf16: F.linear vs widened + packed

common/engine/cpu_gemm.py packs every linear layer this way on x86 CPUs; this script shows why, on
the machine at hand: ms per call and the effective weight bandwidth, for a few row counts M
(a decode step has one row per running sequence, a prefill one per prompt token).
"""

import argparse
import json
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from common.benchmark.machine import machine_info  # noqa: E402
from common.engine.cpu_gemm import PackedLinear  # noqa: E402

# (out_features, in_features): SmolLM2-135M's gate/up, down, q/o projections and its 49,152-token lm_head
SHAPES = [(1536, 576), (576, 1536), (576, 576), (49152, 576)]


def ms_per_call(fn, calls: int) -> float:
    for _ in range(3):   # warm-up: oneDNN picks and caches its kernel on the first calls
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,4,16,64,256", help="comma-separated row counts M")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: torch's bf16 F.linear against the packed layer with its weight widened to float32")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows = []
    print(f"{'M':>5} {'out x in':>13} {'F.linear ms':>12} {'packed ms':>10} {'speed-up':>9} {'max |diff|':>11}")
    for m in map(int, args.rows.split(",")):
        for n, k in SHAPES:
            linear = torch.nn.Linear(k, n, bias=False, dtype=dtype)
            packed, x = PackedLinear(linear, widen=dtype != torch.float32), torch.randn(m, k, dtype=dtype)
            with torch.inference_mode():
                plain = ms_per_call(lambda: F.linear(x, linear.weight), args.calls)
                fast = ms_per_call(lambda: packed(x), args.calls)
                diff = (F.linear(x, linear.weight).float() - packed(x).float()).abs().max().item()
            rows.append({"rows": m, "out": n, "in": k, "f_linear_ms": plain, "packed_ms": fast, "max_abs_diff": diff})
            print(f"{m:>5} {f'{n} x {k}':>13} {plain:>12.3f} {fast:>10.3f} {plain / fast:>8.2f}x {diff:>11.1e}")
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": machine_info(torch.device("cpu")), "torch": torch.__version__,
                                   "dtype": args.dtype, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
