"""docs/CYCLE_GUIDE.md against the code and the stored runs: its figures exist, and the figures it
states that come from a stored file or from the code are what that file or that code says.

No model weights: the stored results are read from docs/results/, the code runs on tiny tensors, and
one test loads SmolLM2's tokenizer (not its weights) to replay the detokenizer example.
"""

import contextlib
import importlib
import importlib.util
import io
import json
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GUIDE = DOCS / "CYCLE_GUIDE.md"
RESULTS = DOCS / "results"
DIAGRAM_TYPES = ("flowchart", "sequenceDiagram", "gantt")


def chapters() -> dict[int, str]:
    """Chapter number -> its text, from '## N. Title' to the next '## ' heading."""
    text = GUIDE.read_text()
    parts = re.split(r"^## ", text, flags=re.M)
    found = {}
    for part in parts:
        m = re.match(r"(\d+)\. ", part)
        if m:
            found[int(m.group(1))] = part
    return found


def mermaid_blocks(text: str) -> list[str]:
    return re.findall(r"^```mermaid\n(.*?)^```", text, flags=re.M | re.S)


def embedded_images(text: str) -> list[str]:
    """The paths of the images a text embeds (`![alt](path)`), as written."""
    return re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)


def test_every_chapter_embeds_a_real_image():
    """Each chapter shows its mechanism as an image a plain viewer opens: a PNG or SVG under docs/
    that exists, embedded by the chapter itself (a Mermaid block does not count: it renders on
    GitHub only). Every embedded image exists."""
    found = chapters()
    assert sorted(found) == list(range(1, 14))
    for number, text in found.items():
        real = []
        for path in embedded_images(text):
            file = (DOCS / path).resolve()
            assert not path.startswith("http") and file.is_file(), f"chapter {number}: image {path} does not exist"
            if file.suffix in (".png", ".svg") and DOCS.resolve() in file.parents:
                real.append(path)
        assert real, f"chapter {number} embeds no PNG/SVG image under docs/"


def test_make_figures_draws_every_figure_the_guide_embeds_and_the_same_bytes_twice(tmp_path):
    """docs/figures/ holds exactly what scripts/make_figures.py draws, the guide embeds each, and
    two runs give the same bytes (no timestamps, a seeded generator)."""
    script = _load_script("make_figures")
    with contextlib.redirect_stdout(io.StringIO()):
        first = script.main(["--out", str(tmp_path / "a")])
        second = script.main(["--out", str(tmp_path / "b")])
    names = sorted(p.name for p in first)
    assert names == sorted(p.name for p in (DOCS / "figures").glob("*.png"))
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second))
    embedded = set(embedded_images(GUIDE.read_text()))
    assert all(f"figures/{name}" in embedded for name in names)


def test_left_padding_example_is_what_prepare_builds():
    """Chapter 1's worked example: cycle 1's ModelRunner._prepare on prompts of 2 and 4 tokens."""
    input_ids, positions, mask = _load_script("make_figures").padding_example()
    lines = [f"input_ids = {input_ids.tolist()}", f"positions = {positions.tolist()}",
             f"mask[0]   = {mask[0].int().tolist()}", f"mask[1]   = {mask[1].int().tolist()}"]
    text = chapters()[1]
    assert all(line in text for line in lines), lines
    assert mask[0, 3].tolist() == [False, False, True, True]      # token 12 sees 11 and itself, no padding


def test_query_and_token_index_example_is_what_layout_builds():
    """Chapter 4's example: cycle 4's _layout for a prefill of 3, 5 and 2 tokens."""
    from types import SimpleNamespace

    runner = importlib.import_module("cycle4_batching.model_runner").ModelRunner
    seqs = [SimpleNamespace(block_table=t) for t in ([0], [1, 2], [3])]
    positions = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 0, 1])
    meta = runner._layout(SimpleNamespace(device=torch.device("cpu"), block_size=4), seqs, [0, 3, 8, 10],
                          positions, torch.zeros(10, dtype=torch.long))
    text = chapters()[4]
    assert f"`query_index` is\n`{meta.query_index.tolist()}`" in text
    assert f"`token_index` is\n`{meta.token_index.tolist()}`" in text


