"""compare.py's vLLM row, without vLLM: tests/fake_vllm is a `vllm` package whose tokens come from
our cycle 2 (so they are known), put on PYTHONPATH only where a test wants vLLM importable."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.benchmark import runner, vllm_baseline
from common.benchmark.report import format_table, mark_same_tokens
from common.benchmark.suite import HF, Part, part_engines, suite

ROOT = Path(__file__).resolve().parent.parent
FAKE_VLLM = Path(__file__).resolve().parent / "fake_vllm"


def _result(engine, token_ids, dtype="float32"):
    return {"engine": engine, "dtype": dtype, "token_ids": token_ids, "int8_path": None, "weights": "real",
            "latency_mean_s": 1.0, "throughput_tok_s": 10.0, "ttft_mean_s": 0.1, "peak_memory_bytes": 2**20,
            "peak_memory_scope": "generation", "kv_cache_peak_bytes": None, "weight_bytes": None}


# -- the "= vLLM" verdict ----------------------------------------------------------------------------


def test_same_tokens_as_vllm_is_exact_for_exact_cycles_in_fp32():
    vllm = _result("vllm", [[1, 2, 3], [4, 5, 6]])
    results = [_result("cycle1_naive", [[1, 2, 3], [4, 5, 6]]), _result("cycle4_batching", [[1, 2, 3], [4, 9, 6]]),
               _result("hf_generate", [[1, 2, 3], [4, 5, 6]]), vllm]
    mark_same_tokens(results)
    cells = [r["same_tokens_vllm"]["cell"] for r in results]
    assert cells == ["yes", "no: 50% (first diff @ 1)", "100%", "vLLM"]
    assert results[0]["same_tokens_vllm"]["exact_required"] and not results[2]["same_tokens_vllm"]["exact_required"]
    table = format_table(results)
    assert "= vLLM" in table.splitlines()[0] and "no: 50% (first diff @ 1)" in table
    assert "vLLM's peak memory adds up its processes' peaks" in table


def test_in_bf16_the_vllm_column_gives_the_share_and_the_first_difference():
    results = [_result("cycle6_flash", [[1, 2, 3], [4, 5, 6], [7, 8, 9]], "bfloat16"),
               _result("vllm", [[1, 2, 3], [4, 5, 0], [7, 0, 0]], "bfloat16")]
    mark_same_tokens(results)
    assert results[0]["same_tokens_vllm"]["cell"] == "33% (first diff @ 2)"   # positions 2 and 1: mean 1.5 -> 2
    assert results[0]["same_tokens_vllm"]["share"] == pytest.approx(1 / 3)


def test_without_a_vllm_row_the_table_has_no_vllm_column():
    results = [_result("cycle1_naive", [[1, 2]]), _result("cycle2_kvcache", [[1, 2]])]
    mark_same_tokens(results)
    assert all("same_tokens_vllm" not in r for r in results) and "= vLLM" not in format_table(results)


def test_an_online_vllm_row_without_token_ids_has_no_token_verdict():
    results = [_result("cycle4_batching", [[1, 2]]), _result("vllm", None)]
    mark_same_tokens(results)
    assert results[1]["same_tokens"]["cell"] == "-" and results[0]["same_tokens_vllm"]["cell"] == "-"


# -- what reaches vLLM -------------------------------------------------------------------------------


def test_vllm_settings_like_for_like_and_overridable():
    settings, ignored = vllm_baseline.vllm_settings({}, max_num_seqs=64)
    assert settings == {"enforce_eager": True, "max_num_seqs": 64} and ignored == []
    settings, ignored = vllm_baseline.vllm_settings({"enforce_eager": False, "max_num_seqs": 3, "block_size": 16}, 64)
    assert settings == {"enforce_eager": False, "max_num_seqs": 3} and ignored == ["block_size"]


def test_vllm_env_binds_threads_to_our_cpus_and_keeps_what_is_set():
    env = vllm_baseline.vllm_env({"VLLM_CPU_KVCACHE_SPACE": "2"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["HF_HUB_OFFLINE"] == "1"
    cpus = sorted(os.sched_getaffinity(0))
    assert env["VLLM_CPU_OMP_THREADS_BIND"] in (f"{cpus[0]}-{cpus[-1]}", ",".join(map(str, cpus)))


def test_server_command_carries_the_same_engine_arguments():
    cmd = vllm_baseline.server_command("py", "/m", "float32", {"enforce_eager": True, "max_num_seqs": 8}, 1234)
    assert cmd[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"] and "--enforce-eager" in cmd
    assert cmd[cmd.index("--max-num-seqs") + 1] == "8" and cmd[cmd.index("--dtype") + 1] == "float32"
    cmd = vllm_baseline.server_command("py", "/m", "float32", {"enforce_eager": False, "max_num_seqs": 8}, 1234)
    assert "--enforce-eager" not in cmd


def test_no_vllm_row_without_vllm_and_a_bad_interpreter_is_refused():
    assert not vllm_baseline.vllm_importable()    # the test environment has no vllm
    python, note = vllm_baseline.choose_vllm_python(None, "real")
    assert python is None and "cannot import vllm" in note
    with pytest.raises(SystemExit, match="cannot import vllm"):
        vllm_baseline.choose_vllm_python(sys.executable, "real")


def test_vllm_joins_the_throughput_part_only_when_there_is_one():
    throughput = suite("cpu")[0]
    cycles = ["cycle2_kvcache", "cycle4_batching"]
    assert part_engines(throughput, cycles, hf_allowed=False) == cycles
    assert part_engines(throughput, cycles, hf_allowed=False, vllm_allowed=True) == cycles + ["vllm"]
    online = next(p for p in suite("cpu") if p.name == "online")
    assert "vllm" not in part_engines(online, cycles, hf_allowed=False, vllm_allowed=True)


def test_the_vllm_bench_runs_under_its_interpreter_on_the_model_directory():
    args = SimpleNamespace(weights="auto", quick=True, option=[], vllm_python="/venv/bin/python",
                           vllm_model_dir="/models/smol", burstiness=1.0, slo_ttft=None, slo_tpot=None)
    part = Part("throughput", "throughput", None, hf=HF, vllm=True)
    cmd = runner.bench_command("vllm", part, args, "cpu", "HuggingFaceTB/SmolLM2-135M-Instruct", "float32",
                               Path("/tmp/v.json"), None)
    assert cmd[0] == "/venv/bin/python" and cmd[cmd.index("--model") + 1] == "/models/smol"
    assert cmd[cmd.index("--dtype") + 1] == "float32"
    env = runner._vllm_env("vllm")["env"]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT) and runner._vllm_env("cycle1_naive") == {}


def test_tree_peak_counts_this_process():
    assert vllm_baseline.tree_peak_bytes(vllm_baseline._tree_pids()) > 0


# -- compare.py end to end with the fake vllm --------------------------------------------------------


def _compare(tmp_path, path, *extra, env_extra=None):
    calls = tmp_path / "calls.jsonl"
    env = os.environ | {"PYTHONPATH": str(FAKE_VLLM), "FAKE_VLLM_CALLS": str(calls), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "compare.py", "--quick", "--cycles", "1", "--no-hf", "--device", "cpu",
                           "--model", path, "--out", str(tmp_path / "out"), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=env | (env_extra or {}))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    return data, proc.stdout, [json.loads(line) for line in calls.read_text().splitlines()]


@pytest.mark.slow
def test_compare_adds_the_vllm_row_with_its_columns(tmp_path, tiny_checkpoints):
    path, _ = tiny_checkpoints["llama"]
    data, stdout, calls = _compare(tmp_path, path, "--workload", "throughput", "--plot")
    cycle, vllm = data["results"]
    assert vllm["engine"] == "vllm" and vllm["token_ids"] == cycle["token_ids"]
    assert vllm["throughput_tok_s"] > 0 and vllm["ttft_mean_s"] > 0 and vllm["latency_mean_s"] >= vllm["ttft_mean_s"]
    assert vllm["peak_memory_bytes"] > 0 and cycle["same_tokens_vllm"]["cell"] == "yes"
    header = next(line for line in stdout.splitlines() if line.startswith("engine"))
    assert header.split()[-2:] == ["=", "vLLM"]
    assert calls == [{"model": path, "dtype": "float32", "enforce_eager": True, "max_num_seqs": 64,
                      "env": {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": vllm_baseline.cpu_list(),
                              "HF_HUB_OFFLINE": "1"}}]
    assert (tmp_path / "out" / "throughput.png").exists()


@pytest.mark.slow
def test_compare_passes_options_to_vllm_and_reports_different_tokens(tmp_path, tiny_checkpoints):
    path, _ = tiny_checkpoints["llama"]
    data, stdout, calls = _compare(tmp_path, path, "--workload", "throughput", "--option", "enforce_eager=False",
                                   "--option", "max_num_seqs=3",
                                   "--vllm-python", sys.executable, env_extra={"FAKE_VLLM_SHIFT": "1"})
    assert calls[0]["enforce_eager"] is False and calls[0]["max_num_seqs"] == 3
    cycle = data["results"][0]
    assert cycle["same_tokens_vllm"]["cell"] == "no: 0% (first diff @ 1)"
    assert "no: 0% (first diff @ 1)" in stdout


@pytest.mark.slow
def test_compare_online_starts_vllms_server_drives_it_and_stops_it(tmp_path, tiny_checkpoints):
    path, _ = tiny_checkpoints["llama"]
    data, stdout, calls = _compare(tmp_path, path, "--workload", "online", "--cycles", "4")   # the last --cycles wins
    server = calls[0]
    assert server["server"]["enforce_eager"] and server["server"]["max_num_seqs"] == "64"
    assert server["server"]["model"] == path and server["server"]["dtype"] == "float32"
    with pytest.raises(ProcessLookupError):
        os.kill(server["pid"], 0)   # stopped at the end
    cycle, vllm = data["results"]
    assert vllm["engine"] == "vllm" and vllm["completed"] == vllm["num_requests"] and vllm["failed"] == 0
    assert vllm["output_tokens"] == cycle["output_tokens"] and vllm["ttft_p99_s"] > 0
    assert any(line.startswith("vllm ") for line in stdout.splitlines())
