"""Cycle 7: int8 AbsMax weight-only quantization: int8 weights, one scale per output channel."""

from .llm import LLM
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
