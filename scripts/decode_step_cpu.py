"""Decode step time of one engine at 2 running sequences on the CPU, with a torch profiler table.

    python scripts/decode_step_cpu.py cycle7_int8 > docs/results/cpu-decode-2seqs-cycle7_int8.txt
"""
import importlib
import sys
import time

from torch.profiler import profile

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def main(name: str) -> None:
    cycle = importlib.import_module(name)
    llm = cycle.LLM(MODEL, device="cpu")
    params = cycle.SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    for prompt in [[700 + i] * 40 for i in range(2)]:
        llm.add_request(prompt, params)
    llm.step()  # prefill
    for _ in range(5):  # warm-up decode steps, not timed
        llm.step()
    start = time.perf_counter()
    for _ in range(40):
        llm.step()
    print(name, "decode ms/step at 2 seqs", round((time.perf_counter() - start) / 40 * 1000, 1))
    with profile() as prof:
        for _ in range(10):
            llm.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main(sys.argv[1])
