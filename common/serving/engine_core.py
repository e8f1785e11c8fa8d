"""The engine core: the cycle's engine and nothing else, stepping whenever work is pending.

A server has two kinds of work. The engine's (schedule, run the model, sample) is what users wait
for; everything else (HTTP, JSON, tokenizing, chat templates, detokenizing, server-sent events) is
the front end's (common/serving/engine_client.py). `EngineCore` runs the first kind only. It talks
to the front end over one `multiprocessing.connection` pipe, in small tuples:

    in:  ("add", token, prompt_token_ids, sampling params as a dict)   ("abort", request_id)   ("shutdown",)
    out: ("added", token, request_id) or ("rejected", token, message, kind)
         ("outputs", [(request_id, new_token_ids, finish_reason or None, queue_time_s or None), ...], stats)
                                            once per step; queue_time_s only with a request's first token.
                                            A request that asked for logprobs gets two more items:
                                            (..., logprobs of new_token_ids or None,
                                             prompt_logprobs (first output only) or None)
         ("dead", message)   a step raised: the core stops, as vLLM's does (EngineDeadError)

Between two steps it takes every command that arrived; with nothing to run it blocks in recv(), so
an idle core costs no CPU and never sleeps in a poll loop.

The same loop runs in a thread of the server process (InProcessEngine, the chapter's first version)
or alone in a process of its own (`run_core_process`, the second); only the second gets a GIL and
CPU cores that no HTTP handler competes for.
"""

import cProfile
import importlib
import os
import signal
import sys
import time
import traceback


class _Shutdown(Exception):
    """The front end asked the core to stop."""


class EngineCore:
    def __init__(self, llm, conn):
        self.llm, self.conn = llm, conn
        self.sampling_params_cls = sampling_params_class(llm)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.num_steps = 0
        self.step_seconds_total = 0.0      # time inside llm.step(): the core's busy time
        self._added_at: dict[int, float] = {}   # request id -> when it was added, until its first token

    def run(self) -> int:
        """Serve commands and step until told to stop (0), the front end goes away (0) or a step
        raises (1). The connection is closed on return: the front end sees EOF at once."""
        try:
            while True:
                if not self.llm.has_unfinished_requests():
                    self._handle(self.conn.recv())    # idle: block until the front end sends something
                while self.conn.poll():               # every command that arrived during the step
                    self._handle(self.conn.recv())
                if self.llm.has_unfinished_requests() and not self._step():
                    return 1
        except _Shutdown:
            return 0
        except (EOFError, OSError):                   # the front end closed its end or died
            return 0
        finally:
            self.conn.close()

    def _handle(self, command) -> None:
        kind = command[0]
        if kind == "add":
            _, token, prompt_token_ids, params = command
            try:
                request_id = self.llm.add_request(prompt_token_ids, self.sampling_params_cls(**params), detokenize=False)
            except (ValueError, TypeError) as error:   # the engine's own validation: a 400
                self.conn.send(("rejected", token, str(error), "invalid"))
                return
            except Exception as error:  # noqa: BLE001  (a bug adding one request must not stop the core)
                traceback.print_exc()
                self.conn.send(("rejected", token, f"adding the request failed: {error!r}", "internal"))
                return
            self.prompt_tokens_total += len(prompt_token_ids)
            self._added_at[request_id] = time.perf_counter()
            self.conn.send(("added", token, request_id))
        elif kind == "abort":
            # An aborted request frees its blocks now; with nothing left to step, no step would
            # report that, so the core reports its gauges itself.
            self._added_at.pop(command[1], None)
            if self.llm.abort_request(command[1]) and not self.llm.has_unfinished_requests():
                self.conn.send(("outputs", [], self.stats()))
        elif kind == "shutdown":
            raise _Shutdown
        else:
            raise ValueError(f"unknown engine core command {kind!r}")

    def _step(self) -> bool:
        started = time.perf_counter()
        try:
            outputs = self.llm.step()
        except Exception as error:  # noqa: BLE001  (whatever it was, every waiting client must hear)
            traceback.print_exc()
            self.conn.send(("dead", f"engine step failed: {error!r}"))
            return False
        self.step_seconds_total += time.perf_counter() - started
        self.num_steps += 1
        batch = [self._output_item(o, started) for o in outputs]
        self.generation_tokens_total += sum(len(o.new_token_ids) for o in outputs)
        self.conn.send(("outputs", batch, self.stats()))
        return True

    def _output_item(self, output, step_started: float) -> tuple:
        """One request's part of a step's message. vLLM's queue time (from the request's arrival in
        the engine to the start of its prefill step) comes with its first output. Logprobs travel
        only for a request that asked: those of this step's tokens (a finished output holds the
        whole generation's), and the prompt's once, with the first output."""
        added = self._added_at.pop(output.request_id, None)
        queue_time = None if added is None else max(0.0, step_started - added)
        item = (output.request_id, output.new_token_ids, output.finish_reason if output.finished else None, queue_time)
        if output.logprobs is None and output.prompt_logprobs is None:
            return item
        new = output.new_token_ids
        logprobs = None if output.logprobs is None else output.logprobs[len(output.logprobs) - len(new):]
        return item + (logprobs, output.prompt_logprobs if added is not None else None)

    def stats(self) -> dict:
        """The gauges and counters only the engine knows (the server's /metrics reads them)."""
        load = self.llm.load()
        used = load["num_kv_blocks"] - load["free_kv_blocks"]
        stats = {"num_requests_running": load["num_running"], "num_requests_waiting": load["num_waiting"],
                 "kv_cache_usage_perc": used / load["num_kv_blocks"],
                 "num_preemptions": load["preemptions"],
                 "prompt_tokens_total": self.prompt_tokens_total,
                 "generation_tokens_total": self.generation_tokens_total,
                 "num_steps": self.num_steps, "step_seconds_total": self.step_seconds_total}
        if "prefix_cache_queried_tokens" in load:                    # cycle 5 on
            stats |= {"prefix_cache_queries": load["prefix_cache_queried_tokens"],
                      "prefix_cache_hits": load["prefix_cache_hit_tokens"]}
        if "spec_decode_num_drafts" in load:                         # cycle 10, speculation on
            stats |= {k: load[k] for k in SPEC_DECODE_COUNTERS}
        return stats


