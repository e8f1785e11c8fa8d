"""Measure one engine on one workload and write the result as JSON.

    python -m common.benchmark.bench --engine cycle4_batching --workload throughput --device cpu \
        --model HuggingFaceTB/SmolLM2-135M-Instruct --quick --out result.json

`--engine` is a cycle package (cycle1_naive ... cycle7_int8), an HF baseline (hf_generate,
hf_generate_batch) or `vllm`, the real vLLM (common/benchmark/vllm_baseline.py; --model is then a
local directory). compare.py runs this once per engine, each in a fresh process, so one engine's
memory, caches and allocator state can never leak into the next one's numbers.
"""

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from common.engine.args import add_model_args, parse_options
from common.engine.cli import engine_options
from common.engine.device import default_model, resolve_device, resolve_dtype
from common.engine.memory import MemoryEstimateError
from common.engine.metrics import (PEAK_GENERATION, PEAK_WITH_LOADING, peak_memory_bytes, peak_rss_bytes,
                            reset_peak_memory, summarize)
from common.benchmark.machine import machine_info
from common.benchmark.vllm_baseline import VLLM_ENGINE
from common.benchmark.workloads import WORKLOADS, check_supported, make_workload, parse_length_range, warmup_request

HF_ENGINES = ("hf_generate", "hf_generate_batch")

# The HF baseline needs the same weights as the cycles; with random weights only a cycle can make
# them (the model directory holds just a config), and cycle 1 is the reference every cycle matches.
REFERENCE_CYCLE = "cycle1_naive"

# The HF baselines get the batch limits the cycles use on the device: max_num_seqs, and for
# continuous batching the token budget of one step. The first continuous-batching cycle has both.
BATCH_LIMITS_CYCLE = "cycle4_batching"
HF_LIMITS = {"hf_generate": ("max_num_seqs",), "hf_generate_batch": ("max_num_seqs", "max_num_batched_tokens")}

# Exit status of `python -m common.benchmark.bench` when the engine refused the workload for memory (its
# estimate is over the limit): the --out JSON then holds "refused" instead of a result.
EXIT_OUT_OF_MEMORY = 3

# Cycles 1-5 spell attention out as torch ops (QK^T, mask, softmax, V) and report no backend.
EXPLICIT_ATTENTION = "explicit"


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _accepted_options(engine: str, options: dict) -> tuple[dict, list[str]]:
    """Split options into those the engine accepts and the rest, so one `--option` list (say
    block_size=16, which cycle 1 has no use for) can go to every cycle; the result records the rest."""
    params = engine_options(engine)
    accepted = {k: v for k, v in options.items() if k in params}
    return accepted, sorted(set(options) - set(accepted))


def _greedy_params(cycle, requests) -> list:
    return [cycle.SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=r.ignore_eos)
            for r in requests]


def _run_cycle(engine: str, workload: str, device, model: str, weights: str, quick: bool, dtype,
               options: dict, size: dict, online: dict | None = None) -> dict:
    cycle = importlib.import_module(engine)
    accepted, ignored = _accepted_options(engine, options)
    start = time.perf_counter()
    llm = cycle.LLM(model, device=device, dtype=dtype, weights=weights, **accepted)
    load_s = time.perf_counter() - start
    work = make_workload(workload, llm.tokenizer, device.type, quick,
                         max_model_len=llm.source.config.max_position_embeddings, **size)

    # Warm-up pays one-time costs (kernel selection, allocator growth) outside the measurement.
    warm = warmup_request(llm.tokenizer)
    llm.generate([warm.prompt_token_ids], _greedy_params(cycle, [warm]))
    peak_scope = PEAK_GENERATION if reset_peak_memory(device) else PEAK_WITH_LOADING

    if workload == "online":   # requests arrive over time (common/benchmark/online.py)
        return _run_cycle_online(llm, cycle, work, online or {}, load_s, peak_scope, ignored)
    start = time.perf_counter()
    outputs = llm.generate([r.prompt_token_ids for r in work.requests], _greedy_params(cycle, work.requests))
    wall_s = time.perf_counter() - start
    stats = dict(llm.stats)
    return {
        "source": llm.source, "dtype": llm.dtype, "work": work, "wall_s": wall_s, "load_s": load_s,
        "token_ids": [list(o.token_ids) for o in outputs],
        "ttft_s": [o.metrics.ttft_s for o in outputs],
        "latency_s": [o.metrics.latency_s for o in outputs],
        "peak_memory_bytes": peak_memory_bytes(device), "peak_memory_scope": peak_scope,
        "weight_bytes": stats.get("weight_bytes"),
        "kv_cache_peak_bytes": stats.get("kv_cache_peak_bytes"),
        "attention_backend": stats.get("attention_backend", EXPLICIT_ATTENTION),
        "int8_path": stats.get("int8_matmul"),
        "stats": stats, "ignored_options": ignored,
    }