def test_mermaid_blocks_keep_to_simple_syntax():
    """Every Mermaid block of the guide and ARCHITECTURE.md is a flowchart, sequence diagram or gantt chart, starts at the fence's
    indentation (a fence inside a list item may not render), has no ';' (a statement separator)
    and balanced quotes and brackets on every line."""
    text = GUIDE.read_text() + (DOCS / "ARCHITECTURE.md").read_text()
    assert "  ```mermaid" not in text
    blocks = mermaid_blocks(text)
    assert len(blocks) >= 11
    for block in blocks:
        assert block.split()[0] in DIAGRAM_TYPES, block[:40]
        for line in block.splitlines():
            assert ";" not in line, line
            assert line.count('"') % 2 == 0, line
            outside = re.sub(r'"[^"]*"', "", line)
            for a, b in ("[]", "{}", "()"):
                assert outside.count(a) == outside.count(b), line


def test_no_build_process_vocabulary():
    """Docs, scripts and common/ never speak of 'sessions' or 'leases', point at issue numbers or at
    files the repository does not have (DEVELOPERS.md), or name a virtualenv outside the repository
    (it comes from an option or an environment variable)."""
    files = [DOCS / "CYCLE_GUIDE.md", DOCS / "ARCHITECTURE.md", ROOT / "README.md",
             *ROOT.glob("scripts/*"), *ROOT.glob("common/**/*.py"), *RESULTS.glob("*/*.sh")]
    for path in files:
        if not path.is_file():
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            assert not re.search(r"\bsession", line, re.I), f"{path.name}:{i}: {line}"
            assert not re.search(r"\bleases?\b", line, re.I), f"{path.name}:{i}: {line}"
            assert not re.search(r"\bissues? \d", line, re.I), f"{path.name}:{i}: {line}"
            assert "DEVELOPERS.md" not in line and "/work/" not in line, f"{path.name}:{i}: {line}"


def test_the_design_expectation_is_defined_once_and_the_seed_is_gone():
    text = GUIDE.read_text()
    assert "seed expected" not in text and "the seed's" not in text
    assert text.count("**the design's expectation**") == 1


# --- chapter 7 -------------------------------------------------------------------------------

def test_int8pack_ratios_as_stored():
    """The guide's 26.5x and 10x are int8pack_mm's time over the cast path's in the stored run."""
    times = {}
    for line in (RESULTS / "cpu-int8-matmul.txt").read_text().splitlines():
        m = re.match(r"(\d+) x \d+ weight, \d+ rows, (\w+): best of \d+ ([\d.]+) ms", line)
        times[m.group(1), m.group(2)] = float(m.group(3))
    ratios = [times[n, "int8pack_mm"] / times[n, "cast"] for n in ("1536", "49152")]
    assert [round(r, 1) for r in ratios] == [26.5, 10.0]
    assert "26.5× and 10×" in GUIDE.read_text()


def test_chat_peak_memory_difference_as_stored():
    """Chapter 7's +419 MiB is the stored pair's peak difference, and the 108 MiB it is set against
    is the largest matrix of the real SmolLM2 config (the tied lm_head) as the cast path's fp32 copy."""
    from common.engine.model_source import resolve_model

    runs = json.loads((RESULTS / "cpu-chat" / "results.json").read_text())["results"]
    peak = {r["engine"]: r["peak_memory_bytes"] / 2**20 for r in runs}
    difference = round(peak["cycle7_int8"] - peak["cycle6_flash"])
    text = chapters()[7]
    assert f"({round(peak['cycle7_int8']):,} against {round(peak['cycle6_flash']):,} MiB, +{difference} MiB," in text
    try:
        config = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").config
    except ValueError as error:
        pytest.skip(f"SmolLM2 is not available offline here: {error}")
    shapes = {"lm_head": (config.vocab_size, config.hidden_size),
              "gate/up": (config.intermediate_size, config.hidden_size)}
    largest = max(shapes, key=lambda k: shapes[k][0] * shapes[k][1])
    copy_mib = round(shapes[largest][0] * shapes[largest][1] * 4 / 2**20)      # fp32
    assert largest == "lm_head" and config.tie_word_embeddings
    assert f"the {shapes[largest][0]:,} x {shapes[largest][1]} `lm_head` ({copy_mib} MiB), a quarter of that difference" in text
    assert 0.2 < copy_mib / difference < 0.3


# --- chapter 9 -------------------------------------------------------------------------------

