"""The online workload (common/benchmark/online.py): arrivals, the serving metrics, and both drivers."""

import math
import statistics

import pytest

from common.benchmark.online import (RequestRecord, arrival_times, drive_static, drive_steps, format_online_table,
                           online_row, online_settings, parse_rates, serving_metrics)
from common.engine.outputs import RequestMetrics, RequestOutput
from conftest import cycle


def gaps(times):
    return [b - a for a, b in zip(times, times[1:])]


def test_arrivals_are_seeded():
    assert arrival_times(50, 2.0, seed=1) == arrival_times(50, 2.0, seed=1)
    assert arrival_times(50, 2.0, seed=1) != arrival_times(50, 2.0, seed=2)
    assert arrival_times(5, math.inf) == [0.0] * 5
    times = arrival_times(50, 2.0)
    assert times[0] == 0.0 and times == sorted(times)


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_arrival_gaps_have_the_rate_and_the_burstiness(burstiness):
    """Gamma gaps of shape B and mean 1/rate: the coefficient of variation is 1/sqrt(B)
    (1 for Poisson, larger for bursty traffic, smaller for even traffic)."""
    g = gaps(arrival_times(20_000, 4.0, burstiness, seed=0))
    mean = statistics.fmean(g)
    assert mean == pytest.approx(0.25, rel=0.05)
    assert statistics.pstdev(g) / mean == pytest.approx(1 / math.sqrt(burstiness), rel=0.1)


@pytest.mark.parametrize("bad", [dict(num_requests=0, request_rate=1), dict(num_requests=3, request_rate=0),
                                 dict(num_requests=3, request_rate=1, burstiness=0)])
def test_bad_arrival_settings_are_refused(bad):
    with pytest.raises(ValueError):
        arrival_times(**bad)


def test_parse_rates():
    assert parse_rates("1, 2.5,inf") == [1.0, 2.5, math.inf]
    with pytest.raises(ValueError):
        parse_rates("1,-2")


def test_serving_metrics_by_hand():
    # A arrives at 0, tokens at 1, 2, 4: TTFT 1, E2EL 4, TPOT (4 - 1) / 2 = 1.5, ITLs 1 and 2.
    # B arrives at 1, one token at 3: TTFT 2, E2EL 2, no TPOT. C never finished (failed).
    a = RequestRecord(0.0, [1.0, 2.0, 4.0], 4.0, num_output_tokens=3)
    b = RequestRecord(1.0, [3.0], 3.0, num_output_tokens=1)
    c = RequestRecord(2.0)
    m = serving_metrics([a, b, c], slo_ttft_s=1.5, slo_tpot_s=2.0)
    assert (m["completed"], m["failed"], m["duration_s"]) == (2, 1, 4.0)
    assert m["ttft_mean_s"] == 1.5 and m["ttft_p50_s"] == 1.5 and m["ttft_p99_s"] == pytest.approx(1.99)
    assert m["tpot_mean_s"] == 1.5
    assert m["itl_p50_s"] == 1.5 and m["itl_p99_s"] == pytest.approx(1.99)
    assert m["e2el_p99_s"] == pytest.approx(3.98)
    assert m["request_throughput"] == 0.5 and m["output_throughput"] == 1.0
    assert m["goodput"] == 0.25            # only A meets TTFT <= 1.5 s (B waited 2 s)
    assert serving_metrics([a, b], slo_ttft_s=0.5, slo_tpot_s=2.0)["goodput"] == 0.0
    assert serving_metrics([a, b], slo_ttft_s=5, slo_tpot_s=1.0)["goodput"] == 0.25   # A's TPOT 1.5 > 1


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, seconds):
        self.t += seconds


class StaticEngine:
    """A generate()-only engine whose every batch takes 10 s: first tokens after 1 s, 4 tokens each."""

    def __init__(self, clock):
        self.clock, self.batches = clock, []

    def generate(self, prompts, params):
        self.batches.append([p[0] for p in prompts])
        self.clock.t += 10.0
        return [RequestOutput(i, None, p, [7, 7, 7, 7], "", "length", RequestMetrics(1.0, 10.0))
                for i, p in enumerate(prompts)]


def test_static_server_batches_what_arrived_and_makes_the_rest_wait():
    clock = FakeClock()
    engine = StaticEngine(clock)
    arrivals = [0.0, 0.0, 3.0, 4.0, 5.0, 25.0]
    records = drive_static(engine, [[i] for i in range(6)], [None] * 6, arrivals, max_num_seqs=2,
                           clock=clock, sleep=clock.sleep)
    # 0-10: requests 0, 1; 10-20: 2, 3 (4 waits: the batch is full); 20-30: 4; idle until 25 is past
    assert engine.batches == [[0, 1], [2, 3], [4], [5]]
    assert [r.token_times_s[0] - r.arrival_s for r in records] == [1.0, 1.0, 8.0, 7.0, 16.0, 6.0]
    assert records[2].token_times_s == [11.0, 14.0, 17.0, 20.0]   # spread evenly between first and last
    assert records[5].finish_s == 40.0


