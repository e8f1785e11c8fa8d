"""keep_freed_memory: a CPU engine's freed activations stay in the process (no page fault on reuse)."""

import platform
import subprocess
import sys

import pytest
import torch

from common.engine.cpu_memory import keep_freed_memory

# A layer's pattern in a fresh process: 4 MiB activations made from an input and freed, ten times;
# the page faults counted (a fault is a fresh page the kernel had to map and zero).
SCRIPT = """
import resource, sys, torch
from common.engine.cpu_memory import keep_freed_memory
if sys.argv[1] == "keep":
    print(keep_freed_memory(torch.device("cpu")), file=sys.stderr)
x = torch.ones(1 << 20)
def layer():
    y = x + 1
    z = y * 2
    del y
    return z.sum()
layer()   # once before counting
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    layer()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt's thresholds are glibc's")


def page_faults(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120, check=True)
    return int(run.stdout.split()[-1])


@glibc_only
def test_freed_blocks_are_reused_without_page_faults():
    default, kept = page_faults("default"), page_faults("keep")
    assert default > 10 * 1024       # glibc's default: at least one 4 MiB block's pages fault every time
    assert kept < 0.75 * default     # measured here: 6,141 -> 3,073


@glibc_only
def test_says_what_it_did():
    assert keep_freed_memory(torch.device("cpu")).startswith("glibc: mmap threshold 32 MiB")
    assert keep_freed_memory(torch.device("meta")).startswith("unchanged")
