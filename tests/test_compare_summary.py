"""The course suite's summary, "what each cycle adds", computed from a fake run: no engine runs."""

import json
from types import SimpleNamespace

import pytest

import compare
from common.benchmark import runner
from common.benchmark.bench import _accepted_options
from common.benchmark.report import cycle_number
from common.benchmark.suite import CPU_NAIVE_REQUESTS, CPU_THROUGHPUT_REQUESTS, CPU_TP_SIZE, part_engines, suite
from common.benchmark.summary import STEPS, format_summary, summarize
from common.engine.args import parse_options

CYCLES = ["cycle1_naive", "cycle2_kvcache", "cycle3_paged", "cycle4_batching", "cycle5_prefix",
          "cycle6_flash", "cycle7_int8", "cycle8_graphs", "cycle9_chunked", "cycle10_speculative", "cycle11_tp"]


def _row(engine, workload="throughput", **values):
    base = {"engine": engine, "workload": workload, "latency_mean_s": 1.0, "ttft_mean_s": 1.0, "ttft_p99_s": 1.0,
            "kv_cache_peak_bytes": 100, "weight_bytes": 1000, "stats": {"step_times": [[8, 1.0], [9, 0.1], [10, 0.1]]}}
    return base | values


def _fake_parts(**overrides):
    """Every part of the CPU suite, each engine's home metric set apart from its neighbour's; a
    metric the step does not read is equal everywhere, so a wrong pick shows as a ratio of 1."""
    parts = {
        "throughput": [_row("cycle2_kvcache", latency_mean_s=9.0, kv_cache_peak_bytes=100),
                       _row("cycle3_paged", kv_cache_peak_bytes=60),
                       _row("cycle6_flash", weight_bytes=1000),
                       _row("cycle7_int8", weight_bytes=250, stats={"step_times": [[8, 1.0], [9, 0.2], [10, 0.2]]}),
                       _row("cycle8_graphs", weight_bytes=250,
                            stats={"step_times": [[8, 1.0], [9, 0.1], [10, 0.1]], "cuda_graphs": False})],
        "kv_cache": [_row("cycle1_naive", latency_mean_s=10.0), _row("cycle2_kvcache", latency_mean_s=4.0)],
        "online": [_row("cycle3_paged", "online", ttft_p99_s=12.0), _row("cycle4_batching", "online", ttft_p99_s=0.5)],
        "shared_prefix": [_row("cycle4_batching", "shared_prefix", ttft_mean_s=6.0),
                          _row("cycle5_prefix", "shared_prefix", ttft_mean_s=1.5)],
        "long_context": [_row("cycle5_prefix", "long_context", latency_mean_s=10.0),
                         _row("cycle6_flash", "long_context", latency_mean_s=5.0)],
    }
    return parts | overrides


# Cycle 10 against cycle 11 at tp=3: rank 0 holds a third of the weights. In the throughput part
# both hold them all: a step that read that part would find no change.
TENSOR_PARALLEL = [_row("cycle10_speculative", weight_bytes=900), _row("cycle11_tp", weight_bytes=300)]

# Cycle 9 against cycle 10 on the copy workload, one request at a time: TPOT from each request's
# latency, TTFT and tokens. Cycle 9: (2.1 - 0.1) / 4 and (1.1 - 0.1) / 2, a mean of 0.5 s; cycle 10:
# (1.1 - 0.1) / 4 and (0.6 - 0.1) / 2, 0.25 s. Their mean latencies are equal: a step that read them
# would find no change.
SPECULATIVE = [_row("cycle9_chunked", "copy", latency_s=[2.1, 1.1], ttft_s=[0.1, 0.1], token_ids=[[1] * 5, [2] * 3]),
               _row("cycle10_speculative", "copy", latency_s=[1.1, 0.6], ttft_s=[0.1, 0.1], token_ids=[[1] * 5, [2] * 3])]


def test_each_step_reads_its_home_workload_and_metric():
    parts = _fake_parts(tensor_parallel=TENSOR_PARALLEL, speculative=SPECULATIVE)
    parts["throughput"] += [_row("cycle10_speculative", weight_bytes=900), _row("cycle11_tp", weight_bytes=900)]
    rows = {r["cycle"]: r for r in summarize(parts)}
    expected = {2: ("kv_cache", "latency_mean_s", 10.0, 4.0), 3: ("throughput", "kv_cache_peak_bytes", 100, 60),
                4: ("online", "ttft_p99_s", 12.0, 0.5), 5: ("shared_prefix", "ttft_mean_s", 6.0, 1.5),
                6: ("long_context", "latency_mean_s", 10.0, 5.0), 7: ("throughput", "weight_bytes", 1000, 250),
                8: ("throughput", "decode_step_s", 0.2, 0.1), 10: ("speculative", "tpot_mean_s", 0.5, 0.25),
                11: ("tensor_parallel", "weight_bytes", 900, 300)}
    assert sorted(rows) == sorted(expected) == [s.cycle for s in STEPS]
    for cycle, (part, metric, before, after) in expected.items():
        r = rows[cycle]
        assert (r["part"], r["metric"]) == (part, metric), cycle
        assert (r["before"], r["after"]) == (pytest.approx(before), pytest.approx(after)), cycle
        assert r["step"] == f"c{cycle - 1} -> c{cycle}"


