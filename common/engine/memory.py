"""Byte counts of what a model holds, what a static batch will need, and what the machine has free.

Cycles 1 and 2 have no block pool to bound them: a static batch allocates whatever its longest
sequence needs. They call `check_static_batch` before running anything, so a batch that cannot fit
is refused with a ValueError naming the estimate and the limit, instead of dying inside the
allocator half an hour later (or never: Linux may swap until the machine stalls).
"""

import torch
from torch import nn

GIB = 2**30


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and persistent buffers (what a checkpoint holds: int8 weights and
    their scales too, but not a rotary table a model keeps as a non-persistent buffer), a tied
    tensor counted once. Every row of compare.py's table, the HF baselines' too, uses this."""
    seen, total = set(), 0
    for tensor in model.state_dict(keep_vars=True).values():
        if tensor.is_mkldnn:   # a packed oneDNN weight (cpu_gemm.py): opaque, never shared
            total += tensor.numel() * tensor.element_size()
            continue
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def head_dim_of(config) -> int:
    """Width of one attention head: config.head_dim where the model sets it (Qwen3), else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_cache_bytes(config, batch: int, tokens: int, dtype: torch.dtype) -> int:
    """K and V of `tokens` positions for `batch` sequences, every layer."""
    head_dim = head_dim_of(config)
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * _itemsize(dtype)
    return batch * tokens * per_token


def static_batch_bytes(config, batch: int, seq_len: int, dtype: torch.dtype, kv_tokens: int = 0) -> dict:
    """Peak bytes one forward over a left-padded [batch, seq_len] batch adds beyond the weights.

    attention: the [B, H, T, T] scores in the model dtype plus their fp32 copy and fp32
        probabilities (one layer's worth: each layer frees its scores before the next starts),
        plus the [B, T, T] boolean mask and its temporaries;
    activations: one layer's hidden states, q/k/v and SwiGLU intermediates, and fp32 logits of
        the last position;
    kv_cache: a contiguous reservation of kv_tokens positions per sequence (cycle 2; 0 in cycle 1).
    """
    item = _itemsize(dtype)
    head_dim = head_dim_of(config)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    scores = batch * heads * seq_len * seq_len * score_bytes_per_element(dtype)
    mask = 4 * batch * seq_len * seq_len   # the mask, its causal/padding parts and its negation
    per_token = 3 * config.hidden_size + 2 * (heads + 2 * kv_heads) * head_dim + 3 * config.intermediate_size
    activations = batch * seq_len * per_token * item + 2 * batch * config.vocab_size * 4
    kv = kv_cache_bytes(config, batch, kv_tokens, dtype) if kv_tokens else 0
    return {"attention": scores + mask, "activations": activations, "kv_cache": kv,
            "total": scores + mask + activations + kv}


def score_bytes_per_element(dtype: torch.dtype) -> int:
    """Bytes per element of the explicit attention's [B, H, Tq, Tk] score tensors alive at once at
    its peak (grouped_attention, cycles 1-2): the masked scores in the model dtype, their fp32 copy
    and the fp32 probabilities, since softmax runs in fp32. In fp32 the copy is the tensor itself;
    while masked_fill runs, the scores and the masked scores are both alive."""
    item = _itemsize(dtype)
    fp32_copies = 1 if dtype == torch.float32 else 2
    return max(2 * item, item + 4 * fp32_copies)


def available_bytes(device: torch.device) -> tuple[int | None, str]:
    """Memory a new allocation can still get, and where the figure comes from.

    CUDA: the driver's free memory plus what torch's allocator holds but does not use. CPU:
    MemAvailable from /proc/meminfo (what the kernel can hand out without swapping); None where
    that file does not exist (not Linux), and the caller then cannot check.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, "free GPU memory"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM, MemAvailable"
    except OSError:
        pass
    return None, "unknown (no /proc/meminfo)"


class MemoryEstimateError(ValueError):
    """A batch refused before it started: its estimated peak is over the memory limit."""

    def __init__(self, message: str, estimate_bytes: int, limit_bytes: int):
        super().__init__(message)
        self.estimate_bytes = estimate_bytes
        self.limit_bytes = limit_bytes


def check_static_batch(need: dict, weights: int, device: torch.device, *, batch: int, seq_len: int,
                       max_num_seqs: int, longest_prompt: int, largest_max_tokens: int) -> dict:
    """Raise MemoryEstimateError when `need` (static_batch_bytes of the worst group) does not fit
    beside the weights that are already loaded; return the figures for the engine's stats."""
    available, where = available_bytes(device)
    figures = {"memory_estimate_bytes": weights + need["total"],
               "memory_limit_bytes": None if available is None else weights + available,
               "memory_limit_source": where}
    if available is None or need["total"] <= available:
        return figures
    parts = ", ".join(f"{name.replace('_', ' ')} {need[name] / GIB:.1f} GiB"
                      for name in ("attention", "activations", "kv_cache") if need[name])
    raise MemoryEstimateError(
        f"refused before starting: a static batch of {batch} sequences x {seq_len} tokens needs est. "
        f"{need['total'] / GIB:.1f} GiB ({parts}) beside the {weights / GIB:.1f} GiB of weights, i.e. a "
        f"peak of est. {(weights + need['total']) / GIB:.1f} GiB, over the limit of "
        f"{(weights + available) / GIB:.1f} GiB (the weights + {available / GIB:.1f} GiB of {where}). Lower "
        f"max_num_seqs (now {max_num_seqs}), the prompt length (longest {longest_prompt} "
        f"tokens) or max_tokens (largest {largest_max_tokens}).",
        weights + need["total"], weights + available)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
