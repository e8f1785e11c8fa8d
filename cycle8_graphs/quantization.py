"""int8 AbsMax weight-only quantization.

Each output channel (row) of a weight matrix gets one scale, scale = max|w_row| / 127, and is
stored as q = round(w / scale) in [-127, 127]: one byte per weight instead of two (bf16) or four
(fp32). Activations stay in floating point; a matmul dequantizes on the fly. Because the scale is
per output channel it factors out of the dot product: x @ (q * s)^T = (x @ q^T) * s.
The rounding error of one weight is at most scale / 2.
"""

import time

import torch
from torch import nn


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


MATMULS = {"int8pack_mm": int8pack_matmul, "cast": cast_matmul}


class Int8Linear(nn.Module):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, matmul: str):
        super().__init__()
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.bias = bias
        self.matmul = MATMULS[matmul]

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


def choose_matmul(device: torch.device, dtype: torch.dtype, in_features: int, out_features: int) -> str:
    """Time both int8 paths on one layer shape, at a decode-sized and a prefill-sized batch; keep
    the faster one that runs (torch's int8pack kernel is fast on some CPUs and slow on others)."""
    q, scale = quantize_absmax(torch.randn(out_features, in_features, device=device))
    scale = scale.to(dtype)
    batches = [torch.randn(m, in_features, device=device, dtype=dtype) for m in (32, 256)]
    timings = {}
    for name, fn in MATMULS.items():
        try:
            fn(batches[0], q, scale)
        except (RuntimeError, NotImplementedError):
            continue   # e.g. no int8pack kernel for this device or dtype
        timings[name] = sum(_time(lambda: fn(x, q, scale), device) for x in batches)
    return min(timings, key=timings.get)


def _time(fn, device: torch.device, repeats: int = 10) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


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