def test_ratio_and_change_against_the_designs_expectation():
    rows = {r["cycle"]: r for r in summarize(_fake_parts())}
    assert rows[2]["ratio"] == pytest.approx(0.4) and rows[2]["change"] == pytest.approx(-0.6)
    assert rows[4]["ratio"] == pytest.approx(0.5 / 12) and rows[4]["change"] == pytest.approx(0.5 / 12 - 1)
    # The design states no TTFT figure for continuous batching: its +200% throughput is shown as text.
    assert [rows[c]["expected_change"] for c in range(2, 9)] == [-0.6, -0.3, None, -0.5, -0.3, -0.5, None]
    assert all(rows[c]["verdict"] == "better" for c in range(2, 8))
    assert rows[8]["verdict"] == "GPU only"     # no graph replays: the CPU's decode step says nothing
    table = format_summary(list(rows.values()))
    assert "c1 -> c2" in table and "-60%" in table and "-96%" in table and "+200% throughput" in table
    assert "REGRESSED" not in table and "no gain" not in table and "int8 on a CPU" in table and "block tables" in table


def test_tensor_parallelism_is_judged_on_the_weight_memory_of_one_rank():
    row = summarize(_fake_parts(tensor_parallel=TENSOR_PARALLEL))[-1]
    assert (row["step"], row["label"], row["verdict"]) == ("c10 -> c11", "weight memory per rank", "better")
    assert row["ratio"] == pytest.approx(1 / 3) and row["expected_change"] is None
    table = format_summary(summarize(_fake_parts(tensor_parallel=TENSOR_PARALLEL)))
    line = next(line for line in table.splitlines() if line.startswith("c10 -> c11"))
    # the design states no figure: its expectation is text, beside the measured -67%
    assert "tensor_parallel" in line and "-67%" in line and "1/N of the weights per rank" in line
    assert "c11: on one machine tensor parallelism buys memory, not speed" in table
    # cycle 11 failed: the part ran, so the row stays, unmeasured
    failed = summarize(_fake_parts(tensor_parallel=TENSOR_PARALLEL[:1]))[-1]
    assert failed["cycle"] == 11 and failed["verdict"] == "not measured"


def test_without_the_tensor_parallel_part_there_is_no_cycle_11_row():
    rows = summarize(_fake_parts())    # cycle 11 not selected (or not built yet): its part did not run
    assert [r["cycle"] for r in rows] == [2, 3, 4, 5, 6, 7, 8]
    assert "c10 -> c11" not in format_summary(rows)
    # a course step keeps its row, unmeasured, when its part did not run
    parts = _fake_parts()
    del parts["online"]
    assert {r["cycle"]: r for r in summarize(parts)}[4]["verdict"] == "not measured"


def test_a_cycle_that_regresses_on_its_home_metric_is_flagged():
    parts = _fake_parts(shared_prefix=[_row("cycle4_batching", "shared_prefix", ttft_mean_s=1.0),
                                       _row("cycle5_prefix", "shared_prefix", ttft_mean_s=1.2)])
    rows = {r["cycle"]: r for r in summarize(parts)}
    assert rows[5]["verdict"] == "REGRESSED" and rows[5]["change"] == pytest.approx(0.2)
    assert format_summary(list(rows.values())).splitlines()[-1] == "no gain on the home metric: c4 -> c5 (REGRESSED)"
    parts["shared_prefix"][1]["ttft_mean_s"] = 1.0       # exactly equal: no gain, not a regression
    assert {r["cycle"]: r for r in summarize(parts)}[5]["verdict"] == "NO GAIN"


def test_graphs_that_replay_are_judged_and_a_missing_part_is_not_measured():
    parts = _fake_parts()
    parts["throughput"][-1]["stats"]["cuda_graphs"] = True
    del parts["long_context"]
    rows = {r["cycle"]: r for r in summarize(parts)}
    assert rows[8]["verdict"] == "better" and rows[6]["verdict"] == "not measured" and rows[6]["ratio"] is None


def test_without_a_reduced_part_cycle_1_is_read_from_the_throughput_part():
    parts = _fake_parts()
    del parts["kv_cache"]
    parts["throughput"].insert(0, _row("cycle1_naive", latency_mean_s=18.0))
    assert summarize(parts)[0]["part"] == "throughput" and summarize(parts)[0]["ratio"] == pytest.approx(0.5)


