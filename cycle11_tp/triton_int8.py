"""Our own int8 weight-only matmul, in Triton: out = (x @ q^T) * scale, reading the weight as int8.

A decode step multiplies a few activation rows by every weight matrix, so its time is the time to
read the weights. This kernel reads each weight as one byte, converts it to the activation dtype
in registers (int8 values up to 127 are exact in bf16, fp16 and fp32), accumulates in fp32 with
tl.dot, and applies the per-output-channel scale once at the end: because the scale belongs to the
output channel, x @ (q * s)^T = (x @ q^T) * s. No dequantized copy of the weight is ever written.

One program computes a BLOCK_M x BLOCK_N tile of the output and walks the shared dimension in
steps of BLOCK_K. Launches depend only on shapes (no host sync), so a CUDA graph can capture them.
On a CPU the kernel runs only under Triton's interpreter (TRITON_INTERPRET=1, set before import).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_matmul_kernel(x_ptr, q_ptr, scale_ptr, out_ptr, M, N, K,
                        stride_xm, stride_qn, stride_om,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)    # activation rows (tokens)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)    # output channels (weight rows)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)              # [BLOCK_M, BLOCK_K]
        q = tl.load(q_ptr + cols[:, None] * stride_qn + ks[None, :],
                    mask=col_ok[:, None] & k_ok[None, :], other=0)                # [BLOCK_N, BLOCK_K] int8
        # Dequantize in registers: the int8 value becomes the activation dtype, exactly. The
        # scale waits until the end. "ieee" keeps fp32 activations in fp32 (tf32 would round
        # them); for bf16/fp16 the option does nothing.
        acc = tl.dot(x, tl.trans(q.to(x.dtype)), acc, input_precision="ieee")
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = acc * scale[None, :]                                   # one multiply per output, not per weight
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def tile_sizes(M: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """Fixed tiles, chosen by the number of rows and the dtype only (deterministic, no autotuning at
    start-up). Decode (a few rows) is bound by reading the weight: narrow output tiles give many
    programs to spread that read over the GPU. Prefill (many rows) reuses each weight tile over 64
    rows. fp32 has no tensor-core dot that keeps every bit ("ieee"): tl.dot becomes a loop of FMAs
    with both operand tiles in registers, which spill at these sizes (2-5 KB per thread on sm_80
    and sm_90), so fp32 walks K in steps of 32 (docs/results/triton-compile-sm80-sm90.txt)."""
    if dtype == torch.float32:
        return (16, 16, 32) if M <= 16 else (32, 32, 32)
    if M <= 16:
        return 16, 16, 256      # tl.dot needs >= 16 rows: a decode batch is padded to 16
    return 64, 64, 64


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (fp32/bf16/fp16) @ (q [N, K] int8 * scale [N])^T -> [M, N] in x's dtype."""
    M, K = x.shape
    N = q.shape[0]
    x = x.contiguous()                  # the kernel assumes unit stride along K
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    BLOCK_M, BLOCK_N, BLOCK_K = tile_sizes(M, x.dtype)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _int8_matmul_kernel[grid](x, q, scale, out, M, N, K, x.stride(0), q.stride(0), out.stride(0),
                              BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out
