"""What a workload will cost each engine on a GPU, estimated before running it.

    python -m common.benchmark.estimate        # the table chapter 8 of the guide quotes

The CUDA sizes in common/benchmark/workloads.py were chosen with this: `python compare.py --plot` must run
all seven cycles and both HF baselines within 10 minutes on one H100/H200, cycle 1 included.

Cycle 1 reruns the whole sequence every step. One step of a static group of B sequences padded to
T tokens costs
  - the linear layers: 2 FLOPs per parameter outside the embedding per token, 2 * P * B * T,
    and the lm_head on the last position only, 2 * hidden * vocab * B;
  - attention: QK^T and PV, 4 * B * H * T^2 * D FLOPs per layer, and the [B, H, T, T] scores
    written and read several times per layer (score_traffic_per_element);
  - a fixed cost per step (Python, kernel launches) that dominates small steps.
Every other engine is, on this GPU, bound by that fixed cost: one decode step for the whole batch
(plus reading the KV cache it attends over), so its time is its number of steps times it.

The fixed cost per step and the load time come from the stored H200 runs (docs/results/cuda-h200);
the FLOP rate and the bandwidth are assumptions (a third and a half of the H200's datasheet
figures), which is why the budget keeps a margin of 2 on top.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from common.engine.memory import GIB, kv_cache_bytes, static_batch_bytes

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "cuda-h200"
MEASURED_STEP_RUN = RESULTS / "throughput64-cycle4_batching.json"   # 64 requests, 1,019 steps

# The paged cycles gather each sequence's blocks into a dense K and V per layer every step:
# the cache is read, the copy written and read again.
KV_PASSES = 3
MARGIN = 2.0


@dataclass(frozen=True)
class GpuSpeed:
    step_s: float          # fixed cost of one engine step, measured
    load_s: float          # one engine's start-up: loading (random) weights and warm-up, measured
    flops: float           # bf16 matmul FLOP/s, assumed
    bytes_per_s: float     # memory bandwidth, assumed
    source: str


def h200_speed() -> GpuSpeed:
    """The H200 figures: step time and load time from a stored run, the rest from the datasheet
    (989 TFLOP/s dense bf16, 4.8 TB/s HBM3e), of which we assume a third and a half."""
    run = json.loads(MEASURED_STEP_RUN.read_text())
    return GpuSpeed(step_s=run["wall_s"] / run["stats"]["steps"], load_s=run["load_s"],
                    flops=989e12 / 3, bytes_per_s=4.8e12 / 2,
                    source=f"{MEASURED_STEP_RUN.name}: {run['stats']['steps']} steps in {run['wall_s']:.1f} s")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def score_traffic_per_element(dtype: torch.dtype) -> int:
    """Bytes moved per [B, H, T, T] score element per layer by cycles 1-2's grouped_attention: the
    matmul writes the scores, masked_fill reads and writes them, the fp32 cast reads and writes,
    softmax reads and writes fp32, the cast back reads and writes, and probs @ V reads. In fp32
    both casts are no-ops."""
    item = torch.empty((), dtype=dtype).element_size()
    casts = 0 if dtype == torch.float32 else 2 * (item + 4)
    return item + 2 * item + casts + 2 * 4 + item


def linear_params(config) -> int:
    """Parameters of the layers every token passes through (not the embedding, not the lm_head)."""
    d, D = config.hidden_size, _head_dim(config)
    attention = d * D * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = 3 * d * config.intermediate_size
    return config.num_hidden_layers * (attention + mlp)


def static_groups(requests, max_num_seqs: int) -> list[tuple[int, int, int]]:
    """(batch, longest prompt, largest max_tokens) of each group, in the engines' order."""
    groups = []
    for first in range(0, len(requests), max_num_seqs):
        group = requests[first:first + max_num_seqs]
        groups.append((len(group), max(len(r.prompt_token_ids) for r in group), max(r.max_tokens for r in group)))
    return groups


@dataclass
class NaiveCost:
    steps: int = 0
    flops: float = 0.0
    score_bytes: float = 0.0      # bytes moved over the attention scores
    peak_bytes: int = 0           # the largest step's estimate (common.engine.memory), weights excluded
    seconds: float = 0.0


def naive_steps(requests, max_num_seqs: int):
    """(batch, tokens per sequence) of every forward cycle 1 runs: each group of max_num_seqs,
    left-padded to its longest prompt, grows by one token per step until its largest max_tokens;
    a sequence leaves the batch once it has its max_tokens (no EOS: the estimate's worst case)."""
    for first in range(0, len(requests), max_num_seqs):
        group = requests[first:first + max_num_seqs]
        longest = max(len(r.prompt_token_ids) for r in group)
        for step in range(max(r.max_tokens for r in group)):
            yield sum(r.max_tokens > step for r in group), longest + step


