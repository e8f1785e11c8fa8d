"""Our own paged attention kernels, in Triton: the online softmax over K/V read through the block table.

Two kernels, one per kind of step:

- `paged_decode_attention`: one new query token per sequence. One program per (sequence, KV head);
  the G query heads that share that KV head are the rows of one tile, so each K/V value is loaded
  once for all of them (grouped-query attention is a bandwidth saving only if the loads are shared).
- `paged_prefill_attention`: the flat batch of prompts (cu_seqlens_q), causal. One program per
  (tile of BLOCK_M queries, sequence, query head). A sequence with a cached prefix has fewer
  queries than keys: its first query sits at position context_len - query_len.

Both walk the keys in tiles of BLOCK_N and keep, per query row, the running max `m`, the running
sum `l` and the running output `acc` in registers (the online softmax of docs/CYCLE_GUIDE.md,
chapter 6). Neither writes a score matrix, gathers the blocks into a dense copy, or pads anything:
each key finds its block through the block table, `block_table[key // block_size]`, so a tile
may span several small blocks or lie inside one large block; any block_size works. Any head_dim up
to MAX_HEAD_DIM works too: tl.arange needs a power of two, so the tiles are HEAD_PAD wide (the next
power of two) and the columns past head_dim load zeros (which add nothing to q.k) and are not stored.

Launches depend only on tensor shapes and Python constants (no .item(), no host sync), so the
decode call can later be captured in a CUDA graph. On a CPU the kernels run only under Triton's
interpreter (TRITON_INTERPRET=1, set before this module is imported): slow, but the same code.
"""

import torch
import triton
import triton.language as tl

MIN_DOT = 16        # tl.dot on tensor cores needs every dimension >= 16: small tiles are padded to it
MAX_HEAD_DIM = 256  # the widest head whose tiles fit (registers, shared memory): tests/test_triton_compile.py


def head_dim_problem(head_dim: int) -> str | None:
    """Why these kernels cannot take this head size, or None."""
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        return f"head_dim {head_dim} is over the {MAX_HEAD_DIM} our triton kernels' tiles are sized for"
    return None


def head_pad(head_dim: int) -> int:
    """The tile width along head_dim: the next power of two (tl.arange's rule), at least MIN_DOT."""
    return max(MIN_DOT, triton.next_power_of_2(head_dim))


def tile_sizes(q: torch.Tensor) -> tuple[int, int, int]:
    """(BLOCK_M prefill queries, BLOCK_N keys, num_warps) per tile. A K and a V tile of BLOCK_N x
    HEAD_PAD sit in shared memory for each pipeline stage (3 by default), so 4-byte fp32 values
    and heads over 128 get narrower tiles, to fit any recent GPU (64 x 128 x 2 bytes x 2 x 3 = 96
    KiB). The prefill tile's running output (BLOCK_M x HEAD_PAD fp32) and its q tile fill the 255
    registers a thread may hold at 4 warps from head_dim 128 up (sm_80 then spills to local
    memory), and fp32's tl.dot runs on FMA units with every operand in registers: these spread
    over 8 warps. Measured by compiling for sm_80 and sm_90: docs/results/triton-compile-sm80-sm90.txt.
    The CPU interpreter has no such limits, and runs faster with fewer, larger tiles."""
    if q.device.type == "cpu":
        return 64, 64, 4
    width = head_pad(q.shape[-1])
    if q.element_size() > 2:
        return (16, 16, 8) if width > 128 else (32, 32, 8)
    return 64, 32 if width > 128 else 64, 8 if width >= 128 else 4


