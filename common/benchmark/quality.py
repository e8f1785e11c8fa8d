"""Quality of one cycle against another on the same text: teacher-forced next-token agreement
and perplexity. Used to measure cycle 7 (int8) against cycle 6 (the same engine in float).

    python -m common.benchmark.quality --cycles 6,7 [--model M] [--device cpu]

Teacher forcing: both engines read the same text and predict every next token from the true
prefix, so one early disagreement cannot snowball as it does in free generation.
"""

import argparse
import importlib
import math
from pathlib import Path

from common.engine.device import default_model, resolve_device

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from wine making. "
    "Before that, books were copied by hand, which made them rare and expensive. Within fifty "
    "years printing shops had spread to more than two hundred cities across Europe, and millions "
    "of books had been produced. Cheaper books helped literacy grow, allowed scientists to share "
    "their results precisely, and let new ideas travel faster than any authority could stop them. "
    "Water boils at one hundred degrees Celsius at sea level, and the capital of France is Paris."
)


def cycle_name(spec: str) -> str:
    """"7" -> the package at the repository root whose name starts with "cycle7_"; a name as is."""
    if spec.isdigit():
        root = Path(__file__).resolve().parents[2]
        matches = sorted(p.parent.name for p in root.glob(f"cycle{spec}_*/__init__.py"))
        if matches:
            return matches[0]
    return spec


def text_logprobs(llm, token_ids: list[int]) -> list[dict[int, float]]:
    """Per position after the first: {most likely token: its logprob, true next token: its logprob},
    through the engine's public face (prompt_logprobs, which a prefix-cache hit cannot skip)."""
    params = importlib.import_module(type(llm).__module__.rpartition(".")[0]).SamplingParams
    out = llm.generate([token_ids], params(temperature=0, max_tokens=1, prompt_logprobs=1))[0]
    return out.prompt_logprobs[1:]


def compare(reference, candidate, text: str = TEXT) -> dict:
    ids = reference.tokenizer(text).input_ids
    targets = ids[1:]
    ref, cand = text_logprobs(reference, ids), text_logprobs(candidate, ids)

    def perplexity(positions):
        return math.exp(-sum(p[t] for p, t in zip(positions, targets)) / len(targets))

    top = [(next(iter(r)), next(iter(c))) for r, c in zip(ref, cand)]   # the top-1 token comes first
    return {
        "tokens": len(targets),
        "next_token_agreement": sum(r == c for r, c in top) / len(top),
        "perplexity_reference": perplexity(ref),
        "perplexity_candidate": perplexity(cand),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m common.benchmark.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", default="6,7", help="reference,candidate (cycle 4 onward)")
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    model = args.model or default_model(device)
    ref_name, cand_name = (cycle_name(c) for c in args.cycles.split(","))
    reference = importlib.import_module(ref_name).LLM(model, device=device)
    candidate = importlib.import_module(cand_name).LLM(model, device=device)
    result = compare(reference, candidate)
    print(f"{cand_name} against {ref_name} on {model} ({reference.source.weights} weights, {device}), "
          f"{result['tokens']} tokens of text:")
    print(f"  teacher-forced next-token agreement: {result['next_token_agreement']:.1%}")
    print(f"  perplexity: {ref_name} {result['perplexity_reference']:.3f}, {cand_name} {result['perplexity_candidate']:.3f}")


if __name__ == "__main__":
    main()
