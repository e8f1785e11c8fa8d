"""Every option of the engine in one place: `LLM(model, **options)` builds a Config from them.

__post_init__ resolves the device and the dtype, fills in the device's defaults and refuses an
impossible option (a ValueError naming it) before anything is loaded. It reads no file and
prints nothing.
"""

from dataclasses import dataclass

import torch

from common.engine.device import resolve_device, resolve_dtype

# The same batch limits as the continuous-batching cycles, so every cycle is measured alike.
DEFAULTS = {"cuda": dict(max_num_seqs=256), "cpu": dict(max_num_seqs=64)}


@dataclass
class Config:
    model: str
    device: torch.device | str | None = None
    dtype: torch.dtype | str | None = None
    weights: str = "auto"
    max_num_seqs: int | None = None           # None: the device's default (DEFAULTS)
    seed: int | None = None
    cpu_fast_paths: bool = True               # False: torch's plain linears, glibc's malloc (chapter 1)

    def __post_init__(self):
        self.device = resolve_device(self.device)
        self.dtype = resolve_dtype(self.dtype, self.device)
        defaults = DEFAULTS["cuda" if self.device.type == "cuda" else "cpu"]
        self.max_num_seqs = self.max_num_seqs or defaults["max_num_seqs"]
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
