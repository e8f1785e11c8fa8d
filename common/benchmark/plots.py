"""Charts of benchmark results: one PNG each for latency, throughput, TTFT and memory, plus, when
the engines that teach them are present, step time against sequence length (cycles 1 and 2: the
cost of recomputing versus caching) and a request timeline (cycles 3 and 4: static versus
continuous batching)."""

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, works on headless machines and CI
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)
import matplotlib.ticker  # noqa: E402

from common.engine.metrics import PEAK_WITH_LOADING  # noqa: E402

MIB = 2**20

# The real vLLM, when compare.py ran it, is drawn in its own colour: the reference the cycles chase.
VLLM_LABEL = "vLLM"
VLLM_COLOR = "tab:red"

# A linear axis hides bars more than this many times smaller than the largest (c1's throughput next
# to c4's on a GPU), so past this spread we switch to log scale and say so in the title.
LOG_SCALE_SPREAD = 100


def short_name(engine: str) -> str:
    """cycle4_batching -> 'c4 batching', hf_generate_batch -> 'HF generate_batch'."""
    match = re.fullmatch(r"cycle(\d+)_(.+)", engine)
    if match:
        return f"c{match[1]} {match[2]}"
    if engine.startswith("hf_"):
        return "HF " + engine.removeprefix("hf_")
    if engine == "vllm":
        return VLLM_LABEL
    return engine


def _subtitle(results: list[dict]) -> str:
    first = results[0]
    machine = (first.get("machine") or {}).get("name")
    device = f"{first['device']} ({machine})" if machine else first["device"]
    size = f" [{first['workload_size']}]" if first.get("workload_size") else ""
    return f"{first['model']} · {first['weights']} weights\n{device} · workload {first['workload']}{size}"


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _needs_log(series: dict[str, list]) -> bool:
    positive = [v for values in series.values() for v in values if v is not None and v > 0]
    return len(positive) > 1 and max(positive) / min(positive) > LOG_SCALE_SPREAD


