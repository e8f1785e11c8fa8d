"""Incremental detokenization: the text a stream may show after each new token.

Decoding one token at a time is wrong for two reasons: a byte-level tokenizer (SmolLM2, Qwen3)
may split one multi-byte character (an emoji, a CJK character) over several tokens, and a token
decoded alone can lose the space its neighbours would give it. So, as vLLM does, we decode a small
window twice: the tokens already shown (`prefix_offset:read_offset`) and the same window plus the
new ones, and emit only the difference. While the window ends in U+FFFD (a character whose bytes
have not all arrived) nothing is emitted; the next token completes it.

Stop strings live here too (the engine only sees tokens): the text is cut before the first stop
string, and while one could still be forming, its possible start is held back from the stream.
"""

from common.engine.sampling_limits import check_stop as normalize_stop  # noqa: F401  (the cycles import it here)

REPLACEMENT_CHAR = "\ufffd"
CONTEXT_TOKENS = 5   # prompt tokens decoded with the first output tokens, for correct spacing


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...] = (),
                 skip_special_tokens: bool = True, include_stop_str: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.include_stop_str = include_stop_str   # keep the stop string that ended the text
        context = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.token_ids = context            # context, then every generated token
        self.prefix_offset = 0              # start of the decode window
        self.read_offset = len(context)     # tokens before this are already in `text`
        self.text = ""                      # all generated text so far (cut at a stop string)
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.emitted = 0                    # characters of `text` already returned
        self.stopped = False                # a stop string was found: the request must finish

    @classmethod
    def for_request(cls, tokenizer, prompt_token_ids: list[int], params) -> "IncrementalDetokenizer":
        """The detokenizer a request's SamplingParams ask for."""
        return cls(tokenizer, prompt_token_ids, params.stop, params.skip_special_tokens,
                   params.include_stop_str_in_output)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def update(self, token_id: int, finishing: bool = False) -> str:
        """Add one generated token; return the text that became safe to show (maybe "").
        `finishing`: this is the request's last token, so everything left is flushed."""
        self.token_ids.append(token_id)
        if not self.stopped:
            shown = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
            window = self._decode(self.token_ids[self.prefix_offset:])
            complete = not window.endswith(REPLACEMENT_CHAR)
            if (complete or finishing) and len(window) > len(shown):
                old_len = len(self.text)
                self.text += window[len(shown):]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
                self._find_stop(old_len)
        end = len(self.text) if finishing or self.stopped else len(self.text) - self.holdback
        delta = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    def process(self, new_token_ids: list[int], finish_reason: str | None) -> tuple[str, int, str | None]:
        """One step's new tokens of a request -> (text to show, how many of the tokens to keep,
        finish reason). The one rule for stop strings, for the engine (cycle 4 on, one token a
        step) and the server (a step's batch): a stop string ends the request with "stop", and
        the tokens after the one that completed it are dropped."""
        text = ""
        for i, token in enumerate(new_token_ids):
            text += self.update(token, finishing=finish_reason is not None and i == len(new_token_ids) - 1)
            if self.stopped:
                return text, i + 1, "stop"
        return text, len(new_token_ids), finish_reason

    def _find_stop(self, old_len: int) -> None:
        """Only a stop string that ends in the new text can be new: search from there on."""
        if not self.stop:
            return
        start = max(0, old_len - self.holdback)
        found = [(i, len(s)) for i, s in ((self.text.find(s, start), s) for s in self.stop) if i >= 0]
        if found:
            at, length = min(found)
            self.text = self.text[:at + length if self.include_stop_str else at]
            self.stopped = True