def test_step_driver_adds_each_request_once_it_has_arrived(tiny_llms):
    llm = tiny_llms("cycle4_batching")
    clock = FakeClock()
    step = llm.step

    class Timed:   # each step takes 1 s on the fake clock
        def __getattr__(self, name):
            return getattr(llm, name)

        def step(self):
            clock.t += 1.0
            return step()

    sp = cycle("cycle4_batching").SamplingParams
    prompts, params = [[5, 6, 7], [8, 9], [10, 11, 12]], [sp(temperature=0, max_tokens=4, ignore_eos=True)] * 3
    records = drive_steps(Timed(), prompts, params, [0.0, 0.0, 2.5], clock=clock, sleep=clock.sleep)
    # steps end at 1 (prefill 0, 1), 2, 3; request 2 arrived at 2.5 joins with a prefill ending at 4
    assert records[0].token_times_s == [1.0, 2.0, 3.0, 5.0] and records[2].token_times_s[0] == 4.0
    assert [r.token_ids for r in records] == [o.token_ids for o in llm.generate(prompts, params)]
    assert llm.scheduler.block_manager.num_free_blocks == llm.scheduler.block_manager.num_blocks


def test_step_driver_sleeps_while_idle(tiny_llms):
    llm = tiny_llms("cycle4_batching")
    clock = FakeClock()
    sp = cycle("cycle4_batching").SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    records = drive_steps(llm, [[5, 6], [7, 8]], [sp, sp], [0.0, 100.0], clock=clock, sleep=clock.sleep)
    assert records[1].token_times_s[0] >= 100.0 and records[1].finish_s is not None


def test_online_row_and_table():
    records = [RequestRecord(0.0, [1.0, 2.0], 2.0, num_output_tokens=2)]
    settings = online_settings("cpu", None, 1.0, None, 0.5)
    row = online_row(records, settings) | {"engine": "cycle4_batching"}
    assert row["request_rate"] == 1.0 and row["slo_tpot_s"] == 0.5 and row["arrival_s"] == [0.0]
    table = format_online_table([row])
    assert "TTFT p99 s" in table and "goodput" in table and "cycle4_batching" in table


@pytest.mark.slow
def test_compare_online_smoke_tiny_checkpoint(tmp_path, tiny_checkpoints):
    """compare.py --workload online end to end: cycles 3 and 4, the table and the timeline chart."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    path, _ = tiny_checkpoints["qwen3"]
    out = tmp_path / "online"
    proc = subprocess.run([sys.executable, "compare.py", "--workload", "online", "--quick", "--cycles", "3,4",
                           "--model", path, "--device", "cpu", "--request-rate", "20", "--plot", "--out", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["results"]
    assert [(r["engine"], r["request_rate"]) for r in results] == [("cycle3_paged", 20.0), ("cycle4_batching", 20.0)]
    assert all(r["completed"] == r["num_requests"] and r["ttft_p99_s"] > 0 and r["goodput"] is not None for r in results)
    assert all(r["token_ids"] == results[0]["token_ids"] for r in results)   # arrivals never change a greedy output
    assert "timeline.png" in {p.name for p in out.glob("*.png")}
    assert "TTFT p99 s" in proc.stdout


def test_sweep_charts(tmp_path):
    from common.benchmark.plots import plot_online

    def row(engine, rate, ttft):
        return {"engine": engine, "request_rate": rate, "ttft_p99_s": ttft, "tpot_mean_s": 0.1, "e2el_p99_s": 2 * ttft,
                "goodput": 1 / ttft, "request_throughput": rate, "slo_ttft_s": 1.0, "slo_tpot_s": 0.2,
                "model": "tiny", "weights": "random", "device": "cpu", "workload": "online"}
    rows = [row("cycle3_paged", r, 3 * r) for r in (0.5, 1.0, math.inf)] + [row("cycle4_batching", r, r) for r in (0.5, 1.0)]
    paths = plot_online(rows, tmp_path)
    assert [p.name for p in paths] == ["online_latency.png", "goodput.png"] and all(p.stat().st_size > 0 for p in paths)
    assert plot_online(rows[:1] + rows[3:4], tmp_path) == []   # one rate per engine: no sweep to draw
