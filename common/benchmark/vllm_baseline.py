"""The real vLLM as one more row of compare.py: how far is the course's engine from the one it copies?

vLLM usually lives in a virtualenv of its own (its wheel pins its own torch), so compare.py runs
`python -m common.benchmark.bench --engine vllm` under that virtualenv's interpreter
(`--vllm-python`), with this project on PYTHONPATH. This module therefore needs only what such a
virtualenv has: vLLM, torch and transformers (and httpx, a vLLM dependency, for the online run).

Like for like with the cycles: the same token ids (as TokensPrompt), greedy, ignore_eos,
max_num_seqs, dtype and device, and eager execution (`enforce_eager=True`, which
`--option enforce_eager=False` turns off); everything else is vLLM's own default. The model is the
local directory our model source resolved (HF_HUB_OFFLINE=1: nothing is downloaded).

Offline, the requests are added to vLLM's engine (LLM.llm_engine) and stepped until done, the loop
LLM.generate runs itself, but asking for every step's new tokens (RequestOutputKind.DELTA): that is
how each request's first-token and finish times are seen, since LLM.generate returns only the end.
Online, vLLM's own OpenAI server is started and driven by our HTTP driver (http_bench.py).

Memory: vLLM runs its engine core and model worker in child processes, so the peak is the sum of
the peak RSS (VmHWM) of this process and all its children, reset after the warm-up like the
cycles' peak. On a CPU it includes the KV cache vLLM allocates up front (VLLM_CPU_KVCACHE_SPACE).
"""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time

VLLM_ENGINE = "vllm"

# Options of ours that mean the same in vLLM and go through; any other --option is reported as not
# taken. max_num_seqs itself defaults to the cycles' value on the device (bench.hf_batch_limits).
VLLM_OPTIONS = ("max_num_seqs", "max_num_batched_tokens", "enforce_eager", "speculative_config")   # same names as ours

# GiB of KV cache vLLM reserves on a CPU (its default reserves more than a small machine may have).
CPU_KVCACHE_SPACE_GIB = 4

SERVER_START_TIMEOUT_S = 900   # vLLM's start-up (import, load, warm-up) took ~2 minutes on 2 busy cores
SERVED_MODEL_NAME = "model"


def vllm_importable(python: str | None = None) -> bool:
    """Whether `python` (None: this interpreter) can import vllm, without importing it (seconds saved)."""
    if python is None:
        return importlib.util.find_spec("vllm") is not None
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def choose_vllm_python(flag: str | None, weights: str) -> tuple[str | None, str | None]:
    """compare.py's vLLM interpreter: --vllm-python, else this one if it can import vllm; or None
    and the note saying why there is no vLLM row. A --vllm-python that cannot import vllm is an error."""
    if flag and not vllm_importable(flag):
        raise SystemExit(f"--vllm-python {flag}: this interpreter cannot import vllm")
    python = flag or (sys.executable if vllm_importable() else None)
    if python is None:
        return None, "no vLLM row: this interpreter cannot import vllm (--vllm-python PATH names one that can)"
    if weights != "real":
        return None, f"no vLLM row: it needs the model's real weights, and the model resolved to {weights} ones"
    return python, None