def naive_cost(config, requests, max_num_seqs: int, dtype: torch.dtype, speed: GpuSpeed) -> NaiveCost:
    """Cycle 1's cost: every step reruns the whole padded group."""
    cost = NaiveCost()
    H, D, L = config.num_attention_heads, _head_dim(config), config.num_hidden_layers
    per_score = score_traffic_per_element(dtype)
    for batch, T in naive_steps(requests, max_num_seqs):
        flops = 2 * linear_params(config) * batch * T + 2 * config.hidden_size * config.vocab_size * batch
        flops += 4 * batch * H * T * T * D * L
        moved = batch * H * T * T * per_score * L
        cost.steps += 1
        cost.flops += flops
        cost.score_bytes += moved
        cost.seconds += speed.step_s + flops / speed.flops + moved / speed.bytes_per_s
    for batch, longest, largest in static_groups(requests, max_num_seqs):
        last = static_batch_bytes(config, batch, longest + largest - 1, dtype)["total"]
        cost.peak_bytes = max(cost.peak_bytes, last)
    return cost


def kvcache_peak_bytes(config, requests, max_num_seqs: int, dtype: torch.dtype) -> int:
    """Cycle 2's largest group: the contiguous reservation plus its prefill (common.engine.memory)."""
    return max(static_batch_bytes(config, b, longest, dtype, kv_tokens=longest + largest)["total"]
               for b, longest, largest in static_groups(requests, max_num_seqs))


def batched_steps(requests, max_num_seqs: int, max_num_batched_tokens: int) -> list[tuple[int, int, list]]:
    """(prefill steps, decode steps, requests) per group of max_num_seqs: prefill in steps of at
    most max_num_batched_tokens prompt tokens (it yields each request's first token), then one
    decode step per further token of the group's largest max_tokens. Exact for cycle 4 when the
    requests fit its limits; cycles 2-3 prefill a whole group in one step."""
    groups = []
    for first in range(0, len(requests), max_num_seqs):
        group = requests[first:first + max_num_seqs]
        prefill = math.ceil(sum(len(r.prompt_token_ids) for r in group) / max_num_batched_tokens)
        groups.append((prefill, max(r.max_tokens for r in group) - 1, group))
    return groups


def batched_seconds(config, requests, max_num_seqs: int, max_num_batched_tokens: int, dtype: torch.dtype,
                    speed: GpuSpeed) -> tuple[int, float]:
    """Cycles 2-7 and HF (steps, seconds): a fixed-cost step each (batched_steps), and each decode
    step reads the KV cache of every live sequence KV_PASSES times."""
    per_token = kv_cache_bytes(config, 1, 1, dtype)
    steps, seconds = 0, 0.0
    for prefill, decode, group in batched_steps(requests, max_num_seqs, max_num_batched_tokens):
        kv_read = 0.0
        for step in range(1, decode + 1):
            kv_read += sum(len(r.prompt_token_ids) + step for r in group if r.max_tokens > step) * per_token * KV_PASSES
        steps += prefill + decode
        seconds += (prefill + decode) * speed.step_s + kv_read / speed.bytes_per_s
    return steps, seconds


