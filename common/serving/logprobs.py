"""Engine logprobs -> the two OpenAI forms. Pure functions: no server, no engine state.

The engine (RequestOutput.logprobs / prompt_logprobs) gives one dict {token_id: logprob} per
position: the top-k tokens, most likely first, then the chosen token when it is not among them;
a prompt's first position is None. The server turns that into
- the completions form: parallel lists `tokens`, `token_logprobs`, `top_logprobs` (a dict
  token string -> logprob: the top-k and the chosen token, so up to k + 1 entries, as OpenAI
  documents) and `text_offset` (where each token starts in the returned text). With `echo` the
  prompt's positions come first, the first with None.
- the chat form: `content`, one entry per token: {token, logprob, bytes, top_logprobs}, where
  top_logprobs lists exactly the k most likely tokens.
Token strings are each token decoded alone (`decode(token_id)`, as vLLM does): a character split
over several byte-level tokens shows as U+FFFD in each, and `bytes` are that string's UTF-8.
JSON has no -inf: a token the model rules out gets -9999.0, vLLM's and OpenAI's stand-in.
"""

from itertools import accumulate
from typing import Callable

Logprobs = dict[int, float]
NEG_INF_STANDIN = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, NEG_INF_STANDIN)


def completion_logprobs(token_ids: list[int], logprobs: list[Logprobs | None], decode: Callable[[int], str],
                        text_offset: int = 0) -> dict:
    """The completions `logprobs` object for these positions. text_offset: where the first token
    starts in the choice's text (a streamed chunk passes the length of the text sent before it)."""
    if len(token_ids) != len(logprobs):
        raise ValueError(f"{len(token_ids)} tokens but {len(logprobs)} logprob entries")
    tokens = [decode(t) for t in token_ids]
    return {
        "tokens": tokens,
        "token_logprobs": [None if d is None else _finite(d[t]) for t, d in zip(token_ids, logprobs)],
        "top_logprobs": [None if d is None else {decode(t): _finite(v) for t, v in d.items()} for d in logprobs],
        "text_offset": list(accumulate((len(s) for s in tokens[:-1]), initial=text_offset)) if tokens else [],
    }


def echo_completion_logprobs(prompt_token_ids: list[int], prompt_logprobs: list[Logprobs | None],
                             token_ids: list[int], logprobs: list[Logprobs | None],
                             decode: Callable[[int], str]) -> dict:
    """`echo`: the returned text is the prompt's, then the generation's; so are the logprobs."""
    return completion_logprobs(list(prompt_token_ids) + list(token_ids), list(prompt_logprobs) + list(logprobs),
                               decode)


def _chat_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8"))}


def chat_logprobs(token_ids: list[int], logprobs: list[Logprobs], decode: Callable[[int], str],
                  top_logprobs: int = 0) -> dict:
    """The chat `logprobs` object: {"content": [...]}, one entry per generated token."""
    if len(token_ids) != len(logprobs):
        raise ValueError(f"{len(token_ids)} tokens but {len(logprobs)} logprob entries")
    content = []
    for token_id, entry in zip(token_ids, logprobs):
        item = _chat_entry(decode(token_id), entry[token_id])
        # the engine's dict lists the top-k first; a chosen token outside them comes after
        item["top_logprobs"] = [_chat_entry(decode(t), v) for t, v in list(entry.items())[:top_logprobs]]
        content.append(item)
    return {"content": content}


class LogprobsForm:
    """What one request asked for and how its choices write it; the server keeps one per request.

    chat: the chat form with `top` alternatives. Otherwise the completions form; `prompts` (one
    token-id list per choice) when `echo` puts the prompt's positions first."""

    def __init__(self, decode: Callable[[int], str], chat: bool, top: int,
                 prompts: list[list[int]] | None = None):
        self.decode, self.chat, self.top, self.prompts = decode, chat, top, prompts

    def format(self, index: int, token_ids: list[int], logprobs: list[Logprobs],
               prompt_logprobs: list[Logprobs | None] | None = None, text_offset: int = 0) -> dict:
        if self.chat:
            return chat_logprobs(token_ids, logprobs, self.decode, self.top)
        if self.prompts is not None and prompt_logprobs is not None:
            return echo_completion_logprobs(self.prompts[index], prompt_logprobs, token_ids, logprobs, self.decode)
        return completion_logprobs(token_ids, logprobs, self.decode, text_offset)


def logprob_params(body, chat: bool) -> dict:
    """A request's OpenAI logprob fields -> SamplingParams fields ({} when it asks for none).
    completions: `logprobs: k`, and with `echo` the prompt's too (prompt_logprobs k);
    chat: `logprobs: true` with `top_logprobs: k` (0 when absent)."""
    extra = body.model_extra or {}
    field = lambda name: getattr(body, name, None) if getattr(body, name, None) is not None else extra.get(name)
    if chat:
        top = field("top_logprobs")
        if not field("logprobs"):
            if top:
                raise ValueError("top_logprobs needs logprobs: true")
            return {}
        return {"logprobs": 0 if top is None else top}
    k = field("logprobs")
    if k is None:
        return {}
    return {"logprobs": k, "prompt_logprobs": k} if field("echo") else {"logprobs": k}
