"""Pick the next token of every sequence in a batch from its logits, in vLLM's order.

1. Logprobs, for the requests that ask, come from the raw logits: the model's own distribution,
   before any penalty or temperature (vLLM's default, its "raw_logprobs" mode).
2. Only when a request of the batch asks for them, on a float32 copy: min_tokens masks the tokens
   that would end the request, then the repetition, frequency and presence penalties apply.
3. Greedy rows take the argmax. Sampled rows apply temperature, min_p, top-k and top-p, then draw
   with the exponential-race trick: argmax(p / E) with E ~ Exp(1) is a sample from p. A request
   with a seed draws its E from its own generator, one draw per token, so its tokens do not
   depend on which other requests share the batch. That is what lets every cycle reproduce
   cycle 1's seeded output.
A batch where no request asks for logprobs, penalties or min_tokens skips 1 and 2: the flags are
checked once per batch, and its tokens are the ones the plain sampler would pick.
"""

from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams

Logprobs = dict[int, float]   # token id -> logprob at one position: the top-k, then the chosen token


@dataclass
class SamplerOutput:
    token_ids: list[int]                          # the sampled token of every sequence
    logprobs: list[Logprobs | None] | None = None  # per sequence (None: it did not ask); None: none asked
    prompt_logprobs: list[list[Logprobs | None] | None] | None = None   # per sequence, set on its prefill
    accepted_token_ids: list[list[int]] | None = None   # per sequence, drafts accepted before token_ids[i]

    def take(self, rows: list[int]) -> "SamplerOutput":
        """The outputs of these rows, in this order (no prompt logprobs: a decode step has none)."""
        return SamplerOutput([self.token_ids[r] for r in rows], self.logprobs and [self.logprobs[r] for r in rows])


class Sampler:
    def __init__(self, device: torch.device, seed: int | None = None, eos_token_ids=()):
        # Randomness for requests without a seed: an explicit generator owned by the engine.
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.eos_token_ids = tuple(eos_token_ids)   # masked, with stop_token_ids, until min_tokens

    def __call__(self, logits: torch.Tensor, seqs: list) -> SamplerOutput:
        """logits: [batch, vocab], row i for seqs[i]: a Sequence (sampling_params, generator,
        token_ids, num_prompt_tokens)."""
        params = [s.sampling_params for s in seqs]
        ks = [p.logprobs for p in params]
        raw = torch.log_softmax(logits.float(), dim=-1) if any(k is not None for k in ks) else None
        logits = self._process(logits, seqs, params)
        token_ids = self.sample(logits, params, [s.generator for s in seqs]).tolist()
        return SamplerOutput(token_ids, None if raw is None else top_logprobs(raw, token_ids, ks))

    def _process(self, logits: torch.Tensor, seqs: list, params: list[SamplingParams]) -> torch.Tensor:
        """min_tokens, then penalties, on a float32 copy; the logits untouched when no row asks."""
        short = [i for i, p in enumerate(params)
                 if p.min_tokens > 0 and len(seqs[i].token_ids) - seqs[i].num_prompt_tokens < p.min_tokens]
        penalized = [i for i, p in enumerate(params) if p.penalized]
        if not short and not penalized:
            return logits
        logits = logits.float().clone()
        for i in short:   # the request may not end yet: nothing that would end it can be drawn
            logits[i, list(self.eos_token_ids + params[i].stop_token_ids)] = float("-inf")
        if penalized:
            logits[penalized] = apply_penalties(logits[penalized], [seqs[i] for i in penalized])
        return logits

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> torch.Tensor:
        """The token of every row, left on the device; generators[i]: row i's own (None: no seed)."""
        greedy = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy
        probs = self._probs(logits.float(), params)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, g in enumerate(generators):
            if g is not None and not params[i].greedy:
                noise[i].exponential_(generator=g)
        sampled = (probs / noise).argmax(dim=-1)
        is_greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        return torch.where(is_greedy, greedy, sampled)

    @staticmethod
    def _probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        temps = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=logits.device)
        logits = logits / temps.unsqueeze(1)
        if any(p.min_p > 0 for p in params):
            logits = _min_p(logits, params)
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            logits = _top_k_top_p(logits, params)
        return torch.softmax(logits, dim=-1)


