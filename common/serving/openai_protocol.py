"""The requests of OpenAI's API as vLLM serves them, and which of their fields this server honours.

The rule: a field is honoured, or a value other than its default is refused with 400 naming the
field (`param`); it is never silently ignored. `null` always means "the default". A field no table
here knows (not OpenAI's, not vLLM's) is logged once per server and ignored, as vLLM does (the
record of names logged is bounded: server.MAX_UNKNOWN_RECORDED).

| field | endpoint | here | why |
|---|---|---|---|
| `model` | both | honoured | must be the served name; null: the served model |
| `prompt` | completions | honoured | a string, a list of strings, a list of token ids, or a list of those lists; one choice per prompt, `index` = prompt's position |
| `messages` | chat | honoured | content: a string, a list of `text` parts (joined by newlines), or null for an assistant turn |
| `max_tokens` | both | honoured | completions: default 16; chat: default what is left of the context; 0 only with `echo` |
| `max_completion_tokens` | chat | honoured | OpenAI's newer name for `max_tokens`; wins when both are set |
| `temperature`, `top_p`, `top_k` | both | honoured | default: the model's generation_config.json (`--generation-config vllm`: 1, 1, off); NaN/inf refused; temperature < 1e-5 is greedy |
| `seed`, `stop`, `ignore_eos` | both | honoured | the engine's SamplingParams has them |
| `stream`, `stream_options.include_usage` | both | honoured | `stream_options` without `stream` is refused, as vLLM does |
| `stream_options.continuous_usage_stats` | both | honoured | usage in every chunk |
| `n` | both | 1 only | several choices per prompt need the prompt's KV blocks shared: not built |
| `best_of` | completions | 1 only | the same |
| `echo` | completions | honoured | the prompt's text before the completion; `max_tokens: 0` returns the prompt alone, with its logprobs when `logprobs` is set (lm-eval's scoring form) |
| `echo` | chat | refused | vLLM's extension, not built |
| `add_special_tokens` | both | honoured | tokenization is the server's (default: true for completions, false for chat) |
| `add_generation_prompt`, `continue_final_message` | chat | honoured | passed to the chat template |
| `chat_template_kwargs` | chat | honoured | passed to the template, except the renderer's own arguments (`tokenize`, ...) |
| `chat_template` | chat | refused | a client's own template runs on the server: only with `--trust-request-chat-template` |
| `user`, `parallel_tool_calls` | both / chat | accepted | they change no output (and there are no tools) |
| `logprobs` | completions | honoured | the sampled tokens' logprobs and the top `logprobs`; with `echo`, the prompt's first (common/serving/logprobs.py) |
| `logprobs`, `top_logprobs` | chat | honoured | the chat form: each token's logprob, bytes and `top_logprobs` alternatives |
| `prompt_logprobs` | both | refused | vLLM's extension, not built (`echo` with `logprobs` gives the prompt's) |
| `presence_penalty`, `frequency_penalty`, `repetition_penalty`, `min_p`, `min_tokens`, `stop_token_ids`, `include_stop_str_in_output`, `skip_special_tokens`, `spaces_between_special_tokens` | both | engine | passed on when the cycle's SamplingParams has the field (every cycle has all but `spaces_between_special_tokens`); refused otherwise |
| `logit_bias`, `allowed_token_ids`, `bad_words`, `logprob_token_ids` | both | refused | the sampler has no logit processors |
| `response_format`, `structured_outputs`, `guided_*` | both | refused | no structured output (`response_format: {"type": "text"}` is the default, accepted) |
| `tools`, `tool_choice`, `functions`, `function_call` | chat | refused | no tool calling (`tool_choice` "none" or "auto" without tools is accepted) |
| `suffix` | completions | refused | no fill-in-the-middle |
| `use_beam_search`, `length_penalty` | both | refused | no beam search |
| `truncate_prompt_tokens`, `truncation_side` | both | refused | a prompt too long is an error, never cut |
| `reasoning_effort`, `thinking_token_budget`, `include_reasoning: false` | chat | refused | no reasoning parser |
| `documents`, `media_io_kwargs`, `mm_processor_kwargs`, `modalities`, `audio` | chat | refused | text only |
| `priority`, `request_id`, `cache_salt`, `kv_transfer_params`, `vllm_xargs`, `return_tokens_as_token_ids`, `return_token_ids`, `prompt_embeds`, `repetition_detection`, `stream_interval`, `watermarking` | both | refused | vLLM engine features this engine does not have |
"""

import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict


MAX_PROMPTS = 2048            # prompts in one completions request (OpenAI's limit)


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


# --- what is honoured: declared with types (pydantic checks them); null is the default ---------

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")   # refused and unknown fields are judged by check_fields
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = False
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(_Common):
    prompt: Any = None             # str, list[str], list[int], list[list[int]]: normalize_prompts()
    echo: bool | None = False
    logprobs: int | None = None    # the top-k alternatives per position (common/serving/logprobs.py)
    best_of: int | None = None
    add_special_tokens: bool | None = True


class ChatRequest(_Common):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_special_tokens: bool | None = False
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a `prompt`, or chat `messages` rendered by the template first."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool | None = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


# --- what is refused: a value other than the default gets 400 naming the field ----------------

@dataclass(frozen=True)
class Refused:
    defaults: tuple          # the values that ask for nothing (null is always one)
    reason: str


