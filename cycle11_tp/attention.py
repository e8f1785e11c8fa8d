"""Attention backends: one fused kernel per call instead of QK^T, mask, softmax and V as four ops.

The explicit attention of cycles 1-5 materializes the score matrix [heads, queries, keys] in fp32,
writes it to memory, reads it back for the softmax, writes the probabilities, reads them again for
the product with V. A fused kernel walks the keys in tiles and keeps a running max and sum per
query (the online softmax), so the scores never leave the chip.

- `flash_attn` (CUDA, fp16/bf16, with the flash-attn package): reads K/V straight from the paged
  cache through the block table; variable-length prefill with cu_seqlens, decode with
  cache_seqlens. Its paged path needs block_size to be a multiple of 256, hence that default.
  A mixed step (cycle 9) is one varlen call: its causal mask is aligned to the end of each
  sequence's keys, so a decode row and a chunk after a computed prefix need nothing more.
- `triton` (any CUDA GPU; on a CPU only under Triton's interpreter): our own kernels
  (triton_attention.py), which read K/V through the block table the same way.
- `sdpa` (the CPU): torch's scaled_dot_product_attention, which picks a fused kernel for the
  device. It takes dense tensors, so each sequence's blocks are gathered first, up to the longest
  context in the batch.

On CUDA the order is flash_attn, then triton; a step down that was not asked for is reported
(`select_backend` returns a note, which the engine prints and puts in its stats). The model's
head_dim is checked with the rest, before any weight is loaded: our triton kernels pad any head
size up to triton_attention.MAX_HEAD_DIM to a power of two, and refuse a wider one.
"""

import importlib

import torch
import torch.nn.functional as F

BACKENDS = ("flash_attn", "triton", "sdpa")
DEFAULT_BLOCK_SIZE = {"flash_attn": 256, "triton": 16, "sdpa": 16}
DENSE_LAYOUT = ("sdpa",)   # the backends that need AttentionMetadata's query_index / token_index / mask
HALF_DTYPES = (torch.float16, torch.bfloat16)


def select_backend(device: torch.device, dtype: torch.dtype, requested: str | None,
                   head_dim: int | None = None) -> tuple[str, str | None]:
    """The backend to run, and a note when it is a fallback nobody asked for (else None). head_dim
    (the model config's) is checked when given."""
    if requested is not None and requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}: choose one of {BACKENDS}")
    if requested is not None:
        problem = PROBLEMS[requested](device, dtype, head_dim=head_dim)
        if problem:
            raise ValueError(f"attention_backend={requested!r} cannot run here: {problem}")
        return requested, None
    if device.type != "cuda":
        return "sdpa", None
    flash = flash_attn_problem(device, dtype, head_dim)
    if flash is None:
        return "flash_attn", None
    triton = triton_problem(device, dtype, head_dim=head_dim)
    if triton is None:
        return "triton", f"flash_attn not used ({flash}); attention runs on our triton kernels"
    return "sdpa", f"flash_attn not used ({flash}) nor triton ({triton}); attention runs on torch sdpa"


