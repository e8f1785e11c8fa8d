"""Chapter 12's figure: cycle 10's real NgramProposer and RejectionSampler on a toy trace.

    python scripts/figure_speculative.py            # writes docs/figures/ch12_speculative.png
    python scripts/figure_speculative.py /tmp/figs  # or into another folder (it must exist)

No model: the "target model" is greedy and answers a fixed text (ANSWER), which copies the prompt's
sentence with one word changed; its logits put 10 on the next word of ANSWER. Each step the proposer
drafts up to K words from the words so far and the rejection sampler keeps what the target agrees
with, then adds the target's own word. Deterministic: the same bytes every run.
"""

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CYCLE = "cycle10_speculative"
K = 4
PROMPT = "copy this : the quick brown fox jumps over the lazy dog and the cat sleeps on the mat .".split()
ANSWER = "the quick brown fox jumps over the lazy cat and the cat sleeps on the mat . done".split()
WORDS = sorted(set(PROMPT + ANSWER))


def trace() -> list[dict]:
    """Per verification step: the drafts, how many were accepted, and the words it emitted."""
    proposer = importlib.import_module(f"{CYCLE}.proposer").NgramProposer(K, 1, 3)
    sampler = importlib.import_module(f"{CYCLE}.sampler").Sampler(torch.device("cpu"), seed=0)
    rejection = importlib.import_module(f"{CYCLE}.rejection_sampler").RejectionSampler(sampler)
    params = importlib.import_module(CYCLE).SamplingParams(temperature=0)
    ids = [WORDS.index(w) for w in PROMPT]
    answer = [WORDS.index(w) for w in ANSWER]
    steps = []
    while len(ids) - len(PROMPT) < len(answer):
        done = len(ids) - len(PROMPT)
        drafts = proposer.propose(ids, min(K, len(answer) - done - 1))
        # Row j's logits: the target's next word after the words so far and drafts[:j] (greedy: the
        # next word of ANSWER, where the words so far follow ANSWER; else its first word).
        rows = []
        for j in range(len(drafts) + 1):
            right = ids[len(PROMPT):] + drafts[:j] == answer[:done + j]
            rows.append(answer[done + j] if right else answer[0])
        logits = torch.nn.functional.one_hot(torch.tensor(rows), len(WORDS)).float() * 10
        seq = SimpleNamespace(token_ids=ids, num_prompt_tokens=len(PROMPT), sampling_params=params, generator=None)
        out = rejection(logits, [seq], [drafts])
        emitted = out.accepted_token_ids[0] + out.token_ids
        steps.append({"drafts": len(drafts), "accepted": len(out.accepted_token_ids[0]),
                      "words": [WORDS[t] for t in emitted]})
        ids = ids + emitted
    return steps


def figure_speculative(out: Path) -> Path:
    steps = trace()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    for x, s in enumerate(steps, start=1):
        rejected = s["drafts"] - s["accepted"]
        left.bar(x, s["accepted"], color="#74c476", edgecolor="white")
        left.bar(x, 1, bottom=s["accepted"], color="#3182bd", edgecolor="white")
        left.bar(x, rejected, bottom=s["accepted"] + 1, color="#fcbba1", edgecolor="white", hatch="//")
        left.text(x, s["drafts"] + 1.15, "\n".join(s["words"]), ha="center", va="bottom", fontsize=6)
    left.set_ylim(0, K + 1 + 5.5)
    left.set_xticks(range(1, len(steps) + 1))
    left.set_xlabel("decode step after the prompt (each verifies its drafts)", fontsize=8)
    left.set_ylabel("tokens", fontsize=8)
    left.set_title(f"Per step: drafts accepted (green), the target's own token (blue),\ndrafts rejected "
                   f"(red, rolled back); the words emitted above. k = {K}", fontsize=9)
    positions = range(1, K + 1)
    reached = [sum(s["drafts"] >= p for s in steps) for p in positions]
    accepted = [sum(s["accepted"] >= p for s in steps) for p in positions]
    right.bar(positions, [a / max(1, len(steps)) for a in accepted], color="#74c476")
    for p, a, r in zip(positions, accepted, reached):
        right.text(p, a / max(1, len(steps)) + 0.02, f"{a}/{len(steps)}\n({r} drafted)", ha="center", fontsize=7)
    right.set_ylim(0, 1.25)
    right.set_xticks(list(positions))
    right.set_xlabel("draft position", fontsize=8)
    right.set_title("Acceptance by position\n(accepted / verification steps)", fontsize=9)
    total = sum(len(s["words"]) for s in steps)
    fig.suptitle(f"Cycle 10's n-gram proposer and rejection sampler on a toy copy task: {total} tokens in "
                 f"{len(steps)} steps instead of {total}", fontsize=9)
    fig.tight_layout()
    path = out / "ch12_speculative.png"
    fig.savefig(path, dpi=110, metadata={"Software": None})   # no version stamp: the same bytes each run
    plt.close(fig)
    return path


if __name__ == "__main__":   # scripts/make_figures.py draws it with the others
    print(figure_speculative(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "figures"))
