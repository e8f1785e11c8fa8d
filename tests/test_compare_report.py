"""compare.py's verdicts and bookkeeping: same tokens, engines not measured, exit status, --cycles
ranges, the per-engine time limit."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import compare
from common.benchmark import report, runner
from common.benchmark.bench import EXIT_OUT_OF_MEMORY

ROOT = Path(__file__).resolve().parent.parent


def _result(engine, token_ids, dtype="float32", int8_path=None):
    return {"engine": engine, "token_ids": token_ids, "dtype": dtype, "int8_path": int8_path}


# ------------------------------------------------------------------------------------------------
# same tokens
# ------------------------------------------------------------------------------------------------

def test_token_agreement_share_and_first_difference():
    reference = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9], [1, 1]]
    ours = [[1, 2, 3, 4], [5, 6, 0, 8], [0, 9, 9, 9], [1, 1, 1]]   # equal, diff @ 2, diff @ 0, longer
    share, first = report.token_agreement(ours, reference)
    assert share == 0.25
    assert first == pytest.approx((2 + 0 + 2) / 3)   # the longer one differs where the shorter ends
    assert report.token_agreement(reference, reference) == (1.0, None)


def test_fp32_exact_cycles_must_match_token_for_token():
    c1 = _result("cycle1_naive", [[1, 2], [3, 4]])
    assert report.same_tokens(c1, c1)["cell"] == "yes"
    assert report.same_tokens(_result("cycle4_batching", [[1, 2], [3, 4]]), c1)["cell"] == "yes"
    verdict = report.same_tokens(_result("cycle6_flash", [[1, 2], [3, 5]]), c1)
    assert verdict["cell"] == "no" and verdict["exact_required"] and verdict["share"] == 0.5


def test_bf16_reports_the_share_and_the_first_difference_instead():
    c1 = _result("cycle1_naive", [[1, 2, 3], [3, 4, 5]], dtype="bfloat16")
    c4 = _result("cycle4_batching", [[1, 2, 3], [3, 4, 0]], dtype="bfloat16")
    verdict = report.same_tokens(c4, c1)
    assert verdict["cell"] == "50% (first diff @ 2)" and not verdict["exact_required"]
    assert report.same_tokens(c1, c1)["cell"] == "reference"
    assert report.same_tokens(_result("cycle5_prefix", [[1, 2, 3], [3, 4, 5]], "bfloat16"), c1)["cell"] == "100%"


def test_int8_and_hf_get_the_share_even_in_fp32():
    c1 = _result("cycle1_naive", [[1, 2], [3, 4]])
    assert report.same_tokens(_result("cycle7_int8", [[1, 2], [3, 0]], int8_path="cast"), c1)["cell"] == \
        "50% (first diff @ 1)"
    assert report.same_tokens(_result("hf_generate", [[1, 2], [3, 4]]), c1)["cell"] == "100%"
    assert report.same_tokens(_result("cycle4_batching", [[1, 2]]), None)["cell"] == "-"


def test_reference_is_cycle1_else_the_lowest_exact_cycle():
    results = [_result("cycle7_int8", [], int8_path="cast"), _result("cycle5_prefix", []),
               _result("cycle4_batching", []), _result("hf_generate", [])]
    assert report.reference_result(results)["engine"] == "cycle4_batching"
    assert report.reference_result([_result("cycle1_naive", [])] + results)["engine"] == "cycle1_naive"
    assert report.reference_result([_result("hf_generate", [])]) is None


def test_fp32_mismatch_warns_and_bf16_difference_does_not(tmp_path, monkeypatch, capsys):
    for dtype, warned in (("float32", True), ("bfloat16", False)):
        tokens = {"cycle1_naive": [[1, 2], [5, 6]], "cycle2_kvcache": [[1, 3], [5, 6]]}
        _fake_compare(monkeypatch, lambda engine: (_full_result(engine, tokens[engine], dtype), None))
        compare.main(["--workload", "throughput", "--cycles", "1,2", "--no-hf", "--device", "cpu", "--out", str(tmp_path / dtype)])
        out = capsys.readouterr().out
        assert ("WARNING: in fp32" in out) == warned
        assert ("50% (first diff @ 1)" in out) == (not warned)


# ------------------------------------------------------------------------------------------------
# engines not measured, exit status
# ------------------------------------------------------------------------------------------------

def _full_result(engine, token_ids, dtype="float32"):
    return {"engine": engine, "model": "tiny", "weights": "real", "device": "cpu", "dtype": dtype,
            "workload": "throughput", "workload_size": "cpu", "num_requests": len(token_ids),
            "machine": {"name": "test cpu", "cpu_count": 2}, "token_ids": token_ids,
            "latency_mean_s": 1.0, "latency_p90_s": 1.0, "throughput_tok_s": 10.0, "ttft_mean_s": 0.1,
            "peak_memory_bytes": 900 * 2**20, "peak_memory_scope": "generation", "kv_cache_peak_bytes": 2**20,
            "weight_bytes": 500 * 2**20, "attention_backend": "explicit", "int8_path": None,
            "ignored_options": [], "stats": {}}


def _fake_compare(monkeypatch, outcome):
    """compare.main with the model resolved for real but every engine's subprocess replaced."""
    from types import SimpleNamespace

    monkeypatch.setattr(compare, "resolve_once",
                        lambda model, weights: SimpleNamespace(name="tiny", weights="real", origin="local", fallback_reason=None))
    monkeypatch.setattr(runner, "run_one", lambda cmd, out_path, timeout: outcome(cmd[cmd.index("--engine") + 1]))


