"""Every option of the engine in one place: `LLM(model, **options)` builds a Config from them.

__post_init__ resolves the device and the dtype, fills in the device's defaults and refuses an
impossible option (a ValueError naming it) before anything is loaded. It reads no file and
prints nothing.
"""

from dataclasses import dataclass

import torch

from common.engine.device import resolve_device, resolve_dtype

from .attention import DEFAULT_BLOCK_SIZE, check_block_size, select_backend
from .kv_cache import GPU_MEMORY_UTILIZATION

# Measured defaults (docs/CYCLE_GUIDE.md, chapter 4): on a GPU a bigger batch is nearly free; on a
# CPU a decode step is bound by reading the weights, so more sequences per step help up to ~64.
DEFAULTS = {"cuda": dict(max_num_seqs=256, max_num_batched_tokens=16384),
            "cpu": dict(max_num_seqs=64, max_num_batched_tokens=4096)}


@dataclass
class Config:
    model: str
    device: torch.device | str | None = None
    dtype: torch.dtype | str | None = None
    weights: str = "auto"
    max_num_seqs: int | None = None           # None: the device's default (DEFAULTS)
    max_num_batched_tokens: int | None = None
    block_size: int | None = None             # None: the attention backend's default
    num_kv_blocks: int | None = None          # the KV pool's size: exactly this many blocks, or
    kv_cache_memory_bytes: int | None = None  # this many bytes, or (CUDA) this share of the GPU
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION
    enable_prefix_caching: bool = True
    attention_backend: str | None = None      # None: the best this device runs, for the model (ModelRunner)
    seed: int | None = None
    cpu_fast_paths: bool = True               # False: torch's plain linears, glibc's malloc (chapter 1)
    trace: bool = False                       # print one line per step

    def __post_init__(self):
        self.device = resolve_device(self.device)
        self.dtype = resolve_dtype(self.dtype, self.device)
        # A backend asked for must run here; the block size defaults to that of the backend this
        # device runs. The ModelRunner chooses again once the head size is known: a fallback then
        # keeps this block size (only flash_attn constrains it, and no fallback is flash_attn).
        backend, _ = select_backend(self.device, self.dtype, self.attention_backend)
        self.block_size = self.block_size or DEFAULT_BLOCK_SIZE[backend]
        check_block_size(backend, self.block_size)
        defaults = DEFAULTS["cuda" if self.device.type == "cuda" else "cpu"]
        self.max_num_seqs = self.max_num_seqs or defaults["max_num_seqs"]
        self.max_num_batched_tokens = self.max_num_batched_tokens or defaults["max_num_batched_tokens"]
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError(f"kv_cache_memory_bytes must be >= 1, got {self.kv_cache_memory_bytes}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