def estimate_workload(name: str, source, tokenizer, speed: GpuSpeed, max_num_seqs: int = 256,
                      max_num_batched_tokens: int = 16384, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The figures of one CUDA workload for Qwen3-0.6B: cycle 1, cycle 2's memory, the others."""
    from common.benchmark.workloads import make_workload

    config = source.config
    work = make_workload(name, tokenizer, "cuda", max_model_len=config.max_position_embeddings)
    naive = naive_cost(config, work.requests, max_num_seqs, dtype, speed)
    steps, others = batched_seconds(config, work.requests, max_num_seqs, max_num_batched_tokens, dtype, speed)
    return {
        "workload": name, "requests": len(work.requests),
        "output_tokens": sum(r.max_tokens for r in work.requests),
        "cycle1_steps": naive.steps, "cycle1_pflop": naive.flops / 1e15,
        "cycle1_score_tb": naive.score_bytes / 1e12, "cycle1_peak_gib": naive.peak_bytes / GIB,
        "cycle1_s": naive.seconds,
        "cycle2_peak_gib": kvcache_peak_bytes(config, work.requests, max_num_seqs, dtype) / GIB,
        "other_steps": steps, "other_s": others,
    }


def compare_seconds(row: dict, speed: GpuSpeed, cycles: int = 7, hf_engines: int = 2) -> float:
    """`compare.py` end to end: every engine's load and run. An HF baseline with random weights
    builds them with cycle 1 on the CPU first, then loads HF's model: counted as two loads."""
    loads = (cycles + 2 * hf_engines) * speed.load_s
    return loads + row["cycle1_s"] + (cycles - 1 + hf_engines) * row["other_s"]


def format_table(rows: list[dict], speed: GpuSpeed) -> str:
    lines = [
        f"H200 speed: {speed.step_s * 1000:.1f} ms per engine step and {speed.load_s:.1f} s per engine "
        f"load ({speed.source}); assumed {speed.flops / 1e12:.0f} TFLOP/s, {speed.bytes_per_s / 1e12:.1f} TB/s",
        "",
        "| workload | requests | output tokens | cycle 1: steps | PFLOP | score traffic TB | peak GiB | est. s "
        "| cycle 2 peak GiB | cycles 2-7, HF: est. s each | compare.py est. s (x2 margin) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        total = compare_seconds(r, speed)
        lines.append(
            f"| {r['workload']} | {r['requests']} | {r['output_tokens']:,} | {r['cycle1_steps']:,} | "
            f"{r['cycle1_pflop']:.1f} | {r['cycle1_score_tb']:.1f} | {r['cycle1_peak_gib']:.1f} | "
            f"{r['cycle1_s']:,.0f} | {r['cycle2_peak_gib']:.1f} | {r['other_s']:.0f} | "
            f"{total:,.0f} ({MARGIN * total:,.0f}) |")
    return "\n".join(lines)


CYCLES_PRESENT = 8   # a part whose cycles are "all" (None) runs cycles 1-8


def suite_estimate(source, tokenizer, speed: GpuSpeed) -> list[dict]:
    """Seconds of each part of the CUDA course suite (common/benchmark/suite.py): every engine's
    load (an HF baseline with random weights counts two, see compare_seconds), cycle 1's own cost
    where it runs, the batched cost of the others; an online part lasts at least its arrivals."""
    from common.benchmark.online import ONLINE_DEFAULTS
    from common.benchmark.suite import suite
    from common.benchmark.workloads import make_workload

    rows = []
    for part in suite("cuda"):
        work = make_workload(part.workload, tokenizer, "cuda", max_model_len=source.config.max_position_embeddings,
                             num_requests=part.num_requests, prompt_len=part.prompt_len,
                             output_len=part.output_len)
        cycles = list(range(1, CYCLES_PRESENT + 1)) if part.cycles is None else list(part.cycles)
        hf = len(part.hf)
        _, others = batched_seconds(source.config, work.requests, 256, 16384, torch.bfloat16, speed)
        if part.workload == "online":
            rate = part.request_rates[0] or ONLINE_DEFAULTS["cuda"]["request_rate"]
            others = max(others, len(work.requests) / rate)
        naive = naive_cost(source.config, work.requests, 256, torch.bfloat16, speed).seconds if 1 in cycles else 0.0
        batched = len([c for c in cycles if c != 1]) + hf
        seconds = (len(cycles) + 2 * hf) * speed.load_s + naive + batched * others
        rows.append({"part": part.name, "requests": len(work.requests), "engines": len(cycles) + hf, "seconds": seconds})
    return rows


def format_suite(rows: list[dict]) -> str:
    lines = ["| part | requests | engines | est. s |", "|---|---:|---:|---:|"]
    lines += [f"| {r['part']} | {r['requests']} | {r['engines']} | {r['seconds']:.0f} |" for r in rows]
    total = sum(r["seconds"] for r in rows)
    return "\n".join(lines + [f"| all | | {sum(r['engines'] for r in rows)} | {total:.0f} (x{MARGIN:g}: {MARGIN * total:.0f}) |"])


def main(argv: list[str] | None = None) -> None:
    import argparse

    from common.engine.model_source import load_tokenizer, resolve_model

    p = argparse.ArgumentParser(prog="python -m common.benchmark.estimate", description=__doc__.splitlines()[0])
    p.add_argument("--suite", action="store_true", help="estimate the CUDA course suite (compare.py with no --workload)")
    args = p.parse_args(argv)
    source = resolve_model("Qwen/Qwen3-0.6B", "random")
    tokenizer = load_tokenizer(source)
    speed = h200_speed()
    if args.suite:
        print("Qwen3-0.6B, bf16, the CUDA course suite (common/benchmark/suite.py), H200 speed as below")
        print(format_suite(suite_estimate(source, tokenizer, speed)))
        return
    rows = [estimate_workload(name, source, tokenizer, speed) for name in ("throughput", "nano_vllm_bench")]
    print("Qwen3-0.6B, bf16, max_num_seqs 256, max_num_batched_tokens 16384, CUDA sizes of common/benchmark/workloads.py")
    print(format_table(rows, speed))
    # What the estimate says of the largest static batch an H200 (139 GiB usable) could hold: an
    # estimate only; no stored run ran cycle 1 on nano_vllm_bench's sizes to see where it stops.
    at_oom = static_batch_bytes(source.config, 256, 1850, torch.bfloat16)["total"] / GIB
    print(f"\ncheck: cycle 1, 256 sequences at T = 1,850 tokens: est. {at_oom:.0f} GiB beside the weights "
          "(more than an H200's 139 GiB: estimated, not run)")


if __name__ == "__main__":
    main()