def test_the_suite_puts_each_step_where_its_lesson_lives():
    cpu = {p.name: p for p in suite("cpu")}
    assert list(cpu) == ["throughput", "kv_cache", "online", "shared_prefix", "long_context", "speculative",
                         "tensor_parallel"]
    # HF's stronger baseline (its own continuous batching) in the suite; --workload throughput runs both
    assert part_engines(cpu["throughput"], CYCLES, hf_allowed=True) == CYCLES[1:] + ["hf_generate_batch"]
    assert cpu["throughput"].num_requests == CPU_THROUGHPUT_REQUESTS
    assert part_engines(cpu["kv_cache"], CYCLES, True) == CYCLES[:2] and cpu["kv_cache"].num_requests == CPU_NAIVE_REQUESTS
    assert part_engines(cpu["online"], CYCLES, True) == CYCLES[2:4] and cpu["online"].request_rates[0] > 0
    assert part_engines(cpu["shared_prefix"], CYCLES, True) == CYCLES[3:5]
    assert part_engines(cpu["long_context"], CYCLES, False) == CYCLES[4:6] and cpu["long_context"].prompt_len >= 1024
    assert "reduced" in cpu["throughput"].note
    assert part_engines(cpu["tensor_parallel"], CYCLES, True) == CYCLES[9:11]
    # speculative decoding: the copy workload, one request at a time, cycle 9 the row without drafts
    assert part_engines(cpu["speculative"], CYCLES, True) == CYCLES[8:10] and cpu["speculative"].workload == "copy"
    assert "max_num_seqs=1" in cpu["speculative"].options
    assert parse_options(list(cpu["speculative"].options))["speculative_config"]["method"] == "ngram"
    cuda = {p.name: p for p in suite("cuda", num_gpus=1)}
    assert "kv_cache" not in cuda and part_engines(cuda["throughput"], CYCLES, False) == CYCLES
    every_home = {name for step in STEPS for name in step.parts}
    assert every_home <= set(cpu) | {"throughput"}


def test_the_tensor_parallel_part_splits_the_model_over_the_ranks_the_device_has():
    cpu = next(p for p in suite("cpu") if p.name == "tensor_parallel")
    # SmolLM2-135M's 9 heads and 3 KV heads split over 3 ranks; a few short requests: start-up is the cost
    assert cpu.options == (f"tensor_parallel_size={CPU_TP_SIZE}",) and CPU_TP_SIZE == 3
    assert cpu.num_requests <= 4 and cpu.output_len[1] <= 16 and cpu.cycles == (10, 11)
    # NCCL runs one rank per GPU: with one GPU the part is left out, not run at tp=1 (cycle 10 again)
    assert "tensor_parallel" not in {p.name for p in suite("cuda", num_gpus=1)}
    for gpus in (2, 8):
        cuda = next(p for p in suite("cuda", num_gpus=gpus) if p.name == "tensor_parallel")
        assert cuda.options == ("tensor_parallel_size=2",)
    assert "tensor_parallel" not in {p.name for p in suite("mps")}
    quick = next(p for p in suite("cpu", quick=True) if p.name == "tensor_parallel")
    assert quick.num_requests is None and quick.options == cpu.options


def test_the_part_option_reaches_cycle_11_and_cycle_10_runs_as_tp_1():
    args = SimpleNamespace(weights="auto", quick=False, option=[], burstiness=1.0)
    part = next(p for p in suite("cpu") if p.name == "tensor_parallel")
    for engine in ("cycle10_speculative", "cycle11_tp"):
        cmd = runner.bench_command(engine, part, args, "cpu", "model", None, compare.ROOT / "x.json", None)
        assert cmd[cmd.index("--option") + 1] == f"tensor_parallel_size={CPU_TP_SIZE}"
        assert cmd[cmd.index("--num-requests") + 1] == str(part.num_requests)
    # bench gives each engine only the options it takes: cycle 10 records the option as ignored
    options = parse_options(list(part.options))
    assert _accepted_options("cycle11_tp", options) == ({"tensor_parallel_size": CPU_TP_SIZE}, [])
    assert _accepted_options("cycle10_speculative", options) == ({}, ["tensor_parallel_size"])


def test_the_tensor_parallel_part_runs_only_with_cycles_10_and_11(capsys):
    assert "tensor_parallel" in [p.name for p in compare.suite_parts("cpu", False, CYCLES[9:11])]
    assert [p.name for p in compare.suite_parts("cpu", False, ["cycle11_tp"])] == ["throughput"]
    assert "skipping the tensor_parallel part: it compares cycles 10 and 11" in capsys.readouterr().out
    assert "tensor_parallel" not in [p.name for p in compare.suite_parts("cpu", False, CYCLES[:8])]


