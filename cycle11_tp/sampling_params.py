"""How to pick each next token (the same fields as vLLM's SamplingParams).

The range of every field is in common/engine/sampling_limits.py, one table the server checks too:
a value outside it is a ValueError naming the field and its range, before any work starts.
"""

from dataclasses import dataclass

from common.engine.detokenizer import normalize_stop
from common.engine.sampling_limits import MAX_LOGPROBS, check_params  # noqa: F401  (MAX_LOGPROBS: re-exported)

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
        check_params(self)   # every field against its range (common/engine/sampling_limits.py)
        object.__setattr__(self, "stop", normalize_stop(self.stop))  # frozen: set once, normalized
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))  # frozen: set once

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        """True when the sampler must look at the tokens so far (penalties); checked once a batch."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)
