"""The guide's figures that are not charts of one compare.py run: drawn from the project's own code
(the mask cycle 1 builds, cycle 3's BlockManager, cycle 5's prefix cache, cycle 7's quantizer) or
from stored results (chapter 9's served runs), plus one labelled schematic (chapter 10).

    python scripts/make_figures.py                  # writes docs/figures/*.png
    python scripts/make_figures.py --out /tmp/figs  # somewhere else

Deterministic (fixed inputs, a seeded generator, no timestamps in the PNGs), no model, a few seconds.
"""

import argparse
import importlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "docs" / "results"
PAD, REAL, LOOK, NO = "#d9d9d9", "#9ecae1", "#3182bd", "white"
OWNER_COLORS = ["#fdae6b", "#9ecae1", "#a1d99b", "#bcbddc"]


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, metadata={"Software": None})   # no version stamp: the same bytes each run
    plt.close(fig)
    return path


# --- chapter 1: left padding and its mask ----------------------------------------------------

PADDING_EXAMPLE = [[11, 12], [21, 22, 23, 24]]   # two prompts, 2 and 4 tokens: the guide's worked example


def padding_example():
    """cycle 1's own _prepare on the worked example: input_ids, positions [B, T], mask [B, T, T]."""
    runner = importlib.import_module("cycle1_naive.model_runner").ModelRunner
    seqs = [SimpleNamespace(token_ids=t) for t in PADDING_EXAMPLE]
    return runner._prepare(SimpleNamespace(device=torch.device("cpu")), seqs)


def _grid(ax, colors, labels, title, xlabel, ylabel):
    rows, cols = len(colors), len(colors[0])
    for r in range(rows):
        for c in range(cols):
            ax.add_patch(plt.Rectangle((c, r), 1, 1, facecolor=colors[r][c], edgecolor="black", lw=0.8))
            ax.text(c + 0.5, r + 0.5, labels[r][c], ha="center", va="center", fontsize=8)
    ax.set_xlim(0, cols), ax.set_ylim(rows, 0), ax.set_aspect("equal")
    ax.set_xticks([c + 0.5 for c in range(cols)], range(cols), fontsize=7)
    ax.set_yticks([r + 0.5 for r in range(rows)], range(rows), fontsize=7)
    ax.set_title(title, fontsize=9), ax.set_xlabel(xlabel, fontsize=8), ax.set_ylabel(ylabel, fontsize=8)


