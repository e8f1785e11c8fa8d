"""The front end's slow work, off the event loop: a few threads and a bounded queue.

Tokenizing a long prompt, rendering a chat template, decoding an echoed prompt or a /detokenize
request take from milliseconds to seconds; on the event loop they would stall every other client
(/health included) for that long. Here they run in FRONT_END_THREADS threads, and the event loop
keeps answering meanwhile (tests/test_hostile_clients.py measures /health while a long prompt is
tokenized). At most MAX_QUEUED jobs may wait for a thread: past that a request gets 429
with Retry-After at once, instead of queueing without bound (429, not 503: the server is fine,
the clients together ask too much at once, as with --max-waiting-requests).
"""

import asyncio
import functools
import threading
from concurrent.futures import ThreadPoolExecutor

from common.serving.openai_protocol import APIError

FRONT_END_THREADS = 2
# A burst is not an attack: vLLM's benchmark at --request-rate inf sends every request at once, and
# with 64 here 22 of 200 small requests got a 429 (docs/results/cpu-vs-vllm-saturation-max-queued-64/).
# Each queued job's request body is in memory already; the bound only stops an unbounded pile-up.
MAX_QUEUED = 4096
RETRY_AFTER_S = 1


class WorkerPool:
    def __init__(self, threads: int = FRONT_END_THREADS, max_queued: int = MAX_QUEUED):
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="front-end")
        # Held from submit until the job has finished in its thread, even when the request that
        # asked for it is gone: a job already running cannot be stopped, so it still counts.
        self._slots = threading.BoundedSemaphore(threads + max_queued)

    async def run(self, fn, *args, **kwargs):
        if not self._slots.acquire(blocking=False):
            raise APIError(429, "the server is busy preparing other requests; retry later", "rate_limit_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        try:
            future = self._pool.submit(functools.partial(fn, *args, **kwargs))
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