def apply_penalties(logits: torch.Tensor, seqs: list) -> torch.Tensor:
    """vLLM's definitions, for rows that ask (logits: [n, vocab] float32).

    repetition_penalty r, on every token of the prompt or the output: a positive logit is divided
    by r, a negative one multiplied (r > 1 always makes the token less likely).
    frequency_penalty f and presence_penalty p, on the output only (OpenAI's definition):
    logit -= f * count(token in output) + p * (count > 0).
    The counts are rebuilt from the token lists every step: simple, O(length) per penalized row.
    """
    n, vocab = logits.shape
    dev = logits.device
    counts = torch.zeros(n, vocab, device=dev)
    seen = torch.zeros(n, vocab, dtype=torch.bool, device=dev)
    for row, seq in enumerate(seqs):
        out = torch.tensor(seq.token_ids[seq.num_prompt_tokens:], dtype=torch.long, device=dev)
        counts[row].index_add_(0, out, torch.ones(len(out), device=dev))
        seen[row, torch.tensor(seq.token_ids[:seq.num_prompt_tokens], dtype=torch.long, device=dev)] = True
    seen |= counts > 0
    column = lambda name: torch.tensor([getattr(s.sampling_params, name) for s in seqs], device=dev).unsqueeze(1)
    factor = torch.where(seen, column("repetition_penalty"), 1.0)
    logits = torch.where(logits > 0, logits / factor, logits * factor)
    return logits - column("frequency_penalty") * counts - column("presence_penalty") * (counts > 0)


def _min_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask every token less likely than min_p times its row's most likely token (after temperature)."""
    probs = torch.softmax(logits, dim=-1)
    min_p = torch.tensor([p.min_p for p in params], device=logits.device).unsqueeze(1)
    return logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))


def _top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask (to -inf) every token outside each row's top-k and top-p sets."""
    vocab = logits.shape[-1]
    ks = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=logits.device)
    ps = torch.tensor([p.top_p for p in params], device=logits.device)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(rank >= ks.unsqueeze(1), float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= ps.unsqueeze(1), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def is_plain(params: SamplingParams) -> bool:
    """No logprobs, penalties or min_tokens: the token depends on the logits and params alone, so
    the plain sampler (a captured decode step's) serves it without the sequence's history."""
    return params.logprobs is None and params.min_tokens == 0 and not params.penalized


# --- logprobs ---------------------------------------------------------------------------------

def top_logprobs(logprobs: torch.Tensor, token_ids: list[int], ks: list[int | None]) -> list[Logprobs | None]:
    """logprobs: [rows, vocab] log_softmax; per row that asks (ks[i] not None): its top ks[i]
    tokens, most likely first, then token_ids[i] if it is not among them. One transfer to the CPU."""
    rows = [i for i, k in enumerate(ks) if k is not None]
    out: list[Logprobs | None] = [None] * len(ks)
    if not rows:
        return out
    index = torch.tensor(rows, device=logprobs.device)
    picked = torch.tensor([token_ids[i] for i in rows], device=logprobs.device)
    values, ids = logprobs[index].topk(max(ks[i] for i in rows), dim=-1)
    chosen = logprobs[index, picked]
    values, ids, chosen = values.tolist(), ids.tolist(), chosen.tolist()
    for j, i in enumerate(rows):
        entry = dict(zip(ids[j][:ks[i]], values[j][:ks[i]]))
        entry.setdefault(token_ids[i], chosen[j])
        out[i] = entry
    return out


def wants_prompt_logprobs(seq) -> bool:
    """Prompt logprobs are computed once, on the prefill before the first token (a preempted
    sequence that is recomputed has them already)."""
    return seq.sampling_params.prompt_logprobs is not None and len(seq.token_ids) == seq.num_prompt_tokens


def prompt_logprobs(compute_logits, hidden: torch.Tensor, prompt_ids: list[int], k: int,
                    chunk: int = 256) -> list[Logprobs | None]:
    """hidden: [P, hidden] for the P prompt positions; position p predicts token p + 1. Returns
    [None, d_1, ..., d_{P-1}] (nothing predicts the first token). The logits of the whole prompt
    are made `chunk` positions at a time: [P, vocab] at once could be larger than the KV cache."""
    out: list[Logprobs | None] = [None]
    targets = prompt_ids[1:]
    for start in range(0, len(targets), chunk):
        end = min(start + chunk, len(targets))
        logprobs = torch.log_softmax(compute_logits(hidden[start:end]).float(), dim=-1)
        out += top_logprobs(logprobs, targets[start:end], [k] * (end - start))
    return out


def prompt_logprobs_for(seqs: list, compute_logits, prompt_hidden) -> list | None:
    """SamplerOutput.prompt_logprobs of a step: for each sequence that wants them now, from
    prompt_hidden(i), the hidden states of seqs[i]'s prompt positions in the step that just ran;
    None when none does (the common case costs one check per sequence)."""
    if not any(map(wants_prompt_logprobs, seqs)):
        return None
    return [prompt_logprobs(compute_logits, prompt_hidden(i), s.token_ids, s.sampling_params.prompt_logprobs)
            if wants_prompt_logprobs(s) else None for i, s in enumerate(seqs)]
