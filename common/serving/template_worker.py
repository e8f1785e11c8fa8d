"""A client's chat template, rendered in a process of its own with a time, memory and size limit.

A template sent in a request (`chat_template`, only with `--trust-request-chat-template`) is a
program the client wrote. Jinja's sandbox keeps it from reaching the server's objects, but not from
looping for minutes (`range` nests), building a gigabyte (`'a' * 10**9`, `tojson(indent=10**9)`,
a namespace doubling a string), or sending a rendered prompt of any size. Python cannot stop a
thread, so the render runs in a small worker process (jinja2 only, no torch) that the server can
kill:

- time: the server waits RENDER_TIMEOUT_S for the answer, then kills the worker (the next client
  template starts a fresh one) and answers 400;
- memory: the worker's address space is capped (RLIMIT_AS); a MemoryError there is a 400;
- CPU: the worker runs at a lower priority (nice 10) than the engine core;
- output: rendering streams (`Template.generate`) and stops past MAX_RENDERED_CHARS;
- one render at a time: a request that finds the worker busy for BUSY_WAIT_S gets 429;
- compiled templates are kept in a small LRU (MAX_COMPILED), so many distinct templates cannot
  grow the worker either.

The variables are those transformers gives a template: `messages`, `add_generation_prompt`,
`continue_final_message`'s effect is the caller's, the tokenizer's special tokens, the request's
`chat_template_kwargs`, and `raise_exception` / `strftime_now`. The model's own template is trusted
and rendered by transformers, in the server's worker pool (server.py).

Protocol (stdin/stdout of the worker): one JSON line per request, one JSON line per answer:
{"text": ...} or {"error": ...}.
"""

import json
import os
import select
import subprocess
import sys
import threading
from collections import OrderedDict

RENDER_TIMEOUT_S = 2.0
MAX_RENDERED_CHARS = 2 * 2**20
MAX_COMPILED = 16
MEMORY_LIMIT_BYTES = 1 * 2**30
MAX_JSON_INDENT = 16
BUSY_WAIT_S = 0.5
WORKER_NICENESS = 10


class TemplateBusy(RuntimeError):
    """The worker is rendering another request's template (the server answers 429)."""


# --- the worker process ------------------------------------------------------------------------------

def _environment():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"the template raised: {message}")

    def strftime_now(fmt):
        import datetime
        return datetime.datetime.now().strftime(str(fmt)[:64])

    def tojson(value, indent=None, separators=None, sort_keys=False):
        if indent is not None and (not isinstance(indent, int) or not 0 <= indent <= MAX_JSON_INDENT):
            raise ValueError(f"tojson: indent must be an int in [0, {MAX_JSON_INDENT}]")
        return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env


def _render(env, compiled: OrderedDict, job: dict) -> str:
    source = job["template"]
    template = compiled.pop(source, None) or env.from_string(source)
    compiled[source] = template
    while len(compiled) > MAX_COMPILED:
        compiled.popitem(last=False)
    parts, size = [], 0
    for piece in template.generate(**job["variables"]):
        size += len(piece)
        if size > MAX_RENDERED_CHARS:
            raise ValueError(f"the rendered chat is over {MAX_RENDERED_CHARS} characters")
        parts.append(piece)
    return "".join(parts)


def worker_main() -> None:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    os.nice(WORKER_NICENESS)   # a runaway template gets the CPU the engine leaves, not the engine's
    env, compiled = _environment(), OrderedDict()
    for line in sys.stdin:
        try:
            answer = {"text": _render(env, compiled, json.loads(line))}
        except MemoryError:
            answer = {"error": f"MemoryError: the template needs more than {MEMORY_LIMIT_BYTES >> 20} MiB"}
        except Exception as error:  # noqa: BLE001  (a template may raise anything: its request gets it)
            answer = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


# --- the server's side -----------------------------------------------------------------------------

class TemplateWorker:
    """The server's handle on the worker: render() from any thread, one render at a time."""

    def __init__(self):
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        if self._process is None or self._process.poll() is not None:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            self._process = subprocess.Popen([sys.executable, "-m", "common.serving.template_worker"],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                             text=True, bufsize=1)
        return self._process

    def render(self, template: str, variables: dict) -> str:
        """The text, or ValueError saying why not (raised, too slow, too large, out of memory)."""
        # One render at a time; a request does not queue behind a slow one for long (the pool's
        # threads are shared with tokenizing): busy past BUSY_WAIT_S is a 429, retry later.
        if not self._lock.acquire(timeout=BUSY_WAIT_S):
            raise TemplateBusy(f"another client's chat template is rendering; retry in {RENDER_TIMEOUT_S:.0f} s")
        try:
            process = self._start()
            try:
                process.stdin.write(json.dumps({"template": template, "variables": variables}) + "\n")
                process.stdin.flush()
            except (BrokenPipeError, OSError):
                self.close()
                raise ValueError("the template worker failed; try again") from None
            ready, _, _ = select.select([process.stdout], [], [], RENDER_TIMEOUT_S)
            line = process.stdout.readline() if ready else ""
            if not line:
                self.close()      # too slow (or it died): a fresh worker serves the next template
                raise ValueError(f"the chat template did not render within {RENDER_TIMEOUT_S} s")
        finally:
            self._lock.release()
        answer = json.loads(line)
        if "error" in answer:
            raise ValueError(answer["error"])
        return answer["text"]

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(5)
            self._process = None


if __name__ == "__main__":
    worker_main()
