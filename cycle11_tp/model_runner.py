"""The model runner: owns the model and its KV pool, and runs one scheduled step on them.

ModelRunner(config, source) builds the model (on the meta device, then filled with the weights),
sizes the KV pool as kv_cache.py plans it (on CUDA by running the largest steps the engine can
take once, on dummy tokens) and allocates it. run() turns a scheduled step into tensors, runs the
model once and samples. Each sequence computes its tokens past num_computed_tokens, as many as the
scheduler gave it: a decode's newest token, or a chunk of its prompt. All of them go into one flat
batch without padding (input_ids, positions, slot_mapping over N tokens, plus per-sequence block
tables), so the model has one code path; only the sequences that computed their last token sample.
Cycle 8: once the pool exists, one CUDA graph per batch-size bucket is captured on it
(cuda_graphs.py), and a decode step replays one after copying its inputs into the graphs' static
buffers; prefill stays eager.
Cycle 10: a decode with draft tokens (speculative decoding) is a row of 1 + k tokens, its last
token then its drafts, like a chunk; it gets logits at all k + 1 positions, and the rejection
sampler (rejection_sampler.py) keeps what the target model agrees with. A step with drafts runs
eagerly (its rows are longer than one token); a step without replays a graph as before.
Cycle 11: with tensor_parallel_size N, every rank has a ModelRunner over its slice of the model and
its KV heads. Rank 0's run() turns the step into plain lists (StepInputs), sends them to the other
ranks (the executor), and every rank runs execute() on them: the same forward, whose all-reduces
keep the ranks in step, and the same logits, gathered on rank 0. Only rank 0 samples.
"""

import sys
import time
from dataclasses import dataclass
from itertools import accumulate

import torch

from common.engine.cpu_gemm import pack_linear_weights
from common.engine.cpu_memory import keep_freed_memory
from common.engine.memory import head_dim_of, weight_bytes
from common.engine.model_source import load_weights

from .attention import DENSE_LAYOUT, select_backend
from .compiled_ops import compile_small_ops
from .config import Config
from .cuda_graphs import DecodeGraphs
from .kv_cache import PagedKVCache, block_bytes, plan_kv_pool, profile_activation_peak, profile_batches
from .model import AttentionMetadata, CausalLM
from .parallel_state import TPGroup
from .quantization import quantize_model
from .rejection_sampler import RejectionSampler
from .sampler import Sampler, SamplerOutput, prompt_logprobs_for
from .sampling_params import SamplingParams
from .sequence import Sequence


@dataclass
class StepInputs:
    """One step as plain lists: what rank 0 sends to the other ranks (pickled, a few bytes a token)."""
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    num_tokens: list[int]


