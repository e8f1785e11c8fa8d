"""The scheduler: decides, every step, which sequences run, and how many of their tokens.

Two queues: `waiting` (not admitted, or preempted) and `running` (holding KV blocks, in admission
order). Each sequence counts its `num_computed_tokens`: the tokens whose K/V is in the cache. A
step has one token budget (`max_num_batched_tokens`), spent as vLLM V1 spends it:
1. running sequences first, oldest first: a decode takes its one token, a prompt that is not yet
   computed takes its next chunk (at most `long_prefill_token_threshold` tokens when set), each
   while the budget lasts;
2. then, unless step 1 had to preempt, waiting sequences first come first served, while they fit
   the sequence limit, the free blocks and what is left of the budget: their first chunk.
Decodes and prompt chunks share the one step, so a long prompt no longer stalls every stream for
its whole prefill: it costs each step at most the budget. A sequence samples its next token only
in the step that computes its last token; a partial prompt samples nothing.
Blocks come per chunk. When a running sequence needs a block and none is free, the most recently
admitted sequence is preempted, mid-prompt or not: its blocks are freed, its computed tokens
forgotten, and it goes back to the front of `waiting`, to be recomputed.
With prefix caching, admission reuses cached blocks: they count as computed, so only the uncached
tail costs budget (the block holding the last token is always computed, so there is a row to
sample). A block is cached once computed; when a waiting prompt's next block is being computed in
this very step by a sequence admitted before it, it waits one step and then hits.
enable_chunked_prefill=False keeps cycle 8's phases: a step admits whole prompts, or decodes.
Speculative decoding (cycle 10, speculative_config): a decode also takes the draft tokens the
n-gram proposer finds for it (proposer.py), as many as the budget and max_tokens leave, so it is a
row of 1 + k tokens in the same mixed step; its drafts are dropped before anyone is preempted for
their blocks. After the step, the drafts the rejection sampler did not accept are rolled back:
they do not count as computed (their K/V slots get overwritten) and the blocks taken only for
them are freed; the prefix cache hashes accepted tokens only.
The scheduler owns the BlockManager, and after each step it advances every sequence's computed
tokens and hands each sampled token to its sequence (postprocess): a sequence that finished
leaves, and the caller gets its outputs.
"""

import time
from collections import deque

from common.engine.outputs import RequestOutput

