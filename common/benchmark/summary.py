""""What each cycle adds": for every step N-1 -> N, the metric its lesson moves, on its home workload,
measured, beside the design's expectation (the gain the course's starting design expected of each
step: KV cache -60% latency, paging -30% memory, continuous batching +200% throughput, prefix
caching -50% TTFT, flash attention -30% latency, int8 -50% memory; none for CUDA graphs, and no
figure for tensor parallelism: 1/N of the weights per rank). Cycles 9 and 10 have no row: their
home workloads do not fit the CPU suite's time budget.

The summary is computed from the suite's results only (compare.py's parts), so a test can build it
from a fake run: each step names the parts that may hold its home workload (the first present
wins), the metric, and which direction is better.
"""

import statistics
from dataclasses import dataclass

from common.benchmark.tables import format_columns

MIB = 2**20
DESIGN = "the design's expectation"


@dataclass(frozen=True)
class Step:
    cycle: int                 # the step cycle-1 -> cycle
    lesson: str
    parts: tuple[str, ...]     # the parts that may hold the home workload, in order of preference
    metric: str                # a result key, or DECODE_STEP (derived from the engine's step times)
    label: str
    lower_is_better: bool
    expected: float | None     # the design's expected change (-0.6: 60% less); None: it states none
                               # on this metric (expected_text: what it states instead)
    # Why this cycle may cost speed where its lesson does not pay: one line under the table.
    cost: str = ""
    expected_text: str = "(none stated)"
    # True: no row at all unless one of its parts ran (a part runs only when both cycles of its step
    # are selected). The course's steps 2-8 always show, "not measured" when their part is missing;
    # cycle 11 is beyond the course a repository may stop at, so without it the table says nothing.
    optional: bool = False


DECODE_STEP = "decode_step_s"
TPOT = "tpot_mean_s"             # derived from each request's latency, TTFT and tokens

STEPS = (
    Step(2, "KV cache", ("kv_cache", "throughput"), "latency_mean_s", "mean latency", True, -0.60),
    Step(3, "paging", ("throughput",), "kv_cache_peak_bytes", "KV cache peak", True, -0.30,
         cost="paging's block tables: each step gathers a sequence's blocks into a dense K/V, "
              "so speed may drop while KV memory does"),
    # Under arrivals a static engine's requests queue behind a whole batch: the gain is the time to
    # first token. The design states +200% throughput instead; throughput here is capped by the
    # arrival rate, and goodput depends on SLOs that a slower machine misses for both engines.
    Step(4, "continuous batching", ("online",), "ttft_p99_s", "p99 TTFT", True, None,
         expected_text="+200% throughput",
         cost="with all requests present at once and slots for all, there is nothing to schedule: "
              "the gain needs arrivals over time (the online part)"),
    Step(5, "prefix caching", ("shared_prefix",), "ttft_mean_s", "mean TTFT", True, -0.50),
    Step(6, "flash attention", ("long_context",), "latency_mean_s", "mean latency", True, -0.30,
         cost="on short prompts a fused attention call's fixed cost may outweigh what it saves"),
    Step(7, "int8 weights", ("throughput",), "weight_bytes", "weight memory", True, -0.50,
         cost="int8 on a CPU: torch's int8 kernel is fast at a few rows only, and without AVX512-BF16 each "
              "matmul casts the weights back to float, so tokens/s can drop while weight memory does"),
    Step(8, "CUDA graphs", ("throughput",), DECODE_STEP, "decode step time", True, None,
         cost="CUDA graphs are GPU only: on a CPU the decode runs eagerly, as in cycle 7"),
    # Speculative decoding's gain is the time per output token of a request alone on the engine,
    # on text that copies its prompt (the speculative part: copy workload, max_num_seqs=1).
    Step(10, "speculative decoding", ("speculative",), TPOT, "TPOT, copy at batch 1", True, None, optional=True,
         cost="speculation pays where the text repeats itself: open chat proposes little, and a verify "
              "step of 1 + k rows costs more than a decode on a CPU"),
    # Cycle 11 at tensor_parallel_size=N against cycle 10 (its tp=1): the result's weight_bytes is
    # rank 0's (every rank holds the same share), so the row reads the memory one rank needs.
    Step(11, "tensor parallelism", ("tensor_parallel",), "weight_bytes", "weight memory per rank", True, None,
         expected_text="1/N of the weights per rank", optional=True,
         cost="on one machine tensor parallelism buys memory, not speed: every layer adds two all-reduces "
              "(after attention and after the MLP), and on a CPU the ranks share the same cores"),
)


def metric_value(result: dict, metric: str) -> float | None:
    """A result's value of the metric; the decode step time is the median of the engine's steps
    after the first (the first is the prefill); TPOT the mean over requests of (latency - TTFT) /
    (tokens - 1), for requests of two tokens or more."""
    if metric == TPOT:
        tpots = [(latency - ttft) / (len(ids) - 1) for latency, ttft, ids in
                 zip(result.get("latency_s") or [], result.get("ttft_s") or [], result.get("token_ids") or [])
                 if len(ids) > 1]
        return statistics.fmean(tpots) if tpots else None
    if metric != DECODE_STEP:
        return result.get(metric)
    steps = (result.get("stats") or {}).get("step_times") or []
    return statistics.median(s[1] for s in steps[1:]) if len(steps) > 1 else None


