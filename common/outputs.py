"""What generate() returns, the same in every cycle (modelled on vLLM's RequestOutput)."""

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
    finish_reason: str              # "stop" (EOS) or "length" (max_tokens)
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
