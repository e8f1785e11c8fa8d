"""Turn the user's prompts and sampling params into validated requests, before any work starts.

Every cycle calls `prepare_requests` first thing in generate(): bad input raises a ValueError or
TypeError that names the problem, and since nothing has been scheduled yet the engine stays usable.
"""

from dataclasses import dataclass
from typing import Any


@dataclass
class PreparedRequest:
    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: Any


def _is_token_list(obj) -> bool:
    return isinstance(obj, (list, tuple)) and len(obj) > 0 and all(isinstance(t, int) for t in obj)


def _as_prompt_list(prompts) -> list:
    """A single prompt (a string or one token-id list) is accepted as a batch of one."""
    if isinstance(prompts, str) or _is_token_list(prompts):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a string, a list of token ids, or a list of those; got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one prompt")
    return list(prompts)


def _token_ids(i: int, prompt, tokenizer, vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError(f"prompt {i} is an empty string")
        ids = tokenizer(prompt).input_ids
        if not ids:
            raise ValueError(f"prompt {i} tokenizes to no tokens")
        return ids
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(f"prompt {i} must be a string or a list of token ids, got {type(prompt).__name__}")
    if len(prompt) == 0:
        raise ValueError(f"prompt {i} is an empty token list")
    for t in prompt:
        if not isinstance(t, int) or isinstance(t, bool):
            raise TypeError(f"prompt {i} holds {t!r} ({type(t).__name__}); token ids must be ints")
        if not 0 <= t < vocab_size:
            raise ValueError(f"prompt {i} holds token id {t}, outside the vocabulary [0, {vocab_size})")
    return list(prompt)


def _sampling_list(sampling_params, n: int, params_cls) -> list:
    if sampling_params is None:
        return [params_cls()] * n
    if isinstance(sampling_params, params_cls):
        return [sampling_params] * n
    if not isinstance(sampling_params, (list, tuple)):
        raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got {type(sampling_params).__name__}")
    if len(sampling_params) != n:
        raise ValueError(f"got {len(sampling_params)} sampling params for {n} prompts: pass one, or one per prompt")
    for i, sp in enumerate(sampling_params):
        if not isinstance(sp, params_cls):
            raise TypeError(f"sampling_params[{i}] is a {type(sp).__name__}, not a SamplingParams")
    return list(sampling_params)


def prepare_requests(prompts, sampling_params, tokenizer, vocab_size: int, max_model_len: int,
                     params_cls, max_prompt_tokens: int | None = None) -> list[PreparedRequest]:
    """Validate everything up front; return one PreparedRequest per prompt, in input order.
    `max_prompt_tokens`: the longest prompt whose prefill the engine's memory plan budgets
    (cycles 4 on pass `max_num_batched_tokens`: one step's activations were profiled at that
    size); a longer prompt is refused here instead of running the engine out of memory."""
    prompts = _as_prompt_list(prompts)
    params = _sampling_list(sampling_params, len(prompts), params_cls)
    requests = []
    for i, (prompt, sp) in enumerate(zip(prompts, params)):
        ids = _token_ids(i, prompt, tokenizer, vocab_size)
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            raise ValueError(f"prompt {i} has {len(ids)} tokens, more than one prefill step may hold "
                             f"(max_num_batched_tokens={max_prompt_tokens}, the size the engine's "
                             f"memory plan was profiled at)")
        if sp.top_k > vocab_size:     # the table (sampling_limits.py) cannot know the vocabulary
            raise ValueError(f"top_k must be -1 or 0 (off) or an int in [1, {vocab_size}] (the vocabulary), "
                             f"got {sp.top_k}")
        outside = [t for t in getattr(sp, "stop_token_ids", ()) if t >= vocab_size]
        if outside:
            raise ValueError(f"sampling_params of prompt {i}: stop_token_ids {outside} are outside the "
                             f"vocabulary [0, {vocab_size})")
        if len(ids) + sp.max_tokens > max_model_len:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; with max_tokens={sp.max_tokens} it needs "
                             f"{len(ids) + sp.max_tokens} positions, more than the model allows ({max_model_len})")
        requests.append(PreparedRequest(prompt if isinstance(prompt, str) else None, ids, sp))
    return requests