def figure_left_padding(out: Path) -> Path:
    input_ids, positions, mask = padding_example()
    B, T = input_ids.shape
    pads = [T - len(t) for t in PADDING_EXAMPLE]
    fig, axes = plt.subplots(1, 1 + B, figsize=(3.2 * (1 + B), 3.0))
    colors = [[PAD if c < pads[r] else REAL for c in range(T)] for r in range(B)]
    labels = [[f"{'pad' if c < pads[r] else input_ids[r, c].item()}\npos {positions[r, c].item()}" for c in range(T)]
              for r in range(B)]
    _grid(axes[0], colors, labels, "input_ids [B, T], left-padded", "column", "row (sequence)")
    for b in range(B):
        m = mask[b].tolist()
        colors = [[LOOK if m[q][k] else NO for k in range(T)] for q in range(T)]
        labels = [["1" if m[q][k] else "" for k in range(T)] for q in range(T)]
        _grid(axes[1 + b], colors, labels, f"mask of row {b} ({pads[b]} padding)", "key column", "query column")
    fig.suptitle("cycle1_naive ModelRunner._prepare: prompts of 2 and 4 tokens (1 = may attend)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "ch1_left_padding.png")


# --- chapter 3: block tables and slot mapping ------------------------------------------------

def paged_example():
    """cycle 3's BlockManager: 12 blocks of 4. A (6 tokens), C (5) and B (3) are allocated, C
    finishes, then A grows to 9 tokens and B to 5: their new blocks come from the free list."""
    bm = importlib.import_module("cycle3_paged.block_manager").BlockManager(12, 4)
    Sequence = importlib.import_module("cycle3_paged.sequence").Sequence
    SP = importlib.import_module("cycle3_paged").SamplingParams
    a, c, b = (Sequence(i, None, list(range(n)), SP(max_tokens=8), None) for i, n in ((0, 6), (2, 5), (1, 3)))
    for seq in (a, c, b):
        bm.allocate(seq)
    bm.free(c)
    for seq, grow in ((a, 3), (b, 2)):
        for _ in range(grow):
            seq.token_ids.append(0)
            bm.append_slot(seq)
    return bm, {"A": a, "B": b}


def figure_block_table(out: Path) -> Path:
    bm, seqs = paged_example()
    bs = bm.block_size
    fig, ax = plt.subplots(figsize=(10, 3.6))
    owner = {blk: (name, i) for name, s in seqs.items() for i, blk in enumerate(s.block_table)}
    for blk in range(bm.num_blocks):                                    # the pool, one column per block
        name, logical = owner.get(blk, (None, None))
        seq = seqs.get(name)
        for off in range(bs):
            pos = logical * bs + off if seq else None
            used = seq is not None and pos < len(seq)
            color = OWNER_COLORS[0 if name == "A" else 1] if used else ("#f0f0f0" if seq else "white")
            ax.add_patch(plt.Rectangle((blk, 3 - off * 0.5), 0.9, 0.45, facecolor=color, edgecolor="grey", lw=0.5))
            ax.text(blk + 0.45, 3.22 - off * 0.5, f"slot {blk * bs + off}" + (f"\n{name} pos {pos}" if used else ""),
                    ha="center", va="center", fontsize=5.5)
        ax.text(blk + 0.45, 3.65, f"block {blk}" + ("" if seq else "\nfree"), ha="center", fontsize=7)
    for row, (name, s) in enumerate(seqs.items()):                      # the block tables, below
        ax.text(-0.2, 0.7 - row * 0.55, f"{name}: {len(s)} tokens, block_table {s.block_table}", fontsize=8,
                color="black", ha="left")
    a = seqs["A"]
    ax.text(-0.2, -0.5, f"slot_mapping of A's position 8: block_table[8 // {bs}] * {bs} + 8 % {bs} = "
            f"{a.block_table[8 // bs]} * {bs} + {8 % bs} = {bm.slot(a, 8)}", fontsize=8, ha="left")
    ax.set_xlim(-0.3, bm.num_blocks), ax.set_ylim(-0.7, 4.0), ax.axis("off")
    ax.set_title("cycle3_paged BlockManager, 12 blocks of 4 slots: C (5 tokens) finished and freed blocks 2-3;\n"
                 "A and B then grew, taking blocks from the front of the free list", fontsize=9)
    return _save(fig, out / "ch3_block_table.png")


# --- chapter 5: hash-chained blocks shared by two prompts ------------------------------------

def prefix_example():
    """cycle 5's BlockManager, block_size 4: A's 12-token prompt, then B = A's first 8 tokens + 3 of
    its own; each admitted as the scheduler admits it, A's full blocks hashed after its prefill."""
    bm = importlib.import_module("cycle5_prefix.block_manager").BlockManager(8, 4)
    Sequence = importlib.import_module("cycle5_prefix.sequence").Sequence
    SP = importlib.import_module("cycle5_prefix").SamplingParams
    a = Sequence(0, None, list(range(100, 112)), SP(max_tokens=4), None)
    b = Sequence(1, None, list(range(100, 108)) + [200, 201, 202], SP(max_tokens=4), None)
    for seq in (a, b):
        hashes = bm.prompt_block_hashes(seq)
        hits = bm.cached_blocks(seq, hashes)
        bm.allocate(seq, hits, hashes)
        bm.cache_full_blocks(seq, len(seq))
    return bm, {"A": a, "B": b}


def figure_prefix_sharing(out: Path) -> Path:
    bm, seqs = prefix_example()
    fig, ax = plt.subplots(figsize=(10, 3.0))
    users = {blk: [n for n, s in seqs.items() if blk in s.block_table] for blk in range(bm.num_blocks)}
    for blk in range(6):
        block, who = bm.blocks[blk], users[blk]
        color = "#c7e9c0" if len(who) > 1 else (OWNER_COLORS[0] if who == ["A"] else OWNER_COLORS[1] if who else "white")
        ax.add_patch(plt.Rectangle((blk * 1.6, 1), 1.4, 1.4, facecolor=color, edgecolor="black", lw=0.8))
        seq = seqs[who[0]] if who else None
        i = seq.block_table.index(blk) if seq else 0
        tokens = " ".join(str(t) for t in seq.token_ids[i * bm.block_size:(i + 1) * bm.block_size]) if seq else "free"
        ax.text(blk * 1.6 + 0.7, 2.1, f"block {blk}", ha="center", fontsize=8, weight="bold")
        ax.text(blk * 1.6 + 0.7, 1.75, tokens, ha="center", fontsize=6)
        ax.text(blk * 1.6 + 0.7, 1.45, f"hash {block.hash:016x}"[:14] + "…" if block.hash else
                "not full: no hash" if who else "no hash",
                ha="center", fontsize=6)
        ax.text(blk * 1.6 + 0.7, 1.15, f"ref_count {block.ref_count}  {'+'.join(who) or 'free'}", ha="center", fontsize=6.5)
    for i in range(2):                                                  # the chain: each hash includes its parent
        ax.annotate("", xy=((i + 1) * 1.6 + 0.05, 2.5), xytext=(i * 1.6 + 1.35, 2.5),
                    arrowprops=dict(arrowstyle="->", color="tab:green"))
    ax.text(0, 2.75, "chain_hash: h(block i) = xxh64(h(block i-1), its tokens); equal hashes mean equal prefixes",
            fontsize=7.5, color="tab:green")
    for row, (name, s) in enumerate(seqs.items()):
        ax.text(0, 0.55 - row * 0.4, f"{name}: {len(s)} prompt tokens, block_table {s.block_table}, "
                f"num_cached_tokens {s.num_cached_tokens}", fontsize=8)
    ax.set_xlim(-0.1, 6 * 1.6), ax.set_ylim(-0.1, 3.0), ax.axis("off")
    ax.set_title("cycle5_prefix BlockManager, 4-token blocks: B shares A's first two blocks (green), "
                 "computes only its last 3 tokens", fontsize=9)
    return _save(fig, out / "ch5_prefix_sharing.png")


# --- chapter 7: AbsMax per-channel quantization error ----------------------------------------

def quantization_example():
    """A seeded random [64, 512] weight, one row in eight with a 10x outlier: cycle 7's quantizer."""
    quant = importlib.import_module("cycle7_int8.quantization")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 512, generator=gen) * 0.02
    w[::8, 0] *= 10 * w[::8].abs().max(dim=1).values / w[::8, 0].abs().clamp(min=1e-8)   # outliers
    q, scale = quant.quantize_absmax(w)
    return w, q, scale, quant.dequantize(q, scale)


