"""The server's side of the engine: what an HTTP handler calls, whichever way the engine runs.

    InProcessEngine(llm)                         the engine core in a thread of the server process
    EngineCoreClient(package, model, options)    the engine core in a process of its own (the default)

Both run common/serving/engine_core.py's EngineCore and speak to it over the same pipe; they
differ only in where the core runs. A thread shares the server's GIL and cores with every HTTP
handler, the event loop and the detokenizer; a process shares nothing (vLLM V1 splits its server
the same way: an API server process and an EngineCore process).

The front end (this module, on the server's event loop) does everything but the engine's work.
Handlers tokenize and apply chat templates themselves and call `add(prompt_token_ids, params)`,
which returns once the engine has validated and queued the request (ValueError with the engine's
message otherwise: nothing was queued). The returned RequestStream yields one Delta per step that
gave the request tokens; the text comes from an IncrementalDetokenizer here, and a stop string
found here ends the stream (finish_reason "stop") and aborts the request in the core.

One reader thread receives the core's messages, one batch per step, and hands each batch to the
event loop in a single call_soon_threadsafe: the event loop wakes once per step, not per token.
If the core dies (killed, or a step raised), `alive` turns False, every stream and pending add
gets EngineDeadError at once, and `on_dead` (set by the server) shuts the server down.
"""

import asyncio
import dataclasses
import importlib
import itertools
import multiprocessing
import os
import queue
import sys
import threading
from multiprocessing.connection import wait

from common.engine.detokenizer import IncrementalDetokenizer
from common.engine.model_source import load_tokenizer
from common.serving.engine_core import (EngineCore, core_threads, describe, run_core_process, run_profiled,
                                       sampling_params_class)

CORE_LOAD_TIMEOUT_S = 900     # loading and warming a model in the core; a core that takes longer is stuck
CORE_EXIT_TIMEOUT_S = 20      # a core told to stop that has not exited by then is killed


class EngineError(RuntimeError):
    """The engine could not serve a request (a step failed, or adding it failed inside the engine)."""


class EngineDeadError(EngineError):
    """The engine core is gone: no request can be served any more (vLLM's EngineDeadError)."""


@dataclasses.dataclass
class Delta:
    new_token_ids: list[int]
    delta_text: str
    finished: bool
    finish_reason: str | None
    queue_time_s: float | None = None   # first delta only: arrival in the engine to the start of its prefill step
    # Only for a request whose SamplingParams ask (RequestOutput's shapes): one dict per token of
    # new_token_ids; the prompt's, one per prompt token, with the first delta.
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None


class RequestStream:
    """One request's outputs, as an async iterator of Deltas. `token_ids`, `text` and
    `finish_reason` accumulate the whole generation (a non-streamed response reads them at the end)."""

    def __init__(self, request_id: int, prompt_token_ids: list[int], detokenizer: IncrementalDetokenizer | None):
        self.request_id, self.num_prompt_tokens = request_id, len(prompt_token_ids)
        self.detokenizer = detokenizer
        self.token_ids: list[int] = []
        self.text, self.finish_reason, self.finished = "", None, False
        self._queue: asyncio.Queue = asyncio.Queue()
        self._done = False      # the consumer has taken the last item

    def __aiter__(self):
        return self

    async def __anext__(self) -> Delta:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finished
        return item

    def _feed(self, new_token_ids: list[int], finish_reason: str | None, queue_time_s: float | None,
              logprobs: list | None = None, prompt_logprobs: list | None = None) -> Delta:
        """Called on the event loop with one step's tokens; detokenizes them here. A stop string
        cuts the tokens (and their logprobs) after the one that completed it and finishes the request."""
        text = ""
        if self.detokenizer is not None:     # the engine's own stop-string rule (detokenizer.py)
            text, kept, finish_reason = self.detokenizer.process(new_token_ids, finish_reason)
            new_token_ids = new_token_ids[:kept]
            logprobs = None if logprobs is None else logprobs[:kept]
        self.token_ids += new_token_ids
        self.text += text
        self.finished, self.finish_reason = finish_reason is not None, finish_reason
        delta = Delta(new_token_ids, text, self.finished, finish_reason, queue_time_s, logprobs, prompt_logprobs)
        self._queue.put_nowait(delta)
        return delta

    def _fail(self, error: BaseException) -> None:
        self.finished = True
        self._queue.put_nowait(error)


