"""The range of every sampling field, in one table that the engine and the server both check.

Each cycle's SamplingParams validates itself through `check_params` (so offline generate() refuses
what the server refuses), and the server's 400 carries the same message, which names the field
and its range. Ranges are vLLM's where vLLM has one; where vLLM has none (the number and length of
stop strings, the int range of seeds and token ids), the bound is ours, chosen so that no value
can crash a tensor conversion or make per-token work grow without limit:

- an int that does not fit int64 would raise OverflowError in `torch.tensor` (`top_k=2**63` once
  killed the engine mid-step); an int too large for a float (`10**400`) does the same in `float()`;
- every stop string is searched after every token, and the longest one sets how much text a stream
  holds back, so their count and length are capped.

Values a request may only have relative to something this table cannot see (top_k up to the
vocabulary size, stop_token_ids inside the vocabulary, min_tokens up to max_tokens) are checked
where that is known: `common/engine/inputs.py` and `__post_init__`.
"""

import math
from dataclasses import dataclass

INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
INT32_MAX = 2**31 - 1
MAX_LOGPROBS = 20          # vLLM's default max_logprobs
MAX_STOP_STRINGS = 32      # ours: vLLM has no cap (OpenAI allows 4)
MAX_STOP_CHARS = 512       # ours: the longest stop string; a stream holds back up to this many - 1
MAX_STOP_TOKEN_IDS = 256   # ours


@dataclass(frozen=True)
class Limit:
    kind: str                  # "float", "int", "bool", "ints" (a list of ints)
    low: float | None = None
    high: float | None = None
    open_low: bool = False     # low itself is refused
    extra: tuple = ()          # values allowed outside [low, high] (top_k's -1)
    nullable: bool = False
    max_items: int | None = None

    def describe(self) -> str:
        if self.kind == "bool":
            return "true or false"
        close = ")" if self.high == math.inf else "]"
        interval = f"{'(' if self.open_low else '['}{_num(self.low)}, {_num(self.high)}{close}"
        what = {"float": "a finite number", "int": "an int", "ints": "a list of ints"}[self.kind]
        if self.kind == "ints":
            text = f"a list of at most {self.max_items} ints, each in {interval}"
        else:
            text = f"{what} in {interval}" + "".join(f" or {e}" for e in self.extra)
        return text + (" or null" if self.nullable else "")


def _num(x) -> str:
    if x == math.inf:
        return "inf"
    if x == INT64_MIN:
        return "-2**63"
    return f"2**{x.bit_length()}-1" if isinstance(x, int) and x > 2**20 and (x + 1) & x == 0 else str(x)


LIMITS: dict[str, Limit] = {
    "temperature": Limit("float", 0, math.inf),
    "top_p": Limit("float", 0, 1, open_low=True),
    "top_k": Limit("int", 1, INT32_MAX, extra=(0, -1)),   # 0, -1: off; up to the vocabulary (inputs.py)
    "min_p": Limit("float", 0, 1),
    "presence_penalty": Limit("float", -2, 2),
    "frequency_penalty": Limit("float", -2, 2),
    "repetition_penalty": Limit("float", 0, math.inf, open_low=True),
    "max_tokens": Limit("int", 1, INT32_MAX),
    "min_tokens": Limit("int", 0, INT32_MAX),            # and <= max_tokens (__post_init__)
    "seed": Limit("int", INT64_MIN, INT64_MAX, nullable=True),
    "ignore_eos": Limit("bool"),
    "include_stop_str_in_output": Limit("bool"),
    "skip_special_tokens": Limit("bool"),
    "logprobs": Limit("int", 0, MAX_LOGPROBS, nullable=True),
    "prompt_logprobs": Limit("int", 0, MAX_LOGPROBS, nullable=True),
    "stop_token_ids": Limit("ints", 0, INT32_MAX, max_items=MAX_STOP_TOKEN_IDS),
}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _in_range(value, limit: Limit) -> bool:
    if limit.open_low:
        return limit.low < value <= limit.high
    return limit.low <= value <= limit.high


def _valid(value, limit: Limit) -> bool:
    if value is None:
        return limit.nullable
    if limit.kind == "bool":
        return isinstance(value, bool)
    if limit.kind == "ints":
        return (isinstance(value, (list, tuple)) and len(value) <= limit.max_items
                and all(_is_int(t) and _in_range(t, limit) for t in value))
    if limit.kind == "int":
        return _is_int(value) and (value in limit.extra or _in_range(value, limit))
    # A float field: ints are compared as they are (10**400 cannot become a float: OverflowError).
    if _is_int(value):
        return abs(value) <= 2**1023 and _in_range(value, limit)
    return isinstance(value, float) and math.isfinite(value) and _in_range(value, limit)


def check(name: str, value) -> None:
    """ValueError naming the field, its range and the value (shortened) unless `value` is allowed."""
    limit = LIMITS[name]
    if not _valid(value, limit):
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise ValueError(f"{name} must be {limit.describe()}, got {shown}")


def check_stop(stop) -> tuple[str, ...]:
    """None, one string, or a list of strings -> a tuple of non-empty strings, capped in number
    and length (ValueError naming `stop` otherwise)."""
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, (list, tuple)) else None
    if stops is None or not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {type(stop).__name__}")
    if len(stops) > MAX_STOP_STRINGS or max(map(len, stops), default=0) > MAX_STOP_CHARS:
        raise ValueError(f"stop must be at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} "
                         f"characters each, got {len(stops)} (longest {max(map(len, stops))})")
    return stops


def check_params(params) -> None:
    """Every field of a SamplingParams that the table knows, plus min_tokens <= max_tokens."""
    for name in LIMITS:
        if hasattr(params, name):
            check(name, getattr(params, name))
    if getattr(params, "min_tokens", 0) > params.max_tokens:
        raise ValueError(f"min_tokens must be an int in [0, max_tokens={params.max_tokens}], "
                         f"got {params.min_tokens}")
