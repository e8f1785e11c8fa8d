"""Cycle 8 (bonus): decode as a CUDA graph replay over static buffers, with a lean host step."""

from .llm import LLM
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
