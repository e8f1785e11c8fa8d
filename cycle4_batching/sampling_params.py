"""How to pick each next token (the same fields as vLLM's SamplingParams)."""

from dataclasses import dataclass

from common.engine.detokenizer import normalize_stop


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0   # 0 means greedy
    top_k: int = 0             # 0 or -1: no top-k
    top_p: float = 1.0         # keep the smallest set of tokens whose probability reaches top_p
    max_tokens: int = 64
    ignore_eos: bool = False
    seed: int | None = None    # per-request seed: the same seed gives the same tokens
    stop: tuple[str, ...] = () # stop strings: the text ends before the first one (finish_reason "stop")

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (both: disabled) or a positive int, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        object.__setattr__(self, "stop", normalize_stop(self.stop))  # frozen: set once, normalized

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
