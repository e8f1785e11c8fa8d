"""The OutputProcessor: what one sampled token does to its request, and what the caller gets back.

After every step, each sequence that ran takes its new token: the token and its logprobs are
appended, the time of its first token is kept, and the request is checked for an end: EOS (unless
ignore_eos), one of its stop_token_ids, max_tokens, or one of its stop strings in the text. Each
gets one RequestOutput: while it runs, only this step's token and text (a delta, vLLM's DELTA kind:
copying the whole generation every step would cost O(length)); when it finishes, everything.
Text is decoded token by token only when it is read as it comes (streaming) or searched for stop
strings; otherwise once, when the request finishes.
"""

from common.engine.detokenizer import IncrementalDetokenizer
from common.engine.outputs import RequestMetrics, RequestOutput


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids

    def add(self, seq, stream: bool, detokenize: bool = True) -> None:
        """Give a new request what decoding its text needs. detokenize=False: token ids only."""
        seq.detokenize = detokenize
        if detokenize and (stream or seq.sampling_params.stop):
            seq.detokenizer = IncrementalDetokenizer.for_request(self.tokenizer, seq.prompt_token_ids,
                                                                 seq.sampling_params)

    def process(self, seq, out, i: int, now: float) -> RequestOutput:
        """Row i of a step's SamplerOutput for its sequence; `now`: perf_counter() after the step.
        With speculative decoding the step may give several tokens: its accepted drafts, then its
        sampled token; they are taken in order, and the first that ends the request is the last."""
        new = [*out.accepted_token_ids[i], out.token_ids[i]] if out.accepted_token_ids else [out.token_ids[i]]
        reason = None
        for count, token in enumerate(new, 1):
            seq.token_ids.append(token)
            reason = self.finish_reason(seq.output_token_ids, seq.sampling_params)
            if reason is not None:
                new = new[:count]
                break
        seq.record_logprobs(out, i)
        if seq.first_token_time is None:
            seq.first_token_time = now - seq.arrival_time
        delta = ""
        if seq.detokenizer is not None:     # the one stop-string rule, the server's too
            delta, keep, reason = seq.detokenizer.process(new, reason)
            del seq.token_ids[len(seq.token_ids) - len(new) + keep:]   # a stop string ends it at token `keep`
            new = new[:keep]
        if reason is None:
            return RequestOutput(seq.seq_id, None, [], [], "", None, finished=False,
                                 new_token_ids=new, delta_text=delta,
                                 logprobs=None if seq.logprobs is None else seq.logprobs[-1:],
                                 # the prompt's logprobs come with the first token
                                 prompt_logprobs=seq.prompt_logprobs if len(seq.output_token_ids) == 1 else None)
        seq.finish_reason, seq.finish_time = reason, now - seq.arrival_time
        return self._finished(seq, new, delta)

    def finish_reason(self, token_ids: list[int], params) -> str | None:
        if not params.ignore_eos and token_ids[-1] in self.eos_token_ids:
            return "stop"
        if token_ids[-1] in params.stop_token_ids:
            return "stop"
        if len(token_ids) >= params.max_tokens:
            return "length"
        return None

    def _finished(self, seq, new: list[int], delta: str) -> RequestOutput:
        tokens = seq.output_token_ids
        text = (seq.detokenizer.text if seq.detokenizer else
                self.tokenizer.decode(tokens, skip_special_tokens=seq.sampling_params.skip_special_tokens)
                if seq.detokenize else "")
        return RequestOutput(seq.seq_id, seq.prompt, seq.prompt_token_ids, tokens, text,
                             seq.finish_reason, RequestMetrics(seq.first_token_time, seq.finish_time),
                             finished=True, new_token_ids=new, delta_text=delta,
                             logprobs=seq.logprobs, prompt_logprobs=seq.prompt_logprobs)
