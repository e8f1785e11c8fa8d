"""keep_freed_memory: a CPU engine's freed activations stay in the process (no page fault on reuse)."""

import platform
import subprocess
import sys

import pytest
import torch

from common.engine.cpu_memory import keep_freed_memory
from conftest import CYCLES, INT8_CYCLES, cycle

# In a fresh process: a 16 MiB block malloc'ed, written and freed, then ten times more; the page
# faults of those ten counted (a fault is a fresh page the kernel had to map and zero). With glibc's
# defaults the first block is mapped and unmapped on its own (over the 128 KiB mmap threshold), and
# the next comes from fresh heap pages; with the thresholds fixed every block reuses the first one.
SCRIPT = """
import ctypes, resource, sys, torch
from common.engine.cpu_memory import keep_freed_memory
if sys.argv[1] == "keep":
    print(keep_freed_memory(torch.device("cpu")), file=sys.stderr)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
def block():
    pointer = libc.malloc(16 << 20)
    ctypes.memset(pointer, 1, 16 << 20)
    libc.free(ctypes.c_void_p(pointer))
block()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    block()
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
    assert default > 2048        # measured here: 4,095 (the 4,096 pages of one block, once)
    assert kept < 256            # measured here: 0


@glibc_only
def test_says_what_it_did():
    assert keep_freed_memory(torch.device("cpu")).startswith("glibc: mmap threshold 32 MiB")
    assert keep_freed_memory(torch.device("meta")).startswith("unchanged")


# --- the engine option that turns both CPU fast paths off (chapter 1) -------------------------

@pytest.mark.parametrize("name", CYCLES)
def test_cpu_fast_paths_off_runs_the_plain_path(name, tiny_llms):
    """cpu_fast_paths=False: torch's own nn.Linear everywhere (no oneDNN-packed weight) and glibc's
    thresholds left alone; the runner's stats say so. On (the default) the x86 fp32 model is packed."""
    from common.engine.cpu_gemm import ONEDNN_PACKED, TORCH_LINEAR, PackedLinear, linear_backend

    float_model = {"quantization": None} if name in INT8_CYCLES else {}   # int8 layers have no float weight to pack
    plain = tiny_llms(name, cpu_fast_paths=False, **float_model)
    stats = plain.model_runner.stats()
    assert stats["linear_backend"] == TORCH_LINEAR and stats["malloc"].startswith("unchanged (cpu_fast_paths=False")
    assert not any(isinstance(m, PackedLinear) for m in plain.model_runner.model.modules())
    if linear_backend(torch.device("cpu"), torch.float32) == ONEDNN_PACKED:   # x86 with oneDNN
        fast = tiny_llms(name, **float_model).model_runner
        assert fast.stats()["linear_backend"] == ONEDNN_PACKED
        assert any(isinstance(m, PackedLinear) for m in fast.model.modules())
        if glibc_only.args[0] is False:
            assert fast.stats()["malloc"].startswith("glibc: mmap threshold")
    params = cycle(name).SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    assert len(plain.generate([[5, 6, 7]], params)[0].token_ids) == 3     # and the plain engine runs