SPEC_DECODE_COUNTERS = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens",
                        "spec_decode_num_accepted_tokens_per_pos")


def sampling_params_class(llm):
    """The SamplingParams of the engine's own cycle package (cycleN_xxx exports LLM and SamplingParams)."""
    return importlib.import_module(type(llm).__module__.rpartition(".")[0]).SamplingParams


def describe(llm) -> dict:
    """What the front end must know about the engine, sent once: everything it needs to tokenize,
    validate and detokenize on its own side."""
    engine = llm.describe()
    return {"source": llm.source, "vocab_size": engine["vocab_size"], "max_model_len": engine["max_model_len"],
            "eos_token_ids": engine["eos_token_ids"], "kv_pool_tokens": engine["num_kv_blocks"] * engine["block_size"],
            "stats": EngineCore(llm, None).stats()}


def core_threads() -> int:
    """The core's torch threads: OMP_NUM_THREADS when set, else every CPU this process may run on."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_core_process(conn, package: str, model: str, options: dict, num_threads: int,
                     profile_path: str | None = None) -> None:
    """The entry point of the engine core process (started with the spawn method: a fresh
    interpreter, no state copied from the server). It builds the engine, says "ready" with
    describe(), and serves until the front end says stop; its exit status says how it ended."""
    import torch

    # Ctrl+C in a terminal reaches every process of the group. The front end owns shutdown (it sends
    # "shutdown"; were it to die, the pipe's EOF ends the core), so the core must not die mid-step.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The core does the heavy math, so its torch gets every core. The front end process has set its
    # own torch to one thread: the two processes do not fight over the same cores.
    torch.set_num_threads(num_threads)
    try:
        llm = importlib.import_module(package).LLM(model, **options)
    except Exception as error:  # noqa: BLE001  (the front end reports it and exits)
        conn.send(("failed", f"{error}" if isinstance(error, (ValueError, TypeError)) else f"{error!r}"))
        conn.close()
        sys.exit(1)
    # An engine with processes of its own (cycle 11's tensor-parallel workers) reports one that dies,
    # even while idle: the core then ends as if it had died itself, and the front end answers 503 and
    # exits, as for a dead core.
    if hasattr(llm, "register_failure_callback"):
        llm.register_failure_callback(_end_core)
    print(f"engine core: pid {os.getpid()}, {num_threads} torch threads", file=sys.stderr, flush=True)
    conn.send(("ready", describe(llm)))
    sys.exit(run_profiled(EngineCore(llm, conn), profile_path))


def _end_core(message: str) -> None:
    print(f"engine core: {message}; stopping", file=sys.stderr, flush=True)
    os._exit(1)    # from a monitor thread: the pipe closes, and the front end sees a dead core


def run_profiled(core: EngineCore, profile_path: str | None) -> int:
    """core.run(), under cProfile when a path is given (scripts/profile_server.py reads the file)."""
    if profile_path is None:
        return core.run()
    profiler = cProfile.Profile()
    try:
        return profiler.runcall(core.run)
    finally:
        profiler.dump_stats(profile_path)
