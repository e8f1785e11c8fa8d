"""Quality of one cycle against another on the same text: teacher-forced next-token agreement
and perplexity. Used to measure cycle 7 (int8) against cycle 6 (the same engine in float).

    python -m common.benchmark.quality --cycles 6,7 [--model M] [--device cpu]

Teacher forcing: both engines read the same text and predict every next token from the true
prefix, so one early disagreement cannot snowball as it does in free generation.
"""

import argparse
import importlib
import math

import torch

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
    if spec.isdigit():
        matches = [m for m in ("cycle1_naive", "cycle2_kvcache", "cycle3_paged", "cycle4_batching",
                               "cycle5_prefix", "cycle6_flash", "cycle7_int8", "cycle8_graphs") if m.startswith(f"cycle{spec}_")]
        if matches:
            return matches[0]
    return spec


@torch.inference_mode()
def text_logits(llm, token_ids: list[int]) -> torch.Tensor:
    """fp32 logits at every position of one prompt, through the engine's own prefill path."""
    seq_mod = importlib.import_module(type(llm).__module__.rsplit(".", 1)[0] + ".sequence")
    params = importlib.import_module(type(llm).__module__.rsplit(".", 1)[0]).SamplingParams()
    seq = seq_mod.Sequence(-1, None, token_ids, params, None)
    llm.block_manager.allocate(seq)
    try:
        runner = llm.model_runner
        input_ids, positions, meta = runner._prepare([seq], True)
        return runner.model.compute_logits(runner.model(input_ids, positions, meta, runner.kv_cache))
    finally:
        llm.block_manager.free(seq)


def compare(reference, candidate, text: str = TEXT) -> dict:
    ids = reference.tokenizer(text).input_ids
    targets = torch.tensor(ids[1:])
    ref, cand = text_logits(reference, ids)[:-1].cpu(), text_logits(candidate, ids)[:-1].cpu()
    def perplexity(logits):
        return math.exp(torch.nn.functional.cross_entropy(logits, targets).item())
    return {
        "tokens": len(targets),
        "next_token_agreement": (ref.argmax(-1) == cand.argmax(-1)).float().mean().item(),
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
