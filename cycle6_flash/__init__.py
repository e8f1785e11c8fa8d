"""Cycle 6: fused attention. One kernel per attention call (flash-attn on CUDA when installed, torch SDPA elsewhere)."""

from .llm import LLM
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
