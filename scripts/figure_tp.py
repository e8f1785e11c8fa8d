"""Chapter 13's figure: one decoder block of SmolLM2-135M-Instruct split over 3 ranks, as cycle 11 splits it.

    python scripts/figure_tp.py            # writes docs/figures/ch13_tensor_parallel.png
    python scripts/figure_tp.py /tmp/figs  # or into another folder (it must exist)

Every number in it comes from cycle11_tp's own model: each rank's CausalLM is built on the meta
device (shapes only, no weights, nothing runs, so no process group), the shapes are read from its
modules and the head and channel ranges from its checkpoint_targets() (which rows of each
checkpoint tensor the rank keeps). Only the model's config is needed (resolve_model with
weights="random" reads it without converting any weights). Deterministic: the same bytes every run.
"""

import importlib
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Patch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CYCLE = "cycle11_tp"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
WORLD = 3
COLUMN, ROW, REDUCE, SAME, LOCAL = "#9ecae1", "#fdae6b", "#de2d26", "#e0e0e0", "#c7e9c0"


def build(config, rank: int, world_size: int):
    """cycle 11's CausalLM as rank `rank` of `world_size` builds it, on the meta device."""
    model = importlib.import_module(f"{CYCLE}.model")
    group = importlib.import_module(f"{CYCLE}.parallel_state").TPGroup(rank, world_size, None)
    with torch.device("meta"):
        return model.CausalLM(config, "sdpa", group)


def _span(shard, unit: int = 1) -> str:
    """'first-last' of the rows (or columns) a Shard keeps, counted in `unit`s (a head: head_dim)."""
    first, count = shard.start // unit, shard.size // unit
    return f"{first}" if count == 1 else f"{first}-{first + count - 1}"


def rank_shapes(config, rank: int) -> dict:
    """What rank `rank` of WORLD holds of layer 0 (every layer is the same), read from its modules."""
    lm = build(config, rank, WORLD)
    layer, targets, p = lm.model.layers[0], lm.checkpoint_targets(), "model.layers.0."
    attn, mlp = layer.self_attn, layer.mlp
    row_parallel = importlib.import_module(f"{CYCLE}.parallel_layers").RowParallelLinear
    embed = targets["model.embed_tokens.weight"]
    return {
        "qkv": tuple(attn.qkv_proj.weight.shape), "q_size": attn.q_size, "kv_size": attn.kv_size,
        "heads": _span(targets[p + "self_attn.q_proj.weight"], attn.head_dim),
        "kv_heads": _span(targets[p + "self_attn.k_proj.weight"], attn.head_dim),
        "num_heads": attn.num_heads, "num_kv_heads": attn.num_kv_heads, "head_dim": attn.head_dim,
        "o_proj": tuple(attn.o_proj.linear.weight.shape),
        "gate_up": tuple(mlp.gate_up_proj.weight.shape),
        "channels": _span(targets[p + "mlp.gate_proj.weight"]),
        "o_cols": _span(targets[p + "self_attn.o_proj.weight"]),
        "down_cols": _span(targets[p + "mlp.down_proj.weight"]),
        "down_proj": tuple(mlp.down_proj.linear.weight.shape),
        "embed": tuple(lm.model.embed_tokens.embedding.weight.shape),
        "vocab_rows": f"{embed.start}-{embed.start + embed.size - 1}",
        # Each row-parallel layer all-reduces its output once (parallel_layers.py): count them.
        "all_reduces": sum(isinstance(m, row_parallel) for m in layer.modules()),
        "reduced_width": attn.o_proj.linear.out_features,
        "matrices": {name: param.numel() for name, param in layer.named_parameters() if param.dim() == 2},
    }


