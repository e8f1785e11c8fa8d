"""The command line every cycle shares: python -m cycleN_xxx.run "prompt" ... [options]."""

import argparse
import dataclasses
import importlib
import inspect
import sys
import time

from common.engine.args import add_model_args, parse_options
from common.engine.device import default_model, resolve_device


def engine_options(package: str) -> set[str]:
    """The options a cycle's engine takes: the fields of its Config (config.py), or, for an engine
    without one, the parameters of its LLM."""
    try:
        config = importlib.import_module(f"{package}.config").Config
    except ModuleNotFoundError:
        return set(inspect.signature(importlib.import_module(package).LLM).parameters)
    return {f.name for f in dataclasses.fields(config) if f.init}


def refuse_unknown_options(package: str, options: dict) -> None:
    """An option this cycle does not have (--max-num-batched-tokens on a static-batch cycle) is an
    error that names it and the options the cycle has: never ignored."""
    unknown = sorted(set(options) - engine_options(package))
    if unknown:
        raise SystemExit(f"{package} takes no option {', '.join(unknown)}; its options: "
                         f"{', '.join(sorted(engine_options(package)))}")


def build_parser(package: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {package}.run", description=f"Generate text with {package}.")
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    add_model_args(p)
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--trace", action="store_true", help="print one line per engine step (cycle 4 onward)")
    return p


def main(package: str, argv: list[str] | None = None) -> None:
    args = build_parser(package).parse_args(argv)
    cycle = importlib.import_module(package)
    options = parse_options(args.option)
    refuse_unknown_options(package, options)
    if args.trace:
        if "trace" not in engine_options(package):
            raise SystemExit(f"--trace needs an engine with a scheduler (cycle 4 onward); {package} has none")
        options["trace"] = True
    device = resolve_device(args.device)
    start = time.perf_counter()
    try:    # an impossible option or model is one line naming it, not a traceback
        llm = cycle.LLM(args.model or default_model(device), device=device, dtype=args.dtype,
                        weights=args.weights, **options)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}")
    load_s = time.perf_counter() - start
    if llm.source.fallback_reason:
        print(f"FALLBACK: {llm.source.fallback_reason}")
    prompts = args.prompts
    if args.chat:
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                     add_generation_prompt=True) for p in prompts]
    try:
        params = cycle.SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                      max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, seed=args.seed)
        outputs = llm.generate(prompts, params)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}")
    for prompt, out in zip(args.prompts, outputs):
        print(f"--- {prompt!r}\n{out.text}\n[{len(out.token_ids)} tokens, {out.finish_reason}, "
              f"TTFT {out.metrics.ttft_s:.3f}s, latency {out.metrics.latency_s:.3f}s]")
    s = llm.stats
    print(f"{package} on {llm.device} ({str(llm.dtype).removeprefix('torch.')}), model {llm.source.name} "
          f"(weights: {llm.source.weights}), load {load_s:.1f}s: {s['output_tokens']} tokens in "
          f"{s['wall_s']:.2f}s = {s['output_tokens'] / s['wall_s']:.1f} tok/s, "
          f"KV cache peak {s['kv_cache_peak_bytes'] / 2**20:.1f} MiB, peak memory {s['peak_memory_bytes'] / 2**20:.0f} MiB",
          file=sys.stdout)
