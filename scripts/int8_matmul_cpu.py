"""The int8 matmul paths on this CPU, timed alone (chapter 7): fp32, torch's int8pack kernel and the
cast path, on SmolLM2-135M's gate_proj (1,536 x 576) and lm_head (49,152 x 576) at 32 rows.

    python scripts/int8_matmul_cpu.py > docs/results/cpu-int8-matmul.txt
"""

import time

import torch

from cycle7_int8.quantization import matmul_function, quantize_absmax


def best_ms(fn, repeats: int = 10) -> float:
    fn()   # the first call pays one-time costs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    x = torch.randn(32, 576)
    for rows in (1536, 49152):
        w = torch.randn(rows, 576)
        q, scale = quantize_absmax(w)
        paths = {"fp32": lambda: x @ w.t()}
        paths |= {name: (lambda f=matmul_function(name): f(x, q, scale)) for name in ("int8pack_mm", "cast")}
        for name, fn in paths.items():
            print(f"{rows} x 576 weight, 32 rows, {name}: best of 10 {best_ms(fn):.2f} ms")


if __name__ == "__main__":
    main()
