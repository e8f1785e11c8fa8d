"""Cycle 4: continuous batching. A scheduler re-forms the batch every step; preemption when blocks run out."""

from .llm import LLM
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
