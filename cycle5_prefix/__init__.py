"""Cycle 5: prefix caching. Full KV blocks are found again by a chained hash of their tokens and reused."""

from .llm import LLM
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