def _run_cycle_online(llm, cycle, work, online: dict, load_s: float, peak_scope: str, ignored: list) -> dict:
    from common.benchmark.online import online_row, online_settings, run_online_engine

    settings = online_settings(work.device_size, **online)
    start = time.perf_counter()
    kv_peaks = []    # a static engine's batches; an engine with step() keeps its run's peak itself
    records = run_online_engine(llm, cycle, work, settings, kv_peaks=kv_peaks)
    wall_s = time.perf_counter() - start
    kv_peak = llm.load()["kv_cache_peak_bytes"] if hasattr(llm, "step") else max(filter(None, kv_peaks), default=None)
    return {
        "source": llm.source, "dtype": llm.dtype, "work": work, "wall_s": wall_s, "load_s": load_s,
        "token_ids": [r.token_ids for r in records],
        "ttft_s": [r.token_times_s[0] - r.arrival_s for r in records],   # from each request's arrival
        "latency_s": [r.finish_s - r.arrival_s for r in records],
        "peak_memory_bytes": peak_memory_bytes(llm.device), "peak_memory_scope": peak_scope,
        "weight_bytes": llm.stats.get("weight_bytes"), "kv_cache_peak_bytes": kv_peak,
        # what the engine reported at the warm-up's generate(): config holds only what was asked for
        "attention_backend": llm.stats.get("attention_backend", EXPLICIT_ATTENTION),
        "int8_path": llm.stats.get("int8_matmul"),
        "stats": {}, "ignored_options": ignored, "online": online_row(records, settings),
    }


def hf_batch_limits(engine: str, device, options: dict) -> dict:
    """The cycles' default limits on this device for what `engine` can take, overridden by options."""
    defaults = importlib.import_module(f"{BATCH_LIMITS_CYCLE}.config").DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    return {key: options.get(key, defaults[key]) for key in HF_LIMITS[engine]}


def _run_hf(engine: str, workload: str, device, model: str, weights: str, quick: bool, dtype,
            options: dict, size: dict) -> dict:
    from common.benchmark.hf_baseline import run_hf
    from common.engine.model_source import load_tokenizer, resolve_model

    start = time.perf_counter()
    source = resolve_model(model, weights)
    dtype = resolve_dtype(dtype, device)
    state_dict = None
    if source.weights == "random":
        # Built on the CPU: random weights are drawn on the CPU whatever the device, so they are
        # the same, and a copy held on the GPU would count against HF's peak memory.
        reference = importlib.import_module(REFERENCE_CYCLE).LLM(model, device="cpu", dtype=dtype, weights=weights)
        tokenizer, state_dict = reference.tokenizer, dict(reference.model.state_dict())
        del reference  # the state dict keeps the weights alive; the rest of the engine can go
    else:
        tokenizer = load_tokenizer(source)
    work = make_workload(workload, tokenizer, device.type, quick,
                         max_model_len=source.config.max_position_embeddings, **size)
    prepared_s = time.perf_counter() - start

    limits = hf_batch_limits(engine, device, options)
    budget = {"max_batch_tokens": limits["max_num_batched_tokens"]} if "max_num_batched_tokens" in limits else {}
    call_start = time.perf_counter()
    run = run_hf(source.path, work.requests, str(device), dtype, engine.removeprefix("hf_"),
                 max_num_seqs=limits["max_num_seqs"], state_dict=state_dict, **budget)
    call_s = time.perf_counter() - call_start
    per_request = ("token_ids", "ttft_s", "latency_s")
    return {
        "source": source, "dtype": dtype, "work": work, "wall_s": run["wall_s"],
        # run_hf loads the model and warms up before it starts its clock: all that is loading time.
        "load_s": prepared_s + call_s - run["wall_s"],
        "token_ids": run["token_ids"], "ttft_s": run["ttft_s"], "latency_s": run["latency_s"],
        # run_hf reports CUDA's allocator peak after its warm-up; on CPU (None) this subprocess's
        # peak RSS stands in, and it includes loading: run_hf loads and generates in one call.
        "peak_memory_bytes": run["peak_memory_bytes"] if run["peak_memory_bytes"] is not None else peak_rss_bytes(),
        "peak_memory_scope": PEAK_GENERATION if run["peak_memory_bytes"] is not None else PEAK_WITH_LOADING,
        "weight_bytes": run["weight_bytes"],
        "kv_cache_peak_bytes": None,  # transformers does not report it
        "attention_backend": run["attn_implementation"],
        "int8_path": None,
        "stats": {k: v for k, v in run.items() if k not in per_request} | limits,
        # Options HF cannot take, and settings this transformers release has no field for: reported.
        "ignored_options": sorted(set(options) - set(limits)) + [f"{name} (not in this transformers)"
                                                                 for name in run["unsupported_settings"]],
    }


