"""Chapter 13's measurements: what tensor parallelism changes on one machine.

    python scripts/tp_measure.py                       # SmolLM2-135M, tp=1 against tp=3, CPU
    python scripts/tp_measure.py --out DIR --tp 3

1. Memory per rank, tp=1 against tp=N, fp32 and int8: rank 0's weight bytes, the KV cache's bytes
   per block, the blocks its pool holds and so the tokens (every rank gets the same budget).
2. All-reduce bytes per computed token, measured (rank 0's counter) against the formula:
   2 x layers x hidden x dtype bytes for the two all-reduces of each block, plus 1 x hidden x
   bytes for the vocab-split embedding.
3. Where a step's time goes at tp=N: rank 0's time inside all-reduces and the logits' gather,
   against its step time; tp=1's step time beside it (fp32, the same workload).
4. The step channel: one message from rank 0 to a worker through the TCPStore (what cycle 11
   uses) against a gloo broadcast of the same pickled bytes and a shared-memory buffer the worker
   polls (one machine only), for a decode step and a long prefill.

Writes DIR/tp.json and DIR/tp.md (default docs/results/cpu-tp/), naming the machine.
"""

import argparse
import datetime
import json
import multiprocessing
import os
import pickle
import statistics
import struct
import sys
import time
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.benchmark.machine import machine_info  # noqa: E402

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPTS = [f"Question {i}: explain in a few sentences why the sky is blue, and what changes at sunset." for i in range(8)]
OUTPUT_TOKENS = 32
CHANNEL_ROUNDS = 300


def engine(tp: int, quantization):
    from cycle11_tp import LLM

    return LLM(MODEL, device="cpu", quantization=quantization, tensor_parallel_size=tp, enable_prefix_caching=False)


def memory_row(tp: int, quantization) -> dict:
    llm = engine(tp, quantization)
    try:
        s, attn = llm.model_runner.stats(), llm.model_runner.model.model.layers[0].self_attn
        blocks, per_block = llm.model_runner.num_kv_blocks, s["kv_pool"]["bytes_per_block"]
        return {"tp": tp, "weights": quantization or "fp32", "weight_bytes_per_rank": s["weight_bytes"],
                "heads_per_rank": attn.num_heads, "kv_heads_per_rank": attn.num_kv_heads,
                "kv_bytes_per_block_per_rank": per_block, "kv_pool_bytes_per_rank": s["kv_cache_pool_bytes"],
                "kv_blocks": blocks, "kv_tokens": blocks * llm.config.block_size}
    finally:
        llm.shutdown()


def step_row(tp: int) -> dict:
    from cycle11_tp import SamplingParams

    llm = engine(tp, None)
    try:
        params = SamplingParams(temperature=0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)
        llm.generate(PROMPTS[:2], params)                 # warm-up
        out = llm.generate(PROMPTS, params)
        s, config = llm.stats, llm.model_runner.model.config
        computed = sum(len(o.prompt_token_ids) + len(o.token_ids) - 1 for o in out)
        step_s = sum(t for _, t in s["step_times"])
        return {"tp": tp, "requests": len(PROMPTS), "output_tokens": s["output_tokens"], "wall_s": s["wall_s"],
                "steps": s["steps"], "step_s": step_s, "tokens_computed": computed,
                "all_reduce_bytes": s["tp_all_reduce_bytes"], "all_reduce_calls": s["tp_all_reduce_calls"],
                "all_reduce_bytes_per_token": s["tp_all_reduce_bytes"] / computed,
                "formula_2LH": 2 * config.num_hidden_layers * config.hidden_size * 4,
                "formula_2LH_plus_embedding": (2 * config.num_hidden_layers + 1) * config.hidden_size * 4,
                "all_reduce_s": s["tp_all_reduce_s"], "gather_s": s["tp_gather_s"],
                "all_reduce_share_of_steps": s["tp_all_reduce_s"] / step_s, "gather_share_of_steps": s["tp_gather_s"] / step_s,
                "output_tok_per_s": s["output_tokens"] / s["wall_s"],
                "tokens_equal_check": [o.token_ids for o in out]}
    finally:
        llm.shutdown()


# --- the step channel ---------------------------------------------------------------------------

def messages() -> dict:
    """A decode step of 64 sequences with 512 tokens of context, and a 4,096-token prefill, as cycle
    11's run() sends them (StepInputs and the logits rows)."""
    from cycle11_tp.model_runner import StepInputs

    decode = StepInputs(list(range(64)), [512] * 64, list(range(64)), [513] * 64,
                        [list(range(33)) for _ in range(64)], [1] * 64)
    prefill = StepInputs(list(range(4096)), list(range(4096)), list(range(4096)), [4096],
                         [list(range(256))], [4096])
    return {"decode_64": ("step", decode, list(range(64))), "prefill_4096": ("step", prefill, [4095])}


