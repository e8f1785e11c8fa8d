"""Decode as a CUDA graph replay over static buffers.

A decode step of cycle 7 launches dozens of kernels per layer from Python; where launching takes
longer than the kernels run, the GPU waits. A CUDA graph records every kernel of one decode
forward once (the capture) and launches them all with one call (the replay). It records
*addresses*: a replay reads and writes the tensors the capture did, with their shapes. So:

- Static buffers, allocated once: input_ids, positions, slot_mapping, context_lens, block_tables,
  output. Before a replay the step's inputs, prepared as in cycle 7, are copied in; then read output.
- Buckets: shapes are fixed at capture, so decode is captured for batch sizes 1, 2, 4, 8, 16, then
  every 16 up to max_num_seqs. A step of n sequences replays the smallest bucket >= n; its padding
  rows write their K/V to a scratch block no sequence owns, and their outputs are never sampled.
- Captured only with attention that reads K/V through the block table in place (flash_attn,
  triton): sdpa's dense gather is as wide as the longest sequence, a shape no graph can follow.
  With sdpa, with enforce_eager, and on the CPU (no graphs) decode runs eagerly, as in cycle 7.
"""

import time
from bisect import bisect_left

import torch

from .attention import DENSE_LAYOUT
from .model import AttentionMetadata, CausalLM

