"""Every option of the engine in one place: `LLM(model, **options)` builds a Config from them.

__post_init__ resolves the device and the dtype, fills in the device's defaults and refuses an
impossible option (a ValueError naming it) before anything is loaded. It reads no file and
prints nothing.
"""

from dataclasses import dataclass, field

import torch

from common.engine.device import resolve_device, resolve_dtype

from .attention import DEFAULT_BLOCK_SIZE, check_block_size, select_backend
from .kv_cache import GPU_MEMORY_UTILIZATION
from .quantization import choose_matmul

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
    max_num_batched_tokens: int | None = None   # the token budget of every step (scheduler.py)
    enable_chunked_prefill: bool = True       # False: cycle 8's steps, whole prompts or decodes
    long_prefill_token_threshold: int = 0     # the most tokens one prompt's chunk may take; 0: the budget
    block_size: int | None = None             # None: the attention backend's default
    num_kv_blocks: int | None = None          # the KV pool's size: exactly this many blocks, or
    kv_cache_memory_bytes: int | None = None  # this many bytes, or (CUDA) this share of the GPU
    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION
    enable_prefix_caching: bool = True
    attention_backend: str | None = None      # None: the best this device runs, for the model (ModelRunner)
    quantization: str | None = "int8"         # None keeps the float checkpoint, to compare with
    int8_matmul: str | None = None            # None: the device's row of quantization.DEFAULT_MATMUL
    seed: int | None = None
    cpu_fast_paths: bool = True               # False: torch's plain linears, glibc's malloc (chapter 1)
    trace: bool = False                       # print one line per step
    enforce_eager: bool = False               # decode without CUDA graphs (cuda_graphs.py)
    compile: bool | None = None               # compiled small ops (compiled_ops.py); None: on CUDA only
    speculative_config: dict | None = None    # vLLM's: {"method": "ngram", "num_speculative_tokens": k, ...}; None: off
    tensor_parallel_size: int = 1             # ranks the model is split over (parallel_layers.py); 1: one process
    int8_matmul_note: str | None = field(default=None, init=False)

    def __post_init__(self):
        self.device = resolve_device(self.device)
        self.dtype = resolve_dtype(self.dtype, self.device)
        # A backend asked for must run here; the block size defaults to that of the backend this
        # device runs. The ModelRunner chooses again once the head size is known: a fallback then
        # keeps this block size (only flash_attn constrains it, and no fallback is flash_attn).
        backend, _ = select_backend(self.device, self.dtype, self.attention_backend)
        self.block_size = self.block_size or DEFAULT_BLOCK_SIZE[backend]
        check_block_size(backend, self.block_size)
        if self.quantization not in ("int8", None) or (self.quantization is None and self.int8_matmul is not None):
            raise ValueError(f"quantization={self.quantization!r}, int8_matmul={self.int8_matmul!r}: quantization "
                             "is 'int8' (default) or None, and int8_matmul applies to 'int8' only")
        if self.quantization:
            self.int8_matmul, self.int8_matmul_note = choose_matmul(self.device, self.dtype, self.int8_matmul)
        # Compiled small ops, a flag of their own (the graphs do not need them): on by default on
        # CUDA, where a decode step is a stream of tiny kernels; on a CPU only when asked.
        self.compile = self.device.type == "cuda" if self.compile is None else bool(self.compile)
        defaults = DEFAULTS["cuda" if self.device.type == "cuda" else "cpu"]
        self.max_num_seqs = self.max_num_seqs or defaults["max_num_seqs"]
        self.max_num_batched_tokens = self.max_num_batched_tokens or defaults["max_num_batched_tokens"]
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError(f"kv_cache_memory_bytes must be >= 1, got {self.kv_cache_memory_bytes}")
        self.speculative_config = check_speculative_config(self.speculative_config)
        if self.speculative_config and not self.enable_chunked_prefill:
            raise ValueError("speculative_config verifies drafts as rows of the mixed step: it needs "
                             "enable_chunked_prefill=True")
        if not isinstance(self.tensor_parallel_size, int) or isinstance(self.tensor_parallel_size, bool) \
                or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        if self.device.type == "cuda" and self.tensor_parallel_size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} needs as many GPUs on this machine; "
                             f"torch sees {torch.cuda.device_count()} (on many machines: torchrun, chapter 13)")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


SPECULATIVE_KEYS = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"}


def check_speculative_config(spec: dict | None) -> dict | None:
    """vLLM's speculative_config, n-gram only: the dict with every key filled in, or None (off).
    One lookup bound given: the other equals it; none: both 3."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ValueError(f"speculative_config must be a dict (JSON object), got {type(spec).__name__}")
    if spec.get("method") != "ngram":
        raise ValueError(f"speculative_config: method {spec.get('method')!r} is not supported; only 'ngram' is")
    unknown = set(spec) - SPECULATIVE_KEYS
    if unknown:
        raise ValueError(f"speculative_config: unknown keys {sorted(unknown)}; known: {sorted(SPECULATIVE_KEYS)}")
    k = spec.get("num_speculative_tokens")
    lo = spec.get("prompt_lookup_min", spec.get("prompt_lookup_max", 3))
    hi = spec.get("prompt_lookup_max", lo)
    for name, value in (("num_speculative_tokens", k), ("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"speculative_config: {name} must be an integer >= 1, got {value!r}")
    if lo > hi:
        raise ValueError(f"speculative_config: prompt_lookup_min ({lo}) > prompt_lookup_max ({hi})")
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": lo, "prompt_lookup_max": hi}
