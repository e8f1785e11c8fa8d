"""Tensor-parallel layers: every weight matrix split over the ranks so that one all-reduce per
sublayer is all the communication a transformer block needs (Megatron-LM's split; vLLM's names).

Column-parallel (q/k/v, gate/up): W [out, in] split by output rows. Each rank computes its slice of
the output from the whole input, and the slice is exactly what the next operation needs: whole
attention heads (attention never mixes heads), or whole MLP channels (silu(gate) * up is per
channel). No communication: a column-parallel layer here is a plain nn.Linear of the rank's rows.
Row-parallel (o_proj, down_proj): W split by input columns, matching the slice the column-parallel
layer left on the rank. Each rank's product is a partial sum of the full output; one all-reduce
adds them up, and every rank holds the whole hidden state again for the residual and the norms.
The vocabulary (embedding and lm_head) is split by rows too: each rank looks up or scores only its
share of the tokens.

Loading: each rank keeps its slice of every checkpoint tensor. `Shard` stands where load_weights
(common/engine/model_source.py) expects a parameter: it takes the whole tensor and keeps the slice.
"""

import torch
from torch import nn

from .parallel_state import TPGroup


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns: rank r holds W[:, its columns] (`linear`) and
    multiplies the slice of x it computed; the partial sums add up to y in one all-reduce. The bias
    is added once, after it (added on every rank before the sum it would count world_size times)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.linear = nn.Linear(in_features // tp.world_size, out_features, bias=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(self.linear(x))
        return y if self.bias is None else y + self.bias


def vocab_rows(vocab_size: int, tp: TPGroup) -> tuple[int, int]:
    """(first row, rows per rank): ceil(vocab / world_size) each, the last rank's tail zero-padded."""
    per_rank = -(-vocab_size // tp.world_size)
    return tp.rank * per_rank, per_rank


class VocabParallelEmbedding(nn.Module):
    """The embedding table split by token rows. A token outside this rank's rows looks up zeros
    here, so the all-reduce (a sum with one non-zero term per token) gives every rank every row."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.start, self.rows = vocab_rows(vocab_size, tp)
        # from_pretrained skips nn.Embedding's random init: on the meta device that one call imports
        # torch's compiler (~2.5 s per process), and load_weights overwrites the values anyway.
        self.embedding = nn.Embedding.from_pretrained(torch.empty(self.rows, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return self.embedding(input_ids)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        x = self.embedding(local.masked_fill(outside, 0)).masked_fill(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(x)


class ParallelLMHead(nn.Module):
    """The output projection split by vocabulary rows, as the embedding is (and tied to it when the
    checkpoint ties them): each rank scores its share of the tokens, rank 0 gathers the scores
    (the sampler needs the whole distribution); the other ranks get None."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TPGroup):
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.linear = nn.Linear(hidden_size, vocab_rows(vocab_size, tp)[1], bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.tp.gather(self.linear(hidden).float())
        return None if logits is None else logits[..., :self.vocab_size]   # the padding rows dropped


class Shard:
    """This rank's slice of one checkpoint tensor, in place of a parameter for load_weights: its
    `shape` is the whole tensor's (what the checkpoint must hold), and copy_(whole) keeps
    whole.narrow(dim, start, size) in param.narrow(dim, into, size). Rows past the checkpoint's end
    (the vocabulary's padding) are zeros."""

    def __init__(self, param: torch.Tensor, shape: tuple, dim: int, start: int, size: int, into: int = 0):
        self.param, self.shape = param, torch.Size(shape)
        self.dim, self.start, self.size, self.into = dim, start, size, into

    @torch.no_grad()
    def copy_(self, whole: torch.Tensor) -> None:
        kept = max(0, min(self.size, whole.shape[self.dim] - self.start))
        target = self.param.narrow(self.dim, self.into, self.size)
        target.narrow(self.dim, 0, kept).copy_(whole.narrow(self.dim, self.start, kept))
        target.narrow(self.dim, kept, self.size - kept).zero_()

    # What load_weights reads of a parameter. Not contiguous: random weights are then drawn into a
    # scratch tensor of the whole shape and copied in, so every rank keeps a slice of the same tensor
    # that tp=1 draws (the same weights whatever the world size).
    dtype = property(lambda self: self.param.dtype)
    device = property(lambda self: self.param.device)

    def numel(self) -> int:
        return self.shape.numel()

    def is_contiguous(self) -> bool:
        return False

    def data_ptr(self) -> int:       # a tied lm_head and embedding: the same parameter
        return self.param.data_ptr()