def test_a_timed_out_engine_is_reported_and_the_others_kept(tmp_path, monkeypatch, capsys):
    def outcome(engine):
        if engine == "cycle1_naive":
            return None, {"kind": "timeout", "seconds": 25.0, "error": "timed out after 25 s"}
        return _full_result(engine, [[1, 2]]), None

    _fake_compare(monkeypatch, outcome)
    status = compare.main(["--workload", "throughput", "--cycles", "1,2", "--no-hf", "--device", "cpu", "--plot", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    assert status == report.EXIT_INCOMPLETE == data["exit_status"]
    assert [r["engine"] for r in data["results"]] == ["cycle2_kvcache"]
    assert data["failures"] == [{"engine": "cycle1_naive", "kind": "timeout", "seconds": 25.0,
                                 "error": "timed out after 25 s"}]
    assert "cycle1_naive  timed out after 25 s" in out.split("not measured:")[1]
    assert "same tokens as c2" in out    # cycle 2 is the reference now
    assert (tmp_path / "throughput.png").exists()


def test_out_of_memory_shows_the_estimate_and_a_crash_fails_the_run(tmp_path, monkeypatch, capsys):
    def outcome(engine):
        if engine == "cycle1_naive":
            return None, {"kind": "out_of_memory", "seconds": 2.0, "error": "refused",
                          "estimate_bytes": 116 * 2**30, "limit_bytes": 10 * 2**30}
        if engine == "cycle2_kvcache":
            return None, {"kind": "error", "seconds": 2.0,
                          "error": "exit code 1\nTraceback ...\ntorch.OutOfMemoryError: CUDA out of memory."}
        return _full_result(engine, [[1, 2]]), None

    _fake_compare(monkeypatch, outcome)
    status = compare.main(["--workload", "throughput", "--cycles", "1-3", "--no-hf", "--device", "cpu", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == report.EXIT_FAILED
    assert "cycle1_naive    out of memory (est. 116.0 GiB)" in out
    assert "cycle2_kvcache  failed (exit code 1): torch.OutOfMemoryError: CUDA out of memory." in out


def test_exit_status():
    assert report.exit_status([]) == report.EXIT_OK
    assert report.exit_status([{"kind": "skipped"}]) == report.EXIT_OK
    assert report.exit_status([{"kind": "timeout"}, {"kind": "out_of_memory"}]) == report.EXIT_INCOMPLETE
    assert report.exit_status([{"kind": "timeout"}, {"kind": "error"}]) == report.EXIT_FAILED


def test_nano_vllm_bench_skips_cycle1_unless_named(tmp_path, monkeypatch, capsys):
    _fake_compare(monkeypatch, lambda engine: (_full_result(engine, [[1]]), None))
    status = compare.main(["--workload", "nano_vllm_bench", "--no-hf", "--device", "cpu", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert status == report.EXIT_OK
    assert data["failures"][0]["engine"] == "cycle1_naive" and data["failures"][0]["kind"] == "skipped"
    assert "cycle1_naive" not in [r["engine"] for r in data["results"]]
    assert "skipping cycle1_naive" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="cycle1_naive cannot run the nano_vllm_bench workload"):
        compare.main(["--workload", "nano_vllm_bench", "--cycles", "1,4", "--device", "cpu", "--out", str(tmp_path)])


# ------------------------------------------------------------------------------------------------
# --cycles ranges
# ------------------------------------------------------------------------------------------------

def test_select_cycles_ranges():
    available = ["cycle1_naive", "cycle2_kvcache", "cycle4_batching", "cycle7_int8", "cycle8_graphs"]
    assert compare.select_cycles("1-7", available) == available[:4]      # the bonus cycle 8 stays out
    assert compare.select_cycles("4-8,1", available) == ["cycle1_naive", "cycle4_batching", "cycle7_int8",
                                                          "cycle8_graphs"]
    with pytest.raises(SystemExit, match="no cycle '9-12'"):
        compare.select_cycles("9-12", available)
    with pytest.raises(SystemExit, match="empty range"):
        compare.select_cycles("5-4", available)


# ------------------------------------------------------------------------------------------------
# run_one: the time limit and the memory refusal, on real subprocesses
# ------------------------------------------------------------------------------------------------

def test_timeout_kills_the_engine_and_what_it_started(tmp_path):
    """The engine and its child would each write a file if they outlived their sleep: after the
    limit both must be gone (or zombies), and neither file may ever appear. No clock decides."""
    pid_file, survived = tmp_path / "child.pid", tmp_path / "survived"
    script = textwrap.dedent(f"""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60); open({str(survived)!r} + '.child', 'w')"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        child.wait()
        open({str(survived)!r}, "w")
    """)
    result, failure = runner.run_one([sys.executable, "-c", script], tmp_path / "out.json", timeout=2)
    assert result is None and failure["kind"] == "timeout" and failure["error"] == "timed out after 2 s"
    assert not survived.exists()   # run_one returned because it killed the engine, not because it ended
    child = int(pid_file.read_text())
    while not survived.with_suffix(".child").exists():   # SIGKILL is delivered at once; reaping may lag
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if _is_zombie(child):
            break
        time.sleep(0.1)
    assert not survived.with_suffix(".child").exists(), f"the engine's child process {child} survived the timeout"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return False


def test_a_memory_refusal_is_told_apart_from_a_crash(tmp_path):
    out = tmp_path / "out.json"
    refusal = {"engine": "cycle1_naive", "refused": "out_of_memory", "message": "est. 9 GiB > 1 GiB",
               "estimate_bytes": 9 * 2**30, "limit_bytes": 2**30}
    script = f"import json, sys; open({str(out)!r}, 'w').write({json.dumps(refusal)!r}); sys.exit({EXIT_OUT_OF_MEMORY})"
    result, failure = runner.run_one([sys.executable, "-c", script], out, timeout=60)
    assert result is None and failure["kind"] == "out_of_memory" and failure["estimate_bytes"] == 9 * 2**30
    result, failure = runner.run_one([sys.executable, "-c", "raise SystemExit('boom')"], out, timeout=60)
    assert failure["kind"] == "error" and "boom" in failure["error"]


# ------------------------------------------------------------------------------------------------
# a timeout end to end on the CPU
# ------------------------------------------------------------------------------------------------

def test_cycle1_times_out_and_cycle2_is_kept(tmp_path, monkeypatch, tiny_checkpoints):
    """compare.py --cycles 1,2 end to end on real subprocesses: cycle 2 runs for real on a tiny
    checkpoint; cycle 1 is a fake engine that never finishes (it sleeps an hour), so it times out on
    any machine, however fast. The limit only has to exceed cycle 2's run (about 3 s on a 2-core
    EPYC: python, torch and a tiny model), so it bounds the test's length and decides nothing."""
    path, _ = tiny_checkpoints["llama"]
    real_command = runner.bench_command

    def command(engine, *args, **kwargs):
        if engine == "cycle1_naive":
            return [sys.executable, "-c", "import time; time.sleep(3600)"]
        return real_command(engine, *args, **kwargs)

    monkeypatch.setattr(runner, "bench_command", command)
    status = compare.main(["--workload", "throughput", "--cycles", "1,2", "--quick", "--timeout", "30", "--no-hf",
                           "--device", "cpu", "--model", path, "--plot", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert status == report.EXIT_INCOMPLETE == data["exit_status"]
    assert data["failures"] == [{"engine": "cycle1_naive", "kind": "timeout", "seconds": 30.0,
                                 "error": "timed out after 30 s"}]
    assert [r["engine"] for r in data["results"]] == ["cycle2_kvcache"]
    assert data["results"][0]["output_tokens"] > 0 and (tmp_path / "throughput.png").exists()


def test_results_name_each_engines_attention_and_int8_path(tiny_checkpoints):
    from common.benchmark.bench import run_engine

    path, _ = tiny_checkpoints["llama"]
    rows = {e: run_engine(e, "throughput", "cpu", path, quick=True)
            for e in ("cycle1_naive", "cycle6_flash", "cycle7_int8")}
    assert rows["cycle1_naive"]["attention_backend"] == "explicit" and rows["cycle1_naive"]["int8_path"] is None
    assert rows["cycle6_flash"]["attention_backend"] == rows["cycle6_flash"]["stats"]["attention_backend"]
    assert rows["cycle6_flash"]["int8_path"] is None
    assert rows["cycle7_int8"]["int8_path"] == rows["cycle7_int8"]["stats"]["int8_matmul"] is not None
    table = report.format_table(list(rows.values()))
    assert rows["cycle7_int8"]["int8_path"] in table.splitlines()[4]


def test_timeout_must_be_positive():
    with pytest.raises(SystemExit, match="--timeout must be a positive"):
        compare.main(["--timeout", "0", "--device", "cpu"])
