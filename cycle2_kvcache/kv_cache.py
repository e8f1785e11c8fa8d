"""The contiguous KV cache: one buffer per layer, reserved for a whole static batch.

Every sequence of the batch gets room for its (padded) prompt plus the largest max_tokens of the
batch, allocated up front and held until the last sequence finishes. Simple, and wasteful: the
padding and the unused tail are reserved too. Cycle 3 (PagedAttention) removes that waste.
"""

import torch


class ContiguousKVCache:
    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
