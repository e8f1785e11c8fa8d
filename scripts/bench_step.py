"""Decode steps per second with many running sequences: the host-bound regime cycle 8 is about.

    python scripts/bench_step.py                              # CPU or CUDA, cycles 7 and 8, 256 sequences
    python scripts/bench_step.py --device cuda --profile docs/results/cuda-bench-step
    python scripts/bench_step.py --model Qwen/Qwen3-0.6B --option quantization=None

The default model is "tiny": Qwen3-0.6B's architecture and tokenizer with 28 layers of width 64
and a vocabulary of 4096, random weights. It launches as many kernels per step as the real model while computing almost
nothing, so a step's time is the host's: Python, kernel launches, copies, syncs. Each engine gets
--num-seqs requests of --prompt-len tokens at once (one prefill), then --warmup decode steps, then
--steps timed decode steps with every sequence running. --profile DIR runs a few more steps under
torch.profiler and writes, per engine, the top ops by host time and by device time, and the host
vs device time per step, to DIR (plus bench_step.json with every figure).
"""

import argparse
import importlib
import json
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from common.engine.cli import parse_options  # noqa: E402
from common.engine.device import resolve_device  # noqa: E402
from common.engine.model_source import resolve_model  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            vocab_size=4096)   # a small lm_head too: the step is all launches and Python


def tiny_model_dir() -> str:
    """Qwen3-0.6B's config (28 layers) at width 64, vocabulary 4096, with its tokenizer, in a temporary folder."""
    qwen = pathlib.Path(resolve_model("Qwen/Qwen3-0.6B", "random").path)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="bench-step-tiny-"))
    for f in qwen.iterdir():
        if f.is_file() and f.name != "config.json":
            (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((qwen / "config.json").read_text())
    config.update(TINY)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str, model: str, device: torch.device, args, options: dict) -> dict:
    cycle = importlib.import_module(name)
    n, p = args.num_seqs, args.prompt_len
    llm = cycle.LLM(model, device=device, weights="random", max_num_seqs=n, max_num_batched_tokens=n * p,
                    **options)
    total = args.warmup + args.steps + (args.profile_steps if args.profile else 0) + 2
    params = cycle.SamplingParams(temperature=0, max_tokens=total, ignore_eos=True)
    for i in range(n):
        llm.add_request([(100 + 7 * i + j) % 4000 + 10 for j in range(p)], params)
    llm.step()                                                   # one prefill admits everyone
    if len(llm.scheduler.running) != n:
        raise SystemExit(f"{name}: only {len(llm.scheduler.running)} of {n} sequences fit; raise the KV budget")
    for _ in range(args.warmup):
        llm.step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        llm.step()
    sync(device)
    wall = time.perf_counter() - start
    graphs = getattr(llm.model_runner, "graphs", None)
    result = {"engine": name, "num_seqs": n, "steps": args.steps, "steps_per_s": args.steps / wall,
              "ms_per_step": 1000 * wall / args.steps, "output_tok_per_s": n * args.steps / wall,
              "cuda_graphs": graphs is not None and bool(graphs.graphs),
              "compile_s": getattr(llm.model_runner, "compile_s", None),
              "graph_capture_s": graphs.capture_s if graphs is not None else None,
              "options": options}
    if args.profile:
        result.update(profile(llm, name, device, args))
    return result


def profile(llm, name: str, device: torch.device, args) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    start = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            llm.step()
        sync(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events) if device.type == "cuda" else 0
    folder = pathlib.Path(args.profile)
    folder.mkdir(parents=True, exist_ok=True)
    sort_device = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    text = (f"{name}: {args.profile_steps} decode steps at {args.num_seqs} sequences under the profiler, "
            f"{1000 * wall / args.profile_steps:.2f} ms/step wall, "
            f"{device_us / 1000 / args.profile_steps:.2f} ms/step of device kernels\n\n"
            f"top ops by host (self CPU) time:\n{events.table(sort_by='self_cpu_time_total', row_limit=20)}\n")
    if device.type == "cuda":
        text += f"\ntop ops by device time:\n{events.table(sort_by=sort_device, row_limit=20)}\n"
    (folder / f"{name}_profile.txt").write_text(text)
    return {"profile_ms_per_step": 1000 * wall / args.profile_steps,
            "profile_device_ms_per_step": device_us / 1000 / args.profile_steps, "profile_text": text}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", default="cycle7_int8,cycle8_graphs")
    p.add_argument("--model", default="tiny", help='"tiny" (default) or any model compare.py takes')
    p.add_argument("--device", default=None)
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--profile", default=None, metavar="DIR", help="also profile and write summaries to DIR")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="cycle 8: compile=False (default on CUDA: True)")
    p.add_argument("--compile", action="store_true", help="cycle 8: compile=True (default on CPU: False)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="an engine option (repeatable)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    model = tiny_model_dir() if args.model == "tiny" else args.model
    options = parse_options(args.option)
    results = []
    for name in filter(None, args.cycles.split(",")):
        engine_options = dict(options)
        if (args.no_compile or args.compile) and name.startswith("cycle8"):
            engine_options["compile"] = args.compile
        results.append(bench(name.strip(), model, device, args, engine_options))
        r = results[-1]
        print(f"{name}: {r['steps_per_s']:.1f} decode steps/s ({r['ms_per_step']:.2f} ms/step, "
              f"{r['output_tok_per_s']:.0f} tok/s) at {args.num_seqs} sequences, CUDA graphs: {r['cuda_graphs']}, "
              f"compile_s: {r['compile_s']}, graph_capture_s: {r['graph_capture_s']}",
              flush=True)
    if len(results) == 2:
        print(f"{results[1]['engine']} / {results[0]['engine']}: {results[1]['steps_per_s'] / results[0]['steps_per_s']:.2f}x")
    meta = {"device": str(device), "torch": torch.__version__, "model": args.model, "argv": sys.argv,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    if args.profile:
        path = pathlib.Path(args.profile) / "bench_step.json"
        path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
