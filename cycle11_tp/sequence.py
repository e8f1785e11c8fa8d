"""A Sequence: one request as the engine tracks it, from its prompt to its last token."""

from enum import Enum, auto

import torch


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(self, seq_id: int, prompt: str | None, prompt_token_ids: list[int], sampling_params,
                 generator: torch.Generator | None, arrival_time: float = 0.0):
        self.seq_id = seq_id
        self.prompt = prompt
        self.token_ids = list(prompt_token_ids)     # prompt, then every generated token
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling_params = sampling_params
        self.generator = generator                  # the request's own RNG when it has a seed
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []            # logical block i of this sequence -> physical block id
        self.block_hashes: list[int] = []           # chained hash of each full, computed block
        self.num_cached_tokens = 0                  # prompt tokens whose K/V came from the prefix cache
        # Tokens whose K/V is in the cache (the cached prefix, then every chunk computed): the next
        # step computes from here. A sequence samples only when this reaches len(token_ids).
        self.num_computed_tokens = 0
        # Speculative decoding: this step's draft tokens (proposer.py), verified after the last
        # token; the next draft's length, and decode steps left without proposals (adaptive).
        self.spec_token_ids: list[int] = []
        self.spec_draft_len: int | None = None     # None: num_speculative_tokens
        self.spec_skip = 0
        self.arrival_time = arrival_time            # perf_counter() when the request came in
        self.first_token_time: float | None = None  # seconds after arrival
        self.finish_time: float | None = None
        self.finish_reason: str | None = None
        self.logprobs: list | None = [] if sampling_params.logprobs is not None else None  # per output token
        self.prompt_logprobs: list | None = None    # set by the prefill, when asked
        self.detokenizer = None                     # an IncrementalDetokenizer when streamed or with stop strings
        self.detokenize = True                      # False: outputs carry token ids only, the caller decodes

    def record_logprobs(self, out, i: int) -> None:
        """Keep what the sampler computed for this sequence (row i of its SamplerOutput), if asked."""
        if self.logprobs is not None:
            self.logprobs.append(out.logprobs[i])
        if out.prompt_logprobs is not None and out.prompt_logprobs[i] is not None:
            self.prompt_logprobs = out.prompt_logprobs[i]

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def max_len(self) -> int:
        """The most tokens whose K/V this sequence can ever store: the last sampled token is never fed back."""
        return self.num_prompt_tokens + self.sampling_params.max_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED


def request_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A request with a seed draws from its own RNG, so its tokens do not depend on its batch."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)