def _run_vllm(engine: str, workload: str, device, model: str, weights: str, quick: bool, dtype,
              options: dict, size: dict, online: dict | None = None) -> dict:
    """The real vLLM on the same requests (common/benchmark/vllm_baseline.py); `model` must be a
    local directory with real weights, as the vLLM virtualenv cannot resolve our model names."""
    from common.benchmark import vllm_baseline as vb
    from common.engine.model_source import load_tokenizer, resolve_model

    vb.check_device(device)
    source = resolve_model(model, weights)
    if source.weights != "real" or not os.path.isdir(source.path):
        raise ValueError(f"vLLM needs a local directory with real weights; {model!r} resolved to "
                         f"{source.weights} weights at {source.path}")
    os.environ.update(vb.vllm_env())
    dtype = resolve_dtype(dtype, device)
    settings, ignored = vb.vllm_settings(options, hf_batch_limits("hf_generate", device, options)["max_num_seqs"])
    tokenizer = load_tokenizer(source)
    work = make_workload(workload, tokenizer, device.type, quick,
                         max_model_len=source.config.max_position_embeddings, **size)
    common = {"source": source, "dtype": dtype, "work": work, "weight_bytes": None, "kv_cache_peak_bytes": None,
              "attention_backend": "vllm", "int8_path": None, "ignored_options": ignored}
    stats = settings | {key: os.environ[key] for key in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND")}
    stats["vllm_version"] = vb.vllm_version()
    if workload == "online":
        return common | _run_vllm_online(source.path, work, _dtype_name(dtype), settings, online or {}) | {"stats": stats}
    run = vb.run_vllm(source.path, work.requests, warmup_request(tokenizer), _dtype_name(dtype), settings)
    return common | {
        "wall_s": run["wall_s"], "load_s": run["load_s"], "token_ids": run["token_ids"],
        "ttft_s": run["ttft_s"], "latency_s": run["latency_s"], "peak_memory_bytes": run["peak_memory_bytes"],
        "peak_memory_scope": PEAK_GENERATION if run["peak_reset"] else PEAK_WITH_LOADING,
        "stats": stats | {"processes": run["processes"]},
    }


def _run_vllm_online(model_dir: str, work, dtype_name: str, settings: dict, online: dict) -> dict:
    from common.benchmark.online import online_row, online_settings
    from common.benchmark.vllm_baseline import run_vllm_online

    chosen = online_settings(work.device_size, **online)
    run = run_vllm_online(model_dir, work.requests, dtype_name, settings, chosen)
    records = run["records"]
    return {
        "wall_s": max((r.finish_s or 0.0 for r in records), default=0.0), "load_s": run["load_s"],
        "token_ids": None,   # the HTTP driver counts tokens but does not read their ids
        "output_tokens": sum(r.num_output_tokens for r in records),
        "ttft_s": [r.token_times_s[0] - r.arrival_s if r.token_times_s else None for r in records],
        "latency_s": [r.finish_s - r.arrival_s if r.finish_s is not None else None for r in records],
        "peak_memory_bytes": run["peak_memory_bytes"], "peak_memory_scope": PEAK_WITH_LOADING,
        "online": online_row(records, chosen),
    }


def run_engine(engine: str, workload: str, device=None, model: str | None = None, weights: str = "auto",
               quick: bool = False, dtype=None, options: dict | None = None,
               num_requests: int | None = None, prompt_len: int | None = None, online: dict | None = None,
               output_len: tuple[int, int] | None = None) -> dict:
    """Run one engine on one workload in this process and return the result dict (see module doc).
    `online`: request_rate, burstiness, slo_ttft_s, slo_tpot_s of the online workload (None: defaults)."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}: choose one of {', '.join(WORKLOADS)}")
    if workload == "online" and engine in HF_ENGINES:
        raise ValueError("the online workload needs a cycle or vllm (HF generate has no server loop)")
    check_supported(engine, workload)
    device = resolve_device(device)
    model = model or default_model(device)
    runner = _run_hf if engine in HF_ENGINES else _run_vllm if engine == VLLM_ENGINE else _run_cycle
    size = {"num_requests": num_requests, "prompt_len": prompt_len, "output_len": output_len}   # overrides of the size
    extra = {"online": online} if workload == "online" else {}
    run = runner(engine, workload, device, model, weights, quick, dtype, options or {}, size, **extra)

    source, work = run["source"], run["work"]
    output_tokens = run["output_tokens"] if "output_tokens" in run else sum(len(ids) for ids in run["token_ids"])
    return {
        "engine": engine,
        "model": source.name,
        "weights": source.weights,
        "origin": source.origin,
        "weights_note": source.fallback_reason,   # why an offline fallback was used; None: none was
        "device": str(device),
        "dtype": _dtype_name(run["dtype"]),
        "workload": workload,
        "workload_size": work.device_size,
        "num_requests": len(work.requests),
        "prompt_tokens": sum(len(r.prompt_token_ids) for r in work.requests),
        **summarize(run["ttft_s"], run["latency_s"], output_tokens, run["wall_s"]),
        "ttft_s": run["ttft_s"],
        "latency_s": run["latency_s"],
        "peak_memory_bytes": run["peak_memory_bytes"],
        "peak_memory_scope": run["peak_memory_scope"],
        "weight_bytes": run["weight_bytes"],
        "kv_cache_peak_bytes": run["kv_cache_peak_bytes"],
        "attention_backend": run["attention_backend"],
        "int8_path": run["int8_path"],
        "load_s": run["load_s"],
        "options": options or {},
        "ignored_options": run["ignored_options"],
        "stats": run["stats"],
        "machine": machine_info(device),
        "token_ids": run["token_ids"],
        **run.get("online", {}),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m common.benchmark.bench", description="Benchmark one engine on one workload.")
    p.add_argument("--engine", required=True, help=f"a cycle package (e.g. cycle4_batching), one of {', '.join(HF_ENGINES)}, "
                                                   f"or {VLLM_ENGINE}")
    p.add_argument("--workload", default="throughput", choices=WORKLOADS)
    add_model_args(p)
    p.add_argument("--quick", action="store_true", help="the tiny smoke-test size of the workload")
    p.add_argument("--num-requests", type=int, default=None, help="override the workload size's request count")
    p.add_argument("--prompt-len", type=int, default=None, help="give every prompt this many tokens of its own")
    p.add_argument("--output-len", type=parse_length_range, default=None, metavar="N|LO-HI",
                   help="every request's max_tokens: N, or uniform in LO-HI")
    p.add_argument("--out", default=None, help="write the JSON here (default: print it)")
    # --workload online only (common/benchmark/online.py); unset: the size's defaults there
    p.add_argument("--request-rate", type=float, default=None, help="online: requests per second (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="online: gamma shape of the arrival gaps (1: Poisson)")
    p.add_argument("--slo-ttft", type=float, default=None, help="online: goodput's TTFT target, seconds")
    p.add_argument("--slo-tpot", type=float, default=None, help="online: goodput's TPOT target, seconds")
    return p


def refusal(engine: str, error: Exception) -> dict:
    """What the --out JSON holds when the engine refused the workload for memory."""
    return {"engine": engine, "refused": "out_of_memory", "message": str(error),
            "estimate_bytes": getattr(error, "estimate_bytes", None), "limit_bytes": getattr(error, "limit_bytes", None)}


def _write(text: str, out: str | None) -> None:
    if out is None:
        print(text)
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run_engine(args.engine, args.workload, args.device, args.model, args.weights, args.quick,
                            args.dtype, parse_options(args.option), args.num_requests, args.prompt_len,
                            online={"request_rate": args.request_rate, "burstiness": args.burstiness,
                                    "slo_ttft_s": args.slo_ttft, "slo_tpot_s": args.slo_tpot},
                            output_len=args.output_len)
    except MemoryEstimateError as error:
        # Cycles 1-2 refusing a static batch that cannot fit: an expected outcome, told apart from a
        # crash. A CUDA out-of-memory error that no estimate foresaw stays a crash: something to fix.
        _write(json.dumps(refusal(args.engine, error), indent=1), args.out)
        print(f"{args.engine}: out of memory: {error}", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    # default=str: engines may put non-JSON values (a torch.dtype, a device) into their stats.
    _write(json.dumps(result, indent=1, default=str), args.out)
    if args.out is not None:
        print(f"{args.engine}: {result['output_tokens']} tokens in {result['wall_s']:.2f}s = "
              f"{result['throughput_tok_s']:.1f} tok/s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