def test_detokenizer_example_is_what_the_code_prints():
    """scripts/detokenizer_example.py, run now on SmolLM2's tokenizer, prints the stored example,
    and the guide quotes its table."""
    script = _load_script("detokenizer_example")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        script.main()
    stored = (RESULTS / "detokenizer-emoji.txt").read_text()
    assert out.getvalue() == stored
    table = stored.splitlines()[3:10]
    assert "\n".join(table) in GUIDE.read_text()


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sse_transcript_as_stored():
    """The stored stream: one event per token, the last one with finish_reason, a usage event
    counting them, then [DONE]; the guide shows it as stored."""
    lines = [l for l in (RESULTS / "sse-completions.txt").read_text().splitlines() if l.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(l[6:]) for l in lines[:-1]]
    tokens = [e for e in events if e["choices"]]
    assert [e["choices"][0]["finish_reason"] for e in tokens] == [None] * (len(tokens) - 1) + ["length"]
    assert events[-1]["usage"]["completion_tokens"] == len(tokens) == 4
    text = GUIDE.read_text()
    assert all(l.replace("\\n", "\\\\n") in text or l in text for l in lines)


def test_http_bench_result_names_no_machine_in_the_stored_run():
    """The guide labels the HTTP row with what its file stores: no machine, no engine."""
    run = json.loads((RESULTS / "cpu-online-http" / "results.json").read_text())["run"]
    assert "machine" not in run and "server" not in run
    assert "| http://127.0.0.1:8011/v1 | 1 |" in GUIDE.read_text()


# --- chapter 10 ------------------------------------------------------------------------------

