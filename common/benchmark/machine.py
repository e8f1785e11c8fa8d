"""The machine a result was measured on: processor, cores, torch and its threads, GPU.

Its own module because every benchmark driver records it (bench, http_bench, compare.py, scripts/),
and none of them should have to import another driver to get it.
"""

import os
import platform

import torch


def _cpu_name() -> str:
    """platform.processor() is often empty or just 'x86_64' on Linux; /proc/cpuinfo has the model."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The instruction sets that decide which CPU kernels run (oneDNN's fp32/bf16/int8 paths, torch's int8
# weight-only matmul): two CPUs of one name can differ here, and with them every CPU figure.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "asimd", "sve")


def cpu_flags() -> list[str]:
    """Which of CPU_FLAGS this CPU has (from /proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in CPU_FLAGS if flag in have]
    except OSError:
        pass
    return []


def machine_info(device: torch.device) -> dict:
    info = {
        "processor": _cpu_name(),
        "cpu_flags": cpu_flags(),
        # another process on the machine slows every figure: the 1-minute load average says if one ran
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    info["name"] = info["gpu"] or info["processor"]  # the one line a table or plot shows
    return info