def figure_int8_error(out: Path) -> Path:
    w, q, scale, deq = quantization_example()
    err = (deq - w).abs()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    row = 1
    left.scatter(w[row].tolist(), (deq[row] - w[row]).tolist(), s=4, color="tab:blue")
    half = scale[row].item() / 2
    left.axhline(half, color="tab:red", lw=0.8), left.axhline(-half, color="tab:red", lw=0.8)
    left.set_xlabel("weight value (row 1)", fontsize=8), left.set_ylabel("dequantized - original", fontsize=8)
    left.set_title(f"one row: every error within ±scale/2 = ±{half:.2e} (red)", fontsize=9)
    rows = range(len(scale))
    right.bar(list(rows), err.max(dim=1).values.tolist(), color=["tab:orange" if r % 8 == 0 else "tab:blue" for r in rows])
    right.plot(list(rows), (scale / 2).tolist(), color="tab:red", lw=0.8, label="scale / 2, the bound")
    right.set_xlabel("output row (channel)", fontsize=8), right.set_ylabel("largest |error| in the row", fontsize=8)
    right.set_title("per row: an outlier (orange rows) makes the scale and error 10x", fontsize=9)
    right.legend(fontsize=7)
    fig.suptitle("cycle7_int8 quantize_absmax on a seeded random 64 x 512 weight: one scale per output row",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "ch7_int8_error.png")


# --- chapter 9: served, ours beside vLLM -----------------------------------------------------

SERVED_RUNS = (("cpu-vs-vllm-served", "core in its own process"), ("cpu-vs-vllm-served-thread", "core in a thread"))