def test_rmsnorm_kernels_in_eager_mode():
    """An eager RMSNorm in a bf16 model dispatches eight ops (each a kernel on a GPU): cast up,
    square, mean, add, rsqrt, multiply, cast back, weight; in fp32 the two casts are no-ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    rms_norm = importlib.import_module("cycle8_graphs.model").rms_norm

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    counts = {}
    for dtype in (torch.bfloat16, torch.float32):
        x, weight = torch.randn(2, 64, dtype=dtype), torch.ones(64, dtype=dtype)
        with Count() as count:
            rms_norm(x, weight, 1e-6)
        counts[dtype] = len(count.ops)
    assert counts == {torch.bfloat16: 8, torch.float32: 6}
    assert "each RMSNorm alone is eight" in GUIDE.read_text()


def test_padding_rows_as_stored():
    """The paired CPU runs of cycles 7 and 8: 16 requests prefilled together leave one by one; a
    decode step of n sequences runs bucket_for(n) rows. 630 real rows, 102 padding rows, at most 7
    (9 sequences in the bucket of 16)."""
    g = importlib.import_module("cycle8_graphs.cuda_graphs")
    runs = sorted((RESULTS / "cpu-c78-paired").glob("*.json"))
    assert len(runs) == 6
    for path in runs:
        run = json.loads(path.read_text())
        assert len(set(run["ttft_s"])) == 1 and run["stats"]["preemptions"] == 0   # one prefill of all
        lengths = [len(t) for t in run["token_ids"]]
        buckets = g.batch_buckets(run["stats"]["max_num_seqs"])
        running = [sum(1 for n in lengths if n - 1 >= step) for step in range(1, max(lengths))]
        padding = [g.bucket_for(buckets, n) - n for n in running]
        assert (len(running), sum(running), sum(padding), max(padding)) == (63, 630, 102, 7)
        assert running[padding.index(7)] == 9
    assert "630 real rows and 102 padding rows" in GUIDE.read_text()


def _profile(name: str) -> dict:
    ops = {}
    for line in (RESULTS / "cpu-bench-step" / f"{name}_profile.txt").read_text().splitlines():
        parts = line.split()
        if parts and parts[0].startswith("aten::"):
            ops[parts[0]] = float(parts[2].removesuffix("ms"))
        if line.startswith("Self CPU time total"):
            ops["total"] = float(line.split(":")[1].strip().removesuffix("ms"))
    return ops


def test_profile_gap_as_stored():
    """Of the host time cycle 8 saves under the profiler, aten::index is half and the sdpa kernel
    another 12%: 62% together, in ops both engines run."""
    c7, c8 = _profile("cycle7_int8"), _profile("cycle8_graphs")
    gap = c7["total"] - c8["total"]
    share = {op: (c7[op] - c8[op]) / gap for op in ("aten::index", "aten::_scaled_dot_product_flash_attention_for_cpu")}
    assert round(gap) == 144 and round(c8["total"]) == 485 and round(c7["total"]) == 629
    assert [round(100 * s) for s in share.values()] == [50, 12]
    assert round(100 * sum(share.values())) == 62
    assert "62% of that\ndifference" in GUIDE.read_text()


@pytest.mark.parametrize("figure", ["97.2", "88.6"])
def test_no_unstored_decode_times(figure):
    """The 2-sequence decode times the guide quotes are the stored ones, and only those."""
    stored = "".join(p.read_text() for p in RESULTS.glob("cpu-decode-2seqs-*.txt"))
    assert figure not in stored and figure not in GUIDE.read_text()
    assert "93.9" in stored and "95.7" in stored


def test_vllm_table_as_stored():
    """Chapter 8's "every cycle beside vLLM" rows are the stored runs' tokens/s, rounded as printed."""
    text = chapters()[8]
    for run, label in (("fp32-4", "4 requests, fp32"), ("fp32-16", "16 requests, fp32"),
                       ("fp32-64", "64 requests, fp32"), ("bf16-4", "4 requests, bf16"),
                       ("bf16-16", "16 requests, bf16"), ("bf16-64", "64 requests, bf16")):
        rows = {r["engine"]: r for r in json.loads((RESULTS / "cpu-vs-vllm-offline" / run / "results.json").read_text())["results"]}
        line = next(line for line in text.splitlines() if line.startswith(f"| throughput, {label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        order = ["cycle4_batching", "cycle6_flash", "cycle8_graphs", "hf_generate", "hf_generate_batch", "vllm"]
        for engine, cell in zip(order, cells):
            want = f"{rows[engine]['throughput_tok_s']:.1f}" if engine in rows else ""
            assert cell == want, (run, engine, cell, want)
        best = max(rows[e]["throughput_tok_s"] for e in ("cycle4_batching", "cycle6_flash") if e in rows)
        assert cells[-1] == f"{best / rows['vllm']['throughput_tok_s']:.2f}×", (run, cells[-1])


def test_cycle_pairs_as_stored():
    """Chapter 8's alternating pairs are the stored runs' tokens/s and their ratios, as printed."""
    text = chapters()[8]
    for run in (1, 2, 3):
        tok = {e: json.loads((RESULTS / "cpu-cycle-pairs" / f"{e}-run{run}.json").read_text())["throughput_tok_s"]
               for e in ("cycle5_prefix", "cycle6_flash", "cycle7_int8", "cycle8_graphs")}
        want = (f"| {run} | {tok['cycle5_prefix']:.1f} | {tok['cycle6_flash']:.1f} | "
                f"{tok['cycle6_flash'] / tok['cycle5_prefix']:.2f} | {tok['cycle7_int8']:.1f} | "
                f"{tok['cycle8_graphs']:.1f} | {tok['cycle8_graphs'] / tok['cycle7_int8']:.2f} |")
        assert want in text, want


# --- numbers that used to live only in git history, and chapter 8's single figures -----------

def _wall_s(folder: str) -> int:
    return int(re.search(r"^wall: (\d+) s", (RESULTS / folder / "README.txt").read_text(), re.M).group(1))


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_suite_wall_times_as_stored():
    """290 s now, 263 s before the gathers and malloc, 8 min 3 s before the start-up cuts: each from
    a stored README.txt (the two earlier ones recovered from git history)."""
    text = _flat(chapters()[8])
    now, before, cuts = (_wall_s(f) for f in ("cpu-course-suite", "cpu-course-suite-before-gathers",
                                              "cpu-course-suite-before-startup-cuts"))
    assert (now, before) == (290, 263)
    assert f"The suite took {before} s before the last two" in text and f"and {now} s with them" in text
    assert f"Before the cuts ({cuts // 60} min {cuts % 60} s without the install" in text


def test_first_vllm_comparison_as_stored():
    """The first offline comparison's 0.92x and 0.84x: the best cycle over vLLM in the recovered runs."""
    ratios = []
    for run in ("fp32-16", "fp32-64"):
        rows = {r["engine"]: r["throughput_tok_s"] for r in
                json.loads((RESULTS / "cpu-vs-vllm-offline-first" / run / "results.json").read_text())["results"]}
        ratios.append(max(rows["cycle4_batching"], rows["cycle6_flash"]) / rows["vllm"])
    assert f"which had the cycles at {ratios[0]:.2f}× at 16 requests and {ratios[1]:.2f}× at 64" in _flat(chapters()[8])


