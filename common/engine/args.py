"""The model arguments every command line shares: --model, --weights, --device, --dtype, --option.

run.py, serve.py, compare.py and the per-engine benchmark all build an engine from the same five
choices, so they declare them here, once, and read --option KEY=VALUE with `parse_options`.
vLLM's own flags for the engine options a reader meets first (--max-num-batched-tokens 512,
--speculative-config '{...}') are the same thing: each adds its KEY=VALUE to --option, so every
command, and every engine compare.py starts, sees one list. An engine that does not take an option
refuses it (its Config has no such field); compare.py passes each engine only the ones it takes.
"""

import argparse
import json

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
    flags = parser.add_argument_group("vLLM's names for engine options (each is --option KEY=VALUE)")
    for flag, metavar in VLLM_FLAGS.items():
        flags.add_argument(flag, action=_AsOption, metavar=metavar)
    for name in SWITCHES:     # --enable-prefix-caching / --no-enable-prefix-caching, as vLLM spells them
        flags.add_argument(f"--{name}", f"--no-{name}", action=_AsOption, nargs=0)


# flag -> metavar. The engine checks every value, as it checks an option given with --option.
VLLM_FLAGS = {"--max-num-seqs": "N", "--max-num-batched-tokens": "N", "--block-size": "N",
              "--gpu-memory-utilization": "FRACTION", "--long-prefill-token-threshold": "N",
              "--speculative-config": "JSON", "--tensor-parallel-size": "N"}
SWITCHES = ("enable-prefix-caching", "enable-chunked-prefill", "enforce-eager")


class _AsOption(argparse.Action):
    """--max-num-batched-tokens 512 -> --option max_num_batched_tokens=512; --no-enforce-eager ->
    --option enforce_eager=false."""

    def __call__(self, parser, namespace, value, option_string=None):
        key = option_string.lstrip("-").removeprefix("no-").replace("-", "_")
        if self.nargs == 0:
            value = "false" if option_string.startswith("--no-") else "true"
        namespace.option = [*(namespace.option or []), f"{key}={value}"]


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
    if value.startswith("{"):            # a JSON object, e.g. speculative_config={"method": "ngram", ...}
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--option value {value!r} is not valid JSON: {e}") from None
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
