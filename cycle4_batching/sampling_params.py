"""How to pick each next token (the same fields as vLLM's SamplingParams)."""

import math
from dataclasses import dataclass

from common.engine.detokenizer import normalize_stop

MAX_LOGPROBS = 20    # the most top logprobs one position may ask for (vLLM's default max_logprobs)
GREEDY_BELOW = 1e-5  # a temperature under this is greedy: dividing by it would overflow (vLLM's rule)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0   # below GREEDY_BELOW (0 included) means greedy
    top_k: int = 0             # 0 or -1: no top-k
    top_p: float = 1.0         # keep the smallest set of tokens whose probability reaches top_p
    max_tokens: int = 64
    ignore_eos: bool = False
    seed: int | None = None    # per-request seed: the same seed gives the same tokens
    stop: tuple[str, ...] = () # stop strings: the text ends before the first one (finish_reason "stop")
    min_p: float = 0.0         # drop every token less likely than min_p times the most likely one
    presence_penalty: float = 0.0    # subtracted from every token the output holds already
    frequency_penalty: float = 0.0   # subtracted once per time the output holds the token
    repetition_penalty: float = 1.0  # tokens of the prompt or output: positive logits / r, others * r
    min_tokens: int = 0        # EOS and stop_token_ids cannot be sampled before this many tokens
    stop_token_ids: tuple[int, ...] = ()  # more tokens that end the request (kept in token_ids)
    include_stop_str_in_output: bool = False  # keep the stop string that ended the text
    skip_special_tokens: bool = True          # leave special tokens out of the text
    logprobs: int | None = None         # per generated token: its logprob and the top-k (0: its own only)
    prompt_logprobs: int | None = None  # the same for every prompt token but the first

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        _check_number("temperature", self.temperature, 0, math.inf)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (both: disabled) or a positive int, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        object.__setattr__(self, "stop", normalize_stop(self.stop))  # frozen: set once, normalized
        self._check_new_fields()

    def _check_new_fields(self) -> None:
        _check_number("min_p", self.min_p, 0, 1)
        _check_number("presence_penalty", self.presence_penalty, -2, 2)
        _check_number("frequency_penalty", self.frequency_penalty, -2, 2)
        _check_number("repetition_penalty", self.repetition_penalty, 0, math.inf)
        if self.repetition_penalty == 0:
            raise ValueError("repetition_penalty must be > 0 (1 means no penalty), got 0")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an int in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        ids = self.stop_token_ids
        if ids is None or isinstance(ids, int) or not all(_is_int(t) and t >= 0 for t in ids):
            raise ValueError(f"stop_token_ids must be a list of token ids (ints >= 0), got {ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        for name in ("include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not _is_int(k) or not 0 <= k <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an int in [0, {MAX_LOGPROBS}], got {k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        """True when the sampler must look at the tokens so far (penalties); checked once a batch."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_number(name: str, value, low: float, high: float) -> None:
    """A real number in [low, high]: not a bool, not NaN, not infinite."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low <= value <= high:
        raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {value!r}")
