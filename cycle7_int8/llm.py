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
"""

import time

import torch
from tqdm import tqdm

from common.engine.detokenizer import IncrementalDetokenizer
from common.engine.inputs import prepare_requests
from common.engine.memory import head_dim_of
from common.engine.metrics import peak_memory_bytes, reset_peak_memory
from common.engine.model_source import eos_token_ids, load_tokenizer, resolve_model
from common.engine.outputs import RequestMetrics, RequestOutput

from .block_manager import BlockManager
from .config import Config
from .model_runner import ModelRunner
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence


class LLM:
    def __init__(self, model: str, **options):
        self.config = config = Config(model, **options)    # every option checked before any loading
        self.device, self.dtype = config.device, config.dtype
        self.source = resolve_model(config.model, config.weights)
        config.fit_head_dim(head_dim_of(self.source.config))   # the attention backend must take it
        self.tokenizer = load_tokenizer(self.source)
        self.eos_token_ids = set(eos_token_ids(self.source, self.tokenizer))
        self.model_runner = ModelRunner(config, self.source, self.eos_token_ids)
        self.block_manager = BlockManager(self.model_runner.num_kv_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self._next_id = 0
        self._reset_counters()
        self.stats: dict = {}

    def add_request(self, prompt, sampling_params: SamplingParams | None = None, detokenize: bool = True) -> int:
        """Validate one prompt and queue it; returns its request id. Its text is detokenized as it
        is generated, so every step() output carries the new text (delta_text) to stream.
        detokenize=False: outputs carry token ids only (no text; stop strings are not checked)."""
        return self._add(self._prepare([prompt], sampling_params), stream=True, detokenize=detokenize)[0]

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
        if self.config.trace:  # what was scheduled: before the step, so finished sequences still show
            print(f"step {self._num_steps:4d} {self.scheduler.describe(seqs, is_prefill)}")
        started = time.perf_counter()
        out = self.model_runner.run(seqs, is_prefill)
        self._step_times.append([max(len(s) for s in seqs), time.perf_counter() - started])
        return self._postprocess(seqs, out)

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = False) -> list[RequestOutput]:
        if self.has_unfinished_requests():
            raise RuntimeError("generate() needs an idle engine: requests added with add_request() are "
                               "unfinished; step() until has_unfinished_requests() is False first")
        requests = self._prepare(prompts, sampling_params)
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

    def _prepare(self, prompts, sampling_params):
        hf = self.source.config
        return prepare_requests(prompts, sampling_params, self.tokenizer, hf.vocab_size,
                                hf.max_position_embeddings, SamplingParams)

    def _add(self, requests, arrival: float | None = None, stream: bool = False, detokenize: bool = True) -> list[int]:
        seqs = []
        for r in requests:
            seq = Sequence(self._next_id, r.prompt, r.prompt_token_ids, r.sampling_params,
                           _request_generator(r.sampling_params.seed, self.device),
                           arrival if arrival is not None else time.perf_counter())
            # Only streamed requests (and stop strings) pay for detokenizing every step; generate()
            # decodes each request once, at the end.
            seq.detokenize = detokenize
            if detokenize and (stream or r.sampling_params.stop):
                seq.detokenizer = IncrementalDetokenizer.for_request(self.tokenizer, r.prompt_token_ids,
                                                                     r.sampling_params)
            self._next_id += 1
            seqs.append(seq)
        self.block_manager.check_fits([s.max_len for s in seqs])   # all pass before any is queued
        for seq in seqs:
            self.scheduler.add(seq)
        return [s.seq_id for s in seqs]

    def _postprocess(self, seqs: list[Sequence], out) -> list[RequestOutput]:
        now = time.perf_counter()
        outputs = []
        for i, (seq, token) in enumerate(zip(seqs, out.token_ids)):
            self.block_manager.cache_full_blocks(seq, num_computed_tokens=len(seq))
            seq.token_ids.append(token)
            seq.record_logprobs(out, i)
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
                                             new_token_ids=[token], delta_text=delta,
                                             logprobs=None if seq.logprobs is None else seq.logprobs[-1:],
                                             # the prompt's logprobs come with the first token
                                             prompt_logprobs=seq.prompt_logprobs
                                             if len(seq) == seq.num_prompt_tokens + 1 else None))
        return outputs

    def _finish_reason(self, token_ids: list[int], params: SamplingParams) -> str | None:
        if not params.ignore_eos and token_ids[-1] in self.eos_token_ids:
            return "stop"
        if token_ids[-1] in params.stop_token_ids:
            return "stop"
        if len(token_ids) >= params.max_tokens:
            return "length"
        return None

    def _reset_counters(self) -> None:
        self._step_times = []
        self._num_steps = 0
        self.scheduler.reset_stats()

    def _stats(self, outputs, wall: float) -> dict:
        """The components' own stats, and the loop's."""
        return {
            **self.model_runner.stats(), **self.block_manager.stats(), **self.scheduler.stats(),
            "kv_cache_peak_bytes": self.scheduler.peak_blocks * self.model_runner.kv_cache.bytes_per_block,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "output_tokens": sum(len(o.token_ids) for o in outputs),
            "wall_s": wall,
            "steps": self._num_steps,
            "step_times": self._step_times,  # [tokens of the longest sequence in the step, seconds], per step
        }

    def _output(self, seq: Sequence, token: int, delta: str) -> RequestOutput:
        tokens = seq.output_token_ids
        text = (seq.detokenizer.text if seq.detokenizer else
                self.tokenizer.decode(tokens, skip_special_tokens=seq.sampling_params.skip_special_tokens)
                if seq.detokenize else "")
        return RequestOutput(seq.seq_id, seq.prompt, seq.token_ids[:seq.num_prompt_tokens], tokens, text,
                             seq.finish_reason, RequestMetrics(seq.first_token_time, seq.finish_time),
                             finished=True, new_token_ids=[token], delta_text=delta,
                             logprobs=seq.logprobs, prompt_logprobs=seq.prompt_logprobs)


def _request_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