def cpu_list() -> str:
    """The CPUs this process may run on, as '0-3' or '0,2,5'."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if cpus == list(range(cpus[0], cpus[-1] + 1)):
        return f"{cpus[0]}-{cpus[-1]}"
    return ",".join(map(str, cpus))


def vllm_env(base: dict | None = None) -> dict:
    """The environment vLLM runs in (values already set in `base` win).

    Threads: vLLM's default CPU binding ("auto") keeps one core back for its scheduler process, so on
    2 cores it computes on 1 while the cycles' torch uses both. Binding its OpenMP threads to every
    CPU this process may use gives it the same cores as the cycles. To measure vLLM as it starts
    by default as well, run compare.py again with VLLM_CPU_OMP_THREADS_BIND=auto set (a value set
    wins; bench.py stores it in the row's stats)."""
    env = dict(os.environ if base is None else base)
    defaults = {"VLLM_CPU_KVCACHE_SPACE": str(CPU_KVCACHE_SPACE_GIB), "VLLM_CPU_OMP_THREADS_BIND": cpu_list(),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    return defaults | env


def vllm_settings(options: dict, max_num_seqs: int) -> tuple[dict, list[str]]:
    """The engine arguments vLLM gets beside model and dtype, and the options it does not take."""
    settings = {"enforce_eager": True, "max_num_seqs": max_num_seqs}
    settings |= {k: v for k, v in options.items() if k in VLLM_OPTIONS}
    return settings, sorted(set(options) - set(VLLM_OPTIONS))


def vllm_version() -> str | None:
    import vllm

    return getattr(vllm, "__version__", None)


def check_device(device) -> None:
    """vLLM runs on the platform its wheel was built for: refuse a run on another device."""
    from vllm.platforms import current_platform

    if current_platform.device_type != device.type:
        raise ValueError(f"this vLLM runs on {current_platform.device_type!r}, not on the cycles' device {device.type!r}")


# -- peak memory of a process tree -----------------------------------------------------------------


def _tree_pids() -> list[int]:
    try:
        import psutil   # a vLLM dependency
    except ImportError:
        return [os.getpid()]
    me = psutil.Process()
    return [me.pid] + [c.pid for c in me.children(recursive=True)]


def reset_tree_peak(pids: list[int]) -> bool:
    """Reset the peak RSS of every process (see metrics.reset_peak_memory); whether all were reset."""
    done = True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            done = False
    return done


def tree_peak_bytes(pids: list[int]) -> int:
    """The sum of the processes' peak RSS (VmHWM): an upper bound of the tree's peak (the peaks
    of two processes need not fall at the same moment)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            pass
    return total


# -- offline ---------------------------------------------------------------------------------------


def _step_all(engine, requests, make_params, make_prompt, first_id: int = 0, clock=time.perf_counter) -> dict:
    """Add every request (ids from first_id on: no id is used twice), then step until all finish;
    per request: tokens, first-token and finish time in seconds since the first request was added."""
    n = len(requests)
    tokens, first, finish = [[] for _ in range(n)], [None] * n, [None] * n
    start = clock()
    for i, r in enumerate(requests):
        engine.add_request(str(first_id + i), make_prompt(r.prompt_token_ids), make_params(r))
    while engine.has_unfinished_requests():
        for out in engine.step():
            now, i = clock() - start, int(out.request_id) - first_id
            new = list(out.outputs[0].token_ids)
            if new and first[i] is None:
                first[i] = now
            tokens[i] += new
            if out.finished:
                finish[i] = now
    return {"token_ids": tokens, "ttft_s": first, "latency_s": finish, "wall_s": clock() - start}


def run_vllm(model_dir: str, requests: list, warmup, dtype_name: str, settings: dict) -> dict:
    """Load vLLM on model_dir, warm up on one request, then run `requests` greedily (module doc)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    def params(r):
        return SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=r.ignore_eos,
                              output_kind=RequestOutputKind.DELTA)

    def prompt(ids):
        return TokensPrompt(prompt_token_ids=list(ids))

    start = time.perf_counter()
    llm = LLM(model=model_dir, dtype=dtype_name, **settings)
    _step_all(llm.llm_engine, [warmup], params, prompt)
    load_s = time.perf_counter() - start
    pids = _tree_pids()
    reset = reset_tree_peak(pids)
    run = _step_all(llm.llm_engine, requests, params, prompt, first_id=1)
    return run | {"load_s": load_s, "peak_memory_bytes": tree_peak_bytes(pids), "peak_reset": reset,
                  "processes": len(pids)}


# -- online: vLLM's OpenAI server driven by our HTTP driver ------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(python: str, model_dir: str, dtype_name: str, settings: dict, port: int) -> list[str]:
    """vLLM's OpenAI server with the same engine arguments as the offline run."""
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", SERVED_MODEL_NAME, "--dtype", dtype_name, "--port", str(port),
           "--host", "127.0.0.1", "--max-num-seqs", str(settings["max_num_seqs"])]
    if settings.get("max_num_batched_tokens"):
        cmd += ["--max-num-batched-tokens", str(settings["max_num_batched_tokens"])]
    if settings.get("enforce_eager"):
        cmd.append("--enforce-eager")
    return cmd


def run_vllm_online(model_dir: str, requests: list, dtype_name: str, settings: dict, online: dict,
                    start_timeout_s: float = SERVER_START_TIMEOUT_S) -> dict:
    """Start vLLM's server, replay the online workload against it over HTTP, stop it (its whole
    process group, whatever happens). Returns the request records and the server tree's peak RSS."""
    import asyncio

    from common.benchmark.http_bench import run_http, wait_healthy
    from common.benchmark.online import arrival_times

    port = free_port()
    start = time.perf_counter()
    server = subprocess.Popen(server_command(sys.executable, model_dir, dtype_name, settings, port),
                              env=vllm_env(), start_new_session=True, stdout=sys.stderr, stderr=sys.stderr)
    try:
        base_url = f"http://127.0.0.1:{port}"
        if not wait_healthy(base_url, start_timeout_s):
            raise RuntimeError(f"vLLM's server did not answer /health within {start_timeout_s:g} s"
                               f" (exit code {server.poll()})")
        load_s = time.perf_counter() - start
        arrivals = arrival_times(len(requests), online["request_rate"], online["burstiness"])
        records = asyncio.run(run_http(base_url + "/v1", SERVED_MODEL_NAME, requests, arrivals))
        pids = [server.pid] + _children(server.pid)
        return {"records": records, "load_s": load_s, "peak_memory_bytes": tree_peak_bytes(pids)}
    finally:
        stop_group(server)


def _children(pid: int) -> list[int]:
    try:
        import psutil
    except ImportError:
        return []
    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


def stop_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM the process group (vLLM shuts its engine down), then SIGKILL whatever is left of it
    after grace_s: no vLLM process may outlive the benchmark."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