def shapes() -> tuple[object, list[dict]]:
    """The config and each rank's shapes; checks that every matrix of the block is split WORLD ways."""
    config = importlib.import_module("common.engine.model_source").resolve_model(MODEL, weights="random").config
    ranks = [rank_shapes(config, r) for r in range(WORLD)]
    whole = build(config, 0, 1).model.layers[0]
    for name, param in whole.named_parameters():
        if param.dim() == 2:   # the norms' vectors are replicated; every matrix is split
            assert all(r["matrices"][name] * WORLD == param.numel() for r in ranks), name
    return config, ranks


# --- drawing ----------------------------------------------------------------------------------

COL_W, GAP = 1.0, 0.18                     # column width and the gap between columns, data units


def _center(rank: int) -> float:
    return rank * (COL_W + GAP) + COL_W / 2


def _box(ax, x: float, y: float, text: str, color: str, h: float = 0.62, w: float = COL_W * 0.94,
         weight: str = "normal", fontsize: float = 7.6) -> None:
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.012,rounding_size=0.04",
                                facecolor=color, edgecolor="#404040", lw=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, weight=weight, linespacing=1.25)


def _arrow(ax, x: float, y_from: float, y_to: float) -> None:
    ax.annotate("", xy=(x, y_to), xytext=(x, y_from),
                arrowprops={"arrowstyle": "-|>", "color": "#404040", "lw": 0.9, "shrinkA": 0, "shrinkB": 0})


def _reduce_bar(ax, y: float, text: str) -> None:
    left, right = -0.02, WORLD * COL_W + (WORLD - 1) * GAP + 0.02
    ax.add_patch(FancyBboxPatch((left, y - 0.24), right - left, 0.48, boxstyle="round,pad=0.01,rounding_size=0.05",
                                facecolor=REDUCE, edgecolor="#67000d", lw=1.0))
    ax.text((left + right) / 2, y, text, ha="center", va="center", fontsize=8.2, color="white", weight="bold")


def _column(ax, cx: float, s: dict, hidden: int, y: dict) -> None:
    """One rank's column of boxes; y: step name -> centre height."""
    _box(ax, cx, y["x"], f"x [tokens, {hidden}]\n(whole: the same on every rank)", SAME)
    _box(ax, cx, y["norm1"], "input_layernorm (RMSNorm)", SAME, h=0.44)
    _box(ax, cx, y["qkv"], f"qkv_proj (column-parallel)\nW {list(s['qkv'])} = q {s['q_size']} + k {s['kv_size']} + "
         f"v {s['kv_size']} rows\nquery heads {s['heads']}, KV head {s['kv_heads']}", COLUMN, h=0.8)
    _box(ax, cx, y["attn"], f"attention: {s['num_heads']} query heads share KV head {s['kv_heads']}\n"
         f"its own KV cache: {s['num_kv_heads']} KV head x {s['head_dim']}\nper token and layer (K and V)", LOCAL, h=0.8)
    _box(ax, cx, y["o"], f"o_proj (row-parallel)\nW {list(s['o_proj'])}: input columns {s['o_cols']}\n"
         f"-> a partial sum [tokens, {s['reduced_width']}]", ROW, h=0.8)
    _box(ax, cx, y["res1"], "residual: x + attention output", SAME, h=0.44)
    _box(ax, cx, y["norm2"], "post_attention_layernorm (RMSNorm)", SAME, h=0.44)
    _box(ax, cx, y["gate_up"], f"gate_up_proj (column-parallel)\nW {list(s['gate_up'])} = gate {s['gate_up'][0] // 2}"
         f" + up {s['gate_up'][0] // 2} rows\nMLP channels {s['channels']}", COLUMN, h=0.8)
    _box(ax, cx, y["act"], f"SiLU(gate) * up  [tokens, {s['gate_up'][0] // 2}]", LOCAL, h=0.44)
    _box(ax, cx, y["down"], f"down_proj (row-parallel)\nW {list(s['down_proj'])}: input columns {s['down_cols']}\n"
         f"-> a partial sum [tokens, {s['reduced_width']}]", ROW, h=0.8)
    _box(ax, cx, y["res2"], f"residual -> the next block's x\n[tokens, {hidden}], whole on every rank", SAME)


