"""The engine: load a model, then generate with static batches over a paged KV cache.

The KV cache is one pool of fixed-size blocks allocated at start-up. A sequence takes blocks as it
grows (a new one only when its last block is full) and returns them the moment it finishes, so the
memory held follows the tokens actually stored instead of a worst-case reservation.

Batching is still static: requests are taken in order into groups of up to `max_num_seqs` whose
worst case fits the pool (without preemption, a group must never run out of blocks midway), and
the next group starts only after the slowest member of this one finishes.
"""

import time

import torch
from tqdm import tqdm

from common.engine.device import resolve_device, resolve_dtype
from common.engine.inputs import prepare_requests
from common.engine.memory import weight_bytes
from common.engine.metrics import peak_memory_bytes, reset_peak_memory
from common.engine.model_source import eos_token_ids, load_tokenizer, load_weights, resolve_model
from common.engine.outputs import RequestMetrics, RequestOutput

from .block_manager import BlockManager
from .kv_cache import (GPU_MEMORY_UTILIZATION, PagedKVCache, block_bytes, check_pool_options,
                       plan_kv_pool, profile_activation_peak, profile_batches)
from .model import AttentionMetadata, CausalLM
from .sampler import Sampler
from .sampling_params import SamplingParams
from .sequence import Sequence, SequenceStatus


# The same batch limits as the continuous-batching cycles, so every cycle is measured alike.
# Static batches have no token budget; the pool is sized for a prefill of PROFILE_TOKENS tokens
# (cycle 4's budget), so a static batch with more prompt tokens than that can need more memory
# than was set aside for activations. Cycle 4's scheduler is what bounds a step.
DEFAULTS = {"cuda": dict(max_num_seqs=256), "cpu": dict(max_num_seqs=64)}
PROFILE_TOKENS = {"cuda": 16384, "cpu": 4096}

