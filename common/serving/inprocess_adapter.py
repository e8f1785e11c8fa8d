"""TEMPORARY: today's in-process EngineLoop behind the EngineClient interface the server is written
against. The engine client module (InProcessEngine, EngineCoreClient) replaces this file; the
server imports it in one place (common/serving/server.py, `from ... import InProcessEngine`).

The interface (what server.py uses, and nothing else):
    attributes: tokenizer, vocab_size, max_model_len, kv_pool_tokens, eos_token_ids, sampling_params_cls,
                model_name
    start(); shutdown(); alive -> bool (False once the engine died or a step raised)
    async add(prompt_token_ids, params, detokenize=True) -> RequestStream   (ValueError: nothing queued)
    abort(request_id); snapshot -> dict (keys: common/serving/metrics.py)
RequestStream: request_id, num_prompt_tokens; an async iterator of deltas (new_token_ids,
delta_text, finished, finish_reason; the first one may carry queue_time_s); raises EngineError
(EngineDeadError) when the engine failed.
"""

import importlib
import time

from common.serving.engine_loop import EngineError, EngineLoop


class EngineDeadError(EngineError):
    """The engine is gone (a step raised, or its thread or process ended): nothing more is served."""


class RequestStream:
    def __init__(self, request_id: int, num_prompt_tokens: int, outputs, added_at: float):
        self.request_id, self.num_prompt_tokens = request_id, num_prompt_tokens
        self._outputs, self._added_at, self._first, self._done = outputs, added_at, True, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._done:
            raise StopAsyncIteration
        out = await self._outputs.get()
        if isinstance(out, EngineError):
            self._done = True
            raise EngineDeadError(str(out))
        if self._first:
            self._first = False
            out.queue_time_s = max(0.0, out.step_started - self._added_at)
        self._done = out.finished
        return out


class _StepWatch:
    """The engine, seen through: records when each step starts (for queue times) and whether one raised."""

    def __init__(self, llm):
        self._llm, self.failed = llm, None

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def step(self):
        started = time.perf_counter()
        try:
            outputs = self._llm.step()
        except Exception as error:
            self.failed = error
            raise
        for out in outputs:
            out.step_started = started
        return outputs


class InProcessEngine:
    def __init__(self, llm):
        self.llm = llm
        self._watch = _StepWatch(llm)
        self._loop = EngineLoop(self._watch)
        self.tokenizer = llm.tokenizer
        self.vocab_size = llm.source.config.vocab_size
        blocks = llm.block_manager
        self.max_model_len = llm.source.config.max_position_embeddings
        self.kv_pool_tokens = blocks.num_blocks * blocks.block_size
        self.source = llm.source
        self.eos_token_ids = set(llm.eos_token_ids)
        self.sampling_params_cls = importlib.import_module(type(llm).__module__.rpartition(".")[0]).SamplingParams
        self.model_name = llm.source.name

    def start(self) -> None:
        self._loop.start()

    def shutdown(self) -> None:
        self._loop.stop()

    @property
    def alive(self) -> bool:
        return self._loop.alive and self._watch.failed is None

    async def add(self, prompt_token_ids: list[int], params, detokenize: bool = True) -> RequestStream:
        if not self.alive:
            raise EngineDeadError(f"the engine is not running ({self._watch.failed!r})")
        added_at = time.perf_counter()
        request_id, num_prompt_tokens, outputs = await self._loop.add(lambda llm: (prompt_token_ids, params))
        return RequestStream(request_id, num_prompt_tokens, outputs, added_at)

    def abort(self, request_id: int) -> None:
        self._loop.abort(request_id)

    @property
    def snapshot(self) -> dict:
        scheduler = self.llm.scheduler
        extra = {"num_preemptions": scheduler.num_preemptions}
        if hasattr(scheduler, "prefix_cache_queried_tokens"):
            extra |= {"prefix_cache_queries": scheduler.prefix_cache_queried_tokens,
                      "prefix_cache_hits": scheduler.prefix_cache_hit_tokens}
        return self._loop.snapshot | extra
