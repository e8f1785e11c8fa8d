"""The engine: continuous batching over a paged KV cache, with prefix caching, on int8 weights.

The LLM is an engine loop in vLLM's vocabulary: add_request() puts a Sequence in the scheduler's
waiting queue, step() asks the scheduler what to run (a prefill of newly admitted sequences, or one
decode token for every running one), runs it through the ModelRunner and appends the sampled
tokens; finished sequences leave at once. generate() adds every prompt and steps until all finish.
step() returns the new token of every request that ran, so a server can stream them as they come,
and abort_request() drops a request (a client that went away) and frees its blocks at once.
The batch is re-formed every step, so a short request never waits for a long one. After each
step, every block that became full of computed K/V is hashed into the prefix cache. The float
checkpoint is quantized to int8 (AbsMax, per output channel) when the engine starts.
Cycle 8: decode steps replay CUDA graphs over static buffers (cuda_graphs.py), captured when the
engine starts, after the KV pool is sized with room held for them; small ops may be compiled.
"""

import sys
import time

import torch
from tqdm import tqdm

from common.engine.device import resolve_device, resolve_dtype
from common.engine.detokenizer import IncrementalDetokenizer
from common.engine.inputs import prepare_requests
from common.engine.memory import weight_bytes
from common.engine.metrics import peak_memory_bytes, reset_peak_memory
from common.engine.model_source import eos_token_ids, load_tokenizer, load_weights, resolve_model
from common.engine.outputs import RequestMetrics, RequestOutput

from .attention import DEFAULT_BLOCK_SIZE, DENSE_LAYOUT, check_block_size, select_backend
from .block_manager import BlockManager
from .compiled_ops import compile_small_ops
from .cuda_graphs import DecodeGraphs, held
from .kv_cache import (GPU_MEMORY_UTILIZATION, PagedKVCache, block_bytes, check_pool_options,
                       plan_kv_pool, profile_activation_peak, profile_batches)
from .model import CausalLM
from .model_runner import ModelRunner
from .quantization import choose_matmul, quantize_model
from .sampler import Sampler
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence

# Measured defaults (docs/CYCLE_GUIDE.md, chapter 4): on a GPU a bigger batch is nearly free; on a
# CPU a decode step is bound by reading the weights, so more sequences per step help up to ~64.
DEFAULTS = {"cuda": dict(max_num_seqs=256, max_num_batched_tokens=16384),
            "cpu": dict(max_num_seqs=64, max_num_batched_tokens=4096)}