def test_served_before_packing_as_stored():
    data = json.loads((RESULTS / "cpu-vs-vllm-served-before-packing" / "compare.json").read_text())
    tpot = data["1"]["mean_tpot_ms"]
    assert f"had the split at {tpot['ours'] / tpot['vllm']:.2f}x vLLM's TPOT at 1 request/s" in _flat(chapters()[9])


def test_earlier_vllm_runs_minutes_before_the_stored_one():
    from datetime import datetime

    def started(path):
        return datetime.fromisoformat(json.loads(path.read_text())["run"]["started"])

    stored = started(RESULTS / "cpu-vs-vllm-offline" / "fp32-16" / "results.json")
    gaps = sorted(round((stored - started(p)).total_seconds() / 60)
                  for p in (RESULTS / "cpu-vs-vllm-offline-earlier").glob("*/results.json"))
    assert f"In two earlier runs of the same size {gaps[0]} and {gaps[1]} minutes before" in _flat(chapters()[8])


def test_bf16_matmul_slowdown_as_stored():
    """bf16 against packed fp32 from 64 rows up: the guide's range is the stored speed-ups'."""
    ups = [float(line.split()[-2].rstrip("x")) for line in (RESULTS / "cpu-bf16-linear.txt").read_text().splitlines()
           if line.split() and line.split()[0].isdigit() and int(line.split()[0]) >= 64]
    span = f"{min(ups):.1f}-{max(ups):.1f}x"
    assert span == "4.7-7.4x"
    assert _flat(chapters()[8]).count(span) == 2 and "5-7x" not in GUIDE.read_text()


def test_course_suite_online_p99_as_stored():
    rows = {r["engine"]: r for r in json.loads((RESULTS / "cpu-course-suite" / "online" / "results.json").read_text())["results"]}
    want = f"p99 TTFT {rows['cycle3_paged']['ttft_p99_s']:.2f} s against {rows['cycle4_batching']['ttft_p99_s']:.2f} s in `cpu-course-suite`"
    assert want in _flat(chapters()[8]), want