def flash_attn_problem(device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> str | None:
    """Why flash_attn cannot run here, or None. Tried at start-up: a wheel built for another torch or
    CUDA fails to import with OSError or RuntimeError, not only ImportError."""
    if device.type != "cuda":
        return f"flash-attn runs on CUDA only, the engine runs on {device.type}"
    if dtype not in HALF_DTYPES:
        return f"flash-attn takes fp16/bf16 only, the model runs in {dtype}"
    if head_dim is not None and head_dim > 256:
        return f"flash-attn takes head_dim up to 256, the model has {head_dim}"
    try:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache  # noqa: F401
    except Exception as error:   # noqa: BLE001 (any failure to load means: not usable)
        return f"flash-attn does not import: {type(error).__name__}: {error} (pip install 'vllm-learn[cuda]')"
    return None


def triton_problem(device: torch.device, dtype: torch.dtype, kernels: str = "triton_attention",
                   head_dim: int | None = None) -> str | None:
    """Why our triton kernels (the module `kernels` of this package) cannot run here, or None. On a
    CPU they run only in Triton's interpreter, which reads TRITON_INTERPRET when a kernel is
    defined (when its module is first imported). head_dim, when given, must fit the attention tiles."""
    if device.type not in ("cuda", "cpu"):
        return f"triton runs on CUDA (or the CPU, interpreted), the engine runs on {device.type}"
    try:
        import triton
    except Exception as error:   # noqa: BLE001 (any failure to load means: not usable)
        return f"triton does not import: {type(error).__name__}: {error}"
    if device.type == "cpu" and not triton.knobs.runtime.interpret:   # checked before the kernels are defined
        return ("on a CPU triton kernels run only in Triton's interpreter: set TRITON_INTERPRET=1 in the "
                "environment before starting Python (slow; meant for tests)")
    if device.type == "cpu" and dtype == torch.bfloat16:   # numpy has no bf16: the interpreter keeps raw bits
        return "Triton's interpreter computes bf16 wrongly (triton-lang/triton#11584): use float32 on the CPU"
    try:
        module = importlib.import_module(f".{kernels}", __package__)   # defines the kernels: fails now, not mid-step
    except Exception as error:   # noqa: BLE001
        return f"the triton kernels do not compile: {type(error).__name__}: {error}"
    if head_dim is not None and kernels == "triton_attention":
        return module.head_dim_problem(head_dim)
    return None


PROBLEMS = {"flash_attn": flash_attn_problem, "triton": triton_problem,
            "sdpa": lambda device, dtype, head_dim=None: None}


def check_block_size(backend: str, block_size: int) -> None:
    """flash-attn's paged kernels read whole 256-token pages; checked before any memory is allocated."""
    if backend == "flash_attn" and block_size % 256 != 0:
        raise ValueError(f"attention_backend='flash_attn' needs block_size to be a multiple of 256, got {block_size}")


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_size, KVH, D] indexed by [B, max_blocks] -> [B, KVH, max_blocks * block_size, D]."""
    B = block_tables.shape[0]
    # index_select copies whole blocks (block_size * KVH * D values in a row); indexing with a
    # tensor computes an offset per element and ran 3.6-5x slower on a CPU (chapter 8).
    blocks = cache.index_select(0, block_tables.flatten())        # [B * max_blocks, block_size, KVH, D]
    return blocks.view(B, -1, *cache.shape[2:]).transpose(1, 2)


def sdpa_attention(q, k_cache, v_cache, meta, scale: float) -> torch.Tensor:
    """q: [N, H, D] flat; returns [N, H, D]. A mixed step runs its first num_decodes rows (one query
    each) apart: in the dense layout [B, Tq] each would be padded to the longest chunk's queries."""
    d = meta.num_decodes if meta.is_prefill else 0
    if d == 0:
        return dense_attention(q, k_cache, v_cache, meta.block_tables, meta.query_index, meta.token_index,
                               meta.mask, scale)
    Tq = meta.query_index.shape[1]
    decodes = dense_attention(q[:d], k_cache, v_cache, meta.block_tables[:d], meta.query_index[:d, :1],
                              meta.token_index[:d], meta.mask[:d, :1], scale)
    chunks = dense_attention(q, k_cache, v_cache, meta.block_tables[d:], meta.query_index[d:],
                             meta.token_index[d:] - d * Tq, meta.mask[d:], scale)   # indices within the chunks' [B - d, Tq]
    return torch.cat([decodes, chunks])


def dense_attention(q, k_cache, v_cache, block_tables, query_index, token_index, mask, scale: float) -> torch.Tensor:
    """Rows laid out as [B, Tq] (AttentionMetadata's dense layout); returns [N, H, D].

    Grouped-query heads without copying K/V per head: the G query heads that share a KV head are
    laid out as G * Tq query rows of that KV head, so the kernel sees plain attention with KVH heads.
    """
    N, H, D = q.shape
    keys = gather_blocks(k_cache, block_tables)                    # [B, KVH, S, D]
    values = gather_blocks(v_cache, block_tables)
    B, kv_heads, S, _ = keys.shape
    group, Tq = H // kv_heads, query_index.shape[1]
    if Tq == 1:   # decode: one query per sequence, already in order; no copy of q, mask or output
        queries, mask = q.view(B, kv_heads, group, D), mask.unsqueeze(1)     # mask [B, 1, 1, S]
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale).view(N, H, D)
    queries = q[query_index]                                       # [B, Tq, H, D]
    queries = queries.view(B, Tq, kv_heads, group, D).permute(0, 2, 3, 1, 4).reshape(B, kv_heads, group * Tq, D)
    mask = mask.unsqueeze(1).expand(B, group, Tq, S).reshape(B, 1, group * Tq, S)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
    out = out.view(B, kv_heads, group, Tq, D).permute(0, 3, 1, 2, 4).reshape(B * Tq, H, D)
    return out[token_index]


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


def triton_paged_attention(q, k_cache, v_cache, meta, scale: float) -> torch.Tensor:
    """Our own kernels over the paged cache (triton_attention.py): no gather, no padding, no mask tensor.
    A mixed step runs its first num_decodes rows (one query each) in the decode kernel, whose tile
    shares each K/V load among a group's query heads, and its prompt chunks in the prefill kernel,
    whose tiles of BLOCK_M queries would be almost all padding for a one-query row."""
    from .triton_attention import paged_decode_attention, paged_prefill_attention

    if not meta.is_prefill:
        return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)
    d = meta.num_decodes               # rows 0..d-1 are tokens 0..d-1 of the flat batch
    chunks = paged_prefill_attention(q[d:], k_cache, v_cache, meta.block_tables[d:], meta.cu_seqlens_q[d:] - d,
                                     meta.context_lens[d:], meta.max_seqlen_q, scale)
    if d == 0:
        return chunks
    decodes = paged_decode_attention(q[:d], k_cache, v_cache, meta.block_tables[:d], meta.context_lens[:d], scale)
    return torch.cat([decodes, chunks])


ATTENTION = {"flash_attn": flash_attention, "triton": triton_paged_attention, "sdpa": sdpa_attention}