_NO_LOGPROBS = "not built: logprobs come in OpenAI's forms only (`logprobs`, `echo`)"
_NO_PROCESSORS = "the sampler has no logit processors"
_NO_STRUCTURED = "no structured output"
_NO_TOOLS = "no tool calling"
_NOT_HERE = "a vLLM engine feature this engine does not have"

# Sampler fields the engine may have: passed on when the cycle's SamplingParams declares the field,
# refused (when not at its default) while it does not. Name -> the default.
ENGINE_FIELDS = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "min_p": 0.0,
                 "min_tokens": 0, "stop_token_ids": [], "include_stop_str_in_output": False,
                 "skip_special_tokens": True, "spaces_between_special_tokens": True}

REFUSED_BOTH = {
    "prompt_logprobs": Refused((), _NO_LOGPROBS),
    "logit_bias": Refused(({},), _NO_PROCESSORS), "allowed_token_ids": Refused((), _NO_PROCESSORS),
    "bad_words": Refused(([],), _NO_PROCESSORS), "logprob_token_ids": Refused((), _NO_LOGPROBS),
    "response_format": Refused(({"type": "text"},), _NO_STRUCTURED),
    "structured_outputs": Refused((), _NO_STRUCTURED),
    **{f"guided_{k}": Refused((), _NO_STRUCTURED)
       for k in ("json", "regex", "choice", "grammar", "decoding_backend", "whitespace_pattern")},
    "use_beam_search": Refused((False,), "no beam search"), "length_penalty": Refused((1.0,), "no beam search"),
    "truncate_prompt_tokens": Refused((), "a prompt too long is an error, never cut"),
    "truncation_side": Refused((), "a prompt too long is an error, never cut"),
    **{k: Refused((), _NOT_HERE) for k in ("request_id", "cache_salt", "kv_transfer_params", "vllm_xargs",
                                           "prompt_embeds", "repetition_detection", "stream_interval",
                                           "watermarking")},
    "priority": Refused((0,), _NOT_HERE),
    "return_tokens_as_token_ids": Refused((False,), _NO_LOGPROBS),
    "return_token_ids": Refused((False,), _NOT_HERE),
}
REFUSED_COMPLETIONS = {
    **REFUSED_BOTH,
    "suffix": Refused(("",), "no fill-in-the-middle"),
}
REFUSED_CHAT = {
    **REFUSED_BOTH,
    "echo": Refused((False,), "vLLM's chat echo is not built"),
    "tools": Refused(([],), _NO_TOOLS), "tool_choice": Refused(("none", "auto"), _NO_TOOLS),
    "functions": Refused(([],), _NO_TOOLS), "function_call": Refused(("none", "auto"), _NO_TOOLS),
    "reasoning_effort": Refused((), "no reasoning parser"), "thinking_token_budget": Refused((), "no reasoning parser"),
    "include_reasoning": Refused((True,), "no reasoning parser"),
    **{k: Refused((), "text only") for k in ("documents", "media_io_kwargs", "mm_processor_kwargs", "audio")},
    "modalities": Refused((["text"],), "text only"),
}


def refusal(name: str, value, table: dict, params_cls) -> APIError | None:
    """The 400 for field `name` set to `value`, or None when it is honoured, default, or unknown."""
    if value is None:
        return None
    if name in ENGINE_FIELDS:
        if value == ENGINE_FIELDS[name] or name in getattr(params_cls, "__dataclass_fields__", {}):
            return None
        return APIError(400, f"{name}={value!r} is not supported: this engine's SamplingParams has no {name}",
                        param=name)
    rule = table.get(name)
    if rule is None or value in rule.defaults:
        return None
    return APIError(400, f"{name}={value!r} is not supported: {rule.reason}", param=name)


def unknown_fields(body: BaseModel, table: dict) -> list[str]:
    """The extra fields of a request that no table knows: logged once, ignored."""
    return [k for k in (body.model_extra or {}) if k not in table and k not in ENGINE_FIELDS]


def check_fields(body: BaseModel, table: dict, params_cls) -> None:
    """Refuse every field set to a value this server does not honour (the first one found)."""
    for name, value in (body.model_extra or {}).items():
        if (error := refusal(name, value, table, params_cls)) is not None:
            raise error
    if body.n not in (None, 1):
        raise APIError(400, f"n={body.n}: one choice per prompt only (n > 1 is not built)", param="n")
    if getattr(body, "best_of", None) not in (None, 1):
        raise APIError(400, f"best_of={body.best_of}: one choice per prompt only", param="best_of")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options can only be set when stream is true", param="stream_options")
    for name in ("temperature", "top_p"):
        value = getattr(body, name)
        if value is not None and not math.isfinite(value):
            raise APIError(400, f"{name} must be a finite number, got {value}", param=name)


def normalize_prompts(prompt) -> list[str | list[int]]:
    """A completions `prompt` -> a list of prompts, each a string or a list of token ids."""
    def is_ids(p):
        return isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)

    if isinstance(prompt, str) or is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise APIError(400, "prompt must be a string, a list of strings, a non-empty list of token ids, "
                       "or a list of such lists", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"prompt holds {len(prompts)} prompts; at most {MAX_PROMPTS} per request (OpenAI's cap)",
                       param="prompt")
    for i, p in enumerate(prompts):
        if p == "":
            raise APIError(400, f"prompt {i} is an empty string", param="prompt")
    return prompts
