"""Memory counters and latency summaries shared by the benchmark runner and the HF baseline."""

import math
import resource
import sys

import torch


# What a reported peak covers: generation alone (the counter was reset after loading and warm-up),
# or the whole process, weight loading included (it could not be reset in between).
PEAK_GENERATION = "generation"
PEAK_WITH_LOADING = "whole process, model loading included"


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far. ru_maxrss is KiB on Linux but bytes on macOS."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def reset_peak_memory(device) -> bool:
    """Start a fresh memory peak; return whether it could be reset.

    CUDA: torch's allocator counter. CPU: Linux resets a process's peak RSS (VmHWM, which is also
    what ru_maxrss reports) when "5" is written to /proc/self/clear_refs, so the peak can cover
    generation alone instead of the transient copies made while loading weights. Where that file
    is missing or not writable the peak keeps covering the whole process.
    """
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_bytes(device) -> int:
    """CUDA: most bytes allocated by torch since the last reset. CPU: peak RSS of this process
    since the last reset (or since it started)."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(ttft_s: list, latency_s: list, output_tokens: int, wall_s: float) -> dict:
    """Mean/p50/p90 of TTFT and latency, and output throughput. None entries (an engine that
    cannot see its first token, like HF generate) are left out; all-None gives None."""
    summary = {"output_tokens": output_tokens, "wall_s": wall_s,
               "throughput_tok_s": output_tokens / wall_s if wall_s > 0 else None}
    for name, values in (("ttft", ttft_s), ("latency", latency_s)):
        known = [v for v in values if v is not None]
        summary[f"{name}_mean_s"] = _mean(known)
        summary[f"{name}_p50_s"] = percentile(known, 50)
        summary[f"{name}_p90_s"] = percentile(known, 90)
    return summary
