"""One cycle of the course: its engine (LLM) and SamplingParams. docs/CYCLE_GUIDE.md tells each cycle's lesson."""

from .llm import LLM
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
