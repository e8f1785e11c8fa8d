"""int8 AbsMax weight-only quantization.

Each output channel (row) of a weight matrix gets one scale, scale = max|w_row| / 127, and is
stored as q = round(w / scale) in [-127, 127]: one byte per weight instead of two (bf16) or four
(fp32). Activations stay in floating point; a matmul dequantizes on the fly. Because the scale is
per output channel it factors out of the dot product: x @ (q * s)^T = (x @ q^T) * s.
The rounding error of one weight is at most scale / 2.

Three matmul paths: `triton`, our own kernel (triton_int8.py), which reads the int8 weight and
dequantizes in registers (the default on CUDA); `int8pack_mm`, torch's fused kernel; `cast`, the
weight cast to the activation dtype, then an ordinary matmul (the default on the CPU).
"""

import torch
from torch import nn

from .attention import triton_problem


def quantize_absmax(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in], fp32 scale [out])."""
    w = weight.float()
    scale = w.abs().amax(dim=1) / 127
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


MATMULS = ("triton", "int8pack_mm", "cast")

# The path each device takes unless int8_matmul says otherwise: a fixed table, so the same command
# always runs the same kernels (and gives the same tokens), where timing at start-up could pick
# differently from one run to the next. The CPU row is measured (docs/results/cpu-int8-matmul.txt:
# torch's int8pack kernel was slower than the cast path on SmolLM2's layer shapes in fp32; only
# fp32 was measured, and the row holds for every dtype). On CUDA our own Triton kernel reads
# the int8 weight directly, in any of fp32, bf16, fp16 (its GPU figures: chapter 7).
DEFAULT_MATMUL = {"cpu": "cast", "cuda": "triton"}


def choose_matmul(device: torch.device, dtype: torch.dtype, requested: str | None) -> tuple[str, str | None]:
    """The int8 path for this device and dtype, and a note if the table's choice cannot run here
    and cast runs instead (else None). A requested path that cannot run is an error."""
    if requested is not None and requested not in MATMULS:
        raise ValueError(f"unknown int8_matmul {requested!r}: choose one of {MATMULS}")
    choice = requested or DEFAULT_MATMUL.get(device.type, "cast")
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
    return {"int8pack_mm": int8pack_matmul, "cast": cast_matmul}[name]


class Int8Linear(nn.Module):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, matmul: str):
        super().__init__()
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

    A tied lm_head shares the embedding's int8 rows and scales, as it shared its float weight."""
    dtype = model.model.embed_tokens.weight.dtype
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    q, scale = quantize_absmax(model.model.embed_tokens.weight)
    scale = scale.to(dtype)
    model.model.embed_tokens = Int8Embedding(q, scale, dtype)
    if tied:
        model.lm_head = Int8Linear(q, scale, None, matmul)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                q, scale = quantize_absmax(child.weight)
                setattr(parent, name, Int8Linear(q, scale.to(dtype), child.bias, matmul))
