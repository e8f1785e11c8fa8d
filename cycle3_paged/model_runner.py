"""The model runner: owns the model and its KV pool, and runs one step of a static batch on them.

ModelRunner(config, source) builds the model (on the meta device, then filled with the weights),
sizes the KV pool as kv_cache.py plans it (on CUDA by running the largest steps the engine can
take once, on dummy tokens) and allocates it. run() turns a step into tensors, runs the model once
and samples. Prefill is the left-padded prompts, [B, T], of which only the real tokens are written
to the pool; decode is each sequence's newest token, [B, 1]. Both say where each token's K/V goes
(slot_mapping) and where each sequence's keys are (block_tables).
"""

import torch

from common.engine.cpu_gemm import pack_linear_weights
from common.engine.cpu_memory import keep_freed_memory
from common.engine.memory import weight_bytes
from common.engine.model_source import load_weights

from .config import Config
from .kv_cache import PagedKVCache, block_bytes, plan_kv_pool, profile_activation_peak, profile_batches
from .model import AttentionMetadata, CausalLM
from .sampler import Sampler, SamplerOutput, prompt_logprobs_for
from .sampling_params import SamplingParams
from .sequence import Sequence


class ModelRunner:
    def __init__(self, config: Config, source, eos_token_ids=()):
        self.config = config
        self.device, self.block_size = config.device, config.block_size
        self.model = build_model(source, config.device, config.dtype)
        # On a CPU: weights packed once for oneDNN, freed memory kept for the next step (chapter 1).
        self.linear_backend = pack_linear_weights(self.model, config.device, config.dtype, config.cpu_fast_paths)
        self.malloc = keep_freed_memory(config.device, config.cpu_fast_paths)
        self.sampler = Sampler(config.device, config.seed, eos_token_ids)   # eos: for min_tokens
        self.kv_pool = self._plan_kv_pool()
        self.num_kv_blocks = self.kv_pool["num_kv_blocks"]
        self.kv_cache = self._kv_cache(self.num_kv_blocks)

    # --- start-up: size and allocate the KV pool ----------------------------------------------

    def _kv_cache(self, num_blocks: int) -> PagedKVCache:
        attn = self.model.model.layers[0].self_attn
        return PagedKVCache(self.model.config.num_hidden_layers, num_blocks, self.block_size, attn.num_kv_heads,
                            attn.head_dim, self.config.dtype, self.device)

    def _plan_kv_pool(self) -> dict:
        c, attn = self.config, self.model.model.layers[0].self_attn
        per_block = block_bytes(self.model.config.num_hidden_layers, self.block_size, attn.num_kv_heads,
                                attn.head_dim, c.dtype)
        max_blocks = c.max_num_seqs * -(-self.model.config.max_position_embeddings // self.block_size)
        return plan_kv_pool(per_block, self.device, max_blocks, c.num_kv_blocks, c.kv_cache_memory_bytes,
                            c.gpu_memory_utilization,
                            profile=lambda: profile_activation_peak(self.device, self._profile_run))

    def _profile_run(self) -> None:
        """Run the largest prefill and decode steps once, on dummy tokens, to measure their memory.

        Every dummy sequence's block table points at block 0 of a one-block scratch pool: the steps
        read and write as many K/V slots as real ones would, but nothing of the real pool (which
        does not exist yet), and the scratch pool is dropped when this returns.
        """
        scratch = self._kv_cache(1)
        greedy = SamplingParams(temperature=0, max_tokens=1)
        for lengths, is_prefill in profile_batches(self.config.max_num_seqs, self.config.profile_tokens,
                                                   self.model.config.max_position_embeddings):
            seqs = [Sequence(i, None, [0] * n, greedy, None) for i, n in enumerate(lengths)]
            for seq in seqs:
                seq.block_table = [0] * -(-len(seq) // self.block_size)   # all on scratch block 0
            self.run(seqs, is_prefill, kv_cache=scratch)

    def stats(self) -> dict:
        return {"weight_bytes": weight_bytes(self.model), "linear_backend": self.linear_backend, "malloc": self.malloc,
                "kv_cache_pool_bytes": self.kv_cache.nbytes,
                "kv_pool": self.kv_pool}   # how the pool was sized: budget, model, activation peak, cap

    # --- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool, kv_cache=None) -> SamplerOutput:
        """One forward over the step's tokens; returns one sampled token per sequence
        (and the logprobs of the sequences that ask). kv_cache: the pool it reads and writes,
        None for the engine's own (the start-up profile passes a one-block scratch pool)."""
        input_ids, positions, meta = self._prepare_prefill(seqs) if is_prefill else self._prepare_decode(seqs)
        hidden = self.model(input_ids, positions, meta, self.kv_cache if kv_cache is None else kv_cache)
        logits = self.model.compute_logits(hidden[:, -1])
        out = self.sampler(logits, seqs)
        prompt_rows = lambda i: hidden[i, -len(seqs[i]):]   # seqs[i]'s positions
        out.prompt_logprobs = prompt_logprobs_for(seqs, self.model.compute_logits, prompt_rows)
        return out

    def _prepare_prefill(self, seqs: list[Sequence]):
        """Left-padded prompts [B, T]; only the real tokens are written to the cache."""
        tokens = [s.token_ids for s in seqs]
        longest = max(len(t) for t in tokens)
        input_ids = torch.tensor([[0] * (longest - len(t)) + t for t in tokens], device=self.device)
        positions = [[0] * (longest - len(t)) + list(range(len(t))) for t in tokens]
        token_index = [b * longest + longest - len(t) + i for b, t in enumerate(tokens) for i in range(len(t))]
        slots = [self._slot(s, i) for s in seqs for i in range(len(s))]
        return input_ids, *self._metadata(seqs, positions, token_index, slots)

    def _prepare_decode(self, seqs: list[Sequence]):
        """One token per sequence, [B, 1]: its newest token, at position len - 1."""
        input_ids = torch.tensor([[s.last_token] for s in seqs], device=self.device)
        positions = [[len(s) - 1] for s in seqs]
        slots = [self._slot(s, len(s) - 1) for s in seqs]
        return input_ids, *self._metadata(seqs, positions, None, slots)

    def _slot(self, seq: Sequence, position: int) -> int:
        """Where token `position`'s K/V lives in the flat pool: its block * block_size + offset."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _metadata(self, seqs, positions, token_index, slots):
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], device=self.device)
        positions = torch.tensor(positions, device=self.device)
        keys = torch.arange(width * self.block_size, device=self.device)
        # A query sees its own sequence's keys up to its own position; padding queries (position 0)
        # see key 0 only, which keeps their softmax finite. Their outputs are never used.
        mask = keys.view(1, 1, -1) <= positions.unsqueeze(-1)
        index = None if token_index is None else torch.tensor(token_index, device=self.device)
        meta = AttentionMetadata(index, torch.tensor(slots, device=self.device), tables, mask)
        return positions, meta


def build_model(source, device: torch.device, dtype: torch.dtype) -> CausalLM:
    # Build on the meta device (no memory, no random init), then allocate and fill with the weights.
    with torch.device("meta"):
        model = CausalLM(source.config)
    model = model.to(dtype=dtype).to_empty(device=device)
    if source.config.tie_word_embeddings:  # to_empty breaks the tie: restore it
        model.lm_head.weight = model.model.embed_tokens.weight
    load_weights(model, source)
    return model.eval()
