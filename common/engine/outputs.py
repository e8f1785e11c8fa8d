"""What generate() and step() return, the same in every cycle (modelled on vLLM's RequestOutput)."""

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    ttft_s: float | None = None     # seconds from the start of generate() to this request's first token
    latency_s: float | None = None  # seconds from the start of generate() to its last token


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]            # generated tokens, including a final EOS if one was produced
    text: str
    finish_reason: str | None       # "stop" (EOS or a stop string), "length" (max_tokens), "abort"; None while running
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    # Streaming (step(), cycle 4 on): what this step added. An output of a request still running
    # carries only these (vLLM's DELTA kind: prompt_token_ids, token_ids and text stay empty); the
    # finished one also carries the whole generation, as generate() returns it.
    finished: bool = True
    new_token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    # Logprobs (SamplingParams.logprobs / prompt_logprobs; None when not asked), vLLM's shape made
    # plain: one dict {token_id: logprob} per position, the top-k most likely first, then the
    # chosen token if it is not among them. They are the model's own log_softmax, before any
    # penalty or temperature (vLLM's default). `logprobs` has one dict per token of token_ids (in a
    # delta output: per token of new_token_ids); `prompt_logprobs` one per prompt token, the first
    # None (nothing predicts it); it comes with the first output of the request.
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
