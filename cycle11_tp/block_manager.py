"""The block pool, now with prefix caching; with chunked prefill, blocks come one chunk at a time.

Every full block whose K/V has been computed gets a hash chained from its parent:
hash(block i) = xxh64(hash(block i-1) + token ids of block i), so equal hashes mean equal
prefixes up to the end of the block. Admitting a sequence walks its prompt's full blocks and
reuses every consecutive hit (the hit block's ref count goes up) instead of recomputing it; the
first miss and everything after it are computed. Finished sequences drop their references; a
block at ref count 0 goes back to the free list but keeps its hash and contents, so a later
request can still hit it, until the pool needs it again (least recently freed first).
"""

from array import array
from collections import OrderedDict

import xxhash

from .sequence import Sequence


class Block:
    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None          # set once the block is full and its K/V computed
        self.token_ids: list[int] = []        # compared on every hit, so a hash collision is never served


def chain_hash(token_ids: list[int], parent: int | None) -> int:
    h = xxhash.xxh64()
    if parent is not None:
        h.update(parent.to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    return h.intdigest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self.hash_to_block: dict[int, int] = {}

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

    # --- prefix cache lookups ------------------------------------------------------------------

    def prompt_block_hashes(self, seq: Sequence) -> list[int]:
        """Chained hashes of the sequence's full blocks that may hit the cache.

        Only blocks that end before the last token count: the last token is always computed, so
        the step has logits to sample from (and no shared block is ever written again).
        """
        # A request that asks for prompt logprobs needs logits at every prompt position, so its
        # prompt is computed whole: it reads no cached block (vLLM does the same).
        if not self.enable_prefix_caching or seq.sampling_params.prompt_logprobs is not None:
            return []
        hashes, parent = [], None
        for i in range((len(seq) - 1) // self.block_size):
            parent = chain_hash(seq.token_ids[i * self.block_size:(i + 1) * self.block_size], parent)
            hashes.append(parent)
        return hashes

    def cached_blocks(self, seq: Sequence, hashes: list[int]) -> list[int]:
        """Ids of the consecutive cached blocks at the start of the sequence (tokens compared too)."""
        hits = []
        for i, h in enumerate(hashes):
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != seq.token_ids[i * self.block_size:(i + 1) * self.block_size]:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, seq: Sequence, hits: list[int] = (), num_tokens: int | None = None) -> bool:
        # a hit on a block in use costs nothing; a hit on a free (cached) block takes it off the free list
        in_use = sum(1 for block_id in hits if self.blocks[block_id].ref_count > 0)
        return self.blocks_for(num_tokens or len(seq)) - in_use <= self.num_free_blocks

    def allocate(self, seq: Sequence, hits: list[int] = (), hashes: list[int] = (),
                 num_tokens: int | None = None) -> None:
        """Blocks for the sequence's first num_tokens tokens (all it has by default): the cached
        `hits` reused, the rest fresh. With chunked prefill, only the first chunk's blocks: the
        next chunks take theirs when they are scheduled (append_slot)."""
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        if not self.can_allocate(seq, hits, num_tokens):
            raise RuntimeError(f"sequence {seq.seq_id} does not fit the {self.num_free_blocks} free blocks")
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.block_hashes = list(hashes[:len(hits)])
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size   # a hit is computed K/V
        while len(seq.block_table) < self.blocks_for(num_tokens or len(seq)):
            seq.block_table.append(self._take_free_block())

    def _take_free_block(self) -> int:
        """The least recently freed block; if it still holds a cached prefix, that entry is evicted."""
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = None, [], 1
        return block_id

    # --- growth and release --------------------------------------------------------------------

    def blocks_needed(self, seq: Sequence, num_tokens: int | None = None) -> int:
        """New blocks that storing the K/V of the sequence's first num_tokens tokens (all by
        default: a decode's newest token) needs beyond those it holds."""
        return max(0, self.blocks_for(num_tokens or len(seq)) - len(seq.block_table))

    def can_append(self, seq: Sequence, num_tokens: int | None = None) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def append_slot(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Make room for K/V up to token num_tokens (a decode's newest token, or a prompt's next
        chunk): new blocks only past the last full one."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"no free KV block for sequence {seq.seq_id}")
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the blocks past the sequence's first num_tokens tokens (speculative decoding:
        blocks taken for drafts that were rejected). They hold no hash: nothing in them counted."""
        while len(seq.block_table) > self.blocks_for(num_tokens):
            block = self.blocks[seq.block_table.pop()]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block.block_id] = None

    def cache_full_blocks(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Hash every block that is now full of computed K/V, so later requests can hit it."""
        if not self.enable_prefix_caching:
            return
        for i in range(len(seq.block_hashes), num_computed_tokens // self.block_size):
            tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            h = chain_hash(tokens, seq.block_hashes[-1] if seq.block_hashes else None)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if h not in self.hash_to_block:   # an identical block computed alongside keeps the entry
                block.hash, block.token_ids = h, tokens
                self.hash_to_block[h] = block.block_id

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; unreferenced blocks become free but stay cached.

        Freed in reverse, so a sequence's tail is evicted before the prefix others may share."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table, seq.block_hashes, seq.num_cached_tokens, seq.num_computed_tokens = [], [], 0, 0

    def slot(self, seq: Sequence, position: int) -> int:
        """Where token `position` of the sequence lives in the flat pool: block * block_size + offset."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def stats(self) -> dict:
        return {"num_kv_blocks": self.num_blocks, "block_size": self.block_size, "free_kv_blocks": self.num_free_blocks,
                "prefix_caching": self.enable_prefix_caching}
