"""Linear layers on an x86 CPU through oneDNN, with each weight packed once at load.

torch's default float32 matmul on a CPU calls MKL's GEMM, which lays the weight out for its
kernels again on every call. A decode step multiplies a few rows by every weight of the model,
so that repacking is most of the work. oneDNN can pack a weight once, into the blocked layout its
kernels read, and then multiply against the packed copy. vLLM's CPU backend does the same.

Measured on a 2-core AMD EPYC, SmolLM2-135M's shapes, float32, ms per call, F.linear / packed
(scripts/bench_linear.py, docs/results/cpu-linear-packing/linear.txt):

    rows (M)      [M, 576] x [576, 1536]     lm_head [M, 576] x [576, 49152]
    1             0.14 / 0.17                15.9 / 9.7
    4             0.37 / 0.18                39.8 / 11.9
    64            1.43 / 0.92                86.7 / 34.7
    256           8.70 / 5.23                230.8 / 156.6

The packed weight is an opaque oneDNN tensor: it replaces the float weight (same bytes), it is
not a Parameter, and nothing but oneDNN's linear can read it. Results differ from MKL's only in
the order of the float32 additions (a few 1e-6 on outputs of order 10).

On x86 only. bfloat16 on a CPU without native bf16 matmul (no AVX512-BF16, no AMX): torch's bf16
matmul there converts as it goes and ran 5-7x slower than the packed float32 one from 64 rows up
(a 2-core AMD EPYC, docs/results/cpu-bf16-linear.txt and .json), and oneDNN cannot pack a bf16
weight on such a CPU. So the weight is widened to float32 once and packed, and each call widens
its input and rounds its output back to bf16: the products and sums are float32, as in a bf16
matmul on hardware that has one, while the weight takes float32's bytes (the weights column
shows it). On a CPU with native bf16, and in float16, the layers stay torch's nn.Linear (not
measured here). The engine's stats say which ran (`linear_backend`).
"""
import platform

import torch
from torch import nn

ONEDNN_PACKED = "onednn-packed"
ONEDNN_PACKED_WIDENED = "onednn-packed-fp32 (bf16 weights widened: no native bf16 matmul on this CPU)"
TORCH_LINEAR = "torch"


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (what torch itself checks)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def linear_backend(device: torch.device, dtype: torch.dtype) -> str:
    """Which linear layers an engine with this device and dtype runs."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if device.type != "cpu" or not x86 or not torch.backends.mkldnn.is_available():
        return TORCH_LINEAR
    if dtype == torch.float32:
        return ONEDNN_PACKED
    if dtype == torch.bfloat16 and not native_bf16():
        return ONEDNN_PACKED_WIDENED
    return TORCH_LINEAR


class PackedLinear(nn.Module):
    """nn.Linear with its weight packed for oneDNN (see the module docstring)."""

    def __init__(self, linear: nn.Linear, tied: bool = False, widen: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.widen = widen   # bf16 layer computed in float32 (module docstring)
        weight, bias = linear.weight.detach(), linear.bias
        if widen:
            weight, bias = weight.float(), None if bias is None else bias.detach().float()
        # A buffer, so the model's state_dict and weight_bytes see it, as they saw the weight. A
        # tied lm_head's packed copy is extra: the embedding keeps its float table for lookups
        # (vLLM's CPU backend keeps both too), so it is not what the checkpoint holds.
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, None),
                             persistent=not tied)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.widen:
            out = torch.ops.mkldnn._linear_pointwise(x.float(), self.packed_weight, self.bias, "none", [], "")
            return out.to(x.dtype)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


@torch.no_grad()
def pack_linear_weights(model: nn.Module, device: torch.device, dtype: torch.dtype, enabled: bool = True) -> str:
    """Replace every nn.Linear of the model with a PackedLinear where oneDNN packing applies
    (linear_backend); returns the backend its float linear layers now run (an int8 model has none
    left to pack: its layers run their own matmul, and this says "torch"). enabled=False (the
    engine option cpu_fast_paths=False) leaves torch's nn.Linear everywhere, to measure against."""
    backend = linear_backend(device, dtype) if enabled else TORCH_LINEAR
    if backend == TORCH_LINEAR:
        return TORCH_LINEAR
    slots = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear]
    # a weight that a module other than a Linear also holds: a tied embedding
    shared = {id(p) for m in model.modules() if type(m) is not nn.Linear for p in m.parameters(recurse=False)}
    for parent, name in slots:   # one at a time: each float weight is freed as soon as its copy is packed
        linear = getattr(parent, name)
        setattr(parent, name, PackedLinear(linear, tied=id(linear.weight) in shared,
                                           widen=backend == ONEDNN_PACKED_WIDENED))
    return backend if slots else TORCH_LINEAR