def _fake_engine(cmd):
    """A bench result for the command's engine and workload, the home metrics showing each gain;
    from cycle 10 on, the weights are split over the tensor_parallel_size the engine takes."""
    engine, workload = cmd[cmd.index("--engine") + 1], cmd[cmd.index("--workload") + 1]
    n = cycle_number(engine) or 0
    options = parse_options([cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--option"])
    tp = _accepted_options(engine, options)[0].get("tensor_parallel_size", 1) if n else 1
    result = {"engine": engine, "model": "tiny", "weights": "real", "device": "cpu", "dtype": "float32",
              "workload": workload, "workload_size": "cpu", "num_requests": 1, "machine": {"name": "test cpu", "cpu_count": 2},
              "token_ids": [[1, 2]], "latency_mean_s": 10.0 / (n + 1), "latency_p90_s": 1.0, "throughput_tok_s": 10.0,
              "ttft_mean_s": 1.0 / (n + 1), "peak_memory_bytes": 2**20, "peak_memory_scope": "generation",
              "kv_cache_peak_bytes": 2**20 / (n + 1), "attention_backend": "explicit",
              "weight_bytes": 2**20 / (n + 1) if n < 10 else 2**20 / 11 / tp,
              "int8_path": None, "ignored_options": [], "stats": {"step_times": [[1, 1.0], [2, 0.1]]},
              "ttft_s": [0.1], "latency_s": [0.1 + 1.0 / (n + 1)]}
    if workload == "online":
        result |= {"goodput": 0.1 * (n + 1), "ttft_p99_s": 1.0 / (n + 1), "request_rate": 2.0, "burstiness": 1.0, "slo_ttft_s": 2.0,
                   "slo_tpot_s": 0.25, "arrival_s": [0.0], "request_throughput": 1.0}
    return result, None


def test_the_suite_prints_the_summary_first_then_one_table_per_workload(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare, "resolve_once",
                        lambda model, weights: SimpleNamespace(name="tiny", weights="real", origin="local", fallback_reason=None))
    monkeypatch.setattr(runner, "run_one", lambda cmd, out_path, timeout: _fake_engine(cmd))
    status = compare.main(["--device", "cpu", "--no-hf", "--plot", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == compare.EXIT_OK
    order = [out.index(s) for s in ("What each cycle adds", "== throughput", "== kv_cache", "== online",
                                    "== shared_prefix", "== long_context", "== speculative", "== tensor_parallel")]
    assert order == sorted(order)
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["verdict"] for r in data["summary"]][:6] == ["better"] * 6 and data["summary"][6]["verdict"] == "GPU only"
    # cycle 11 ran at tp=3 from the part's option (the fake splits its weights over what it takes)
    spec = data["summary"][7]
    assert (spec["step"], spec["part"], spec["verdict"]) == ("c9 -> c10", "speculative", "better")
    tp = data["summary"][8]
    assert (tp["step"], tp["part"], tp["verdict"]) == ("c10 -> c11", "tensor_parallel", "better")
    assert tp["ratio"] == pytest.approx(1 / CPU_TP_SIZE)
    assert set(data["parts"]) == {"throughput", "kv_cache", "online", "shared_prefix", "long_context",
                                  "speculative", "tensor_parallel"}
    assert json.loads((tmp_path / "online" / "results.json").read_text())["results"][0]["engine"] == "cycle3_paged"
    assert (tmp_path / "summary.png").exists() and (tmp_path / "online" / "timeline.png").exists()
    assert not (tmp_path / "throughput" / "timeline.png").exists()   # there cycles 3 and 4 do not differ


def test_suite_refuses_a_size_override():
    with pytest.raises(SystemExit, match="go with --workload NAME"):
        compare.main(["--device", "cpu", "--num-requests", "3"])


def test_speed_charts_say_why_a_cycle_costs_speed_where_its_lesson_does_not_pay():
    from common.benchmark.plots import _speed_costs

    note = _speed_costs([{"engine": e} for e in ("cycle2_kvcache", "cycle3_paged", "cycle5_prefix", "cycle7_int8",
                                                  "hf_generate")])
    assert note.splitlines() == [f"c3: {STEPS[1].cost}"]   # c7 without c6 has no step to explain
    assert "block tables" in note
    assert _speed_costs([{"engine": "cycle1_naive"}, {"engine": "cycle2_kvcache"}]) is None


def test_a_home_part_runs_only_with_both_cycles_of_its_step(capsys):
    chosen = ["cycle4_batching", "cycle5_prefix"]
    assert [p.name for p in compare.suite_parts("cpu", False, chosen)] == ["throughput", "shared_prefix"]
    assert "skipping the online part: it compares cycles 3 and 4" in capsys.readouterr().out