@triton.jit
def _load_kv_tile(k_cache_ptr, v_cache_ptr, table, start, context_len, kv_head, dims, dim_ok,
                  stride_k_block, stride_k_slot, stride_k_head, stride_v_block, stride_v_slot, stride_v_head,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """K and V [BLOCK_N, HEAD_PAD] of one sequence's keys start .. start + BLOCK_N - 1 and one KV
    head, read from the pool through the sequence's block table (`table`). Both kernels' tile."""
    keys = start + tl.arange(0, BLOCK_N)          # positions of this tile's keys
    key_ok = keys < context_len                   # the last tile is cut at the context length
    # Where each key lives: its block from the table, its slot inside the block. Block ids are
    # int32; widen before multiplying by the block stride, which can exceed 2^31 elements.
    block = tl.load(table + keys // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
    slot = keys % BLOCK_SIZE
    k_off = block * stride_k_block + slot * stride_k_slot + kv_head * stride_k_head
    v_off = block * stride_v_block + slot * stride_v_slot + kv_head * stride_v_head
    # Masked keys load 0, so a never-written slot of the pool (even NaN) cannot reach the sums;
    # so do the padding columns past head_dim.
    mask = key_ok[:, None] & dim_ok[None, :]
    k = tl.load(k_cache_ptr + k_off[:, None] + dims[None, :], mask=mask, other=0.0)
    v = tl.load(v_cache_ptr + v_off[:, None] + dims[None, :], mask=mask, other=0.0)
    return keys, key_ok, k, v


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, scale,
                   stride_q_tok, stride_q_head, stride_k_block, stride_k_slot, stride_k_head,
                   stride_v_block, stride_v_slot, stride_v_head, stride_table, stride_o_tok, stride_o_head,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    seq = tl.program_id(0)                 # which sequence (= which query token: decode has one each)
    kv_head = tl.program_id(1)             # which KV head; its GROUP query heads come along
    context_len = tl.load(context_lens_ptr + seq)     # keys to attend to, the new token's own included

    # The query tile: GROUP_PAD rows (query heads kv_head * GROUP ...), HEAD_PAD columns. Rows past
    # GROUP exist only to give tl.dot its minimum of 16, columns past HEAD_DIM to make a power of
    # two; they load zeros and are never stored.
    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_PAD)
    row_ok, dim_ok = rows < GROUP, dims < HEAD_DIM
    heads = kv_head * GROUP + rows
    q = tl.load(q_ptr + seq * stride_q_tok + heads[:, None] * stride_q_head + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    # The online softmax state, per query row, in fp32 whatever the model dtype.
    m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)    # running max of the scores
    l = tl.zeros([GROUP_PAD], dtype=tl.float32)                  # running sum of exp(score - m)
    acc = tl.zeros([GROUP_PAD, HEAD_PAD], dtype=tl.float32)      # running sum of exp(score - m) * v

    table = block_tables_ptr + seq * stride_table
    for start in range(0, context_len, BLOCK_N):
        keys, key_ok, k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, table, start, context_len, kv_head,
                                           dims, dim_ok, stride_k_block, stride_k_slot, stride_k_head, stride_v_block,
                                           stride_v_slot, stride_v_head, BLOCK_SIZE, BLOCK_N)

        # Scores of every query head of the group against the tile: [GROUP_PAD, BLOCK_N]. "ieee"
        # keeps fp32 inputs in fp32 (the default, tf32, would drop mantissa bits and break the
        # fp32 token-exact tests); for bf16/fp16 inputs the option does nothing.
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        s = tl.where(key_ok[None, :], s, float("-inf"))  # keys past the context get probability 0

        # The online softmax step. The first tile always holds key 0, so m is finite from then on.
        m_new = tl.maximum(m, tl.max(s, axis=1))
        correction = tl.exp(m - m_new)                # rescales what was summed under the old max
        p = tl.exp(s - m_new[:, None])
        l = l * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m = m_new

    out = acc / l[:, None]                            # = softmax(scale * q K^T) V
    tl.store(out_ptr + seq * stride_o_tok + heads[:, None] * stride_o_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale: float) -> torch.Tensor:
    """q: [B, H, D], one token per sequence; k/v_cache: [num_blocks, block_size, KVH, D];
    block_tables: int32 [B, max_blocks]; context_lens: int32 [B]. Returns [B, H, D]."""
    B, H, D = q.shape
    kv_heads = k_cache.shape[2]
    group = H // kv_heads
    q = q.contiguous()                                # the kernel assumes unit stride along D
    out = torch.empty_like(q)
    _, block_n, _ = tile_sizes(q)   # a decode tile has only GROUP_PAD rows: 4 warps hold it
    _decode_kernel[(B, kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(MIN_DOT, triton.next_power_of_2(group)), HEAD_DIM=D, HEAD_PAD=head_pad(D),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_N=block_n)
    return out


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_seqlens_q_ptr, context_lens_ptr,
                    out_ptr, scale,
                    stride_q_tok, stride_q_head, stride_k_block, stride_k_slot, stride_k_head,
                    stride_v_block, stride_v_slot, stride_v_head, stride_table, stride_o_tok, stride_o_head,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile = tl.program_id(0)                # which BLOCK_M queries of the sequence
    seq = tl.program_id(1)
    head = tl.program_id(2)                # query head; its KV head is head // GROUP
    kv_head = head // GROUP
    q_start = tl.load(cu_seqlens_q_ptr + seq)             # the sequence's first token in the flat batch
    query_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= query_len:        # the grid is sized for the longest sequence
        return
    context_len = tl.load(context_lens_ptr + seq)
    # Queries are the last query_len positions of the context: a cached prefix comes before them.
    first_position = context_len - query_len

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)         # query index within the sequence
    row_ok = rows < query_len
    positions = first_position + rows                     # each query's position in the sequence
    dims = tl.arange(0, HEAD_PAD)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_q_tok + head * stride_q_head + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)

    table = block_tables_ptr + seq * stride_table
    # Causal: no query of this tile looks past its last position, so the walk stops there.
    last_key = tl.minimum(context_len, first_position + (tile + 1) * BLOCK_M)
    for start in range(0, last_key, BLOCK_N):
        keys, key_ok, k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, table, start, context_len, kv_head,
                                           dims, dim_ok, stride_k_block, stride_k_slot, stride_k_head, stride_v_block,
                                           stride_v_slot, stride_v_head, BLOCK_SIZE, BLOCK_N)

        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale       # [BLOCK_M, BLOCK_N]
        visible = key_ok[None, :] & (keys[None, :] <= positions[:, None])  # the causal mask
        s = tl.where(visible, s, float("-inf"))

        # Key 0 is visible to every query, so every row has a finite max after the first tile.
        m_new = tl.maximum(m, tl.max(s, axis=1))
        correction = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m = m_new

    out = acc / l[:, None]
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_o_tok + head * stride_o_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                            max_seqlen_q: int, scale: float) -> torch.Tensor:
    """q: [N, H, D], the flat batch; cu_seqlens_q: int32 [B + 1]; context_lens: int32 [B] (cached
    prefix included); the K/V of every query token is already in the pool. Returns [N, H, D]."""
    N, H, D = q.shape
    B = block_tables.shape[0]
    q = q.contiguous()
    out = torch.empty_like(q)
    block_m, block_n, num_warps = tile_sizes(q)
    grid = (triton.cdiv(max_seqlen_q, block_m), B, H)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=H // k_cache.shape[2], HEAD_DIM=D, HEAD_PAD=head_pad(D), BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return out
