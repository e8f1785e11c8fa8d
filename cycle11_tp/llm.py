"""The engine: continuous batching over a paged KV cache, with prefix caching, on int8 weights.

The LLM is the engine loop: add_request() queues a Sequence; step() asks the Scheduler what runs
(decode tokens and prompt chunks, under one token budget), runs it on the ModelRunner and hands the
sampled tokens back to the Scheduler (finished sequences leave at once): every new token of a
request, for a server to stream. generate() adds its prompts and steps until all
finish. The batch is re-formed every step, so no request waits for another to finish. The float
checkpoint is quantized to int8 (AbsMax, per output channel) when the engine starts.
With tensor_parallel_size N > 1 the model is split over N processes: this one is rank 0 (the loop,
the scheduler, sampling), the executor starts and feeds the others (executor.py, worker.py).
"""

import time

from tqdm import tqdm

from common.engine.inputs import prepare_requests
from common.engine.metrics import peak_memory_bytes, reset_peak_memory
from common.engine.model_source import eos_token_ids, load_tokenizer, resolve_model
from common.engine.outputs import RequestOutput

from .config import Config
from .executor import Executor
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .parallel_state import check_divisible, check_launch
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence, request_generator


class LLM:
    def __init__(self, model: str, **options):
        self.config = config = Config(model, **options)    # every option checked before any loading
        self.device, self.dtype = config.device, config.dtype
        self.source = resolve_model(config.model, config.weights)
        self.tokenizer = load_tokenizer(self.source)
        self.eos_token_ids = set(eos_token_ids(self.source, self.tokenizer))
        check_launch(config.tensor_parallel_size)
        check_divisible(self.source.config, config.tensor_parallel_size)   # before any weight loads
        self.executor = Executor(model, options, config) if config.tensor_parallel_size > 1 else None
        try:
            self.model_runner = ModelRunner(config, self.source, self.eos_token_ids,
                                            self.executor and self.executor.tp, self.executor)
        except BaseException:
            self.shutdown()
            raise
        self.scheduler = Scheduler(config, self.model_runner.num_kv_blocks,
                                   OutputProcessor(self.tokenizer, self.eos_token_ids))
        self._next_id, self._step_times = 0, []   # step_times: [longest sequence, seconds] per step
        self.stats: dict = {}

    def add_request(self, prompt, sampling_params: SamplingParams | None = None, detokenize: bool = True) -> int:
        """Validate one prompt and queue it; returns its request id. step() outputs carry its new
        text (delta_text); detokenize=False: token ids only (no text, no stop strings)."""
        return self._add(self._prepare([prompt], sampling_params), stream=True, detokenize=detokenize)[0]

    def abort_request(self, request_id: int) -> bool:
        """Remove a request, waiting or running, and free its KV blocks now; False if none such."""
        return self.scheduler.abort(request_id) is not None

    def shutdown(self) -> None:
        """Stop the other ranks now (also done at exit, or when the engine is garbage-collected)."""
        if self.executor:
            self.executor.close()

    def register_failure_callback(self, callback) -> None:
        """callback(message) when another rank's process exits unasked, even while idle (a
        server's engine core stops then); without one, the next step raises WorkerDied."""
        if self.executor:
            self.executor.register_failure_callback(callback)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; one output per request that got a token (a prompt still partly
        computed gets none), `finished` set on those that ended."""
        seqs, num_tokens = self.scheduler.schedule()
        if not seqs:
            raise RuntimeError("the scheduler found nothing to run although requests are unfinished")
        if self.config.trace:  # what was scheduled: before the step, so finished sequences still show
            print(f"step {len(self._step_times) + 1:4d} {self.scheduler.describe(seqs, num_tokens)}")
        started = time.perf_counter()
        out = self.model_runner.run(seqs, num_tokens)
        self._step_times.append([max(len(s) for s in seqs), time.perf_counter() - started])
        return self.scheduler.postprocess(seqs, num_tokens, out)

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = False) -> list[RequestOutput]:
        if self.has_unfinished_requests():
            raise RuntimeError("generate() needs an idle engine: step() until has_unfinished_requests() is False")
        requests = self._prepare(prompts, sampling_params)
        start = time.perf_counter()
        ids = self._add(requests, arrival=start)
        reset_peak_memory(self.device)
        self._step_times = []
        self.scheduler.reset_stats()
        self.model_runner.tp.reset_stats()   # the collectives' counters: this run's
        outputs = {}
        with tqdm(total=len(ids), disable=not use_tqdm, desc="requests") as bar:
            while self.has_unfinished_requests():
                for out in self.step():
                    if out.finished:
                        outputs[out.request_id] = out
                        bar.update(1)
        self.stats = self._stats(outputs.values(), time.perf_counter() - start)
        return [outputs[i] for i in ids]

    def describe(self) -> dict:
        """What this engine is, fixed when it starts: what a server or a benchmark reports."""
        hf, c = self.source.config, self.config
        return {"model": self.source.name, "weights": self.source.weights, "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."), "vocab_size": hf.vocab_size,
                "max_model_len": hf.max_position_embeddings, "eos_token_ids": sorted(self.eos_token_ids),
                "max_num_seqs": c.max_num_seqs, "max_num_batched_tokens": c.max_num_batched_tokens,
                "block_size": c.block_size, "num_kv_blocks": self.scheduler.block_manager.num_blocks,
                "speculative_config": c.speculative_config, "tensor_parallel_size": c.tensor_parallel_size}

    def load(self) -> dict:
        """What it holds now: requests running and waiting, KV blocks free, counters since generate()
        (the KV peak too: a server or an online benchmark steps the engine without generate())."""
        peak = self.scheduler.peak_blocks * self.model_runner.kv_cache.bytes_per_block
        return {**self.scheduler.load(), "kv_cache_peak_bytes": peak}

    def _prepare(self, prompts, sampling_params):
        hf, c = self.source.config, self.config
        # Chunked, no step exceeds the budget the memory plan was profiled at, however long the prompt.
        limit = None if c.enable_chunked_prefill else c.max_num_batched_tokens
        return prepare_requests(prompts, sampling_params, self.tokenizer, hf.vocab_size, hf.max_position_embeddings,
                                SamplingParams, max_prompt_tokens=limit)

    def _add(self, requests, arrival: float | None = None, stream: bool = False, detokenize: bool = True) -> list[int]:
        arrival = time.perf_counter() if arrival is None else arrival
        seqs = [Sequence(self._next_id + i, r.prompt, r.prompt_token_ids, r.sampling_params,
                         request_generator(r.sampling_params.seed, self.device), arrival)
                for i, r in enumerate(requests)]
        self.scheduler.add(seqs, stream, detokenize)
        self._next_id += len(seqs)
        return [s.seq_id for s in seqs]

    def _stats(self, outputs, wall: float) -> dict:
        """The components' own stats, and the loop's."""
        return {**self.model_runner.stats(), **self.load(), "peak_memory_bytes": peak_memory_bytes(self.device), "wall_s": wall,
                "output_tokens": sum(len(o.token_ids) for o in outputs),
                "steps": len(self._step_times), "step_times": self._step_times}
