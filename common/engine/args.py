"""The model arguments every command line shares: --model, --weights, --device, --dtype, --option.

run.py, serve.py, compare.py and the per-engine benchmark all build an engine from the same five
choices, so they declare them here, once, and read --option KEY=VALUE with `parse_options`.
"""

import argparse

MODEL_HELP = "HF id or local directory (default: Qwen3-0.6B on CUDA, SmolLM2-135M on CPU)"
OPTION_HELP = "an engine option, e.g. --option max_num_seqs=8 (repeatable)"


def add_model_args(parser: argparse.ArgumentParser, *, model_positional: bool = False,
                   option_help: str = OPTION_HELP) -> None:
    """Add --model (or a positional MODEL), --weights, --device, --dtype and --option KEY=VALUE.

    --model, --device and --dtype default to None: the caller resolves them (resolve_device,
    default_model), since only it knows whether a default model makes sense. --option collects
    its KEY=VALUE strings in a list; `parse_options(args.option)` turns them into engine options.
    """
    if model_positional:
        parser.add_argument("model", help="HF id or local directory")
    else:
        parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--weights", default="auto", choices=["auto", "real", "random"],
                        help="real weights or random ones of the real shape (default: auto, real when obtainable)")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps (default: cuda when present, else cpu)")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16 or float16 (default: bf16 on CUDA, fp32 elsewhere)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help=option_help)


def parse_options(pairs: list[str]) -> dict:
    """'key=value' strings to a dict; values become int, float, bool or None when they look like one."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--option expects KEY=VALUE, got {pair!r}")
        options[key] = _literal(value)
    return options


def _literal(value: str):
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value.lower() == "none":          # e.g. quantization=None
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value