IN_PLACE_BACKENDS = ("flash_attn", "triton")   # decode kernels reading K/V through the block table


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, then steps of 16, up to max_num_seqs (always the last bucket)."""
    sizes = [1, 2, 4, 8] + list(range(16, max_num_seqs, 16))
    return [b for b in sizes if b < max_num_seqs] + [max_num_seqs]


def bucket_for(buckets: list[int], n: int) -> int:
    """The smallest bucket that holds n rows."""
    i = bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"a decode batch of {n} sequences exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def graph_mode(device: torch.device, attention_backend: str, enforce_eager: bool) -> tuple[bool, str]:
    """Whether decode is captured, and why not when it is not."""
    if device.type != "cuda":
        return False, "CPU: no CUDA graphs; decode runs eagerly, as in cycle 7"
    if enforce_eager:
        return False, "enforce_eager=True"
    if attention_backend not in IN_PLACE_BACKENDS:
        return False, (f"attention backend {attention_backend!r} gathers K/V densely (width follows the "
                       f"longest sequence): decode runs eagerly; capture needs one of {IN_PLACE_BACKENDS}")
    return True, "captured"


class DecodeGraphs:
    """The static buffers of a decode step and one captured graph per batch-size bucket."""

    def __init__(self, model: CausalLM, attention_backend: str, block_size: int, max_num_seqs: int,
                 max_model_len: int, device: torch.device, enforce_eager: bool = False):
        self.model, self.block_size, self.device = model, block_size, device
        self.capture_graphs, self.note = graph_mode(device, attention_backend, enforce_eager)
        # Said once at start-up: a GPU that decodes without graphs (on a CPU that is expected).
        self.fallback_note = None if self.capture_graphs or device.type != "cuda" else self.note
        self.dense = attention_backend in DENSE_LAYOUT    # sdpa: runs the buffers eagerly only (tests)
        self.buckets = batch_buckets(max_num_seqs)
        self.max_blocks = -(-max_model_len // block_size)
        rows, on = self.buckets[-1], dict(device=device)
        self.input_ids = torch.zeros(rows, dtype=torch.long, **on)
        self.positions = torch.zeros(rows, dtype=torch.long, **on)
        self.slot_mapping = torch.zeros(rows, dtype=torch.long, **on)
        self.context_lens = torch.ones(rows, dtype=torch.int32, **on)
        self.block_tables = torch.zeros(rows, self.max_blocks, dtype=torch.int32, **on)
        self.output = torch.zeros(rows, model.config.hidden_size, dtype=model.model.norm.weight.dtype, **on)
        self.cu_seqlens_q = torch.arange(rows + 1, dtype=torch.int32, **on)     # one query per row
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_s, self.graph_pool_bytes = 0.0, 0
        self.pad_eager = False    # tests: eager decode steps through the buffers too, padded like a replay

    @property
    def replays(self) -> bool:
        """Whether decode steps go through the buffers (a replay); otherwise the runner's eager path."""
        return bool(self.graphs) or self.pad_eager

    @torch.inference_mode()
    def capture(self, kv_cache, scratch_block: int) -> None:
        """Record one graph per bucket on the KV pool's addresses, largest first so the smaller ones
        reuse its memory pool. Every row is padding while capturing: only the scratch block is written."""
        self.kv_cache, self.scratch_block = kv_cache, scratch_block
        self._pad(0, self.buckets[-1])
        if not self.capture_graphs:
            return
        start, free_before = time.perf_counter(), torch.cuda.mem_get_info(self.device)[0]
        pool, stream = None, torch.cuda.Stream(self.device)   # warm-up and capture on one side stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        for bucket in reversed(self.buckets):
            with torch.cuda.stream(stream):
                self._forward(bucket, self.max_blocks)     # warm up: lazy init, compiled ops compile here
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self._forward(bucket, self.max_blocks)
            pool = graph.pool() if pool is None else pool
            self.graphs[bucket] = graph
        torch.cuda.synchronize(self.device)
        self.graph_pool_bytes = free_before - torch.cuda.mem_get_info(self.device)[0]
        self.capture_s = time.perf_counter() - start

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Copy a decode step's inputs into the buffers, replay the smallest bucket that holds them
        and return the hidden states of the step's own rows (the padding rows' are never read)."""
        n, width = len(input_ids), meta.block_tables.shape[1]
        bucket = bucket_for(self.buckets, n)
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slot_mapping[:n] = meta.slot_mapping
        self.context_lens[:n] = meta.context_lens
        self.block_tables[:n, :width] = meta.block_tables    # columns past a row's blocks are never read
        self._pad(n, bucket)
        if bucket in self.graphs:
            self.graphs[bucket].replay()
        else:                                                  # pad_eager (tests): the same forward, eagerly
            self._forward(bucket, width)
        return self.output[:n]

    def _pad(self, start: int, stop: int) -> None:
        """Rows start..stop-1 become padding: token 0 at position 0, stored in the scratch block."""
        self.input_ids[start:stop] = 0
        self.positions[start:stop] = 0
        self.slot_mapping[start:stop] = self.scratch_block * self.block_size
        self.context_lens[start:stop] = 1
        self.block_tables[start:stop] = self.scratch_block

    def _forward(self, bucket: int, width: int) -> None:
        """The decode forward over rows 0..bucket-1 of the buffers: what a graph records."""
        context_lens = self.context_lens[:bucket]
        cu_seqlens_k = torch.nn.functional.pad(context_lens.cumsum(0, dtype=torch.int32), (1, 0))
        meta = AttentionMetadata(False, self.slot_mapping[:bucket], self.cu_seqlens_q[:bucket + 1], cu_seqlens_k,
                                 1, width * self.block_size, context_lens, self.block_tables[:bucket, :width])
        if self.dense:     # sdpa's layout for one query per row: keys up to the row's position
            rows = self.cu_seqlens_q[:bucket].long()
            keys = torch.arange(width * self.block_size, device=self.device)
            meta.query_index, meta.token_index = rows.unsqueeze(1), rows
            meta.mask = keys.view(1, 1, -1) <= self.positions[:bucket].view(-1, 1, 1)
        hidden = self.model(self.input_ids[:bucket], self.positions[:bucket], meta, self.kv_cache)
        self.output[:bucket].copy_(hidden)

    def stats(self) -> dict:
        return {"cuda_graphs": bool(self.graphs), "cuda_graphs_note": self.note, "graph_buckets": self.buckets,
                "graph_capture_s": self.capture_s, "cuda_graph_bytes": self.graph_pool_bytes}
