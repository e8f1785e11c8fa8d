"""The engine loop of a server: ONE thread owns the engine and steps it; everyone else sends it commands.

An engine is not thread-safe (nor is its tokenizer), and it should not need to be: HTTP handlers
never touch it. A handler sends an "add" command (a function that builds the request, run on the
engine thread, so tokenizing and validation happen there too) and gets back the request id and an
asyncio.Queue that the loop fills with the request's outputs as steps produce them; a handler whose
client went away sends "abort". Between two steps the loop takes every pending command; when no
request is unfinished it blocks on the command queue instead of spinning.

The loop also publishes a snapshot of the engine's state after every step (/metrics reads it),
replacing the whole dict at once, so readers need no lock.
"""

import asyncio
import queue
import threading
import time
import traceback

IDLE_POLL_S = 0.5   # how often an idle loop wakes up to check whether it should stop


class EngineError(RuntimeError):
    """A step failed: every request that was in flight gets this instead of its outputs."""


class EngineLoop:
    def __init__(self, llm):
        self.llm = llm
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.snapshot = self._take_snapshot()

    # --- called from the server's event loop -------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def add(self, build) -> tuple[int, int, asyncio.Queue]:
        """Queue a request: `build(llm)` runs on the engine thread and returns (prompt token ids,
        SamplingParams), raising ValueError/TypeError for bad input. Returns (request id, prompt
        tokens, the queue its outputs arrive on); raises what build or the engine's validation raised."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        outputs: asyncio.Queue = asyncio.Queue()
        self._commands.put(("add", build, loop, future, outputs))
        request_id, num_prompt_tokens = await future
        return request_id, num_prompt_tokens, outputs

    def abort(self, request_id: int) -> None:
        self._commands.put(("abort", request_id))

    # --- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            idle = not self.llm.has_unfinished_requests()
            self._take_commands(block=idle)
            if self.llm.has_unfinished_requests():
                self._step()
            self.snapshot = self._take_snapshot()

    def _take_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=IDLE_POLL_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, command) -> None:
        kind = command[0]
        if kind == "add":
            _, build, loop, future, outputs = command
            try:
                prompt_token_ids, params = build(self.llm)
                request_id = self.llm.add_request(prompt_token_ids, params)
            except (ValueError, TypeError) as error:
                loop.call_soon_threadsafe(_settle, future, None, error)
                return
            self._streams[request_id] = (loop, outputs)
            self.prompt_tokens_total += len(prompt_token_ids)
            loop.call_soon_threadsafe(_settle, future, (request_id, len(prompt_token_ids)), None, self)
        elif kind == "abort":
            request_id = command[1]
            if self.llm.abort_request(request_id):
                self._streams.pop(request_id, None)

    def _step(self) -> None:
        try:
            outputs = self.llm.step()
        except Exception as error:  # noqa: BLE001  (whatever it was, every waiting client must hear)
            traceback.print_exc()
            failure = EngineError(f"engine step failed: {error!r}")
            for request_id, (loop, stream) in list(self._streams.items()):
                self.llm.abort_request(request_id)
                loop.call_soon_threadsafe(stream.put_nowait, failure)
            self._streams.clear()
            return
        for out in outputs:
            self.generation_tokens_total += len(out.new_token_ids)
            target = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
            if target is not None:
                loop, stream = target
                loop.call_soon_threadsafe(stream.put_nowait, out)

    def _take_snapshot(self) -> dict:
        scheduler, blocks = self.llm.scheduler, self.llm.block_manager
        return {"num_requests_running": len(scheduler.running), "num_requests_waiting": len(scheduler.waiting),
                "kv_cache_usage_perc": blocks.num_used_blocks / blocks.num_blocks,
                "prompt_tokens_total": self.prompt_tokens_total,
                "generation_tokens_total": self.generation_tokens_total, "time": time.time()}


def _settle(future: asyncio.Future, result, error, loop_owner: EngineLoop | None = None) -> None:
    """Runs on the server's event loop. A handler cancelled while its request was being added (its
    client left) no longer awaits the future: the request it added is aborted instead of orphaned."""
    if future.cancelled():
        if result is not None and loop_owner is not None:
            loop_owner.abort(result[0])
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