class _CoreConnection:
    """The front-end half shared by both engines: requests, streams, the reader thread, metrics."""

    def _init_front_end(self, conn, info: dict, sampling_params_cls, tokenizer) -> None:
        self._conn = conn
        self._send_lock = threading.Lock()
        self.source = info["source"]
        self.tokenizer = tokenizer
        self.vocab_size, self.max_model_len = info["vocab_size"], info["max_model_len"]
        self.eos_token_ids, self.kv_pool_tokens = set(info["eos_token_ids"]), info["kv_pool_tokens"]
        self.sampling_params_cls = sampling_params_cls
        self.model_name = self.source.name
        self.on_dead = None                 # called once, on the event loop, with the reason
        self.dead_reason: str | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[int, RequestStream] = {}
        self._pending: dict[int, tuple[asyncio.Future, list[int], bool, object]] = {}
        self._tokens = itertools.count()
        self._core_stats: dict = info["stats"]
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        # Sends go through a thread of their own: a large prompt's send could block on a full pipe
        # while the core runs a step, and the event loop must never wait for that.
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="engine-sender", daemon=True)

    # --- what handlers call (on the event loop) -----------------------------------------------

    @property
    def alive(self) -> bool:
        return self.dead_reason is None

    async def add(self, prompt_token_ids: list[int], params, detokenize: bool = True) -> RequestStream:
        """Queue a request in the engine; returns its stream once the engine accepted it. Raises
        ValueError (the engine's own validation: nothing was queued) or EngineError."""
        if not self.alive:
            raise EngineDeadError(self.dead_reason)
        token = next(self._tokens)
        future = asyncio.get_running_loop().create_future()
        ids = list(prompt_token_ids)
        self._pending[token] = (future, ids, detokenize, params)
        # Every field of the dataclass travels, so a field a cycle adds reaches the core's engine.
        fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
        self._send(("add", token, ids, fields))
        return await future

    def abort(self, request_id: int) -> None:
        """Drop a request (its client went away): the core frees its blocks before its next step."""
        if self._streams.pop(request_id, None) is not None and self.alive:
            self._send(("abort", request_id))

    @property
    def snapshot(self) -> dict:
        """For /metrics: the core's gauges and counters after its last step (EngineCore.stats; the
        latencies are timed by the server from the streams, where the client sees the tokens)."""
        return self._core_stats

    # --- plumbing --------------------------------------------------------------------------------

    def _start_reader(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._reader.start()
        self._sender.start()

    def _send(self, message) -> None:
        """Called on the event loop: queued for the sender thread, in order (never blocks)."""
        if self._sender.is_alive():
            self._outbox.put(message)
        else:                      # not started (or already stopped): nobody else is sending
            self._send_now(message)

    def _send_now(self, message) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError:            # the core is gone; the reader thread reports it
            pass

    def _send_loop(self) -> None:
        while True:
            message = self._outbox.get()
            self._send_now(message)
            if message[0] == "shutdown":
                return

    def _read(self) -> None:
        """The reader thread: recv() blocks (without the GIL) until the core sends something."""
        reason = "the engine core exited"
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "dead":
                    reason = message[1]
                    break
                self._loop.call_soon_threadsafe(self._on_message, message)
        except (EOFError, OSError):
            reason = self._exit_reason()
        if not self._closing:
            self.dead_reason = reason       # /health sees it now, before the event loop runs
            print(f"engine core died: {reason}", file=sys.stderr, flush=True)
            self._loop.call_soon_threadsafe(self._on_dead, reason)

    def _exit_reason(self) -> str:
        return "the engine core closed its connection"

    def _on_message(self, message) -> None:
        kind = message[0]
        if kind == "outputs":
            self._on_outputs(message[1], message[2])
        elif kind == "added":
            self._on_added(message[1], message[2])
        elif kind == "rejected":
            future = self._pending.pop(message[1])[0]
            if not future.cancelled():
                future.set_exception(ValueError(message[2]) if message[3] == "invalid" else EngineError(message[2]))

    def _on_added(self, token: int, request_id: int) -> None:
        future, ids, detokenize, params = self._pending.pop(token)
        if future.cancelled():     # the handler went away while the request was being added
            self._send(("abort", request_id))
            return
        # The request's stop strings, skip_special_tokens and include_stop_str_in_output apply here.
        detokenizer = IncrementalDetokenizer.for_request(self.tokenizer, ids, params) if detokenize else None
        stream = RequestStream(request_id, ids, detokenizer)
        self._streams[request_id] = stream
        future.set_result(stream)

    def _on_outputs(self, batch: list[tuple], stats: dict) -> None:
        self._core_stats = stats
        for request_id, new_token_ids, finish_reason, queue_time_s, *logprobs in batch:
            stream = self._streams.get(request_id)
            if stream is None:      # aborted here after the core ran its step
                continue
            if stream._feed(new_token_ids, finish_reason, queue_time_s, *logprobs).finished:
                del self._streams[request_id]
                if finish_reason is None:    # a stop string ended it here; the core still runs it
                    self._send(("abort", request_id))

    def _on_dead(self, reason: str) -> None:
        error = EngineDeadError(reason)
        for stream in self._streams.values():
            stream._fail(error)
        self._streams.clear()
        for future, *_ in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        if self.on_dead is not None:
            self.on_dead(reason)


class InProcessEngine(_CoreConnection):
    """The first version: the engine core in a thread of the server process. Its steps hold the
    GIL that the event loop, the tokenizer and the detokenizer need too, and its torch threads
    share the cores with them."""

    def __init__(self, llm, profile_path: str | None = None):
        front, back = multiprocessing.Pipe(duplex=True)
        self._core = EngineCore(llm, back)
        self._core_thread = threading.Thread(target=run_profiled, args=(self._core, profile_path),
                                             name="engine-core", daemon=True)
        self._init_front_end(front, describe(llm), sampling_params_class(llm), llm.tokenizer)

    def start(self) -> None:
        self._core_thread.start()
        self._start_reader()

    def shutdown(self) -> None:
        self._closing = True
        self._send(("shutdown",))
        if self._sender.is_alive():      # it sends the shutdown, then ends
            self._sender.join(CORE_EXIT_TIMEOUT_S)
        self._core_thread.join(CORE_EXIT_TIMEOUT_S)
        self._conn.close()


class EngineCoreClient(_CoreConnection):
    """The second version: the engine core in a process of its own, started (spawn) and loaded
    here, so that the server knows the model before it accepts requests."""

    def __init__(self, package: str, model: str, options: dict, num_threads: int | None = None,
                 profile_path: str | None = None):
        import torch
        # The front end's work is Python (HTTP, JSON, tokenizer calls): one torch thread is all it
        # needs, and the cores are left to the core's torch threads. The Rust tokenizer's own thread
        # pool only helps batches of texts; turned off, it cannot compete with the core either.
        torch.set_num_threads(1)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        ctx = multiprocessing.get_context("spawn")   # a fresh interpreter: no torch state, no threads copied
        front, back = ctx.Pipe(duplex=True)
        self.num_threads = num_threads or core_threads()
        self.process = ctx.Process(target=run_core_process, name="engine-core", daemon=True,
                                   args=(back, package, model, options, self.num_threads, profile_path))
        self.process.start()
        back.close()      # only the core holds its end now: its death closes the pipe (EOF here)
        info = self._wait_ready(front)
        self._init_front_end(front, info, importlib.import_module(package).SamplingParams, load_tokenizer(info["source"]))

    def _wait_ready(self, conn) -> dict:
        if not wait([conn, self.process.sentinel], CORE_LOAD_TIMEOUT_S):
            self.process.kill()
            raise RuntimeError(f"the engine core did not load within {CORE_LOAD_TIMEOUT_S} s")
        try:
            kind, payload = conn.recv()
        except EOFError:
            self.process.join(CORE_EXIT_TIMEOUT_S)
            raise RuntimeError(f"the engine core exited while loading (status {self.process.exitcode})") from None
        if kind == "failed":
            self.process.join(CORE_EXIT_TIMEOUT_S)
            raise ValueError(payload)
        return payload

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> None:
        self._start_reader()

    def _exit_reason(self) -> str:
        self.process.join(1.0)
        return f"the engine core process exited (status {self.process.exitcode})"

    def shutdown(self) -> None:
        self._closing = True
        self._send(("shutdown",))
        if self._sender.is_alive():      # it sends the shutdown, then ends
            self._sender.join(CORE_EXIT_TIMEOUT_S)
        self.process.join(CORE_EXIT_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(CORE_EXIT_TIMEOUT_S)
        self._conn.close()
