"""Pick the next token of every sequence in a batch from its logits.

Greedy rows take the argmax. Sampled rows apply temperature, top-k and top-p, then draw with the
exponential-race trick: argmax(p / E) with E ~ Exp(1) is a sample from p. A request with a seed
draws its E from its own generator, one draw per token, so its tokens do not depend on which
other requests share the batch. That is what lets every cycle reproduce cycle 1's seeded output.
"""

import torch

from .sampling_params import SamplingParams


class Sampler:
    def __init__(self, device: torch.device, seed: int | None = None):
        # Randomness for requests without a seed: an explicit generator owned by the engine.
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[int]:
        """logits: [batch, vocab]; generators[i] is request i's own generator (None: no seed)."""
        return self.sample(logits, params, generators).tolist()

    def sample(self, logits: torch.Tensor, params: list[SamplingParams] | None = None,
               generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
        """The same, left on the device (no sync); params None: every row is greedy."""
        greedy = logits.argmax(dim=-1)
        if params is None or all(p.greedy for p in params):
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
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params],
                             device=logits.device)
        logits = logits / temps.unsqueeze(1)
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            logits = _top_k_top_p(logits, params)
        return torch.softmax(logits, dim=-1)


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