class ModelRunner:
    def __init__(self, config: Config, source, eos_token_ids=(), tp: TPGroup | None = None, executor=None):
        self.config = config
        # This rank of the tensor-parallel group (tp=1: cycle 10), and on rank 0 the executor that
        # sends each step to the other ranks (None on the others, and at tp=1).
        self.tp, self.executor = tp or TPGroup(), executor
        self.device, self.block_size = config.device, config.block_size
        # The attention backend for this model's head size, before any weight loads: one asked for
        # that cannot take it is refused; a default choice falls back, with a note (attention.py).
        self.attention_backend, self.attention_backend_note = select_backend(
            config.device, config.dtype, config.attention_backend, head_dim_of(source.config))
        self.model = build_model(source, config.device, config.dtype, self.attention_backend, self.tp)
        self.dense_layout = self.attention_backend in DENSE_LAYOUT   # build sdpa's [B, Tq] layout
        self.quantize_s = self._quantize() if config.quantization else 0.0
        # On a CPU: weights packed once for oneDNN, freed memory kept for the next step (chapter 1).
        self.linear_backend = pack_linear_weights(self.model, config.device, config.dtype, config.cpu_fast_paths)
        self.malloc = keep_freed_memory(config.device, config.cpu_fast_paths)
        # Compiled small ops: a flag of their own, apart from the graphs (compiled_ops.py).
        self.compile_s = compile_small_ops(self.model, config.device, config.dtype) if config.compile else 0.0
        self.sampler = Sampler(config.device, config.seed, eos_token_ids)   # eos: for min_tokens
        self.rejection_sampler = RejectionSampler(self.sampler)
        self.graphs = DecodeGraphs(self.model, self.attention_backend, self.block_size, config.max_num_seqs,
                                   self.model.config.max_position_embeddings, self.device, config.enforce_eager)
        self.kv_pool = self._plan_kv_pool()
        # Rank 0's BlockManager hands out block ids for every rank's pool: all get the smallest plan.
        self.num_kv_blocks = self.tp.min_int(self.kv_pool["num_kv_blocks"])
        # One block more than the BlockManager hands out: the scratch block that padding rows write to.
        self.kv_cache = self._kv_cache(self.num_kv_blocks + 1)
        # A graph records the pool's addresses: captured once the pool exists, in what it left free.
        self.graphs.capture(self.kv_cache, scratch_block=self.num_kv_blocks)
        if self.tp.rank == 0:     # once, not once per rank
            say_fallbacks(self.attention_backend_note, config.int8_matmul_note, self.graphs.fallback_note)

    def _quantize(self) -> float:
        """Quantize the loaded float weights in place; returns the seconds it took."""
        start = time.perf_counter()
        quantize_model(self.model, self.config.int8_matmul)
        return time.perf_counter() - start

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
                seq.num_computed_tokens = 0 if is_prefill else len(seq) - 1
            # Every rank profiles in its own start-up (no message): the same steps, collectives in step.
            num_tokens = [len(s) - s.num_computed_tokens for s in seqs]
            _, logits = self.execute(step_inputs(seqs, num_tokens, self.block_size),
                                     [end - 1 for end in accumulate(num_tokens)], kv_cache=scratch)
            if logits is not None:
                self.sampler(logits, seqs)

    def stats(self) -> dict:
        return {"weight_bytes": weight_bytes(self.model), "linear_backend": self.linear_backend, "malloc": self.malloc,
                "kv_cache_pool_bytes": self.kv_cache.nbytes,
                "kv_pool": self.kv_pool,   # how the pool was sized: budget, model, activation peak, cap
                "attention_backend": self.attention_backend,
                "attention_backend_note": self.attention_backend_note,   # why a fallback ran, or None
                "quantization": self.config.quantization,
                "int8_matmul": self.config.int8_matmul,
                "int8_matmul_note": self.config.int8_matmul_note,               # why a fallback ran, or None
                "quantize_s": self.quantize_s,
                "compile": self.config.compile,
                "compile_s": self.compile_s,
                **self.graphs.stats(), **self.tp.stats()}

    # --- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], num_tokens: list[int]) -> SamplerOutput:
        """Rank 0: one forward over the step's tokens, seqs[i] computing its next num_tokens[i]: decode
        rows and prompt chunks in one flat batch. Returns one sampled token per sequence that computes
        its last token in this step, in `seqs` order (a partial prompt samples nothing), and the
        logprobs of the sequences that ask. The other ranks run the same step on its StepInputs."""
        samples = [s.num_computed_tokens + n == len(s) + len(s.spec_token_ids) for s, n in zip(seqs, num_tokens)]
        rows = [i for i, sample in enumerate(samples) if sample]
        sampled = [seqs[i] for i in rows]
        drafts = [s.spec_token_ids for s in sampled]
        # The rows whose logits the step needs: every verified position of a sequence with drafts,
        # the last row of any other that samples.
        row_ends = list(accumulate(num_tokens))
        index = [p for r, d in zip(rows, drafts) for p in range(row_ends[r] - len(d) - 1, row_ends[r])]
        step = step_inputs(seqs, num_tokens, self.block_size)
        if self.executor:
            self.executor.send(("step", step, index))
        try:
            hidden, logits = self.execute(step, index)
        except RuntimeError as error:       # a rank died mid-step: say which
            if self.executor:
                self.executor.explain(error)
            raise
        if not sampled:
            return SamplerOutput([])
        out = self.rejection_sampler(logits, sampled, drafts) if any(drafts) else self.sampler(logits, sampled)
        # sampled[j]'s positions, as a range: prompt_logprobs slices it as it would the hidden states,
        # and each slice's logits come from every rank (_logits).
        prompt_rows = lambda j: range(row_ends[rows[j]] - num_tokens[rows[j]], row_ends[rows[j]])
        out.prompt_logprobs = prompt_logprobs_for(sampled, lambda r: self._logits(hidden, r), prompt_rows)
        return out

    @torch.inference_mode()
    def execute(self, step: StepInputs, index: list[int], kv_cache=None):
        """Every rank: the forward over the step's tokens, then the logits of the rows in `index`
        (rank 0: gathered from every rank; other ranks: None). kv_cache: the pool it reads and
        writes, None for the engine's own (the start-up profile passes a one-block scratch pool).
        A step of one-token rows only replays a captured graph; a step with a chunk runs eagerly."""
        input_ids, positions, meta = self._tensors(step)
        if not meta.is_prefill and self.graphs.replays:
            hidden = self.graphs.run(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, meta, self.kv_cache if kv_cache is None else kv_cache)
        logits = self.model.compute_logits(hidden[self._to_device(index, torch.long)]) if index else None
        return hidden, logits

    def _logits(self, hidden: torch.Tensor, rows: range):
        """Rank 0, after the step: the logits of more rows (prompt logprobs), every rank taking part."""
        if self.executor:
            self.executor.send(("logits", rows))
        return self.model.compute_logits(hidden[rows.start:rows.stop])

    def _prepare(self, seqs: list[Sequence], num_tokens: list[int]):
        """The step's tensors on this device: input_ids, positions and the attention metadata."""
        return self._tensors(step_inputs(seqs, num_tokens, self.block_size))

    def _tensors(self, step: StepInputs):
        as_tensor = lambda x: self._to_device(x, torch.long)
        positions = as_tensor(step.positions)
        return as_tensor(step.input_ids), positions, self._layout(step, positions, as_tensor(step.slot_mapping))

    def _layout(self, step: StepInputs, positions: torch.Tensor, slot_mapping: torch.Tensor) -> AttentionMetadata:
        """Per-sequence views of the flat batch: lengths and block tables for every backend (from
        Python lists: no device round trip), and the dense layout only for a backend that needs it."""
        context_lens, num_tokens = step.context_lens, step.num_tokens
        seqlens = [0, *accumulate(num_tokens)]       # sequence b's queries: seqlens[b] .. seqlens[b + 1] - 1
        int32 = lambda x: self._to_device(x, torch.int32)
        width = max(len(t) for t in step.block_tables)
        tables = int32([t + [0] * (width - len(t)) for t in step.block_tables])
        max_seqlen_q = max(num_tokens)
        # The scheduler puts one-token rows first: kernels that treat them apart (triton) take them in one launch.
        num_decodes = next((i for i, n in enumerate(num_tokens) if n > 1), len(num_tokens))
        meta = AttentionMetadata(max_seqlen_q > 1, slot_mapping, int32(seqlens), int32([0, *accumulate(context_lens)]),
                                 max_seqlen_q, max(context_lens), int32(context_lens), tables, num_decodes=num_decodes)
        if self.dense_layout:
            meta.query_index, meta.token_index, meta.mask = self._dense_layout(seqlens, positions, width)
        return meta

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A device tensor from Python values without a host-device sync on CUDA (staged in pinned
        memory, copied non_blocking): the host goes on to replay while the copies run."""
        if self.device.type != "cuda":
            return torch.tensor(values, dtype=dtype, device=self.device)
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(self.device, non_blocking=True)

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


def step_inputs(seqs: list[Sequence], num_tokens: list[int], block_size: int) -> StepInputs:
    """Each sequence computes the tokens past what the cache holds (its cached prefix and earlier
    chunks): a whole or partial prompt (a preempted sequence: its prompt and what it had
    generated), a decode's newest token, and its drafts. Attention reads the computed tokens
    through the block table like any other key."""
    input_ids, positions, slots = [], [], []
    for seq, n in zip(seqs, num_tokens):
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        input_ids += (seq.token_ids + seq.spec_token_ids if seq.spec_token_ids else seq.token_ids)[start:end]
        positions += range(start, end)
        # slot = where token p's K/V lives in the flat pool: its block * block_size + offset
        slots += [seq.block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]
    context_lens = [s.num_computed_tokens + n for s, n in zip(seqs, num_tokens)]   # keys, this step's included
    return StepInputs(input_ids, positions, slots, context_lens, [s.block_table for s in seqs], num_tokens)


def say_fallbacks(*notes: str | None) -> None:
    """A fallback nobody asked for is said once, when the engine starts; stats keep the note."""
    for note in filter(None, notes):
        print(f"vllm-learn: {note}", file=sys.stderr, flush=True)


def build_model(source, device: torch.device, dtype: torch.dtype, attention_backend: str,
                tp: TPGroup) -> CausalLM:
    # Build on the meta device (no memory, no random init), then allocate and fill with this rank's
    # slices of the weights.
    with torch.device("meta"):
        model = CausalLM(source.config, attention_backend, tp)
    model = model.to(dtype=dtype).to_empty(device=device)
    if source.config.tie_word_embeddings:  # to_empty breaks the tie: restore it
        model.lm_head.linear.weight = model.model.embed_tokens.embedding.weight
    load_weights(model, source, model.checkpoint_targets())
    return model.eval()