def _find(parts: dict[str, list[dict]], step: Step, cycle: int) -> tuple[str, dict] | tuple[None, None]:
    """The result of `cycle` in the first of the step's parts that holds both of its cycles."""
    for name in step.parts:
        by_cycle = {_cycle(r["engine"]): r for r in parts.get(name, [])}
        if step.cycle - 1 in by_cycle and step.cycle in by_cycle:
            return name, by_cycle[cycle]
    return None, None


def _cycle(engine: str) -> int | None:
    head = engine.partition("_")[0].removeprefix("cycle")
    return int(head) if head.isdigit() else None


def summarize(parts: dict[str, list[dict]]) -> list[dict]:
    """One row per step whose two cycles ran: the home part, the metric before and after, the
    ratio after/before, the change, the design's expected change, and a verdict:
    'better', 'NO GAIN' (exactly equal), 'REGRESSED', 'GPU only' (cycle 8 where no graph replays) or
    'not measured'. An optional step none of whose parts ran gets no row."""
    rows = []
    for step in STEPS:
        if step.optional and not any(name in parts for name in step.parts):
            continue
        part, before = _find(parts, step, step.cycle - 1)
        _, after = _find(parts, step, step.cycle)
        row = {"step": f"c{step.cycle - 1} -> c{step.cycle}", "cycle": step.cycle, "lesson": step.lesson,
               "part": part, "workload": after and after.get("workload"), "metric": step.metric,
               "label": step.label, "lower_is_better": step.lower_is_better,
               "expected_change": step.expected, "expected_text": step.expected_text, "cost": step.cost}
        old = metric_value(before, step.metric) if before else None
        new = metric_value(after, step.metric) if after else None
        row.update(before=old, after=new, ratio=None, change=None)
        if old is None or new is None:
            rows.append(row | {"verdict": "not measured"})
            continue
        ratio = new / old if old else (float("inf") if new else 1.0)
        improved = ratio < 1 if step.lower_is_better else ratio > 1
        verdict = "better" if improved else ("NO GAIN" if ratio == 1 else "REGRESSED")
        if step.metric == DECODE_STEP and not (after.get("stats") or {}).get("cuda_graphs"):
            verdict = "GPU only"   # no graph replays here: the step measures nothing of the lesson
        rows.append(row | {"ratio": ratio, "change": ratio - 1, "verdict": verdict})
    return rows


def judged_elsewhere(row: dict) -> bool:
    """A row whose lesson did not run here ('GPU only': no CUDA graph replayed). Its before and
    after are this device's own figures, shown as such; its change is not the lesson's gain, so the
    table prints no ratio or change for it and the summary chart draws no bar."""
    return row["verdict"] == "GPU only"


def gain_factor(change: float | None, lower_is_better: bool) -> float | None:
    """How many times better: 2.0 for half the latency or twice the goodput; below 1: worse."""
    if change is None:
        return None
    ratio = 1 + change
    if lower_is_better:
        return 1 / ratio if ratio > 0 else float("inf")
    return ratio


def change_text(change: float | None) -> str:
    if change is None:
        return "-"
    if change == float("inf"):
        return "from 0"
    return f"{change:+.0%}"


def _ratio_text(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return "from 0" if ratio == float("inf") else f"{ratio:.2f}x"


def _value_text(value, metric: str) -> str:
    if value is None:
        return "-"
    if metric.endswith("_bytes"):
        return f"{value / MIB:.1f} MiB"
    if metric == "goodput":
        return f"{value:.3f} req/s"
    return f"{value * 1000:.1f} ms" if metric == DECODE_STEP else f"{value:.3f} s"


def format_summary(rows: list[dict]) -> str:
    """The summary table printed first, and one line per cycle that costs speed elsewhere."""
    header = ["step", "lesson", "home workload", "metric", "before", "after", "after/before", "measured",
              DESIGN, "verdict"]
    table = [[r["step"], r["lesson"], r["part"] or "-", r["label"], _value_text(r["before"], r["metric"]),
              _value_text(r["after"], r["metric"]), "-" if judged_elsewhere(r) else _ratio_text(r["ratio"]),
              "-" if judged_elsewhere(r) else change_text(r["change"]),
              change_text(r["expected_change"]) if r["expected_change"] is not None else r["expected_text"],
              r["verdict"]] for r in rows]
    lines = ["What each cycle adds (measured on each lesson's home workload, beside the gain the "
             "course's starting design expected)"] + format_columns(header, table)
    notes = [f"  c{r['cycle']}: {r['cost']}" for r in rows if r["cost"]]
    if notes:
        lines += ["where a cycle costs speed on a metric it does not target:"] + notes
    flagged = [f"{r['step']} ({r['verdict']})" for r in rows if r["verdict"] in ("REGRESSED", "NO GAIN")]
    if flagged:
        lines.append(f"no gain on the home metric: {', '.join(flagged)}")
    return "\n".join(lines)
