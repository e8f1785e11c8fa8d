"""Cycle 3: PagedAttention. The KV cache is a pool of fixed-size blocks, given out on demand; static batches."""

from .llm import LLM
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
