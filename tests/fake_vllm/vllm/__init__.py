"""A stand-in for the `vllm` package, so tests cover compare.py's vLLM row without vLLM.

It has just the API common/benchmark/vllm_baseline.py calls: LLM(model, **engine_args) whose
llm_engine takes add_request(id, TokensPrompt, SamplingParams), step() and has_unfinished_requests(),
and returns RequestOutput-like objects with the step's new tokens (RequestOutputKind.DELTA).

Its tokens come from our own cycle 2 (greedy, on the same model directory and dtype), so they are
known: equal to cycle 1's in fp32. FAKE_VLLM_SHIFT=N adds N to every token id after the first,
which makes them differ from the second position on. Every LLM(...) call appends its arguments as
one JSON line to the file FAKE_VLLM_CALLS names, so a test can check what reached vLLM.
"""

import json
import os
from dataclasses import dataclass, field

from .sampling_params import RequestOutputKind, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutputKind"]


@dataclass
class CompletionOutput:
    token_ids: list[int]


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput]
    finished: bool


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    sent: int = 0


class _Engine:
    """Generates every waiting request at its first step (through cycle 2), then hands out one
    token per request per step, as a continuous-batching engine streams them."""

    def __init__(self, llm):
        self.llm, self.requests = llm, []

    def add_request(self, request_id: str, prompt: dict, params: SamplingParams) -> str:
        if params.output_kind is not RequestOutputKind.DELTA or params.temperature != 0.0:
            raise ValueError("the fake vllm serves greedy DELTA requests only")
        self.requests.append(_Request(request_id, list(prompt["prompt_token_ids"]), params))
        return request_id

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        new = [r for r in self.requests if not r.tokens]
        if new:
            self._generate(new)
        outputs = []
        for r in self.requests:
            r.sent += 1
            outputs.append(RequestOutput(r.request_id, [CompletionOutput(r.tokens[r.sent - 1:r.sent])],
                                         r.sent == len(r.tokens)))
        self.requests = [r for r in self.requests if r.sent < len(r.tokens)]
        return outputs

    def _generate(self, requests) -> None:
        import cycle2_kvcache as engine

        params = [engine.SamplingParams(temperature=0.0, max_tokens=r.params.max_tokens, ignore_eos=r.params.ignore_eos)
                  for r in requests]
        outs = self.llm.engine.generate([r.prompt_token_ids for r in requests], params)
        shift = int(os.environ.get("FAKE_VLLM_SHIFT", "0"))
        for r, out in zip(requests, outs):
            ids = list(out.token_ids)
            r.tokens = ids[:1] + [t + shift for t in ids[1:]]


class LLM:
    def __init__(self, model: str, **engine_args):
        import cycle2_kvcache

        calls = os.environ.get("FAKE_VLLM_CALLS")
        if calls:
            with open(calls, "a") as f:
                f.write(json.dumps({"model": model, **engine_args, "env": {
                    k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "HF_HUB_OFFLINE")}}) + "\n")
        self.engine = cycle2_kvcache.LLM(model, device="cpu", dtype=engine_args["dtype"], weights="real")
        self.llm_engine = _Engine(self)
