"""Cycle 1: the naive engine. No KV cache (every step reruns the whole sequence), static batches."""

from .llm import LLM
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
