"""Attention backends: one fused kernel per call instead of QK^T, mask, softmax and V as four ops.

The explicit attention of cycles 1-5 materializes the score matrix [heads, queries, keys] in fp32,
writes it to memory, reads it back for the softmax, writes the probabilities, reads them again for
the product with V. A fused kernel walks the keys in tiles and keeps a running max and sum per
query (the online softmax), so the scores never leave the chip.

- `flash_attn` (CUDA with the flash-attn package): reads K/V straight from the paged cache through
  the block table; variable-length prefill with cu_seqlens, decode with cache_seqlens. Its paged
  path needs block_size to be a multiple of 256, hence that default for this backend.
- `sdpa` (everywhere else): torch's scaled_dot_product_attention, which picks a fused kernel for
  the device (flash / memory-efficient on CUDA, a flash-style kernel on CPU). It takes dense
  tensors, so each sequence's blocks are gathered first, up to the longest context in the batch.
"""

import importlib.util

import torch
import torch.nn.functional as F

BACKENDS = ("flash_attn", "sdpa")
DEFAULT_BLOCK_SIZE = {"flash_attn": 256, "sdpa": 16}


def select_backend(device: torch.device, requested: str | None) -> str:
    has_flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    if requested is None:
        return "flash_attn" if has_flash else "sdpa"
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}: choose one of {BACKENDS}")
    if requested == "flash_attn" and not has_flash:
        raise ValueError("attention_backend='flash_attn' needs a CUDA device and the flash-attn package "
                         "(pip install flash-attn)")
    return requested


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_size, KVH, D] indexed by [B, max_blocks] -> [B, KVH, max_blocks * block_size, D]."""
    B = block_tables.shape[0]
    blocks = cache[block_tables]                                   # [B, max_blocks, block_size, KVH, D]
    return blocks.view(B, -1, *cache.shape[2:]).transpose(1, 2)


def sdpa_attention(q, k_cache, v_cache, meta, scale: float) -> torch.Tensor:
    """q: [N, H, D] flat; returns [N, H, D].

    Grouped-query heads without copying K/V per head: the G query heads that share a KV head are
    laid out as G * Tq query rows of that KV head, so the kernel sees plain attention with KVH heads.
    """
    N, H, D = q.shape
    keys = gather_blocks(k_cache, meta.block_tables)               # [B, KVH, S, D]
    values = gather_blocks(v_cache, meta.block_tables)
    B, kv_heads, S, _ = keys.shape
    group, Tq = H // kv_heads, meta.query_index.shape[1]
    queries = q[meta.query_index]                                  # [B, Tq, H, D]
    queries = queries.view(B, Tq, kv_heads, group, D).permute(0, 2, 3, 1, 4).reshape(B, kv_heads, group * Tq, D)
    mask = meta.mask.unsqueeze(1).expand(B, group, Tq, S).reshape(B, 1, group * Tq, S)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
    out = out.view(B, kv_heads, group, Tq, D).permute(0, 3, 1, 2, 4).reshape(B * Tq, H, D)
    return out[meta.token_index]


def flash_attention(q, k_cache, v_cache, meta, scale: float) -> torch.Tensor:
    """flash-attn over the paged cache: no gather, no padding, no mask tensor."""
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    if meta.is_prefill:
        return flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q=meta.cu_seqlens_q,
                                      cu_seqlens_k=meta.cu_seqlens_k, max_seqlen_q=meta.max_seqlen_q,
                                      max_seqlen_k=meta.max_seqlen_k, softmax_scale=scale, causal=True,
                                      block_table=meta.block_tables)
    out = flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.context_lens,
                                  block_table=meta.block_tables, softmax_scale=scale, causal=True)
    return out.squeeze(1)


ATTENTION = {"flash_attn": flash_attention, "sdpa": sdpa_attention}
