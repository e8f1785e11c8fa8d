"""A request's sampling fields -> the cycle's SamplingParams, with vLLM's defaults and edge cases.

Defaults. vLLM's default (`--generation-config auto`) takes the sampling defaults the model's
authors wrote into generation_config.json (Qwen3: temperature 0.6, top_p 0.95, top_k 20);
`--generation-config vllm` takes the neutral ones (temperature 1, top_p 1, no top-k). A field the
request leaves out or sets to null gets the default; a value the request gives always wins.

Greedy. A temperature below 1e-5 is treated as 0 (greedy), as vLLM does: dividing float32 logits
by 1e-44 overflows them to inf, and the sampler would then pick token 0 on every step.
"""

import json
import math
import pathlib
import sys

from common.serving.logprobs import logprob_params
from common.serving.openai_protocol import ENGINE_FIELDS, APIError

NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
GREEDY_BELOW = 1e-5
COMPLETIONS_MAX_TOKENS = 16        # OpenAI's and vLLM's default for /v1/completions
# generation_config.json keys vLLM reads as sampling defaults -> the request field they set.
_GENERATION_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                    "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(model_dir: str, mode: str = "auto") -> dict:
    """The sampling defaults to serve with: the neutral ones, overridden (mode "auto") by the
    model's generation_config.json. Prints what it took, so a changed default is never silent."""
    if mode not in ("auto", "vllm"):
        raise ValueError(f"--generation-config must be 'auto' or 'vllm', got {mode!r}")
    defaults = dict(NEUTRAL)
    path = pathlib.Path(model_dir) / "generation_config.json"
    if mode == "vllm" or not path.exists():
        return defaults
    config = json.loads(path.read_text())
    found = {field: config[key] for key, field in _GENERATION_KEYS.items() if config.get(key) is not None}
    if found:
        print(f"sampling defaults from {path}: {found} (--generation-config vllm for the neutral ones)",
              file=sys.stderr)
    return defaults | found


def unusable_defaults(defaults: dict, params_cls) -> list[str]:
    """Defaults the engine cannot apply (e.g. generation_config's repetition_penalty on an engine
    without penalties): the server prints them at start-up and serves without them."""
    fields = getattr(params_cls, "__dataclass_fields__", {})
    return [k for k in defaults if k in ENGINE_FIELDS and k not in fields and defaults[k] != ENGINE_FIELDS[k]]


def _pick(body, name: str, defaults: dict):
    value = getattr(body, name, None)
    if value is None:
        value = (body.model_extra or {}).get(name)
    return defaults.get(name, NEUTRAL.get(name)) if value is None else value


def build_sampling_params(body, defaults: dict, params_cls, max_tokens: int):
    """The SamplingParams of one request (its own validation included): 400 naming the field."""
    temperature = _pick(body, "temperature", defaults)
    if not math.isfinite(temperature):
        raise APIError(400, f"temperature must be a finite number, got {temperature}", param="temperature")
    fields = {"temperature": 0.0 if temperature < GREEDY_BELOW and temperature >= 0 else temperature,
              "top_p": _pick(body, "top_p", defaults), "top_k": _pick(body, "top_k", defaults),
              "seed": body.seed, "stop": body.stop, "ignore_eos": bool(body.ignore_eos), "max_tokens": max_tokens}
    engine_has = getattr(params_cls, "__dataclass_fields__", {})
    for name in ENGINE_FIELDS:          # only those the engine has; check_fields refused the others
        value = _pick(body, name, defaults)
        if name in engine_has and value is not None:
            fields[name] = value
    try:
        fields |= logprob_params(body, chat=hasattr(body, "messages"))
        return params_cls(**fields)
    except (ValueError, TypeError) as error:
        message = str(error)
        param = next((name for name in fields if message.startswith(name) or f" {name} " in message), None)
        raise APIError(400, message, param=param) from None


def default_max_tokens(body, defaults: dict, chat: bool, room: int) -> int:
    """max_tokens when the request gives none: generation_config's max_new_tokens if any, else 16
    for completions and what is left of the context (`room`) for chat, as vLLM does."""
    if defaults.get("max_tokens") is not None:
        return min(defaults["max_tokens"], room) if chat else defaults["max_tokens"]
    return room if chat else COMPLETIONS_MAX_TOKENS
