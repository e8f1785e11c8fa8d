"""Cycle 2: a contiguous KV cache per sequence (prefill once, then one token per step), static batches."""

from .llm import LLM
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
