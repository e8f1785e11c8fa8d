"""Decode step time of one engine at 2 running sequences on the CPU, with a torch profiler table.

    python scripts/decode_step_cpu.py cycle7_int8 > docs/results/cpu-decode-2seqs-cycle7_int8.txt
"""
import sys, time, importlib, torch
name = sys.argv[1]
c = importlib.import_module(name)
llm = c.LLM("HuggingFaceTB/SmolLM2-135M-Instruct", device="cpu")
sp = c.SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
for p in ([[700 + i] * 40 for i in range(2)]):
    llm.add_request(p, sp)
llm.step()  # prefill
for _ in range(5): llm.step()
t = time.perf_counter()
for _ in range(40): llm.step()
print(name, "decode ms/step at 2 seqs", round((time.perf_counter() - t) / 40 * 1000, 1))
from torch.profiler import profile
with profile() as prof:
    for _ in range(10): llm.step()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