def served_rows() -> list[tuple[str, float, dict]]:
    """(label, rate, metrics) for every server of both stored runs: ours (two versions), and the
    vLLM rows each run measured."""
    rows = []
    for run, ours in SERVED_RUNS:
        for rate, metrics in json.loads((RESULTS / run / "compare.json").read_text()).items():
            rows.append((f"ours, {ours}", float(rate), {k: v["ours"] for k, v in metrics.items()}))
            rows.append((f"vLLM 0.32.0 (run with ours, {ours})", float(rate), {k: v["vllm"] for k, v in metrics.items()}))
    return rows


def figure_served(out: Path) -> Path:
    rows = served_rows()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in zip(axes, ("mean_tpot_ms", "p99_ttft_ms"), ("mean TPOT (ms)", "p99 TTFT (ms)")):
        for label in dict.fromkeys(r[0] for r in rows):
            points = sorted((rate, m[key]) for name, rate, m in rows if name == label)
            style = {"color": "tab:red" if label.startswith("vLLM") else "tab:blue",
                     "linestyle": "--" if "thread" in label else "-", "marker": "o"}
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, **style)
        ax.set_xscale("log", base=2), ax.set_xticks([1, 2, 4], ["1", "2", "4"])
        ax.set_xlabel("request rate (req/s)", fontsize=8), ax.set_title(title, fontsize=9), ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6.5)
    fig.suptitle("Served on a 2-core AMD EPYC, vLLM's client, 32 requests of 64 in / 32 out (cycle 6, fp32); "
                 "vLLM computed on 1 core, ours on 2\n" + ", ".join(f"docs/results/{r}/compare.json" for r, _ in SERVED_RUNS),
                 fontsize=8)
    fig.tight_layout()
    return _save(fig, out / "ch9_served_vs_vllm.png")


# --- chapter 10: a schematic, not a measurement ----------------------------------------------

def figure_graph_schematic(out: Path) -> Path:
    fig, axes = plt.subplots(2, 1, figsize=(10, 3.6), sharex=True)
    n = 8
    for ax, title, graph in ((axes[0], "eager (cycle 7): the host launches every kernel", False),
                             (axes[1], "CUDA graph (cycle 8): one replay launches the recorded kernels", True)):
        ax.broken_barh([(0, 1.0)], (1.1, 0.7), facecolor="tab:gray")               # host: prepare inputs
        ax.text(0.5, 1.45, "prepare", ha="center", va="center", fontsize=7)
        t = 1.0
        for k in range(n):
            if not graph:
                ax.broken_barh([(t, 0.8)], (1.1, 0.7), facecolor="tab:orange", edgecolor="white")      # host: launch k
                ax.text(t + 0.4, 1.45, f"launch\nk{k + 1}", ha="center", va="center", fontsize=6)
            start = t + (0.8 if not graph else 0.6 + 0.35 * k)
            ax.broken_barh([(start, 0.3)], (0.1, 0.7), facecolor="tab:blue")        # device: kernel k
            ax.text(start + 0.15, 0.45, f"k{k + 1}", ha="center", va="center", fontsize=6, color="white")
            t += 0.8 if not graph else 0
        if graph:
            ax.broken_barh([(1.0, 0.6)], (1.1, 0.7), facecolor="tab:orange")
            ax.text(1.3, 1.45, "replay", ha="center", va="center", fontsize=7)
        ax.set_yticks([0.45, 1.45], ["device", "host"], fontsize=8), ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 2)
    axes[1].set_xticks([])
    axes[1].set_xlabel("time (a schematic: not to scale, no measured timings; N kernels drawn as 8)", fontsize=8)
    fig.suptitle("One decode step, schematic: when the host is the bottleneck the device idles between kernels",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "ch10_graph_schematic.png")


FIGURES = (figure_left_padding, figure_block_table, figure_prefix_sharing, figure_int8_error, figure_served,
           figure_graph_schematic, importlib.import_module("scripts.figure_chunked").figure_mixed_step,   # chapter 11
           importlib.import_module("scripts.figure_speculative").figure_speculative,   # chapter 12
           importlib.import_module("scripts.figure_tp").figure_tp)                     # chapter 13


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    paths = [make(args.out) for make in FIGURES]
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
