"""int8 AbsMax weight-only quantization.

Each output channel (row) of a weight matrix gets one scale, scale = max|w_row| / 127, and is
stored as q = round(w / scale) in [-127, 127]: one byte per weight instead of two (bf16) or four
(fp32). Activations stay in floating point; a matmul dequantizes on the fly. Because the scale is
per output channel it factors out of the dot product: x @ (q * s)^T = (x @ q^T) * s.
The rounding error of one weight is at most scale / 2.

Five matmul paths: `triton`, our own kernel (triton_int8.py), which reads the int8 weight and
dequantizes in registers (the default on CUDA); `int8pack_mm`, torch's fused kernel of that kind,
in the activations' dtype; `int8pack_bf16`, the same kernel with the activations rounded to bf16,
the one dtype its fast CPU code takes (the default on a CPU with AVX512-BF16); `w8a8`, each row of
activations quantized to int8 too, so the CPU multiplies int8 by int8; `cast`, the weight cast to
the activation dtype, then an ordinary matmul (the default on other CPUs).
"""

import torch
from torch import nn

from .attention import triton_problem
from .parallel_layers import RowParallelLinear


def quantize_absmax(weight: torch.Tensor, row_max=None) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in], fp32 scale [out]). row_max: for a weight split by input
    columns over the ranks (row-parallel), the max of every rank's row maxima: each rank's slice
    then gets the scales, and the int8 values, of the whole weight."""
    w = weight.float()
    amax = w.abs().amax(dim=1)
    scale = (amax if row_max is None else row_max(amax)) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)   # an all-zero row stays zero, no 0/0
    q = torch.round(w / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.unsqueeze(1)


def int8pack_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """torch's fused int8 weight-only kernel: x [M, in] @ dequant(q)^T -> [M, out]."""
    return torch.ops.aten._weight_int8pack_mm(x, q, scale)


def cast_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Cast the int8 weight to x's dtype, matmul, then apply the per-channel scale to the output."""
    return (x @ q.to(x.dtype).t()) * scale


def int8pack_bf16_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """torch's int8 kernel on bf16 activations (converted in and out): on a CPU its float32 code
    is scalar, its bf16 code reads the int8 weight and converts it in AVX512 registers."""
    return torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, scale.bfloat16()).to(x.dtype)


def w8a8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token int8, as vLLM's CPU backend runs int8 models: each row of x gets its own
    AbsMax scale, so x ~ xq * x_scale; int8 x int8 sums exactly into int32 (VNNI's dot product),
    and both scales factor out of it: x @ (q * s)^T ~ (xq @ q^T) * x_scale * s."""
    xf = x.float()
    x_scale = xf.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127
    xq = torch.round(xf / x_scale).to(torch.int8)
    return (torch._int_mm(xq, q.t()).float() * x_scale * scale.float()).to(x.dtype)


MATMULS = ("triton", "int8pack_mm", "int8pack_bf16", "w8a8", "cast")

# The path each device takes unless int8_matmul says otherwise: a fixed table, so the same command
# always runs the same kernels (and gives the same tokens), where timing at start-up could pick
# differently from one run to the next. The CPU rows are measured (scripts/int8_matmul_cpu.py,
# docs/results/cpu-int8-matmul-vnni/, chapter 7). On a 2-core AMD EPYC with AVX512-BF16 and VNNI:
# int8pack_bf16 was the fastest path that kept cycle 7's quality (the perplexity of cast), faster
# than cycle 6's packed float32 layers at 1-4 rows, slower from 16 rows on; w8a8 was faster at
# every size but lost quality (chapter 7). Without AVX512-BF16 cast stays: torch's int8 kernel was
# far slower than cast on an earlier machine (Intel Xeon, docs/results/cpu-int8-matmul.txt), and
# on an AVX2-only CPU int8pack_bf16 and w8a8 are not measured.
# On CUDA our own Triton kernel reads the int8 weight directly.
DEFAULT_MATMUL = {"cpu": "int8pack_bf16", "cpu without avx512-bf16": "cast", "cuda": "triton"}


def default_matmul(device: torch.device) -> str:
    if device.type == "cpu" and not torch.cpu._is_avx512_bf16_supported():
        return DEFAULT_MATMUL["cpu without avx512-bf16"]
    return DEFAULT_MATMUL.get(device.type, "cast")


def choose_matmul(device: torch.device, dtype: torch.dtype, requested: str | None) -> tuple[str, str | None]:
    """The int8 path for this device and dtype, and a note if the table's choice cannot run here
    and cast runs instead (else None). A requested path that cannot run is an error."""
    if requested is not None and requested not in MATMULS:
        raise ValueError(f"unknown int8_matmul {requested!r}: choose one of {MATMULS}")
    choice = requested or default_matmul(device)
    problem = triton_problem(device, dtype, kernels="triton_int8") if choice == "triton" else None
    if problem and requested:
        raise ValueError(f"int8_matmul='triton' cannot run here: {problem}")
    if problem:
        return "cast", f"int8_matmul triton not used ({problem}); the cast path runs instead"
    return choice, None


def matmul_function(name: str):
    """The function behind a path name; triton is imported only when it is used."""
    if name == "triton":
        from .triton_int8 import int8_matmul
        return int8_matmul
    return {"int8pack_mm": int8pack_matmul, "int8pack_bf16": int8pack_bf16_matmul, "w8a8": w8a8_matmul,
            "cast": cast_matmul}[name]


# torch's int8pack kernel reads a row 16 values at a time with no tail: another width crashes the
# process (a segfault, torch 2.13 on the CPU), so it is refused here, before any work.
INT8PACK_K_MULTIPLE = 16


class Int8Linear(nn.Module):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, matmul: str):
        super().__init__()
        if matmul.startswith("int8pack") and q.shape[1] % INT8PACK_K_MULTIPLE:
            raise ValueError(f"int8_matmul={matmul!r} needs in_features a multiple of {INT8PACK_K_MULTIPLE}, "
                             f"this layer has {q.shape[1]}: choose int8_matmul='cast'")
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.bias = bias
        self.matmul = matmul_function(matmul)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x.reshape(-1, x.shape[-1]), self.qweight, self.scale)
        out = out.view(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias


class Int8Embedding(nn.Module):
    """A row lookup dequantizes just the rows it reads."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.qweight[ids].to(self.dtype) * self.scale[ids].unsqueeze(-1)).to(self.dtype)


@torch.no_grad()
def quantize_model(model: nn.Module, matmul: str) -> None:
    """Replace every Linear and the embedding with int8 versions, in place. Norms stay float.

    A tied lm_head shares the embedding's int8 rows and scales, as it shared its float weight.
    Cycle 11: each rank quantizes its own slices; a row-parallel layer's scales are its whole rows'
    (one max all-reduce), so every rank holds a slice of the int8 weights tp=1 would hold."""
    embed = model.model.embed_tokens.embedding
    dtype = embed.weight.dtype
    tied = model.lm_head.linear.weight is embed.weight
    q, scale = quantize_absmax(embed.weight)
    scale = scale.to(dtype)
    model.model.embed_tokens.embedding = Int8Embedding(q, scale, dtype)
    if tied:
        model.lm_head.linear = Int8Linear(q, scale, None, matmul)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                row_max = parent.tp.all_reduce_max if isinstance(parent, RowParallelLinear) else None
                q, scale = quantize_absmax(child.weight, row_max)
                setattr(parent, name, Int8Linear(q, scale.to(dtype), child.bias, matmul))
