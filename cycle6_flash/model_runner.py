"""The model runner: owns the model and its KV pool, and runs one scheduled step on them.

ModelRunner(config, source) builds the model (on the meta device, then filled with the weights),
sizes the KV pool as kv_cache.py plans it (on CUDA by running the largest steps the engine can
take once, on dummy tokens) and allocates it. run() turns a scheduled step into tensors, runs the
model once and samples. Prefill packs every admitted prompt into one flat batch without padding;
decode gathers each running sequence's newest token. Both end up as the same flat layout
(input_ids, positions, slot_mapping over N tokens, plus per-sequence block tables), so the model
has one code path.
"""

import sys
from itertools import accumulate

import torch

from common.engine.cpu_gemm import pack_linear_weights
from common.engine.cpu_memory import keep_freed_memory
from common.engine.memory import head_dim_of, weight_bytes
from common.engine.model_source import load_weights

from .attention import DENSE_LAYOUT, select_backend
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
        # The attention backend for this model's head size, before any weight loads: one asked for
        # that cannot take it is refused; a default choice falls back, with a note (attention.py).
        self.attention_backend, self.attention_backend_note = select_backend(
            config.device, config.dtype, config.attention_backend, head_dim_of(source.config))
        self.model = build_model(source, config.device, config.dtype, self.attention_backend)
        self.dense_layout = self.attention_backend in DENSE_LAYOUT   # build sdpa's [B, Tq] layout
        # On a CPU: weights packed once for oneDNN, freed memory kept for the next step (chapter 1).
        self.linear_backend = pack_linear_weights(self.model, config.device, config.dtype, config.cpu_fast_paths)
        self.malloc = keep_freed_memory(config.device, config.cpu_fast_paths)
        self.sampler = Sampler(config.device, config.seed, eos_token_ids)   # eos: for min_tokens
        self.kv_pool = self._plan_kv_pool()
        self.num_kv_blocks = self.kv_pool["num_kv_blocks"]
        self.kv_cache = self._kv_cache(self.num_kv_blocks)
        say_fallbacks(self.attention_backend_note)

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
        for lengths, is_prefill in profile_batches(self.config.max_num_seqs, self.config.max_num_batched_tokens,
                                                   self.model.config.max_position_embeddings):
            seqs = [Sequence(i, None, [0] * n, greedy, None) for i, n in enumerate(lengths)]
            for seq in seqs:
                seq.block_table = [0] * -(-len(seq) // self.block_size)   # all on scratch block 0
            self.run(seqs, is_prefill, kv_cache=scratch)

    def stats(self) -> dict:
        return {"weight_bytes": weight_bytes(self.model), "linear_backend": self.linear_backend, "malloc": self.malloc,
                "kv_cache_pool_bytes": self.kv_cache.nbytes,
                "kv_pool": self.kv_pool,   # how the pool was sized: budget, model, activation peak, cap
                "attention_backend": self.attention_backend,
                "attention_backend_note": self.attention_backend_note}   # why a fallback ran, or None

    # --- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool, kv_cache=None) -> SamplerOutput:
        """One forward over the step's tokens; returns one sampled token per sequence
        (and the logprobs of the sequences that ask). kv_cache: the pool it reads and writes,
        None for the engine's own (the start-up profile passes a one-block scratch pool)."""
        input_ids, positions, meta = self._prepare(seqs, is_prefill)
        hidden = self.model(input_ids, positions, meta, self.kv_cache if kv_cache is None else kv_cache)
        last = hidden[meta.cu_seqlens_q[1:].long() - 1]   # each sequence's last token
        logits = self.model.compute_logits(last)
        out = self.sampler(logits, seqs)
        prompt_rows = lambda i: hidden[int(meta.cu_seqlens_q[i]):int(meta.cu_seqlens_q[i + 1])]   # seqs[i]'s positions
        out.prompt_logprobs = prompt_logprobs_for(seqs, self.model.compute_logits, prompt_rows)
        return out

    def _prepare(self, seqs: list[Sequence], is_prefill: bool):
        # Prefill computes every token a sequence has (a preempted one: its prompt and what it had
        # generated) past its cached prefix; decode only the newest token, whose K/V is not stored
        # yet. Attention reads the cached prefix through the block table like any other key.
        starts = [s.num_cached_tokens if is_prefill else len(s) - 1 for s in seqs]
        input_ids, positions, slots, seqlens = [], [], [], [0]
        bs = self.block_size
        for seq, start in zip(seqs, starts):
            input_ids += seq.token_ids[start:]
            positions += range(start, len(seq))
            # slot = where token p's K/V lives in the flat pool: its block * block_size + offset
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, len(seq))]
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
        keys = torch.arange(width * self.block_size, device=self.device)
        mask = keys.view(1, 1, -1) <= positions[query_index].unsqueeze(-1)
        return query_index, token_index, mask


def say_fallbacks(*notes: str | None) -> None:
    """A fallback nobody asked for is said once, when the engine starts; stats keep the note."""
    for note in filter(None, notes):
        print(f"vllm-learn: {note}", file=sys.stderr, flush=True)


def build_model(source, device: torch.device, dtype: torch.dtype, attention_backend: str) -> CausalLM:
    # Build on the meta device (no memory, no random init), then allocate and fill with the weights.
    with torch.device("meta"):
        model = CausalLM(source.config, attention_backend)
    model = model.to(dtype=dtype).to_empty(device=device)
    if source.config.tie_word_embeddings:  # to_empty breaks the tie: restore it
        model.lm_head.weight = model.model.embed_tokens.weight
    load_weights(model, source)
    return model.eval()
