"""Decode as a CUDA graph replay over static buffers, and the lean host step around it.

A decode step of cycle 7 launches dozens of kernels per layer from Python, plus blocking copies of
tensors built from Python lists; where that host work takes longer than the kernels, the GPU
waits. A CUDA graph records every kernel of one decode forward once (the capture) and launches
them all again with one call (the replay). A graph records *addresses*:
each replay reads the same input tensors and writes the same output tensor, so every input lives in
a static buffer that is updated in place, and the output is copied out of a static buffer.

- Buckets: a graph has fixed shapes, so decode is captured for batch sizes 1, 2, 4, 8, 16, then
  every 16 up to max_num_seqs. A step of n sequences replays the smallest bucket >= n; the padding
  rows point at a scratch KV block that no sequence owns, and their outputs are never sampled.
  Without a graph to replay, the forward runs over the n rows only (no padding).
- Rows: each running sequence keeps one row of the static buffers while it runs. The host writes
  a row only when something changes (a sequence joins, leaves, or gains a block: the BlockManager
  records those in `changed`); everything else moves on the device: the sampled token becomes the
  next input, positions and context lengths are incremented. A leaving row is filled by the last
  row, so rows 0..n-1 stay dense.
- One host-device sync per step: reading the sampled tokens.
- Only attention backends that read K/V through the block table in place (flash_attn, triton)
  are captured: sdpa gathers each sequence's blocks into a dense tensor whose width follows the
  longest sequence, which a fixed-shape graph cannot follow without attending over max_model_len
  keys for every row. With sdpa (and on the CPU, which has no graphs) the same forward over the
  same buffers runs eagerly, sliced to the step's width.
"""

import time
from bisect import bisect_left

import torch

from .block_manager import BlockManager
from .model import AttentionMetadata, CausalLM
from .sampler import Sampler, SamplerOutput, is_plain
from .sequence import Sequence

IN_PLACE_BACKENDS = ("flash_attn", "triton")   # decode kernels reading K/V through the block table
PAD_TOKEN = 0


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
        return False, "CPU: no CUDA graphs; the decode forward runs eagerly over the same static buffers"
    if enforce_eager:
        return False, "enforce_eager=True"
    if attention_backend not in IN_PLACE_BACKENDS:
        return False, (f"attention backend {attention_backend!r} gathers K/V densely (width follows the "
                       f"longest sequence): decode runs eagerly; capture needs one of {IN_PLACE_BACKENDS}")
    return True, "captured"


