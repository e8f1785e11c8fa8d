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

    def keep_rows(self, rows: list[int], columns: int) -> None:
        """Keep only these batch rows, in order, moved up in the same memory: a finished sequence
        leaves the batch, and its memory stays reserved until the whole group is done. Only the
        first `columns` columns hold K/V yet, and the rows before the first gap stay where they are."""
        first = next((i for i, row in enumerate(rows) if row != i), len(rows))
        index = torch.tensor(rows[first:], dtype=torch.long, device=self.k[0].device)
        for cache in (self.k, self.v):
            for layer, t in enumerate(cache):
                # t[index] is a copy: no row is overwritten before it is read
                t[first:len(rows), :, :columns] = t[index, :, :columns]
                cache[layer] = t[:len(rows)]