def _bar_chart(path: Path, title: str, subtitle: str, labels: list[str], series: dict[str, list],
               ylabel: str, footnote: str | None = None) -> Path:
    """Grouped bars: one group per engine (labels), one bar per series, each labelled with its
    value. A missing value (None) gets an 'n/a' label and no bar."""
    log = _needs_log(series)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.2 * len(labels) + 3), 5.2))
    width = 0.8 / len(series)
    vllm = [j for j, name in enumerate(labels) if name.rstrip("*") == VLLM_LABEL]
    for i, (label, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        heights = [v if v is not None and v > 0 else math.nan for v in values]
        bars = ax.bar(xs, heights, width, label=label)
        for j in vllm:   # vLLM's bars in its own colour, series told apart by shade
            bars[j].set_color(VLLM_COLOR)
            bars[j].set_alpha(1.0 - 0.25 * i)
        for x, v in zip(xs, values):
            text = "n/a" if v is None else _fmt(v)
            if v is not None and v > 0:
                ax.annotate(text, (x, v), xytext=(0, 2), textcoords="offset points", ha="center",
                            va="bottom", fontsize=8)
            else:  # no bar to sit on: put the label on the axis
                ax.annotate(text, (x, 0.01), xycoords=("data", "axes fraction"), ha="center",
                            va="bottom", fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.margins(y=0.15)  # headroom for the value labels
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}{', log scale' if log else ''}\n{subtitle}", fontsize=10)
    if len(series) > 1:  # outside, on the right: inside it would cover bars
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if footnote:
        fig.text(0.01, 0.01, footnote, fontsize=7, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.01 + 0.03 * len(footnote.splitlines()) if footnote else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _memory_labels(results: list[dict]) -> tuple[str, list[str], str | None]:
    """The peak-memory legend, tick labels, and a footnote for engines whose peak could not be
    reset after loading (starred): their bars include loading's transient copies."""
    # The two devices count different things; say which, so nobody compares them across charts.
    counter = "torch CUDA allocator" if results[0]["device"].startswith("cuda") else "process RSS"
    loading = [r.get("peak_memory_scope") == PEAK_WITH_LOADING for r in results]
    labels = [short_name(r["engine"]) + ("*" if star else "") for r, star in zip(results, loading)]
    footnote = "* peak includes model loading (it could not be reset after loading)" if any(loading) else None
    return f"peak memory\n({counter})", labels, footnote


def _mib(value) -> float | None:
    return None if value is None else value / MIB


def plot_results(results: list[dict], out_dir, timeline: bool = True) -> list[Path]:
    """Write latency.png, throughput.png, ttft.png and memory.png into out_dir, and the lesson
    charts the engines present teach; return their paths. timeline=False: no c3/c4 timeline (the
    suite draws it from the run where the two differ, the online one)."""
    if not results:
        raise ValueError("no results to plot")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [short_name(r["engine"]) for r in results]
    peak_legend, memory_labels, footnote = _memory_labels(results)
    subtitle = _subtitle(results)

    def column(key, convert=lambda v: v):
        return [convert(r.get(key)) for r in results]

    speed_note = _speed_costs(results)
    return [
        _bar_chart(out_dir / "latency.png", "Request latency (lower is better)", subtitle, labels,
                   {"mean": column("latency_mean_s"), "p90": column("latency_p90_s")}, "seconds", speed_note),
        _bar_chart(out_dir / "throughput.png", "Output throughput (higher is better)", subtitle, labels,
                   {"throughput": column("throughput_tok_s")}, "tokens / s", speed_note),
        _bar_chart(out_dir / "ttft.png", "Mean time to first token (lower is better)", subtitle, labels,
                   {"mean TTFT": column("ttft_mean_s")}, "seconds", speed_note),
        _bar_chart(out_dir / "memory.png", "Memory (lower is better)", subtitle, memory_labels,
                   {peak_legend: column("peak_memory_bytes", _mib),
                    "KV cache peak": column("kv_cache_peak_bytes", _mib),
                    "weights": column("weight_bytes", _mib)}, "MiB", footnote),
    ] + _lesson_charts(results, out_dir, subtitle, timeline)


def _speed_costs(results: list[dict]) -> str | None:
    """One line per cycle present (with its predecessor) that may cost speed on a metric its lesson
    does not target, saying why: a speed chart never shows a lesson going backwards unexplained."""
    from common.benchmark.summary import STEPS

    engines = {short_name(r["engine"]).split()[0] for r in results}
    lines = [f"c{s.cycle}: {s.cost}" for s in STEPS if s.cost and {f"c{s.cycle - 1}", f"c{s.cycle}"} <= engines]
    return "\n".join(lines) or None


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _lesson_charts(results: list[dict], out_dir: Path, subtitle: str, timeline: bool) -> list[Path]:
    by_engine = {r["engine"]: r for r in results}
    paths = []
    steps = [by_engine[e] for e in ("cycle1_naive", "cycle2_kvcache") if e in by_engine]
    if steps and all(r.get("stats", {}).get("step_times") for r in steps):
        paths.append(_step_time_chart(out_dir / "step_time.png", steps, subtitle))
    online = {}   # an online sweep: each engine's row at the last finite rate (inf has no arrivals to show)
    for r in results:
        if r["engine"] not in online or math.isfinite(r.get("request_rate") or 0):
            online[r["engine"]] = r
    rows = [online[e] for e in ("cycle3_paged", "cycle4_batching") if e in online]
    if rows and timeline:
        paths.append(_timeline_chart(out_dir / "timeline.png", rows, subtitle))
    return paths


def _step_time_chart(path: Path, results: list[dict], subtitle: str) -> Path:
    """Seconds per step against tokens per sequence: cycle 1 reruns the whole sequence every step
    (a line that climbs: O(n) per token, O(n^2) in all), cycle 2 feeds one token (flat)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        points = r["stats"]["step_times"][1:]   # the first step is the prefill: off the scale
        ax.scatter([p[0] for p in points], [p[1] * 1000 for p in points], s=8, label=short_name(r["engine"]))
    ax.set_xlabel("tokens per sequence in the step")
    ax.set_ylabel("ms per decode step (one new token per sequence)")
    ax.set_title(f"Decode step time against sequence length\n{subtitle}", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _timeline_chart(path: Path, results: list[dict], subtitle: str) -> Path:
    """One bar per request from its first token to its last: static batches start together and
    wait for the slowest; continuous batching starts a request as soon as a slot frees. An online
    result (requests arriving over time) has arrival times: each grey line starts at its arrival."""
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), sharex=True, squeeze=False)
    for ax, r in zip(axes[0], results):
        arrivals = r.get("arrival_s") or [0.0] * len(r["ttft_s"])
        for i, (arrival, ttft, latency) in enumerate(zip(arrivals, r["ttft_s"], r["latency_s"])):
            first, last = arrival + ttft, arrival + latency
            ax.barh(i, last - first, left=first, height=0.8, color="tab:blue")
            ax.plot([arrival, first], [i, i], color="0.6", linewidth=1)   # waiting for the first token
        rate = f" @ {r['request_rate']:g} req/s" if r.get("request_rate") is not None else ""
        ax.set_title(short_name(r["engine"]) + rate, fontsize=10)
        ax.set_xlabel("seconds since the first arrival" if r.get("arrival_s") else "seconds since all requests arrived")
        ax.invert_yaxis()
    axes[0][0].set_ylabel("request")
    fig.suptitle(f"Which request runs when (grey: waiting, blue: generating)\n{subtitle}", fontsize=9)
    return _save(fig, path)


def plot_online(results: list[dict], out_dir) -> list[Path]:
    """Online workload sweeps (several request rates per engine): latency and goodput against the
    request rate, one line per engine. One rate only: nothing to draw against, no chart."""
    by_engine: dict[str, list[dict]] = {}
    for r in results:
        if r.get("request_rate") is not None:
            by_engine.setdefault(r["engine"], []).append(r)
    if not any(len(rows) > 1 for rows in by_engine.values()):
        return []
    out_dir = Path(out_dir)
    subtitle = _subtitle(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("ttft_p99_s", "p99 time to first token (s)"), ("tpot_mean_s", "mean time per output token (s)"),
              ("e2el_p99_s", "p99 end-to-end latency (s)")]
    for ax, (key, label) in zip(axes, panels):
        for engine, rows in sorted(by_engine.items()):
            rows = sorted(rows, key=lambda r: r["request_rate"])
            ax.plot([_rate_x(r) for r in rows], [r.get(key) or math.nan for r in rows], marker="o", label=short_name(engine),
                    **_line_style(engine))
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Latency under load (lower is better)\n{subtitle}", fontsize=9)
    paths = [_save(fig, out_dir / "online_latency.png")]

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for engine, rows in sorted(by_engine.items()):
        rows = sorted(rows, key=lambda r: r["request_rate"])
        ax.plot([_rate_x(r) for r in rows], [r.get("goodput") or 0 for r in rows], marker="o", label=short_name(engine),
                **_line_style(engine))
        ax.plot([_rate_x(r) for r in rows], [r.get("request_throughput") or 0 for r in rows], linestyle=":",
                color=ax.lines[-1].get_color())
    slo = results[0]
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("requests / s")
    ax.set_title(f"Goodput (solid: TTFT <= {slo['slo_ttft_s']:g} s and TPOT <= {slo['slo_tpot_s']:g} s; "
                 f"dotted: all requests)\n{subtitle}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return paths + [_save(fig, out_dir / "goodput.png")]


def _line_style(engine: str) -> dict:
    return {"color": VLLM_COLOR} if short_name(engine) == VLLM_LABEL else {}


def _rate_x(r: dict) -> float:
    """An infinite rate (everything at once) has no place on a rate axis: it is left out of the lines."""
    return r["request_rate"] if math.isfinite(r["request_rate"]) else math.nan


def plot_summary(summary: list[dict], run_info: dict, path) -> Path:
    """"What each cycle adds": per step, how many times better the lesson's home metric got
    (measured, and the design's expectation beside it), on a log axis where 1x is no change and a
    bar left of it is a regression. The caption names the home workloads and why a cycle may cost
    speed on a metric it does not target."""
    from common.benchmark.summary import DESIGN, change_text, gain_factor, judged_elsewhere

    rows = [r for r in summary if r["verdict"] != "not measured"]
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.7 * max(1, len(rows))))
    device = run_info.get("device", "?")
    for y, r in enumerate(rows):
        if judged_elsewhere(r):   # the table prints no change for it either: the lesson did not run here
            ax.annotate(f"{r['label']}: GPU only, not drawn (no graph replays on {device})", (1.0, y - 0.18),
                        xytext=(3, 0), textcoords="offset points", va="center", fontsize=8, color="tab:gray")
            continue
        measured = min(gain_factor(r["change"], r["lower_is_better"]), 1e3)   # from 0: off the scale
        expected = gain_factor(r["expected_change"], r["lower_is_better"])
        color = "tab:green" if measured > 1 else "tab:red"
        ax.barh(y - 0.18, measured - 1, 0.36, left=1, color=color)   # from 1x: a regression grows leftwards
        ax.annotate(f"{change_text(r['change'])} {r['label']}",
                    (max(measured, 1.0), y - 0.18), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        if expected is not None:
            ax.barh(y + 0.18, expected - 1, 0.36, left=1, color="tab:blue", alpha=0.45)
            ax.annotate(f"{r['expected_change']:+.0%}", (expected, y + 0.18), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=8)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    factors = [f for r in rows if not judged_elsewhere(r)
               for f in (min(gain_factor(r["change"], r["lower_is_better"]), 1e3),
                         gain_factor(r["expected_change"], r["lower_is_better"])) if f]
    lo, hi = min(factors + [0.5]) / 1.3, max(factors + [2.0]) * 2.5   # room for the labels
    ax.set_xlim(lo, hi)
    ax.set_xticks([t for t in (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000) if lo <= t <= hi])
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks(range(len(rows)), [f"{r['step']} {r['lesson']}\n{r['part']}" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("times better on the home metric (log; 1 = no change, left of 1 = worse)")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color="tab:green"), plt.Rectangle((0, 0), 1, 1, color="tab:blue", alpha=0.45)],
              labels=["measured", DESIGN], fontsize=8, loc="lower right")
    machine = (run_info.get("machine") or {}).get("name", "?")
    ax.set_title(f"What each cycle adds, each lesson on its home workload\n{run_info['model']} · "
                 f"{run_info['weights']} weights · {run_info['device']} ({machine})", fontsize=9)
    notes = [f"c{r['cycle']}: {r['cost']}" for r in rows if r["cost"]]
    fig.text(0.01, 0.01, "\n".join(notes), fontsize=6.5, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03 + 0.022 * len(notes), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_memory_vs_context(results: list[dict], path) -> Path:
    """Peak memory against prompt length, one line per engine, from several compare.py runs
    (e.g. --workload long_context --prompt-len N for a few N): the score matrix that explicit
    attention materializes grows with the square of the context, a fused kernel's does not."""
    by_engine: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        by_engine.setdefault(r["engine"], []).append((r["prompt_tokens"] / r["num_requests"],
                                                      r["peak_memory_bytes"] / MIB))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for engine, points in sorted(by_engine.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=short_name(engine))
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("peak memory (MiB)")
    ax.set_title(f"Peak memory against context length\n{_subtitle(results)}", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m common.benchmark.plots",
                                description="Peak memory against context length from several compare.py results.json "
                                            "files; with --summary, the course suite's summary chart redrawn from its "
                                            "stored results.json, without rerunning anything.")
    p.add_argument("out", help="the PNG to write")
    p.add_argument("results", nargs="+", help="results.json files written by compare.py")
    p.add_argument("--summary", action="store_true",
                   help="RESULTS is one suite results.json: recompute its summary from its parts and draw summary.png")
    args = p.parse_args(argv)
    if args.summary:
        from common.benchmark.summary import summarize

        if len(args.results) != 1:
            p.error("--summary takes one suite results.json")
        data = json.loads(Path(args.results[0]).read_text())
        summary = summarize({name: part["results"] for name, part in data["parts"].items()})
        print(plot_summary(summary, data["run"], args.out))
        return
    results = [r for f in args.results for r in json.loads(Path(f).read_text())["results"]]
    print(plot_memory_vs_context(results, args.out))


if __name__ == "__main__":
    main()