class LLM:
    def __init__(self, model: str, device=None, dtype=None, weights: str = "auto",
                 max_num_seqs: int | None = None, block_size: int = 16, num_kv_blocks: int | None = None,
                 kv_cache_memory_bytes: int | None = None,
                 gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION,
                 seed: int | None = None):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        max_num_seqs = max_num_seqs or DEFAULTS["cuda" if self.device.type == "cuda" else "cpu"]["max_num_seqs"]
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        check_pool_options(num_kv_blocks, kv_cache_memory_bytes, gpu_memory_utilization)
        self.source = resolve_model(model, weights)
        self.config = self.source.config
        self.tokenizer = load_tokenizer(self.source)
        self.eos_token_ids = set(eos_token_ids(self.source, self.tokenizer))
        self.max_num_seqs = max_num_seqs
        self.model = _build_model(self.config, self.source, self.device, self.dtype)
        self.sampler = Sampler(self.device, seed)
        self.kv_cache, self.block_manager = self._allocate_kv_cache(
            block_size, num_kv_blocks, kv_cache_memory_bytes, gpu_memory_utilization, max_num_seqs,
            PROFILE_TOKENS["cuda" if self.device.type == "cuda" else "cpu"])
        self.stats: dict = {}

    def _allocate_kv_cache(self, block_size, num_kv_blocks, kv_cache_memory_bytes, gpu_memory_utilization,
                           max_num_seqs, max_num_batched_tokens):
        attn = self.model.model.layers[0].self_attn
        layers = self.config.num_hidden_layers
        per_block = block_bytes(layers, block_size, attn.num_kv_heads, attn.head_dim, self.dtype)
        max_blocks = max_num_seqs * -(-self.config.max_position_embeddings // block_size)
        self.kv_pool = plan_kv_pool(
            per_block, self.device, max_blocks, num_kv_blocks, kv_cache_memory_bytes, gpu_memory_utilization,
            profile=lambda: profile_activation_peak(
                self.device, lambda: self._profile_run(block_size, max_num_seqs, max_num_batched_tokens)))
        manager = BlockManager(self.kv_pool["num_kv_blocks"], block_size)
        cache = PagedKVCache(layers, self.kv_pool["num_kv_blocks"], block_size, attn.num_kv_heads, attn.head_dim,
                             self.dtype, self.device)
        return cache, manager

    @torch.inference_mode()
    def _profile_run(self, block_size: int, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        """Run a large prefill and decode step once, on dummy tokens, to measure their memory.

        Every dummy sequence's block table points at block 0 of a one-block scratch pool: the steps
        read and write as many K/V slots as real ones would, but nothing of the real pool (which
        does not exist yet); the scratch pool and block manager are dropped when this returns.
        """
        attn = self.model.model.layers[0].self_attn
        scratch = PagedKVCache(self.config.num_hidden_layers, 1, block_size, attn.num_kv_heads, attn.head_dim,
                               self.dtype, self.device)
        real, self.block_manager = getattr(self, "block_manager", None), BlockManager(1, block_size)  # _prepare_* read it
        greedy = SamplingParams(temperature=0, max_tokens=1)
        try:
            for lengths, is_prefill in profile_batches(max_num_seqs, max_num_batched_tokens,
                                                       self.config.max_position_embeddings):
                seqs = [Sequence(i, None, [0] * n, greedy, None) for i, n in enumerate(lengths)]
                for seq in seqs:
                    seq.block_table = [0] * -(-len(seq) // block_size)   # all on scratch block 0
                prepare = self._prepare_prefill if is_prefill else self._prepare_decode
                hidden = self.model(*prepare(seqs), scratch)
                self.sampler(self.model.compute_logits(hidden[:, -1]), [greedy] * len(seqs), [None] * len(seqs))
        finally:
            self.block_manager = real

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = False) -> list[RequestOutput]:
        requests = prepare_requests(prompts, sampling_params, self.tokenizer, self.config.vocab_size,
                                    self.config.max_position_embeddings, SamplingParams)
        seqs = [Sequence(i, r.prompt, r.prompt_token_ids, r.sampling_params,
                         _request_generator(r.sampling_params.seed, self.device)) for i, r in enumerate(requests)]
        self._check_fits_pool(seqs)
        reset_peak_memory(self.device)
        start = time.perf_counter()
        self._peak_blocks, self._tokens_at_peak = 0, 0
        self._step_times = []
        bar = tqdm(total=len(seqs), disable=not use_tqdm, desc="requests")
        for group in self._groups(seqs):
            self._run_group(group, start)
            bar.update(len(group))
        bar.close()
        wall = time.perf_counter() - start
        self.stats = self._stats(seqs, wall)
        return [self._output(seq) for seq in seqs]

    def _check_fits_pool(self, seqs: list[Sequence]) -> None:
        bm = self.block_manager
        for seq in seqs:
            if bm.blocks_for(seq.max_len) > bm.num_blocks:
                raise ValueError(f"prompt {seq.seq_id} needs up to {bm.blocks_for(seq.max_len)} KV blocks "
                                 f"(prompt + max_tokens), the whole pool has {bm.num_blocks}: "
                                 f"lower max_tokens or give the cache more blocks (num_kv_blocks)")

    def _groups(self, seqs: list[Sequence]):
        """Static batches, in order: up to max_num_seqs requests whose worst case fits the pool together."""
        group, worst = [], 0
        for seq in seqs:
            need = self.block_manager.blocks_for(seq.max_len)
            if group and (len(group) == self.max_num_seqs or worst + need > self.block_manager.num_blocks):
                yield group
                group, worst = [], 0
            group.append(seq)
            worst += need
        if group:
            yield group

    @torch.inference_mode()
    def _run_group(self, group: list[Sequence], start: float) -> None:
        for seq in group:
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
        self._track_peak(group)
        last = time.perf_counter() - start
        hidden = self.model(*self._prepare_prefill(group), self.kv_cache)
        live = group
        while True:
            logits = self.model.compute_logits(hidden[:, -1])
            next_tokens = self.sampler(logits, [s.sampling_params for s in live], [s.generator for s in live])
            now = time.perf_counter() - start
            self._step_times.append([max(len(s) for s in live), now - last])
            last = now
            self._postprocess(live, next_tokens, now)
            live = [s for s in live if not s.is_finished]
            if not live:
                break
            # Decode: only the unfinished sequences run (their cache is paged, not one batch
            # tensor); still no new request joins until the whole group is done.
            for seq in live:
                self.block_manager.append_slot(seq)
            self._track_peak(live)
            hidden = self.model(*self._prepare_decode(live), self.kv_cache)

    def _postprocess(self, seqs: list[Sequence], next_tokens: list[int], now: float) -> None:
        for seq, token in zip(seqs, next_tokens):
            seq.token_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = self._finish_reason(seq.output_token_ids, seq.sampling_params)
            if reason:
                seq.finish_reason, seq.finish_time = reason, now
                seq.status = SequenceStatus.FINISHED
                self.block_manager.free(seq)

    def _finish_reason(self, token_ids: list[int], params: SamplingParams) -> str | None:
        if not params.ignore_eos and token_ids[-1] in self.eos_token_ids:
            return "stop"
        if len(token_ids) >= params.max_tokens:
            return "length"
        return None

    def _prepare_prefill(self, seqs: list[Sequence]):
        """Left-padded prompts [B, T]; only the real tokens are written to the cache."""
        tokens = [s.token_ids for s in seqs]
        longest = max(len(t) for t in tokens)
        input_ids = torch.tensor([[0] * (longest - len(t)) + t for t in tokens], device=self.device)
        positions = [[0] * (longest - len(t)) + list(range(len(t))) for t in tokens]
        token_index = [b * longest + longest - len(t) + i for b, t in enumerate(tokens) for i in range(len(t))]
        slots = [self.block_manager.slot(s, i) for s in seqs for i in range(len(s))]
        return input_ids, *self._metadata(seqs, positions, token_index, slots)

    def _prepare_decode(self, seqs: list[Sequence]):
        """One token per sequence, [B, 1]: its newest token, at position len - 1."""
        input_ids = torch.tensor([[s.last_token] for s in seqs], device=self.device)
        positions = [[len(s) - 1] for s in seqs]
        slots = [self.block_manager.slot(s, len(s) - 1) for s in seqs]
        return input_ids, *self._metadata(seqs, positions, None, slots)

    def _metadata(self, seqs, positions, token_index, slots):
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], device=self.device)
        positions = torch.tensor(positions, device=self.device)
        keys = torch.arange(width * self.block_manager.block_size, device=self.device)
        # A query sees its own sequence's keys up to its own position; padding queries (position 0)
        # see key 0 only, which keeps their softmax finite. Their outputs are never used.
        mask = keys.view(1, 1, -1) <= positions.unsqueeze(-1)
        index = None if token_index is None else torch.tensor(token_index, device=self.device)
        meta = AttentionMetadata(index, torch.tensor(slots, device=self.device), tables, mask)
        return positions, meta

    def _track_peak(self, live: list[Sequence]) -> None:
        used = self.block_manager.num_used_blocks
        if used > self._peak_blocks:
            self._peak_blocks, self._tokens_at_peak = used, sum(len(s) for s in live)

    def _stats(self, seqs: list[Sequence], wall: float) -> dict:
        bm, per_block = self.block_manager, self.kv_cache.bytes_per_block
        return {
            "weight_bytes": weight_bytes(self.model),
            "kv_cache_peak_bytes": self._peak_blocks * per_block,   # blocks held by live sequences
            "kv_cache_pool_bytes": self.kv_cache.nbytes,
            "num_kv_blocks": bm.num_blocks,
            "kv_pool": self.kv_pool,       # how the pool was sized: budget, model, activation peak, cap
            "block_size": bm.block_size,
            "free_kv_blocks": bm.num_free_blocks,
            "kv_block_utilization": self._tokens_at_peak / max(1, self._peak_blocks * bm.block_size),
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "output_tokens": sum(len(s.output_token_ids) for s in seqs),
            "wall_s": wall,
            "max_num_seqs": self.max_num_seqs,
            "step_times": self._step_times,  # [tokens of the longest sequence in the step, seconds], per step
        }

    def _output(self, seq: Sequence) -> RequestOutput:
        tokens = seq.output_token_ids
        return RequestOutput(seq.seq_id, seq.prompt, seq.token_ids[:seq.num_prompt_tokens], tokens,
                             self.tokenizer.decode(tokens, skip_special_tokens=True), seq.finish_reason,
                             RequestMetrics(seq.first_token_time, seq.finish_time))


def _build_model(config, source, device, dtype) -> CausalLM:
    # Build on the meta device (no memory, no random init), then allocate and fill with the weights.
    with torch.device("meta"):
        model = CausalLM(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty breaks the tie: restore it
        model.lm_head.weight = model.model.embed_tokens.weight
    load_weights(model, source)
    return model.eval()


def _request_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
