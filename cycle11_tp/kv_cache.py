"""The paged KV cache: per layer, K and V tensors shaped [num_blocks, block_size, kv_heads, head_dim].

Allocated once when the engine starts; the BlockManager decides which sequence owns which block.
Its size is planned as vLLM plans it: on CUDA, `gpu_memory_utilization` of the device's total
memory, less what the model holds and less the activation peak of the largest step the engine can
take (measured by running that step once, on dummy tokens, before the pool exists); on CPU a fixed
number of bytes. Either way it never exceeds what max_num_seqs sequences of max_model_len tokens
could ever hold, so a tiny model does not get millions of blocks it can never fill.
"""

from typing import Callable

import torch

CPU_KV_CACHE_BYTES = 512 << 20  # SmolLM2-135M in fp32 stores 45 KiB per token: ~11.6k tokens
GPU_MEMORY_UTILIZATION = 0.9    # vLLM's default: the share of the GPU's total memory this engine may use


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_blocks, block_size, kv_heads, head_dim)
        # Zeros, not empty: attention reads whole blocks, and a masked-out slot still enters the
        # product with V as 0 * value; uninitialized memory can hold NaN, and 0 * NaN = NaN.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.bytes_per_block = block_bytes(num_layers, block_size, kv_heads, head_dim, dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def block_bytes(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of `block_size` tokens in every layer."""
    return 2 * num_layers * block_size * kv_heads * head_dim * dtype.itemsize


def profile_batches(max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int) -> list[tuple[list[int], bool]]:
    """The steps to profile, as (sequence lengths, is_prefill): the largest prefill and decode.

    Prefill: the token budget in sequences as long as the model allows (one long sequence costs
    the explicit attention the most: its scores grow with the square of the length). Decode: one
    token for each of max_num_seqs sequences, the budget's worth of context spread over them.
    """
    length = min(max_num_batched_tokens, max_model_len)
    prefill = [length] * min(max_num_seqs, max(1, max_num_batched_tokens // length))
    decode = [max(1, min(max_model_len, max_num_batched_tokens // max_num_seqs))] * max_num_seqs
    return [(prefill, True), (decode, False)]


def profile_activation_peak(device: torch.device, run_steps: Callable[[], None]) -> int:
    """Bytes the profiled steps allocated beyond what was already allocated: torch's own peak counter."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run_steps()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()           # hand the activations' cached blocks back before the pool is allocated
    return peak


def plan_kv_pool(bytes_per_block: int, device: torch.device, max_blocks: int, num_kv_blocks: int | None,
                 kv_cache_memory_bytes: int | None, gpu_memory_utilization: float,
                 profile: Callable[[], int]) -> dict:
    """How many blocks the pool gets, and why (the returned dict goes into llm.stats["kv_pool"]).

    max_blocks: what max_num_seqs sequences of max_model_len tokens can hold at most (the cap).
    profile(): runs the largest steps once and returns their activation peak in bytes (CUDA only).
    """
    plan = {"bytes_per_block": bytes_per_block, "cap_blocks": max_blocks, "budget_bytes": None,
            "model_bytes": None, "activation_peak_bytes": None, "total_memory_bytes": None,
            "gpu_memory_utilization": None}
    if num_kv_blocks is not None:  # asked for exactly: no budget, no cap
        return {**plan, "num_kv_blocks": num_kv_blocks, "sized_by": "num_kv_blocks"}
    if kv_cache_memory_bytes is not None:
        plan.update(budget_bytes=kv_cache_memory_bytes, sized_by="kv_cache_memory_bytes")
    elif device.type == "cuda":
        model = torch.cuda.memory_allocated(device)      # weights (and anything else loaded so far)
        peak = profile()                                 # ends with empty_cache: free below is really free
        free, total = torch.cuda.mem_get_info(device)
        # Never more than is free right now either: another process may hold part of the GPU.
        budget = min(int(total * gpu_memory_utilization) - model - peak, free - peak)
        plan.update(budget_bytes=budget, model_bytes=model, activation_peak_bytes=peak, total_memory_bytes=total,
                    gpu_memory_utilization=gpu_memory_utilization, sized_by="gpu_memory_utilization")
    else:
        plan.update(budget_bytes=CPU_KV_CACHE_BYTES, sized_by="cpu budget (CPU_KV_CACHE_BYTES)")
    blocks = max(0, plan["budget_bytes"]) // bytes_per_block
    if blocks < 1:
        raise ValueError(f"the KV cache budget is {plan['budget_bytes']} bytes ({plan['sized_by']}; model "
                         f"{plan['model_bytes']} bytes, activation peak {plan['activation_peak_bytes']} bytes), "
                         f"not even one block of {bytes_per_block} bytes: raise gpu_memory_utilization or "
                         f"kv_cache_memory_bytes, or lower max_num_batched_tokens / max_num_seqs")
    if blocks > max_blocks:
        blocks, plan["sized_by"] = max_blocks, plan["sized_by"] + ", capped at max_num_seqs x max_model_len"
    return {**plan, "num_kv_blocks": blocks}
