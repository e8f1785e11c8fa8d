"""Rejection sampling: which draft tokens to keep, so the output is exactly the target model's.

A sequence with drafts d_0..d_{k-1} was verified in one step: its k + 1 query rows gave the target
model's logits after its last token (row 0) and after each draft (row j sees d_0..d_{j-1}). Row j
is only valid if d_0..d_{j-1} are really the tokens the sequence gets. The rule, from row 0 on:

    draw y_j from row j's distribution p_j, exactly as the plain sampler would;
    y_j == d_j: accept d_j and go on to row j + 1;
    else: emit y_j and stop (the rows after j assumed d_j: they are thrown away).
    All k accepted: the last row's y_k is a bonus token (k + 1 tokens from one step).

For a greedy request y_j is the argmax: accept while the target's argmax equals the draft. For a
sampled one this IS the textbook rule for a deterministic proposer (q one-hot on d_j): d_j is
accepted with probability P(y_j = d_j) = p_j(d_j), and when it is rejected the token emitted is
y_j given y_j != d_j, whose law is p_j with d_j removed and renormalised. Every emitted token is
drawn from the target's own p_j, so the distribution stays exact whatever the proposer proposes;
a bad proposer only costs speed.
y_j is drawn as the plain sampler draws (sampler.py: argmax(p / E), E ~ Exp(1)), one draw per
emitted token, from the request's own generator when it has a seed: a seeded request gets the
same tokens with speculation as without (up to float rounding between batch shapes).
p_j is what the engine's sampler makes of row j's logits: min_tokens, penalties (counted over the
tokens before row j's position, drafts included), temperature, min-p, top-k, top-p.
"""

from dataclasses import dataclass

import torch

from .sampler import Sampler, SamplerOutput, top_logprobs


@dataclass
class RowContext:
    """What the sampler reads of a sequence for one verified row: the tokens before the row's
    position (the sequence's own, then the drafts the row assumes), its params and generator.
    token_ids is built only when read (penalties, min_tokens): most rows never need it."""
    seq: object
    drafts: list[int]

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids + self.drafts

    @property
    def num_prompt_tokens(self) -> int:
        return self.seq.num_prompt_tokens

    @property
    def sampling_params(self):
        return self.seq.sampling_params


class RejectionSampler:
    def __init__(self, sampler: Sampler):
        self.sampler = sampler   # the engine's: its processing, and its generator for unseeded requests

    def __call__(self, logits: torch.Tensor, seqs: list, drafts: list[list[int]]) -> SamplerOutput:
        """logits: [sum(len(d) + 1 for d in drafts), vocab], len(drafts[i]) + 1 consecutive rows for
        seqs[i]. Returns per sequence its final token (token_ids) and the drafts it accepted
        (accepted_token_ids), which come before it. Logprobs only for sequences without drafts."""
        rows = [RowContext(s, d[:j]) for s, d in zip(seqs, drafts) for j in range(len(d) + 1)]
        params = [r.sampling_params for r in rows]
        processed = self.sampler._process(logits, rows, params)
        greedy = processed.argmax(dim=-1).tolist()
        probs = None if all(p.greedy for p in params) else self.sampler._probs(processed.float(), params)
        token_ids, accepted, last_rows, first = [], [], [], 0
        for seq, draft in zip(seqs, drafts):
            kept = []
            for j in range(len(draft) + 1):
                r = first + j
                y = greedy[r] if seq.sampling_params.greedy else self._draw(probs[r], seq.generator)
                if j == len(draft) or y != draft[j]:
                    break
                kept.append(y)
            token_ids.append(y)
            accepted.append(kept)
            last_rows.append(first + len(draft))
            first += len(draft) + 1
        return SamplerOutput(token_ids, self._logprobs(logits, seqs, drafts, last_rows, token_ids),
                             accepted_token_ids=accepted)

    def _draw(self, probs: torch.Tensor, generator: torch.Generator | None) -> int:
        """One token from probs [vocab], drawn as Sampler.sample draws it: argmax(p / E)."""
        noise = torch.empty_like(probs).exponential_(generator=self.sampler.generator if generator is None else generator)
        return int((probs / noise).argmax())

    @staticmethod
    def _logprobs(logits, seqs, drafts, last_rows, token_ids):
        """The raw logprobs of the rows that ask; the scheduler never drafts for a request that
        asks for logprobs, so each such sequence has one row."""
        ks = [s.sampling_params.logprobs for s in seqs]
        if all(k is None for k in ks):
            return None
        assert all(k is None or not d for k, d in zip(ks, drafts)), "a request with logprobs got drafts"
        raw = torch.log_softmax(logits[last_rows].float(), dim=-1)
        return top_logprobs(raw, token_ids, ks)
