"""The block pool: `num_blocks` KV blocks of `block_size` tokens, lent to sequences on demand.

A sequence's block_table maps its logical blocks (token i lives in logical block i // block_size)
to physical blocks anywhere in the pool, so nothing needs to be contiguous and nothing is reserved
ahead: a sequence takes a new block only when its last one is full, and gives all of them back
the moment it finishes.
"""

from collections import deque

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_block_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)  # ceil division

    def check_fits(self, max_lens: list[int]) -> None:
        """Refuse a request that could never fit, even in the empty pool (else it would wait forever)."""
        for i, max_len in enumerate(max_lens):
            if self.blocks_for(max_len) > self.num_blocks:
                raise ValueError(f"prompt {i} needs up to {self.blocks_for(max_len)} KV blocks "
                                 f"(prompt + max_tokens), the whole pool has {self.num_blocks}: "
                                 f"lower max_tokens or give the cache more blocks (num_kv_blocks)")

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_for(len(seq)) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every token the sequence has now (its prompt, at admission)."""
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        if not self.can_allocate(seq):
            raise RuntimeError(f"sequence {seq.seq_id} needs {self.blocks_for(len(seq))} blocks, {self.num_free_blocks} are free")
        seq.block_table = [self.free_block_ids.popleft() for _ in range(self.blocks_for(len(seq)))]

    def needs_block(self, seq: Sequence) -> bool:
        """Whether storing the K/V of the sequence's newest token needs a new block."""
        return len(seq) > len(seq.block_table) * self.block_size

    def can_append(self, seq: Sequence) -> bool:
        return not self.needs_block(seq) or self.num_free_blocks > 0

    def append_slot(self, seq: Sequence) -> None:
        """Make room for the newest token's K/V: a new block only when the last one is full."""
        if self.needs_block(seq):
            if not self.free_block_ids:
                raise RuntimeError(f"no free KV block for sequence {seq.seq_id}")
            seq.block_table.append(self.free_block_ids.popleft())

    def free(self, seq: Sequence) -> None:
        self.free_block_ids.extend(seq.block_table)
        seq.block_table = []

    def slot(self, seq: Sequence, position: int) -> int:
        """Where token `position` of the sequence lives in the flat pool: block * block_size + offset."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def stats(self) -> dict:
        return {"num_kv_blocks": self.num_blocks, "block_size": self.block_size, "free_kv_blocks": self.num_free_blocks}
