"""torch.compile for the small element-wise functions: RMSNorm, SiLU * up, rotary.

Written out in plain torch, each is a chain of small kernels (an RMSNorm: cast, square, mean, add
eps, rsqrt, multiply, cast back, scale), each reading and writing the whole activation; SiLU * up
is two, rotary several per tensor. Inductor fuses each function into one kernel, which can pay
where a step is a stream of tiny kernels: a GPU decoding a small batch. On a CPU the fused C++ kernels gain
little over torch's vectorized ones, every call of a compiled function also checks its guards in
Python, and the first call runs a C++ compiler: so the engine compiles on CUDA only unless asked
(`compile=True`); stats["compile_s"] is the time the compiling took.

One compiled object per function, shared by every layer (compiling each module's bound method
would compile the same code once per layer); dynamic shapes, so a new batch size does not compile
again.
"""

import time

import torch

from .model import MLP, Attention, RMSNorm, apply_rotary, rms_norm, silu_mul


def compile_small_ops(model, device: torch.device, dtype: torch.dtype) -> float:
    """Swap the compiled functions into every module; compile them now, on small inputs, so the
    first step does not pay for it. Returns the seconds compiling took."""
    start = time.perf_counter()
    norm, act_mul, rotate = (torch.compile(f, dynamic=True) for f in (rms_norm, silu_mul, apply_rotary))
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.op = norm
        elif isinstance(module, MLP):
            module.act_mul = act_mul
        elif isinstance(module, Attention):
            module.rotate = rotate
    _warm_up(model, norm, act_mul, rotate, device, dtype)
    return time.perf_counter() - start


@torch.inference_mode()
def _warm_up(model, norm, act_mul, rotate, device, dtype) -> None:
    attn = model.model.layers[0].self_attn
    hidden = model.config.hidden_size
    for n in (1, 3):            # size 1 is specialized apart from the other sizes: compile both
        x = torch.randn(n, hidden, device=device, dtype=dtype)
        norm(x, model.model.norm.weight, model.model.norm.eps)
        act_mul(x, x)
        q = torch.randn(n, attn.num_heads, attn.head_dim, device=device, dtype=dtype)
        if attn.qk_norm:
            norm(q, attn.q_norm.weight, attn.q_norm.eps)
        cos, sin = model.rotary(torch.arange(n, device=device), dtype)
        rotate(q, cos, sin)