def test_the_guide_quotes_the_suite_estimate_as_printed():
    """Chapter 8's GPU suite table is `estimate --suite`'s output, and the README's 'about N minutes'
    is its total."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "common.benchmark.estimate", "--suite"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and not line.startswith("| part")]
    assert len(rows) == 6 and all(row in GUIDE.read_text() for row in rows), rows
    total = int(re.search(r"\| all \| \| \d+ \| (\d+) ", rows[-1]).group(1))
    assert f"estimated at about {round(total / 60)} minutes on an H200" in _flat((ROOT / "README.md").read_text())


# --- the README ------------------------------------------------------------------------------

def _pct(change: float) -> str:
    return f"{change:+.0%}".replace("-", "−").replace("+", "+")


def _results(folder: str) -> dict:
    return {r["engine"]: r for r in json.loads((RESULTS / folder / "results.json").read_text())["results"]}


SUITE_RUN = "cpu-course-suite-cycles1-11"   # the stored course suite the README quotes


def test_readme_numbers_as_stored():
    """Every figure the README quotes, recomputed from the stored file it names."""
    from common.benchmark.summary import summarize

    readme = _flat((ROOT / "README.md").read_text())
    suite = json.loads((RESULTS / SUITE_RUN / "results.json").read_text())
    rows = {r["cycle"]: r for r in summarize({n: p["results"] for n, p in suite["parts"].items()})}
    prompt = suite["parts"]["long_context"]["results"][0]["prompt_tokens"]
    want = [f"KV cache {_pct(rows[2]['change'])} latency ({_pct(rows[2]['expected_change'])})",
            f"paging {_pct(rows[3]['change'])} KV cache peak ({_pct(rows[3]['expected_change'])})",
            f"continuous batching {_pct(rows[4]['change'])} p99 TTFT under arrivals",
            f"prefix caching {_pct(rows[5]['change'])} TTFT ({_pct(rows[5]['expected_change'])})",
            f"flash attention {_pct(rows[6]['change'])} latency on a {prompt:,}-token prompt ({_pct(rows[6]['expected_change'])})",
            f"int8 {_pct(rows[7]['change'])} weight memory ({_pct(rows[7]['expected_change'])})",
            f"speculative decoding {_pct(rows[10]['change'])} time per output token",
            f"tensor parallelism at 3 ranks {_pct(rows[11]['change'])} weight memory per rank"]
    assert rows[8]["verdict"] == "GPU only" and "cycle 8's CUDA graphs are GPU only" in readme
    notes = (RESULTS / SUITE_RUN / "README.txt").read_text()
    wall, install = _wall_s(SUITE_RUN), int(re.search(r"(\d+) s\. The README", notes).group(1))
    want.append(f"The suite took {wall // 60} min {wall % 60} s from an empty model cache, after a {install} s install: "
                f"{(wall + install) // 60} min {(wall + install) % 60} s for the whole command")
    tp, tp64, online = _results("cpu-throughput"), _results("cpu-throughput-64"), _results("cpu-online")
    want.append(f"cycle 1 makes {tp['cycle1_naive']['throughput_tok_s']:.1f} output tokens/s, cycle 2 "
                f"{tp['cycle2_kvcache']['throughput_tok_s']:.0f}, cycle 6 {tp['cycle6_flash']['throughput_tok_s']:.0f}")
    want.append(f"on 64 requests cycle 4 makes {tp64['cycle4_batching']['throughput_tok_s']:.0f} against "
                f"{tp64['hf_generate_batch']['throughput_tok_s']:.0f} for transformers' own continuous batching")
    c3, c4 = online["cycle3_paged"], online["cycle4_batching"]
    want.append(f"p99 time to first token at {c4['ttft_p99_s']:.2f} s where static batching reaches "
                f"{c3['ttft_p99_s']:.1f} s, and its goodput is {c4['goodput'] / c3['goodput']:.1f}x")
    ratios, ttft = [], {}
    for run in ("fp32-4", "fp32-16", "fp32-64", "bf16-4", "bf16-64"):
        r = _results(f"cpu-vs-vllm-offline/{run}")
        ratios.append(r["cycle6_flash"]["throughput_tok_s"] / r["vllm"]["throughput_tok_s"])
        ttft[run] = (r["cycle6_flash"]["ttft_mean_s"], r["vllm"]["ttft_mean_s"])
    want.append(f"cycle 6 makes {ratios[0]:.2f}x, {ratios[1]:.2f}x and {ratios[2]:.2f}x vLLM's tokens/s at 4, 16 and 64 requests")
    want.append(f"{ratios[3]:.1f}-{ratios[4]:.1f}x in bf16")
    assert ttft["fp32-4"][0] < ttft["fp32-4"][1] and ttft["fp32-64"][0] < ttft["fp32-64"][1]   # ahead at 4 and 64
    want.append(f"behind at 16 ({ttft['fp32-16'][0]:.2f} s against {ttft['fp32-16'][1]:.2f} s)")
    served = json.loads((RESULTS / "cpu-vs-vllm-served" / "compare.json").read_text())
    tpot = [served[r]["mean_tpot_ms"]["ours"] / served[r]["mean_tpot_ms"]["vllm"] for r in ("1", "2", "4")]
    want.append(f"mean time per output token is {tpot[0]:.2f}x, {tpot[1]:.2f}x and {tpot[2]:.2f}x vLLM's at 1, 2 and 4 requests/s")
    startup = (RESULTS / "cpu-engine-startup.txt").read_text()
    lo, hi = map(float, re.search(r"([\d.]+)-([\d.]+) s with gguf_state_dict", startup).groups())
    want.append(f"the first load converts it once, ~{round((lo + hi) / 2 / 10) * 10} s on 2 cores")
    assert wall + install <= 7 * 60 and "sized for 7 minutes on a fresh 2-core CPU" in readme
    missing = [w for w in want if w not in readme]
    assert not missing, missing


def test_online_paragraph_of_chapter_4_as_stored():
    """Chapter 4's online comparison: p99 TTFT, the ratio, goodput and how many requests met both targets."""
    r = _results("cpu-online")
    c3, c4 = r["cycle3_paged"], r["cycle4_batching"]
    good = round(c3["goodput"] * c3["duration_s"])
    text = _flat(chapters()[4])
    assert (f"Cycle 4's p99 TTFT is {c4['ttft_p99_s']:.2f} s against cycle 3's {c3['ttft_p99_s']:.1f} s "
            f"({c4['ttft_p99_s'] / c3['ttft_p99_s']:.2f}×") in text
    assert (f"its goodput is {c4['goodput']:.3f} against {c3['goodput']:.3f} requests/s "
            f"({c4['goodput'] / c3['goodput']:.1f}×): every one of cycle 4's requests meets both targets, "
            f"{good} of cycle 3's {c3['num_requests']}") in text
    assert round(c4["goodput"] * c4["duration_s"]) == c4["num_requests"]