def _shm_send(buffer, message, seq: int) -> None:
    """Bytes after a 12-byte header, then the header: the length and message number `seq` (x86
    keeps stores in order, so a reader that sees the number sees the bytes)."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    buffer[12:12 + len(data)] = data
    struct.pack_into("I", buffer, 8, len(data))
    struct.pack_into("Q", buffer, 0, seq)


def _shm_recv(buffer, seq: int):
    """Poll (yielding the core each time) until message number `seq` is there."""
    while struct.unpack_from("Q", buffer, 0)[0] < seq:
        os.sched_yield()
    length = struct.unpack_from("I", buffer, 8)[0]
    return pickle.loads(bytes(buffer[12:12 + length]))


def _channel_rank(rank: int, port: int, shm_name: str, results) -> None:
    from cycle11_tp.parallel_state import StepChannel, connect_store, join_group

    store, _ = connect_store("127.0.0.1", port, 2, host_store=False)
    tp = join_group(store, rank, 2, torch.device("cpu"))
    shm = shared_memory.SharedMemory(shm_name)
    resource_tracker.unregister(shm._name, "shared_memory")   # the parent owns (and unlinks) it
    channel, sync, shm_messages = StepChannel(store), torch.zeros(1), 0
    out = {}
    for name, message in messages().items():
        size = len(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        for way in ("store", "broadcast", "shm", "none"):
            times = []
            for _ in range(CHANNEL_ROUNDS):
                start = time.perf_counter()
                if way == "store":
                    channel.send(message) if rank == 0 else channel.recv()
                elif way == "shm":
                    shm_messages += 1
                    _shm_send(shm.buf, message, shm_messages) if rank == 0 else _shm_recv(shm.buf, shm_messages)
                elif way == "broadcast":    # the length, then the bytes: what broadcast_object_list does
                    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL) if rank == 0 else None
                    length = torch.tensor([len(data) if rank == 0 else 0])
                    tp.process_group.broadcast([length]).wait()
                    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if rank == 0 else \
                        torch.empty(int(length), dtype=torch.uint8)
                    tp.process_group.broadcast([buffer]).wait()
                    if rank:
                        pickle.loads(buffer.numpy().tobytes())
                tp.process_group.allreduce([sync]).wait()   # both ranks done: the message arrived
                times.append(time.perf_counter() - start)
            out[f"{name}/{way}"] = {"bytes": size, "median_us": statistics.median(times) * 1e6}
    del channel
    shm.close()
    if rank == 0:
        results.put(out)


def channel_rows() -> dict:
    from cycle11_tp.parallel_state import connect_store

    store, port = connect_store("127.0.0.1", 0, 2, host_store=True)
    shm = shared_memory.SharedMemory(create=True, size=1 << 20)
    shm.buf[:12] = bytes(12)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_channel_rank, args=(r, port, shm.name, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = results.get(timeout=600)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        shm.close()
        shm.unlink()
    del store
    return got


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Tensor parallelism on one machine ({result['date']})", "",
             f"Machine: {m['processor']}, {m['cpu_count']} cores, flags {', '.join(m['cpu_flags'])}, torch {m['torch']}, "
             f"load average {m['loadavg_1min']:.2f} at the start. Model: {MODEL} (real weights), CPU, gloo.", "",
             "## Memory per rank", "",
             "| tp | weights | weight MiB per rank | heads / KV heads per rank | KV bytes per block per rank | KV blocks | tokens the pool holds |",
             "|---|---|---|---|---|---|---|"]
    for r in result["memory"]:
        lines.append(f"| {r['tp']} | {r['weights']} | {r['weight_bytes_per_rank'] / 2**20:.1f} | {r['heads_per_rank']} / "
                     f"{r['kv_heads_per_rank']} | {r['kv_bytes_per_block_per_rank']:,} | {r['kv_blocks']:,} | {r['kv_tokens']:,} |")
    lines += ["", f"## Steps ({len(PROMPTS)} requests, {OUTPUT_TOKENS} output tokens, fp32)", "",
              "| tp | output tok/s | step time s | all-reduce bytes / token | formula 2LH / with embedding | "
              "all-reduce share | gather share |", "|---|---|---|---|---|---|---|"]
    for r in result["steps"]:
        lines.append(f"| {r['tp']} | {r['output_tok_per_s']:.1f} | {r['step_s']:.2f} | {r['all_reduce_bytes_per_token']:,.0f} | "
                     f"{r['formula_2LH']:,} / {r['formula_2LH_plus_embedding']:,} | {r['all_reduce_share_of_steps']:.1%} | "
                     f"{r['gather_share_of_steps']:.1%} |")
    lines += ["", f"Greedy tokens tp=N equal tp=1: {result['tokens_equal']}", "", "## The step channel (median of "
              f"{CHANNEL_ROUNDS}, 2 ranks, one message then a 1-float all-reduce)", "",
              "| message | pickled bytes | store µs | gloo broadcast µs | shared memory µs | all-reduce alone µs |",
              "|---|---|---|---|---|---|"]
    for name in messages():
        c = result["channel"]
        lines.append(f"| {name} | {c[f'{name}/store']['bytes']:,} | {c[f'{name}/store']['median_us']:.0f} | "
                     f"{c[f'{name}/broadcast']['median_us']:.0f} | {c[f'{name}/shm']['median_us']:.0f} | "
                     f"{c[f'{name}/none']['median_us']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "docs/results/cpu-tp"))
    p.add_argument("--tp", type=int, default=3)
    p.add_argument("--channel-only", action="store_true", help="rerun the channel table into the stored tp.json")
    args = p.parse_args()
    out = Path(args.out)
    if args.channel_only:
        result = json.loads((out / "tp.json").read_text())
        result["channel"] = channel_rows()
        result["channel_machine"] = machine_info(torch.device("cpu"))
        result["channel_date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        write(out, result)
        return
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(torch.device("cpu")), "model": MODEL, "weights": "real"}
    result["memory"] = [memory_row(tp, q) for q in (None, "int8") for tp in (1, args.tp)]
    result["steps"] = [step_row(tp) for tp in (1, args.tp)]
    result["tokens_equal"] = result["steps"][0]["tokens_equal_check"] == result["steps"][1]["tokens_equal_check"]
    for row in result["steps"]:
        del row["tokens_equal_check"]
    result["channel"] = channel_rows()
    result["loadavg_1min_end"] = machine_info(torch.device("cpu"))["loadavg_1min"]
    write(out, result)


def write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tp.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "tp.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
