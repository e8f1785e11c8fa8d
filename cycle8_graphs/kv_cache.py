"""The paged KV cache: per layer, K and V tensors shaped [num_blocks, block_size, kv_heads, head_dim].

Allocated once when the engine starts; the BlockManager decides which sequence owns which block.
Its size comes from a memory budget: on CUDA a fraction of the memory left free after the weights
load, on CPU a fixed number of bytes.
"""

import torch

CPU_KV_CACHE_BYTES = 512 << 20  # SmolLM2-135M in fp32 stores 45 KiB per token: ~11.6k tokens


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


def num_blocks_for_budget(bytes_per_block: int, device: torch.device, kv_cache_memory_bytes: int | None,
                          kv_cache_fraction: float) -> int:
    if kv_cache_memory_bytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            kv_cache_memory_bytes = int(free * kv_cache_fraction)
        else:
            kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
    num_blocks = kv_cache_memory_bytes // bytes_per_block
    if num_blocks < 1:
        raise ValueError(f"a KV budget of {kv_cache_memory_bytes} bytes holds no block of {bytes_per_block} bytes")
    return num_blocks
