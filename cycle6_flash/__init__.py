"""Cycle 6: fused attention. One kernel per attention call (flash-attn when installed, our own Triton kernels on any CUDA GPU, torch SDPA on the CPU)."""

from .llm import LLM
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