class LLM:
    def __init__(self, model: str, device=None, dtype=None, weights: str = "auto",
                 max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None,
                 block_size: int | None = None, num_kv_blocks: int | None = None,
                 kv_cache_memory_bytes: int | None = None,
                 gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION,
                 enable_prefix_caching: bool = True, attention_backend: str | None = None,
                 quantization: str | None = "int8", int8_matmul: str | None = None,
                 seed: int | None = None, trace: bool = False,
                 enforce_eager: bool = False, compile: bool | None = None):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        # The backend needs the device and the dtype; it and its block size are checked before loading.
        self.attention_backend, self.attention_backend_note = select_backend(self.device, self.dtype, attention_backend)
        block_size = block_size or DEFAULT_BLOCK_SIZE[self.attention_backend]
        check_block_size(self.attention_backend, block_size)
        if self.attention_backend_note:   # a fallback nobody asked for: said once, and kept in stats
            print(f"vllm-learn: {self.attention_backend_note}", file=sys.stderr, flush=True)
        # quantization=None keeps the float checkpoint: the same engine without int8, to compare with.
        if quantization not in ("int8", None) or (quantization is None and int8_matmul is not None):
            raise ValueError(f"quantization={quantization!r}, int8_matmul={int8_matmul!r}: quantization is "
                             "'int8' (default) or None, and int8_matmul applies to 'int8' only")
        self.quantization = quantization
        # The int8 path: a fixed table by device (quantization.DEFAULT_MATMUL) unless int8_matmul names one.
        self.int8_matmul, self.int8_matmul_note = (choose_matmul(self.device, self.dtype, int8_matmul)
                                                   if quantization else (None, None))
        if self.int8_matmul_note:
            print(f"vllm-learn: {self.int8_matmul_note}", file=sys.stderr, flush=True)
        defaults = DEFAULTS["cuda" if self.device.type == "cuda" else "cpu"]
        max_num_seqs = max_num_seqs or defaults["max_num_seqs"]
        max_num_batched_tokens = max_num_batched_tokens or defaults["max_num_batched_tokens"]
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        check_pool_options(num_kv_blocks, kv_cache_memory_bytes, gpu_memory_utilization)
        self.source = resolve_model(model, weights)
        self.config = self.source.config
        self.tokenizer = load_tokenizer(self.source)
        self.eos_token_ids = set(eos_token_ids(self.source, self.tokenizer))
        self.model = _build_model(self.config, self.source, self.device, self.dtype, self.attention_backend)
        self.quantize_s = self._quantize() if quantization else 0.0
        # Compiled small ops pay on a GPU; on a CPU they did not (compiled_ops.py): off unless asked.
        self.compile = self.device.type == "cuda" if compile is None else bool(compile)
        self.compile_s = compile_small_ops(self.model, self.device, self.dtype) if self.compile else 0.0
        self.graphs = DecodeGraphs(self.model, self.attention_backend, block_size, max_num_seqs,
                                   self.config.max_position_embeddings, self.device, enforce_eager)
        # The graphs' memory is measured first and held while the KV budget is sized; capture
        # comes after the pool exists, because a graph records the pool's addresses.
        reserve = self.graphs.measure_decode_bytes(lambda n: self._kv_pool(block_size, n))
        with held(reserve, self.device):
            self.kv_cache, self.block_manager = self._allocate_kv_cache(
                block_size, num_kv_blocks, kv_cache_memory_bytes, gpu_memory_utilization, max_num_seqs,
                max_num_batched_tokens, enable_prefix_caching)
        self.graphs.bind(self.kv_cache, self.block_manager, scratch_block=self.block_manager.num_blocks)
        self.graphs.capture()
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.model_runner = ModelRunner(self.model, self.kv_cache, self.block_manager,
                                        Sampler(self.device, seed), self.device, self.graphs,
                                        dense_layout=self.attention_backend in DENSE_LAYOUT)
        self.trace = trace
        self._next_id = 0
        self._reset_counters()
        self.stats: dict = {}

    def _quantize(self) -> float:
        """Quantize the loaded float weights in place; returns the seconds it took."""
        start = time.perf_counter()
        quantize_model(self.model, self.int8_matmul)
        return time.perf_counter() - start

    def _allocate_kv_cache(self, block_size, num_kv_blocks, kv_cache_memory_bytes, gpu_memory_utilization,
                           max_num_seqs, max_num_batched_tokens, enable_prefix_caching):
        attn = self.model.model.layers[0].self_attn
        layers = self.config.num_hidden_layers
        per_block = block_bytes(layers, block_size, attn.num_kv_heads, attn.head_dim, self.dtype)
        max_blocks = max_num_seqs * -(-self.config.max_position_embeddings // block_size)
        self.kv_pool = plan_kv_pool(
            per_block, self.device, max_blocks, num_kv_blocks, kv_cache_memory_bytes, gpu_memory_utilization,
            profile=lambda: profile_activation_peak(
                self.device, lambda: self._profile_run(block_size, max_num_seqs, max_num_batched_tokens)))
        num_blocks = self.kv_pool["num_kv_blocks"]
        if self.kv_pool["budget_bytes"] is not None and 1 < num_blocks < max_blocks:
            num_blocks -= 1          # a budget also pays for the scratch block (the cap or an exact count does not)
        manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        # One block more than the manager hands out: the scratch block that padding rows write to.
        return self._kv_pool(block_size, num_blocks + 1), manager

    def _kv_pool(self, block_size: int, num_blocks: int) -> PagedKVCache:
        attn = self.model.model.layers[0].self_attn
        return PagedKVCache(self.config.num_hidden_layers, num_blocks, block_size, attn.num_kv_heads,
                            attn.head_dim, self.dtype, self.device)

    def _profile_run(self, block_size: int, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        """Run the largest prefill and decode steps once, on dummy tokens, to measure their memory.

        Every dummy sequence's block table points at block 0 of a one-block scratch pool: the steps
        read and write as many K/V slots as real ones would, but nothing of the real pool (which
        does not exist yet), and the scratch pool and runner are dropped when this returns.
        """
        attn = self.model.model.layers[0].self_attn
        scratch = PagedKVCache(self.config.num_hidden_layers, 1, block_size, attn.num_kv_heads, attn.head_dim,
                               self.dtype, self.device)
        runner = ModelRunner(self.model, scratch, BlockManager(1, block_size), Sampler(self.device, 0), self.device)
        greedy = SamplingParams(temperature=0, max_tokens=1)
        for lengths, is_prefill in profile_batches(max_num_seqs, max_num_batched_tokens,
                                                   self.config.max_position_embeddings):
            seqs = [Sequence(i, None, [0] * n, greedy, None) for i, n in enumerate(lengths)]
            for seq in seqs:
                seq.block_table = [0] * -(-len(seq) // block_size)   # all on scratch block 0
            runner.run(seqs, is_prefill)

    # --- the engine loop, in vLLM's LLMEngine vocabulary ---------------------------------------

    def add_request(self, prompt, sampling_params: SamplingParams | None = None, detokenize: bool = True) -> int:
        """Validate one prompt and queue it; returns its request id. Its text is detokenized as it
        is generated, so every step() output carries the new text (delta_text) to stream; with
        detokenize=False only token ids (no text, no stop strings: a server front end does those)."""
        return self._add(prepare_requests([prompt], sampling_params, self.tokenizer, self.config.vocab_size,
                                          self.config.max_position_embeddings, SamplingParams), stream=True, detokenize=detokenize)[0]

    def abort_request(self, request_id: int) -> bool:
        """Remove a request, waiting or running, and free its KV blocks now. False if there is no
        such unfinished request (it finished already, or was never added)."""
        return self.scheduler.abort(request_id) is not None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns one output per request that got a token in it (every
        scheduled one), with `finished` set on those that ended."""
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            raise RuntimeError("the scheduler found nothing to run although requests are unfinished")
        self._num_steps += 1
        if self.trace:  # what was scheduled: before the step, so finished sequences still show
            self._print_trace(seqs, is_prefill)
        self._track_peak()
        if is_prefill:
            self._prefill_tokens += sum(len(s) - s.num_cached_tokens for s in seqs)
        started = time.perf_counter()
        next_tokens = self.model_runner.run(seqs, is_prefill)
        self._step_times.append([max(len(s) for s in seqs), time.perf_counter() - started])
        return self._postprocess(seqs, next_tokens)

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = False) -> list[RequestOutput]:
        if self.has_unfinished_requests():
            raise RuntimeError("generate() needs an idle engine: requests added with add_request() are "
                               "unfinished; step() until has_unfinished_requests() is False first")
        requests = prepare_requests(prompts, sampling_params, self.tokenizer, self.config.vocab_size,
                                    self.config.max_position_embeddings, SamplingParams)
        start = time.perf_counter()
        ids = self._add(requests, arrival=start)
        reset_peak_memory(self.device)
        self._reset_counters()
        outputs = {}
        with tqdm(total=len(ids), disable=not use_tqdm, desc="requests") as bar:
            while self.has_unfinished_requests():
                for out in self.step():
                    if out.finished:
                        outputs[out.request_id] = out
                        bar.update(1)
        self.stats = self._stats(outputs.values(), time.perf_counter() - start)
        return [outputs[i] for i in ids]

    # --- helpers -------------------------------------------------------------------------------

    def _add(self, requests, arrival: float | None = None, stream: bool = False, detokenize: bool = True) -> list[int]:
        seqs = []
        for r in requests:
            seq = Sequence(self._next_id, r.prompt, r.prompt_token_ids, r.sampling_params,
                           _request_generator(r.sampling_params.seed, self.device),
                           arrival if arrival is not None else time.perf_counter())
            # Only streamed requests (and stop strings) pay for detokenizing every step; generate()
            # decodes each request once, at the end.
            if detokenize and (stream or r.sampling_params.stop):
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, r.prompt_token_ids, r.sampling_params.stop)
            self._next_id += 1
            seqs.append(seq)
        self._check_fits_pool(seqs)          # all checks pass before any request is queued
        for seq in seqs:
            self.scheduler.add(seq)
        return [s.seq_id for s in seqs]

    def _check_fits_pool(self, seqs: list[Sequence]) -> None:
        bm = self.block_manager
        for i, seq in enumerate(seqs):
            if bm.blocks_for(seq.max_len) > bm.num_blocks:
                raise ValueError(f"prompt {i} needs up to {bm.blocks_for(seq.max_len)} KV blocks "
                                 f"(prompt + max_tokens), the whole pool has {bm.num_blocks}: "
                                 f"lower max_tokens or give the cache more blocks (num_kv_blocks)")

    def _postprocess(self, seqs: list[Sequence], next_tokens: list[int]) -> list[RequestOutput]:
        now = time.perf_counter()
        outputs = []
        for seq, token in zip(seqs, next_tokens):
            self.block_manager.cache_full_blocks(seq, num_computed_tokens=len(seq))
            seq.token_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now - seq.arrival_time
            reason = self._finish_reason(seq.output_token_ids, seq.sampling_params)
            delta = ""
            if seq.detokenizer is not None:
                delta = seq.detokenizer.update(token, finishing=reason is not None)
                if seq.detokenizer.stopped:
                    reason = "stop"
            if reason:
                seq.finish_reason, seq.finish_time = reason, now - seq.arrival_time
                self.scheduler.finish(seq)
                outputs.append(self._output(seq, token, delta))
            else:  # a delta only: copying the whole generation every step would cost O(length)
                outputs.append(RequestOutput(seq.seq_id, None, [], [], "", None, finished=False,
                                             new_token_ids=[token], delta_text=delta))
        return outputs

    def _finish_reason(self, token_ids: list[int], params: SamplingParams) -> str | None:
        if not params.ignore_eos and token_ids[-1] in self.eos_token_ids:
            return "stop"
        if len(token_ids) >= params.max_tokens:
            return "length"
        return None

    def _reset_counters(self) -> None:
        self._step_times = []
        self._peak_blocks, self._tokens_at_peak, self._num_steps, self._prefill_tokens = 0, 0, 0, 0
        self.scheduler.num_preemptions = 0
        self.scheduler.prefix_cache_hit_tokens = self.scheduler.prefix_cache_queried_tokens = 0

    def _track_peak(self) -> None:
        used = self.block_manager.num_used_blocks
        if used > self._peak_blocks:
            self._peak_blocks = used
            self._tokens_at_peak = sum(len(s) for s in self.scheduler.running)

    def _print_trace(self, seqs: list[Sequence], is_prefill: bool) -> None:
        bm = self.block_manager
        kind = "prefill" if is_prefill else "decode "
        tokens = sum(len(s) - s.num_cached_tokens for s in seqs) if is_prefill else len(seqs)
        cached = f" cached {[s.num_cached_tokens for s in seqs]}" if is_prefill else ""
        print(f"step {self._num_steps:4d} {kind} seqs {[s.seq_id for s in seqs]}{cached} tokens {tokens} "
              f"blocks used {bm.num_used_blocks}/{bm.num_blocks} free {bm.num_free_blocks} "
              f"waiting {len(self.scheduler.waiting)} preemptions {self.scheduler.num_preemptions}")

    def _stats(self, outputs, wall: float) -> dict:
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
            "output_tokens": sum(len(o.token_ids) for o in outputs),
            "wall_s": wall,
            "steps": self._num_steps,
            "step_times": self._step_times,  # [tokens of the longest sequence in the step, seconds], per step
            "preemptions": self.scheduler.num_preemptions,
            "prefix_caching": bm.enable_prefix_caching,
            "prefix_cache_hit_tokens": self.scheduler.prefix_cache_hit_tokens,
            "prefix_cache_queried_tokens": self.scheduler.prefix_cache_queried_tokens,
            "prefix_cache_hit_rate": self.scheduler.prefix_cache_hit_tokens / max(1, self.scheduler.prefix_cache_queried_tokens),
            "prefill_tokens": self._prefill_tokens,
            "attention_backend": self.attention_backend,
            "attention_backend_note": self.attention_backend_note,   # why a fallback ran, or None
            "quantization": self.quantization,
            "int8_matmul": self.int8_matmul,
            "int8_matmul_note": self.int8_matmul_note,               # why a fallback ran, or None
            "quantize_s": self.quantize_s,
            "compile": self.compile,
            "compile_s": self.compile_s,
            **self.graphs.stats(),
            "max_num_seqs": self.scheduler.max_num_seqs,
            "max_num_batched_tokens": self.scheduler.max_num_batched_tokens,
        }

    def _output(self, seq: Sequence, token: int, delta: str) -> RequestOutput:
        tokens = seq.output_token_ids
        text = seq.detokenizer.text if seq.detokenizer else self.tokenizer.decode(tokens, skip_special_tokens=True)
        return RequestOutput(seq.seq_id, seq.prompt, seq.token_ids[:seq.num_prompt_tokens], tokens, text,
                             seq.finish_reason, RequestMetrics(seq.first_token_time, seq.finish_time),
                             finished=True, new_token_ids=[token], delta_text=delta)


def _build_model(config, source, device, dtype, attention_backend: str) -> CausalLM:
    # Build on the meta device (no memory, no random init), then allocate and fill with the weights.
    with torch.device("meta"):
        model = CausalLM(config, attention_backend)
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
