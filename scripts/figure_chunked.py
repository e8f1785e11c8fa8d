"""Chapter 11's figure: what cycle 9's real Scheduler puts in each step of a toy trace, with and
without chunked prefill. No model: the steps are driven as the engine drives them (the scheduled
tokens become computed; a sequence that computed all it has gets a token).

    python scripts/figure_chunked.py                  # writes docs/figures/ch11_mixed_step.png
    python scripts/figure_chunked.py --out /tmp/figs

The trace: three streams (4-token prompts, 12 tokens each) start together; at step 3 a 40-token
prompt arrives. Budget 16 tokens, blocks of 4. Deterministic: the same bytes every run.
"""

import argparse
import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CYCLE = "cycle9_chunked"
STREAM_COLORS = ["#9ecae1", "#6baed6", "#3182bd"]
CHUNK_COLOR = "#fd8d3c"
BUDGET, LONG_PROMPT, ARRIVES_AT, STEPS = 16, 40, 3, 9


def trace(enable_chunked_prefill: bool) -> list[list[tuple[int, int, bool]]]:
    """Per step: (seq_id, tokens computed, is a prompt's) for every scheduled row, in batch order."""
    config = SimpleNamespace(block_size=4, enable_prefix_caching=True, max_num_seqs=8, max_num_batched_tokens=BUDGET,
                             enable_chunked_prefill=enable_chunked_prefill, long_prefill_token_threshold=0)
    processor = importlib.import_module(f"{CYCLE}.output_processor").OutputProcessor(None, set())
    scheduler = importlib.import_module(f"{CYCLE}.scheduler").Scheduler(config, 64, processor)
    Sequence = importlib.import_module(f"{CYCLE}.sequence").Sequence
    SamplerOutput = importlib.import_module(f"{CYCLE}.sampler").SamplerOutput
    params = importlib.import_module(CYCLE).SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    scheduler.add([Sequence(i, None, [10 + i] * 4, params, None) for i in range(3)], detokenize=False)
    steps = []
    for step in range(1, STEPS + 1):
        if step == ARRIVES_AT:
            scheduler.add([Sequence(3, None, list(range(100, 100 + LONG_PROMPT)), params, None)], detokenize=False)
        seqs, num_tokens = scheduler.schedule()
        steps.append([(s.seq_id, n, s.num_computed_tokens + n <= s.num_prompt_tokens) for s, n in zip(seqs, num_tokens)])
        samples = sum(s.num_computed_tokens + n == len(s) for s, n in zip(seqs, num_tokens))
        scheduler.postprocess(seqs, num_tokens, SamplerOutput([1] * samples))   # token 1 for every row that samples
    return steps


def _draw(ax, steps, title: str) -> None:
    for x, rows in enumerate(steps, start=1):
        bottom = 0
        for seq_id, n, prompt in rows:
            color = CHUNK_COLOR if seq_id == 3 else STREAM_COLORS[seq_id]
            ax.bar(x, n, bottom=bottom, color=color, edgecolor="white", hatch="//" if prompt and seq_id != 3 else None)
            label = f"long {n}" if seq_id == 3 and prompt else ("p" if prompt else "d") + str(seq_id)
            ax.text(x, bottom + n / 2, label, ha="center", va="center", fontsize=6)
            bottom += n
    ax.axhline(BUDGET, color="black", linestyle="--", linewidth=0.8)
    ax.text(len(steps) + 0.45, BUDGET, "budget", va="bottom", ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("tokens in the step", fontsize=8)
    ax.set_xticks(range(1, len(steps) + 1))


def figure_mixed_step(out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    _draw(axes[0], trace(False), "cycle 8's phases (enable_chunked_prefill=False):\nthe 40-token prompt's step has no decode")
    _draw(axes[1], trace(True), f"cycle 9, budget {BUDGET}: decodes first (d0-d2),\nthen a chunk of the long prompt")
    for ax in axes:
        ax.set_xlabel(f"step (the long prompt arrives at step {ARRIVES_AT})", fontsize=8)
    fig.suptitle("What cycle 9's Scheduler puts in each step of a toy trace (p: prompt, d: decode token)", fontsize=9)
    fig.tight_layout()
    path = out / "ch11_mixed_step.png"
    fig.savefig(path, dpi=110, metadata={"Software": None})   # no version stamp: the same bytes each run
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = figure_mixed_step(args.out)
    print(path)
    return path


if __name__ == "__main__":
    main()
