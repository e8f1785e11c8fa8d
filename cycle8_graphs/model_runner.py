"""The model runner: turns a scheduled step into tensors, runs the model once, samples.

Prefill packs every admitted prompt into one flat batch without padding; decode gathers each
running sequence's newest token. Both end up as the same flat layout (input_ids, positions,
slot_mapping over N tokens, plus per-sequence block tables), so the model has one code path.
Cycle 8: decode goes to DecodeGraphs (cuda_graphs.py), which keeps that layout in static buffers
updated in place and replays it as a CUDA graph; prefill stays as it was, eager.
"""

from itertools import accumulate

import torch

from .block_manager import BlockManager
from .cuda_graphs import DecodeGraphs
from .model import AttentionMetadata, CausalLM
from .sampler import Sampler
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache, block_manager: BlockManager, sampler: Sampler,
                 device: torch.device, graphs: DecodeGraphs | None = None, dense_layout: bool = True):
        self.model = model
        self.dense_layout = dense_layout   # build sdpa's [B, Tq] layout (attention.DENSE_LAYOUT)
        self.kv_cache = kv_cache
        self.block_manager = block_manager
        self.sampler = sampler
        self.device = device
        self.graphs = graphs      # decode: static buffers, replayed as a CUDA graph where it can be

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        """One forward over the step's tokens; returns one sampled token per sequence."""
        if self.graphs is not None:
            if not is_prefill:
                return self.graphs.run(seqs, self.sampler)
            self.graphs.collect_changes()     # keeps the BlockManager's record short between decodes
        input_ids, positions, meta = self._prepare(seqs, is_prefill)
        hidden = self.model(input_ids, positions, meta, self.kv_cache)
        last = hidden[meta.cu_seqlens_q[1:].long() - 1]   # each sequence's last token
        logits = self.model.compute_logits(last)
        return self.sampler(logits, [s.sampling_params for s in seqs], [s.generator for s in seqs])

    def _prepare(self, seqs: list[Sequence], is_prefill: bool):
        # Prefill computes every token a sequence has (a preempted one: its prompt and what it had
        # generated) past its cached prefix; decode only the newest token, whose K/V is not stored
        # yet. Attention reads the cached prefix through the block table like any other key.
        starts = [s.num_cached_tokens if is_prefill else len(s) - 1 for s in seqs]
        input_ids, positions, slots, seqlens = [], [], [], [0]
        for seq, start in zip(seqs, starts):
            input_ids += seq.token_ids[start:]
            positions += range(start, len(seq))
            slots += [self.block_manager.slot(seq, p) for p in range(start, len(seq))]
            seqlens.append(seqlens[-1] + len(seq) - start)
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)
        positions = as_tensor(positions)
        return as_tensor(input_ids), positions, self._layout(seqs, seqlens, positions, as_tensor(slots), is_prefill)

    def _layout(self, seqs: list[Sequence], seqlens: list[int], positions: torch.Tensor,
                slot_mapping: torch.Tensor, is_prefill: bool) -> AttentionMetadata:
        """Per-sequence views of the flat batch: lengths and block tables for every backend (from
        Python lists: no device round trip), and the dense layout only for a backend that needs it."""
        context_lens = [len(s) for s in seqs]
        int32 = lambda x: torch.tensor(x, dtype=torch.int32, device=self.device)
        width = max(len(s.block_table) for s in seqs)
        tables = int32([s.block_table + [0] * (width - len(s.block_table)) for s in seqs])
        max_seqlen_q = max(end - start for start, end in zip(seqlens, seqlens[1:]))
        meta = AttentionMetadata(is_prefill, slot_mapping, int32(seqlens), int32([0, *accumulate(context_lens)]),
                                 max_seqlen_q, max(context_lens), int32(context_lens), tables)
        if self.dense_layout:
            meta.query_index, meta.token_index, meta.mask = self._dense_layout(seqlens, positions, width)
        return meta

    def _dense_layout(self, seqlens: list[int], positions: torch.Tensor, width: int):
        """sdpa's per-sequence layout [B, Tq]: query_index, token_index and the mask."""
        cu = torch.tensor(seqlens, dtype=torch.long, device=self.device)
        lengths = cu[1:] - cu[:-1]
        B, Tq = len(seqlens) - 1, int(lengths.max())
        offsets = torch.arange(Tq, device=self.device)
        # query_index[b, t] = cu[b] + t, clamped to the sequence's last token for short sequences
        query_index = cu[:-1, None] + torch.minimum(offsets[None, :], lengths[:, None] - 1)
        seq_of_token = torch.repeat_interleave(torch.arange(B, device=self.device), lengths)
        token_index = seq_of_token * Tq + (torch.arange(len(positions), device=self.device) - cu[:-1][seq_of_token])
        keys = torch.arange(width * self.block_manager.block_size, device=self.device)
        mask = keys.view(1, 1, -1) <= positions[query_index].unsqueeze(-1)
        return query_index, token_index, mask