from .block_manager import BlockManager
from .output_processor import OutputProcessor
from .proposer import NgramProposer
from .sampler import wants_prompt_logprobs
from .sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, config, num_kv_blocks: int, output_processor: OutputProcessor):
        self.block_manager = BlockManager(num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.output_processor = output_processor
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.enable_chunked_prefill = config.enable_chunked_prefill
        self.long_prefill_token_threshold = config.long_prefill_token_threshold   # 0: a chunk may take the budget
        spec = config.speculative_config
        self.proposer = spec and NgramProposer(spec["num_speculative_tokens"], spec["prompt_lookup_min"],
                                               spec["prompt_lookup_max"])
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.reset_stats()

    def add(self, seqs: list[Sequence], stream: bool = False, detokenize: bool = True) -> None:
        """Queue new requests, all or none: one that could never fit refuses the whole call.
        stream: their text is decoded as it comes (delta_text); detokenize=False: no text at all."""
        self.block_manager.check_fits([s.max_len for s in seqs])
        # A prompt that asks for prompt logprobs runs whole (_chunk): it must fit one step's budget.
        whole = [i for i, s in enumerate(seqs) if wants_prompt_logprobs(s) and len(s) > self.max_num_batched_tokens]
        if whole:
            raise ValueError(f"prompt {whole[0]} asks for prompt_logprobs, so its prefill runs whole, and it has more "
                             f"tokens than one step may hold (max_num_batched_tokens={self.max_num_batched_tokens})")
        for seq in seqs:
            self.output_processor.add(seq, stream, detokenize)
            self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], list[int]]:
        """The sequences to run this step and how many new tokens each computes, decodes first."""
        if self.enable_chunked_prefill:
            seqs, num_tokens, preempted = self._schedule_running(self.max_num_batched_tokens)
            if not preempted:   # no room to keep what runs: admitting more would only preempt it again
                more, more_tokens = self._schedule_waiting(self.max_num_batched_tokens - sum(num_tokens))
                seqs, num_tokens = seqs + more, num_tokens + more_tokens
        else:   # cycle 8: whole prompts in a step of their own, else one token for every running sequence
            seqs, num_tokens = self._schedule_waiting(self.max_num_batched_tokens)
            if not seqs:
                seqs, num_tokens, _ = self._schedule_running(len(self.running))
        for seq, n in zip(seqs, num_tokens):
            self.prefill_tokens += n if self._in_prompt(seq, n) else 0
        self._track_peak()
        # One-token rows first, as vLLM orders a batch: a kernel can take them apart in one launch.
        order = sorted(range(len(seqs)), key=lambda i: num_tokens[i] > 1)
        return [seqs[i] for i in order], [num_tokens[i] for i in order]

    def _chunk(self, seq: Sequence, num_computed: int, budget: int) -> int:
        """How many of the sequence's tokens past num_computed this step computes."""
        n = len(seq) - num_computed
        if not self.enable_chunked_prefill or wants_prompt_logprobs(seq):
            return n   # whole: prompt logprobs are gathered from one prefill (sampler.py)
        if self.long_prefill_token_threshold:
            n = min(n, self.long_prefill_token_threshold)
        return min(n, budget)

    def _schedule_running(self, budget: int) -> tuple[list[Sequence], list[int], bool]:
        """Every running sequence's next tokens, oldest first, preempting the newest for blocks."""
        seqs, num_tokens, preempted, i = [], [], False, 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, seq.num_computed_tokens, budget)
            n += self._propose(seq, budget - n)
            while not self.block_manager.can_append(seq, seq.num_computed_tokens + n):
                if seq.spec_token_ids:   # drafts are a bet: never preempt anyone for them
                    n -= len(seq.spec_token_ids)
                    seq.spec_token_ids = []
                    continue
                preempted = True
                self._preempt(self.running.pop())   # the most recently admitted one, maybe seq itself
                if seq.status == SequenceStatus.WAITING:
                    break
            if seq.status == SequenceStatus.WAITING:
                break                                # nothing else to evict: it waits for room
            self.block_manager.append_slot(seq, seq.num_computed_tokens + n)
            seqs.append(seq)
            num_tokens.append(n)
            budget -= n
            i += 1
        return seqs, num_tokens, preempted

    def _propose(self, seq: Sequence, room: int) -> int:
        """Draft tokens for a decode (seq.spec_token_ids); returns how many. At most `room` (the
        budget left), never past max_tokens (a step emits up to drafts + 1 tokens), none for a
        request that asks for logprobs (one sampler row per token: kept simple)."""
        if (self.proposer is None or seq.num_computed_tokens != len(seq) - 1
                or seq.sampling_params.logprobs is not None):
            return 0
        k = min(room, seq.max_len - len(seq), self.proposer.draft_len(seq))
        seq.spec_token_ids = self.proposer.propose(seq.token_ids, k)
        return len(seq.spec_token_ids)

    def _schedule_waiting(self, budget: int) -> tuple[list[Sequence], list[int]]:
        """Admit waiting sequences first come first served, each with its first chunk."""
        bm = self.block_manager
        seqs, num_tokens, computing = [], [], set()
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            hashes = bm.prompt_block_hashes(seq)
            hits = bm.cached_blocks(seq, hashes)
            if len(hits) < len(hashes) and hashes[len(hits)] in computing:
                break                          # its prefix is being computed this step: wait, then hit
            cached = len(hits) * bm.block_size
            n = self._chunk(seq, cached, budget)
            # A whole prompt (prompt logprobs, or no chunking) over what is left waits for a step
            # with room; one longer than the whole budget runs alone rather than never.
            if n > budget and (seqs or budget < self.max_num_batched_tokens):
                break
            if not bm.can_allocate(seq, hits, cached + n):
                break
            bm.allocate(seq, hits, hashes, cached + n)
            computing.update(hashes[len(hits):(cached + n) // bm.block_size])
            seq.status = SequenceStatus.RUNNING
            self.running.append(self.waiting.popleft())
            seqs.append(seq)
            num_tokens.append(n)
            budget -= n
            self.prefix_cache_hit_tokens += seq.num_cached_tokens
            self.prefix_cache_queried_tokens += len(seq)
        return seqs, num_tokens

    @staticmethod
    def _in_prompt(seq: Sequence, n: int) -> bool:
        """Whether these n tokens are prompt work (a prompt, or a preempted sequence's recompute)
        rather than a decode's one token."""
        return not (n == 1 + len(seq.spec_token_ids) and seq.num_computed_tokens == len(seq) - 1
                    and len(seq) > seq.num_prompt_tokens)

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

    def postprocess(self, seqs: list[Sequence], num_tokens: list[int], out) -> list[RequestOutput]:
        """After a step: every sequence advances by the tokens it computed (their K/V is in now);
        each that computed all it has takes its sampled token (the rows of `out`, in order), and one
        that finished leaves the batch now and frees its blocks. One output per sampled sequence: a
        prompt still partly computed gets none."""
        now = time.perf_counter()
        sampled = []
        for seq, n in zip(seqs, num_tokens):
            seq.num_computed_tokens += n - len(seq.spec_token_ids)   # drafts count once accepted
            if not seq.spec_token_ids:
                self.block_manager.cache_full_blocks(seq, seq.num_computed_tokens)
            if seq.num_computed_tokens == len(seq):
                sampled.append(seq)
        outputs = []
        for i, seq in enumerate(sampled):
            length = len(seq)
            output = self.output_processor.process(seq, out, i, now)
            if seq.spec_token_ids:
                self._verified(seq, length, out.accepted_token_ids[i], output.finished)
            if output.finished:
                seq.status = SequenceStatus.FINISHED
                self.block_manager.free(seq)
                self.running.remove(seq)
            outputs.append(output)
        for seq in seqs:
            seq.spec_token_ids = []
        return outputs

    def _verified(self, seq: Sequence, length: int, accepted: list[int], finished: bool) -> None:
        """Roll a verified sequence back to what it accepted: only the K/V of its tokens up to the
        last accepted draft counts as computed (`length`: its tokens before this step's), only
        those are hashed for the prefix cache, and a block that held nothing but rejected drafts
        goes back to the pool, as if they had never been proposed. Then count, and adapt."""
        seq.num_computed_tokens = min(len(seq), length + len(accepted))
        self.block_manager.cache_full_blocks(seq, seq.num_computed_tokens)
        if not finished:
            self.block_manager.trim(seq, seq.num_computed_tokens)
        drafts = len(seq.spec_token_ids)
        self.proposer.record(seq, drafts, len(accepted))
        self.spec_num_drafts += 1
        self.spec_num_draft_tokens += drafts
        self.spec_num_accepted_tokens += len(accepted)
        for j in range(len(accepted)):
            self.spec_accepted_per_position[j] += 1

    # --- what the engine reports -----------------------------------------------------------------

    def _track_peak(self) -> None:
        """The most blocks held at once, and the tokens they held then (utilization at the peak)."""
        used = self.block_manager.num_used_blocks
        if used > self.peak_blocks:
            self.peak_blocks = used
            # a partial prompt holds blocks only for what is computed by the end of this step
            self.tokens_at_peak = sum(min(len(s), len(s.block_table) * self.block_manager.block_size)
                                      for s in self.running)

    def load(self) -> dict:
        """What the engine holds now (the queues, the pool) and its counters: a server's gauges."""
        return {"num_running": len(self.running), "num_waiting": len(self.waiting),
                **self.block_manager.stats(), **self.stats()}

    def reset_stats(self) -> None:
        self.num_preemptions = self.peak_blocks = self.tokens_at_peak = 0
        self.prefix_cache_hit_tokens = self.prefix_cache_queried_tokens = self.prefill_tokens = 0
        self.spec_num_drafts = self.spec_num_draft_tokens = self.spec_num_accepted_tokens = 0
        self.spec_accepted_per_position = [0] * (self.proposer.k if self.proposer else 0)

    def stats(self) -> dict:
        return {"preemptions": self.num_preemptions, "max_num_seqs": self.max_num_seqs,
                "max_num_batched_tokens": self.max_num_batched_tokens,
                "kv_block_utilization": self.tokens_at_peak / max(1, self.peak_blocks * self.block_manager.block_size),
                "prefix_cache_hit_tokens": self.prefix_cache_hit_tokens,
                "prefix_cache_queried_tokens": self.prefix_cache_queried_tokens,
                "prefix_cache_hit_rate": self.prefix_cache_hit_tokens / max(1, self.prefix_cache_queried_tokens),
                "prefill_tokens": self.prefill_tokens, **self.spec_stats()}

    def spec_stats(self) -> dict:
        """vLLM's speculative decoding counters: verifications (num_drafts), draft tokens proposed
        and accepted, mean acceptance length (tokens per verification, the bonus included: 1 +
        accepted / drafts) and the acceptance rate at each draft position. Empty when off."""
        if self.proposer is None:
            return {}
        n = max(1, self.spec_num_drafts)
        return {"spec_decode_num_drafts": self.spec_num_drafts,
                "spec_decode_num_draft_tokens": self.spec_num_draft_tokens,
                "spec_decode_num_accepted_tokens": self.spec_num_accepted_tokens,
                "spec_decode_mean_acceptance_length": 1 + self.spec_num_accepted_tokens / n,
                "spec_decode_acceptance_per_position": [a / n for a in self.spec_accepted_per_position],
                "spec_decode_num_accepted_tokens_per_pos": list(self.spec_accepted_per_position)}

    def describe(self, seqs: list[Sequence], num_tokens: list[int]) -> str:
        """One line for --trace (before the step runs): its decodes, its prompt chunks as
        id:first_token+tokens/length, and the pool and queues around it."""
        bm = self.block_manager
        chunks = [f"{s.seq_id}:{s.num_computed_tokens}+{n}/{len(s)}"
                  for s, n in zip(seqs, num_tokens) if self._in_prompt(s, n)]
        decodes = [f"{s.seq_id}+{len(s.spec_token_ids)}" if s.spec_token_ids else s.seq_id   # id+drafts
                   for s, n in zip(seqs, num_tokens) if not self._in_prompt(s, n)]
        kind = "mixed  " if chunks and decodes else "prefill" if chunks else "decode "
        return (f"{kind} decodes {decodes} chunks {chunks} tokens {sum(num_tokens)} "
                f"blocks used {bm.num_used_blocks}/{bm.num_blocks} free {bm.num_free_blocks} "
                f"waiting {len(self.waiting)} preemptions {self.num_preemptions}")
