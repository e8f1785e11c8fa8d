"""On a CPU, keep the memory a step frees inside the process instead of handing it back to the kernel.

glibc's malloc serves a large allocation with its own mmap and unmaps it when it is freed, and it
gives the top of its heap back to the kernel once more than its trim threshold is free there (both
thresholds start at 128 KiB and move with the sizes it sees). A prefill allocates and frees
activations of many MiB in every layer ([2,508 tokens, 1,536] floats are 15 MiB), so every layer
writes into fresh pages, and every fresh page is a page fault that the kernel zeroes.

Measured on a 2-core AMD EPYC, SmolLM2-135M, fp32, cycle 6, one prefill of 64 prompts (2,508
tokens) in a new engine (scripts/bench_prefill_memory.py, docs/results/cpu-malloc/): 624k page
faults, 3.0 s of system time and 7.5 s in all with glibc's defaults; 23k page faults, 0.1 s of
system time and 5.4 s in all with the thresholds fixed as below.
vLLM's CPU backend gets the same effect by preloading TCMalloc.

The cost: the process keeps its largest step's memory after the step (its peak does not change).
"""

import ctypes
import platform

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # mallopt's parameter numbers (glibc's malloc.h)
MMAP_THRESHOLD = 32 << 20    # the largest glibc allows on 64-bit: bigger blocks are still mapped
TRIM_THRESHOLD = 1 << 30     # keep up to 1 GiB of free heap rather than return it


def keep_freed_memory(device: torch.device, enabled: bool = True) -> str:
    """Fix glibc's thresholds for this process when the engine runs on a CPU; returns what was done,
    for the engine's stats. Process-wide and idempotent: a second engine sets the same values.
    enabled=False (the engine option cpu_fast_paths=False) sets nothing; since the thresholds
    belong to the process, measure that in a fresh one (an earlier engine's values stay)."""
    if not enabled:
        return "unchanged (cpu_fast_paths=False: glibc's defaults unless this process set them earlier)"
    if device.type != "cpu":
        return "unchanged (the engine's memory is on the device)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"unchanged (not glibc: {platform.system()} {platform.libc_ver()[0] or 'unknown libc'})"
    libc = ctypes.CDLL(None)
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        return "unchanged (glibc refused mallopt)"
    return f"glibc: mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 30} GiB"