# (step, box height) top to bottom; every column joins consecutive steps with an arrow.
STEPS = [("x", 0.62), ("norm1", 0.44), ("qkv", 0.8), ("attn", 0.8), ("o", 0.8), ("ar1", 0.48), ("res1", 0.44),
         ("norm2", 0.44), ("gate_up", 0.8), ("act", 0.44), ("down", 0.8), ("ar2", 0.48), ("res2", 0.62)]
STEP_GAP = 0.3                              # arrow length between boxes, data units


def figure_tp(out: Path) -> Path:
    config, ranks = shapes()
    hidden, r0 = config.hidden_size, ranks[0]
    y, top = {}, 0.0
    for name, h in STEPS:
        y[name] = top - h / 2
        top -= h + STEP_GAP
    bottom = top + STEP_GAP
    fig, ax = plt.subplots(figsize=(11.6, 10.8))
    for rank, s in enumerate(ranks):
        cx = _center(rank)
        ax.text(cx, 0.95, f"rank {rank}", ha="center", va="center", fontsize=10.5, weight="bold")
        ax.text(cx, 0.5, f"embed_tokens, lm_head: vocab rows {s['vocab_rows']}\n"
                f"W {list(s['embed'])} (vocabulary-parallel)", ha="center", va="center", fontsize=7.4, color="#404040")
        _column(ax, cx, s, hidden, y)
        for (a, ha), (b, hb) in zip(STEPS, STEPS[1:]):
            _arrow(ax, cx, y[a] - ha / 2, y[b] + hb / 2)
    _reduce_bar(ax, y["ar1"], f"ALL-REDUCE 1: sum of the {WORLD} partial o_proj outputs  [tokens, {hidden}]")
    _reduce_bar(ax, y["ar2"], f"ALL-REDUCE 2: sum of the {WORLD} partial down_proj outputs  [tokens, {hidden}]")
    width = WORLD * COL_W + (WORLD - 1) * GAP
    ax.set_xlim(-0.05, width + 0.05)
    ax.set_ylim(bottom - 0.15, 1.2)
    ax.axis("off")
    legend = [Patch(facecolor=COLUMN, edgecolor="#404040", label="column-parallel (output rows split; no communication)"),
              Patch(facecolor=ROW, edgecolor="#404040", label="row-parallel (input columns split; a partial sum)"),
              Patch(facecolor=REDUCE, edgecolor="#67000d", label="all-reduce across the ranks"),
              Patch(facecolor=LOCAL, edgecolor="#404040", label="per rank, on its own heads / channels"),
              Patch(facecolor=SAME, edgecolor="#404040", label="whole (replicated) on every rank")]
    ax.legend(handles=legend, loc="lower center", bbox_to_anchor=(0.5, -0.06), ncol=3, fontsize=7.8, frameon=False)
    fig.suptitle(f"Cycle 11: one decoder block of {MODEL.split('/')[1]} on tensor_parallel_size={WORLD} "
                 f"(W as [out, in]; layer 0, all {config.num_hidden_layers} the same)", fontsize=11, y=0.985)
    fig.text(0.5, 0.952, f"{r0['all_reduces']} all-reduces of [tokens, {r0['reduced_width']}] per block; "
             f"each rank holds 1/{WORLD} of every matrix", ha="center", fontsize=9.5, style="italic")
    fig.subplots_adjust(left=0.015, right=0.985, top=0.94, bottom=0.07)
    path = out / "ch13_tensor_parallel.png"
    fig.savefig(path, dpi=110, metadata={"Software": None})   # no version stamp: the same bytes each run
    plt.close(fig)
    return path


if __name__ == "__main__":   # scripts/make_figures.py draws it with the others (once it lists it)
    print(figure_tp(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "figures"))