def test_the_stored_suite_summary_redraws_without_a_bar_for_a_lesson_that_did_not_run(tmp_path, monkeypatch):
    """`python -m common.benchmark.plots --summary` redraws chapter 8's summary.png from the stored
    results.json; the c7 -> c8 row ('GPU only' on a CPU) gets a note, not a bar, as the table gives it no change."""
    plots = importlib.import_module("common.benchmark.plots")
    bars = []
    real_barh = plots.plt.Axes.barh
    monkeypatch.setattr(plots.plt.Axes, "barh", lambda self, y, *a, **k: bars.append(y) or real_barh(self, y, *a, **k))
    with contextlib.redirect_stdout(io.StringIO()):
        plots.main(["--summary", str(tmp_path / "summary.png"), str(RESULTS / "cpu-course-suite" / "results.json")])
    assert (tmp_path / "summary.png").stat().st_size > 0
    measured = [y for y in bars if round(y % 1, 2) == 0.82]        # y - 0.18: the measured bars
    assert len(measured) == 6                                       # c1 -> c2 .. c6 -> c7; none for c7 -> c8


def test_every_link_inside_the_guide_reaches_a_heading():
    """`[text](#anchor)` links resolve to a heading, with GitHub's anchor rule (lower case, spaces to
    hyphens, punctuation dropped)."""
    text = GUIDE.read_text()
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.*)$", text, re.M)}
    broken = [link for link in re.findall(r"\]\(#([^)\s]+)\)", text) if link not in anchors]
    assert not broken, broken


def test_served_table_and_ratios_as_stored():
    """Chapter 9's served table: every row from its run's compare.json, and the ratios quoted under it."""
    text = chapters()[9]
    runs = {"cpu-vs-vllm-served": ("ours, core in its own process", True),
            "cpu-vs-vllm-served-thread": ("ours, core in a thread", False)}
    keys = ("mean_tpot_ms", "mean_e2el_ms", "mean_ttft_ms", "p99_ttft_ms")
    for run, (label, with_vllm) in runs.items():
        data = json.loads((RESULTS / run / "compare.json").read_text())
        for rate, m in data.items():
            who = [(label, "ours")] + ([("vLLM 0.32.0 (CPU)", "vllm")] if with_vllm else [])
            for name, side in who:
                row = (f"| {rate} | {name} | " + " | ".join(f"{m[k][side]:,.0f}" for k in keys)
                       + f" | {m['request_throughput'][side]:.1f} |")
                assert row in text, row
    data = json.loads((RESULTS / "cpu-vs-vllm-served" / "compare.json").read_text())
    ratio = {k: ", ".join(f"{data[r][k]['ours'] / data[r][k]['vllm']:.2f}x" for r in ("1", "2")) + " and "
             f"{data['4'][k]['ours'] / data['4'][k]['vllm']:.2f}x" for k in ("mean_tpot_ms", "mean_e2el_ms", "p99_ttft_ms")}
    flat = _flat(text)
    assert f"mean TPOT {ratio['mean_tpot_ms']} vLLM's at 1, 2 and 4 requests/s, mean E2EL {ratio['mean_e2el_ms']}, " \
           f"p99 TTFT {ratio['p99_ttft_ms']}" in flat


def test_what_each_vllm_run_did_with_the_cores_as_logged():
    """Served: vLLM's own log shows one compute core and one reserved, ours two torch threads; offline:
    vLLM bound to both cores. Chapter 9 says so with the logs' words."""
    flat = _flat(chapters()[9])
    for run in ("cpu-vs-vllm-served", "cpu-vs-vllm-served-thread"):
        log = (RESULTS / run / "vllm_server.log").read_text()
        assert "core ids=[0]" in log and "reserved_cpus=[1]" in log and "Reducing Torch threads from 2 to 1" in log
        assert "OMP_NUM_THREADS=unset" in (RESULTS / run / "machine.txt").read_text()
    assert "2 torch threads" in (RESULTS / "cpu-vs-vllm-served" / "ours_server.log").read_text()
    for run in ("fp32-4", "fp32-16", "fp32-64"):
        assert _results(f"cpu-vs-vllm-offline/{run}")["vllm"]["stats"]["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert "`core ids=[0]`, `reserved_cpus=[1]`" in flat and "`VLLM_CPU_OMP_THREADS_BIND=0-1`" in flat
