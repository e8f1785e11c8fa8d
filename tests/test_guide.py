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


def test_every_chapter_has_a_figure():
    """Each chapter draws its mechanism: a Mermaid block, or an embedded image whose file exists."""
    found = chapters()
    assert sorted(found) == list(range(1, 11))
    for number, text in found.items():
        images = [p for p in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text) if not p.startswith("http")]
        for path in images:
            assert (DOCS / path).is_file(), f"chapter {number}: image {path} does not exist"
        assert mermaid_blocks(text) or images, f"chapter {number} has no figure"


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
    """Docs, scripts and common/ never speak of 'sessions' or point at issue numbers."""
    files = [DOCS / "CYCLE_GUIDE.md", DOCS / "ARCHITECTURE.md", ROOT / "README.md",
             *ROOT.glob("scripts/*"), *ROOT.glob("common/**/*.py")]
    for path in files:
        if not path.is_file():
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            assert not re.search(r"\bsession", line, re.I), f"{path.name}:{i}: {line}"
            assert not re.search(r"\bissues? \d", line, re.I), f"{path.name}:{i}: {line}"


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
    runs = json.loads((RESULTS / "cpu-chat" / "results.json").read_text())["results"]
    peak = {r["engine"]: r["peak_memory_bytes"] / 2**20 for r in runs}
    assert round(peak["cycle7_int8"] - peak["cycle6_flash"]) == 419
    lm_head = 49152 * 576 * 4 / 2**20                    # the cast path's largest transient copy
    assert round(lm_head) == 108


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
