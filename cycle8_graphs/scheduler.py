"""The scheduler: decides, every step, which sequences run.

Two queues: `waiting` (not admitted, or preempted) and `running` (holding KV blocks, in admission
order). A step is either
- a prefill step: admit waiting sequences first come first served while they fit the sequence
  limit, the token budget and the free blocks; their whole prompts run in one flat batch; or
- a decode step: one new token for every running sequence.
A finished sequence leaves at once and frees its blocks, so a waiting one can join the next step.
When a running sequence needs a block and none is free, the most recently admitted sequence is
preempted: its blocks are freed and it goes back to the front of `waiting`, to be recomputed.
With prefix caching, admission reuses cached blocks, so only the uncached tail of a prompt counts
against the token budget (and a re-admitted sequence may hit its own earlier blocks). A block is
cached only once computed, so when a waiting prompt's next block is being computed in this very
step by a sequence admitted before it, it waits one step and then hits, instead of computing the
same prefix twice.
The scheduler owns the BlockManager, and after each step it hands every sampled token to its
sequence (postprocess): a sequence that finished leaves, and the caller gets its outputs.
"""

import time
from collections import deque

from common.engine.outputs import RequestOutput

from .block_manager import BlockManager
from .output_processor import OutputProcessor
from .sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, config, num_kv_blocks: int, output_processor: OutputProcessor):
        self.block_manager = BlockManager(num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.output_processor = output_processor
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.reset_stats()

    def add(self, seqs: list[Sequence], stream: bool = False, detokenize: bool = True) -> None:
        """Queue new requests, all or none: one that could never fit refuses the whole call.
        stream: their text is decoded as it comes (delta_text); detokenize=False: no text at all."""
        self.block_manager.check_fits([s.max_len for s in seqs])
        for seq in seqs:
            self.output_processor.add(seq, stream, detokenize)
            self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns the sequences to run this step and whether it is a prefill step."""
        admitted = self._admit()
        seqs, is_prefill = (admitted, True) if admitted else (self._decode(), False)
        self._track_peak()
        return seqs, is_prefill

    def _admit(self) -> list[Sequence]:
        bm = self.block_manager
        admitted, tokens, computing = [], 0, set()
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hashes = bm.prompt_block_hashes(seq)
            hits = bm.cached_blocks(seq, hashes)
            if len(hits) < len(hashes) and hashes[len(hits)] in computing:
                break                          # its prefix is being computed this step: wait, then hit
            new_tokens = len(seq) - len(hits) * bm.block_size
            # A prompt longer than the whole budget still runs, alone, rather than never.
            if admitted and tokens + new_tokens > self.max_num_batched_tokens:
                break
            if not bm.can_allocate(seq, hits):
                break
            bm.allocate(seq, hits, hashes)
            computing.update(hashes[len(hits):])
            seq.status = SequenceStatus.RUNNING
            self.running.append(self.waiting.popleft())
            admitted.append(seq)
            tokens += new_tokens
            self.prefill_tokens += len(seq) - seq.num_cached_tokens
            self.prefix_cache_hit_tokens += seq.num_cached_tokens
            self.prefix_cache_queried_tokens += len(seq)
        return admitted

    def _decode(self) -> list[Sequence]:
        scheduled = []
        while self.running:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())   # the most recently admitted one
                else:
                    self._preempt(seq)                  # nothing else to evict: wait for room
                    break
            else:
                self.block_manager.append_slot(seq)
                scheduled.append(seq)
        self.running.extend(scheduled)
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def abort(self, seq_id: int) -> Sequence | None:
        """Take a request out, waiting or running, and free its blocks now; None if it is not here."""
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.seq_id == seq_id:
                    queue.remove(seq)
                    self.block_manager.free(seq)
                    seq.status = SequenceStatus.FINISHED
                    return seq
        return None

    def postprocess(self, seqs: list[Sequence], out) -> list[RequestOutput]:
        """After a step: every sequence takes its sampled token (row i of `out`); one that finished
        leaves the batch now and its blocks go back to the pool. One output per sequence."""
        now = time.perf_counter()
        outputs = []
        for i, seq in enumerate(seqs):
            self.block_manager.cache_full_blocks(seq, num_computed_tokens=len(seq))   # their K/V is in now
            output = self.output_processor.process(seq, out, i, now)
            if output.finished:
                seq.status = SequenceStatus.FINISHED
                self.block_manager.free(seq)
                self.running.remove(seq)
            outputs.append(output)
        return outputs

    # --- what the engine reports -----------------------------------------------------------------

    def _track_peak(self) -> None:
        """The most blocks held at once, and the tokens they held then (utilization at the peak)."""
        used = self.block_manager.num_used_blocks
        if used > self.peak_blocks:
            self.peak_blocks = used
            self.tokens_at_peak = sum(len(s) for s in self.running)

    def load(self) -> dict:
        """What the engine holds now (the queues, the pool) and its counters: a server's gauges."""
        return {"num_running": len(self.running), "num_waiting": len(self.waiting),
                **self.block_manager.stats(), **self.stats()}

    def reset_stats(self) -> None:
        self.num_preemptions = self.peak_blocks = self.tokens_at_peak = 0
        self.prefix_cache_hit_tokens = self.prefix_cache_queried_tokens = self.prefill_tokens = 0

    def stats(self) -> dict:
        return {"preemptions": self.num_preemptions, "max_num_seqs": self.max_num_seqs,
                "max_num_batched_tokens": self.max_num_batched_tokens,
                "kv_block_utilization": self.tokens_at_peak / max(1, self.peak_blocks * self.block_manager.block_size),
                "prefix_cache_hit_tokens": self.prefix_cache_hit_tokens,
                "prefix_cache_queried_tokens": self.prefix_cache_queried_tokens,
                "prefix_cache_hit_rate": self.prefix_cache_hit_tokens / max(1, self.prefix_cache_queried_tokens),
                "prefill_tokens": self.prefill_tokens}

    def describe(self, seqs: list[Sequence], is_prefill: bool) -> str:
        """One line for --trace: what this step runs, and the pool and queues around it."""
        bm = self.block_manager
        kind = "prefill" if is_prefill else "decode "
        tokens = sum(len(s) - s.num_cached_tokens for s in seqs) if is_prefill else len(seqs)
        cached = f" cached {[s.num_cached_tokens for s in seqs]}" if is_prefill else ""
        return (f"{kind} seqs {[s.seq_id for s in seqs]}{cached} tokens {tokens} "
                f"blocks used {bm.num_used_blocks}/{bm.num_blocks} free {bm.num_free_blocks} "
                f"waiting {len(self.waiting)} preemptions {self.num_preemptions}")