class DecodeGraphs:
    """The static buffers of a decode step, the rows that map sequences onto them, and the graphs."""

    def __init__(self, model: CausalLM, attention_backend: str, block_size: int, max_num_seqs: int,
                 max_model_len: int, device: torch.device, enforce_eager: bool = False):
        self.model = model
        self.block_size = block_size
        self.device = device
        self.capture_graphs, self.note = graph_mode(device, attention_backend, enforce_eager)
        if not self.capture_graphs and device.type == "cuda":     # a fallback on a GPU is said out loud
            print(f"cycle8_graphs: decode runs eagerly: {self.note}")
        # In-place kernels read only a sequence's own blocks, so their table can be as wide as
        # max_model_len at no cost; sdpa's gather reads every column, so it is sliced per step.
        self.full_width = attention_backend in IN_PLACE_BACKENDS
        self.buckets = batch_buckets(max_num_seqs)
        self.max_blocks = -(-max_model_len // block_size)
        max_bs = self.buckets[-1]
        on = dict(device=device)
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, **on)
        self.positions = torch.zeros(max_bs, dtype=torch.long, **on)
        self.context_lens = torch.ones(max_bs, dtype=torch.int32, **on)
        self.block_tables = torch.zeros(max_bs, self.max_blocks, dtype=torch.int32, **on)
        self.hidden = torch.zeros(max_bs, model.config.hidden_size, dtype=model.model.norm.weight.dtype, **on)
        arange = torch.arange(max(max_bs + 1, self.max_blocks * block_size), **on)
        self.cu_seqlens_q = arange[:max_bs + 1].to(torch.int32)   # one query per row
        self.row_index = arange[:max_bs]
        self.key_index = arange[:self.max_blocks * block_size]
        # Host staging for row writes: pinned on CUDA so the copies are non_blocking.
        pin = device.type == "cuda"
        self.stage_rows = torch.zeros(max_bs, dtype=torch.long, pin_memory=pin)
        self.stage_values = torch.zeros(max_bs, 3, dtype=torch.long, pin_memory=pin)
        self.stage_tables = torch.zeros(max_bs, self.max_blocks, dtype=torch.int32, pin_memory=pin)
        self.rows: list[Sequence] = []             # row r of the buffers holds rows[r]
        self.row_of: dict[int, int] = {}           # seq_id -> row
        self.pending: dict[int, Sequence] = {}     # sequences whose blocks changed, not yet written
        self.num_sampled_rows = 0                  # rows that do not sample greedily
        self.num_full_rows = 0                     # rows that ask for logprobs, penalties or min_tokens
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_s, self.graph_pool_bytes, self.reserve_bytes = 0.0, 0, 0
        self.pad_eager = False    # tests: pad eager steps to their bucket too, as a replay would

    # --- binding to the KV pool, memory, capture -----------------------------------------------

    def bind(self, kv_cache, scratch_block: int) -> None:
        """Point the buffers at the KV pool; every row starts as padding on the scratch block."""
        self.kv_cache, self.scratch_block = kv_cache, scratch_block
        self.block_tables.fill_(scratch_block)

    def follow(self, block_manager: BlockManager) -> None:
        """Rows are written from the sequences whose blocks the BlockManager records as changed."""
        self.block_manager = block_manager

    @torch.inference_mode()
    def measure_decode_bytes(self, kv_cache_factory) -> int:
        """Peak memory of one eager decode forward at the largest bucket, on a one-block pool: what
        the captured graphs will hold (they share one memory pool, largest bucket first). Taken
        before the KV budget is sized, so the budget leaves room for the graphs."""
        if not self.capture_graphs:
            return 0
        self.bind(kv_cache_factory(1), 0)
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._forward(self.buckets[-1], self.max_blocks)
        torch.cuda.synchronize(self.device)
        self.reserve_bytes = torch.cuda.max_memory_allocated(self.device) - before
        del self.kv_cache
        torch.cuda.empty_cache()
        return self.reserve_bytes

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per bucket, largest first so the smaller ones reuse its memory pool.
        Every row is padding while capturing: the kernels only write the scratch block."""
        if not self.capture_graphs:
            return
        start = time.perf_counter()
        torch.cuda.synchronize(self.device)
        free_before, _ = torch.cuda.mem_get_info(self.device)
        pool, stream = None, torch.cuda.Stream(self.device)   # warm-up and capture on one stream:
        stream.wait_stream(torch.cuda.current_stream(self.device))   # libraries' per-stream handles exist
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
        if self.graph_pool_bytes > self.reserve_bytes:
            print(f"cycle8_graphs: the graphs took {self.graph_pool_bytes / 2**20:.0f} MiB, more than the "
                  f"{self.reserve_bytes / 2**20:.0f} MiB reserved for them before the KV pool was sized")

    # --- one decode step -----------------------------------------------------------------------

    def run(self, seqs: list[Sequence], sampler: Sampler) -> SamplerOutput:
        """One decode token for every running sequence; tokens come back in `seqs` order."""
        self.collect_changes()
        self._write_rows()
        n = len(self.rows)
        if n != len(seqs):
            raise RuntimeError(f"decode rows ({n}) out of step with the scheduled sequences ({len(seqs)})")
        bucket = bucket_for(self.buckets, n)
        if bucket in self.graphs:
            self.graphs[bucket].replay()
        else:      # eager: the step's own n rows (padding them buys nothing without a replay)
            self._forward(bucket if self.pad_eager else n, self._width(seqs))
        logits = self.model.compute_logits(self.hidden[:n])       # padding rows are never sampled
        full = sampler(logits, self.rows) if self.num_full_rows else None   # the whole sampler: it reads tokens
        if full is not None:
            tokens = torch.tensor(full.token_ids, device=logits.device)
        elif self.num_sampled_rows == 0:
            tokens = sampler.sample(logits)                        # greedy: one argmax on the device
        else:
            tokens = sampler.sample(logits, [s.sampling_params for s in self.rows],
                                    [s.generator for s in self.rows])
        # Advance every row on the device, for the next step: the sampled token is its next input.
        self.input_ids[:n].copy_(tokens)
        self.positions[:n] += 1
        self.context_lens[:n] += 1
        by_row = SamplerOutput(tokens.tolist(), full and full.logprobs)   # the step's one host-device sync
        return by_row.take([self.row_of[s.seq_id] for s in seqs])

    def _width(self, seqs: list[Sequence]) -> int:
        """Block-table columns the step attends over: all of them for in-place kernels; for sdpa only
        the longest sequence's blocks, as cycle 7 does (the dense gather reads every column)."""
        if self.full_width:
            return self.max_blocks
        return self.block_manager.blocks_for(max(map(len, seqs)))

    def _forward(self, bucket: int, width: int) -> None:
        """The decode forward over rows 0..bucket-1 of the static buffers: what a graph records.
        Everything it computes from the buffers (slots, masks) is device work, recorded too."""
        positions, context_lens = self.positions[:bucket], self.context_lens[:bucket]
        tables = self.block_tables[:bucket, :width]
        slot_mapping = tables.gather(1, (positions // self.block_size).unsqueeze(1)).squeeze(1).long() \
            * self.block_size + positions % self.block_size
        cu_seqlens_k = torch.nn.functional.pad(context_lens.cumsum(0, dtype=torch.int32), (1, 0))
        mask = None if self.full_width else \
            (self.key_index[:width * self.block_size].view(1, 1, -1) <= positions.view(-1, 1, 1))
        meta = AttentionMetadata(False, slot_mapping, self.cu_seqlens_q[:bucket + 1], cu_seqlens_k, 1,
                                 width * self.block_size, context_lens, tables,
                                 self.row_index[:bucket].unsqueeze(1), self.row_index[:bucket], mask)
        hidden = self.model(self.input_ids[:bucket], positions, meta, self.kv_cache)
        self.hidden[:bucket].copy_(hidden)

    # --- rows: written only when they change ---------------------------------------------------

    def collect_changes(self) -> None:
        """Take the BlockManager's record of sequences whose blocks changed. A sequence that has no
        blocks and no row (finished in its prefill step) needs nothing; the rest are written at the
        next decode step, when their newest token is known."""
        changed = self.block_manager.changed
        for seq in changed:
            if seq.block_table or seq.seq_id in self.row_of:
                self.pending[seq.seq_id] = seq
            else:
                self.pending.pop(seq.seq_id, None)
        changed.clear()

    def _write_rows(self) -> None:
        """Apply the pending changes: leaving rows are filled by the last rows, joining sequences take
        new rows at the end, and every touched row is written from its sequence in one copy."""
        if not self.pending:
            return
        leaving = {self.row_of[s.seq_id] for s in self.pending.values()
                   if not s.block_table and s.seq_id in self.row_of}
        touched = self._remove_rows(leaving)
        for seq in self.pending.values():
            if not seq.block_table:
                continue
            row = self.row_of.get(seq.seq_id)
            if row is None:                                   # joins: a new row at the end
                row = len(self.rows)
                self.rows.append(seq)
                self.row_of[seq.seq_id] = row
                self.num_sampled_rows += not seq.sampling_params.greedy
                self.num_full_rows += not is_plain(seq.sampling_params)
            touched.add(row)                                  # joined, or gained a block
        self.pending.clear()
        self._copy_rows(sorted(touched))

    def _remove_rows(self, leaving: set[int]) -> set[int]:
        """Drop the leaving rows; the last rows move into the holes. Returns the rows to rewrite:
        the holes (now holding a moved sequence) and the vacated tail (now padding)."""
        if not leaving:
            return set()
        n, n_new = len(self.rows), len(self.rows) - len(leaving)
        for row in leaving:
            seq = self.rows[row]
            del self.row_of[seq.seq_id]
            self.num_sampled_rows -= not seq.sampling_params.greedy
            self.num_full_rows -= not is_plain(seq.sampling_params)
        holes = sorted(r for r in leaving if r < n_new)
        movers = [r for r in range(n_new, n) if r not in leaving]
        for hole, src in zip(holes, movers):
            self.rows[hole] = self.rows[src]
            self.row_of[self.rows[hole].seq_id] = hole
        del self.rows[n_new:]
        return set(holes) | set(range(n_new, n))

    def _copy_rows(self, rows: list[int]) -> None:
        """Write the given rows from their sequences (padding past the last row): staged on the host,
        one non_blocking copy per buffer, scattered on the device."""
        if not rows:
            return
        k, width = len(rows), self.max_blocks
        values, tables = [], []
        for row in rows:
            if row < len(self.rows):
                seq = self.rows[row]
                values.append((seq.last_token, len(seq) - 1, len(seq)))   # the token whose K/V is next
                tables.append(seq.block_table + [self.scratch_block] * (width - len(seq.block_table)))
            else:
                values.append((PAD_TOKEN, 0, 1))                           # attends to the scratch slot
                tables.append([self.scratch_block] * width)
        self.stage_rows[:k] = torch.tensor(rows)
        self.stage_values[:k] = torch.tensor(values)
        self.stage_tables[:k] = torch.tensor(tables, dtype=torch.int32)
        index = self.stage_rows[:k].to(self.device, non_blocking=True)
        staged = self.stage_values[:k].to(self.device, non_blocking=True)
        self.input_ids[index] = staged[:, 0]
        self.positions[index] = staged[:, 1]
        self.context_lens[index] = staged[:, 2].to(torch.int32)
        self.block_tables[index] = self.stage_tables[:k].to(self.device, non_blocking=True)

    def stats(self) -> dict:
        return {"cuda_graphs": bool(self.graphs), "cuda_graphs_note": self.note, "graph_buckets": self.buckets,
                "graph_capture_s": self.capture_s, "cuda_graph_bytes": self.graph_pool_bytes,
                "cuda_graph_reserve_bytes": self.reserve_bytes}
