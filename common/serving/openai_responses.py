"""OpenAI's response shapes: whole responses, streamed chunks (server-sent events), usage.

A completion choice is {"index", "text", "logprobs", "finish_reason"}; a chat one carries a
"message" (whole) or a "delta" (streamed: the first delta of a choice also says role "assistant").
With `echo`, a completion's first text of each choice starts with its prompt's text.
"""

import json
import time

from fastapi.responses import StreamingResponse


class Reply:
    """The pieces every response and chunk of one request share."""

    def __init__(self, response_id: str, model: str, chat: bool, echoes: list[str] | None = None):
        self.id, self.model, self.chat, self.echoes, self.created = response_id, model, chat, echoes, int(time.time())
        self.logprobs = None    # a LogprobsForm when the request asks for logprobs

    def envelope(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def choice(self, index: int, text: str, finish_reason: str | None, chunk: bool, first: bool = True) -> dict:
        if not self.chat:
            if self.echoes is not None and first:
                text = self.echoes[index] + text
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if chunk:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def echo_only(reply: Reply, body, prompt_lengths: list[int], logprobs: list[dict] | None = None):
    """`echo` with `max_tokens: 0` (lm-eval's loglikelihood form): the prompts back, with their
    logprobs when asked (`logprobs`: one completions-form object per prompt)."""
    choices = [reply.choice(i, "", "length", chunk=False) for i in range(len(prompt_lengths))]
    for choice, scored in zip(choices, logprobs or ()):
        choice["logprobs"] = scored
    totals = usage(sum(prompt_lengths), 0)
    if not body.stream:
        return {**reply.envelope(chunk=False), "choices": choices, "usage": totals}

    async def events():
        for choice in choices:
            yield sse({**reply.envelope(chunk=True), "choices": [choice]})
        if body.stream_options and body.stream_options.include_usage:
            yield sse({**reply.envelope(chunk=True), "choices": [], "usage": totals})
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")
