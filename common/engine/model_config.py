"""A model's config.json, read by the engine itself.

The engines implement two architectures (Llama and Qwen3) and read a dozen numbers from
config.json. transformers' AutoConfig would read them too, but importing its config classes
pulls in a large part of transformers and torch.distributed: ~4 s per process on a 2-core CPU,
paid by every engine start, server start and benchmark process. Reading the JSON ourselves
also lets us refuse what the engines do not implement (RoPE scaling, sliding windows, another
activation) instead of ignoring it.

The attribute names are transformers' own, so `ModelConfig` and a transformers config are
interchangeable wherever the engines read a config (tests build models from either).
"""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

# Values transformers assumes when config.json leaves a field out (LlamaConfig, Qwen3Config).
_DEFAULTS = {
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048, "head_dim": None},
    "qwen3": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768, "head_dim": 128},
}


@dataclass(frozen=True)
class ModelConfig:
    architectures: list[str]
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None          # None: hidden_size // num_attention_heads
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    eos_token_id: int | list[int] | None
    initializer_range: float


def load_model_config(path: str | pathlib.Path) -> ModelConfig:
    """Read `path`/config.json; ValueError names the field when the engines cannot run it."""
    file = pathlib.Path(path) / "config.json"
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{file} cannot be read: {error}") from error
    model_type = data.get("model_type")
    if model_type not in _DEFAULTS:
        raise ValueError(f"{file}: model_type {model_type!r} is not supported; this course implements "
                         f"{sorted(_DEFAULTS)}")
    _refuse_unimplemented(data, file)
    defaults = _DEFAULTS[model_type]
    try:
        heads = int(data["num_attention_heads"])
        return ModelConfig(
            architectures=list(data.get("architectures") or []), model_type=model_type,
            vocab_size=int(data["vocab_size"]), hidden_size=int(data["hidden_size"]),
            intermediate_size=int(data["intermediate_size"]), num_hidden_layers=int(data["num_hidden_layers"]),
            num_attention_heads=heads, num_key_value_heads=int(data.get("num_key_value_heads") or heads),
            head_dim=data.get("head_dim", defaults["head_dim"]),
            rms_norm_eps=float(data.get("rms_norm_eps", defaults["rms_norm_eps"])),
            rope_theta=_rope_theta(data, defaults["rope_theta"]),
            max_position_embeddings=int(data.get("max_position_embeddings", defaults["max_position_embeddings"])),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            attention_bias=bool(data.get("attention_bias", False)), mlp_bias=bool(data.get("mlp_bias", False)),
            eos_token_id=data.get("eos_token_id"), initializer_range=float(data.get("initializer_range", 0.02)))
    except KeyError as error:
        raise ValueError(f"{file} lacks {error.args[0]!r}") from error


def _rope_parameters(data: dict) -> dict:
    # transformers 5 writes rope_parameters; older files have rope_theta and rope_scaling.
    return data.get("rope_parameters") or data.get("rope_scaling") or {}


def _rope_theta(data: dict, default: float) -> float:
    return float(_rope_parameters(data).get("rope_theta", data.get("rope_theta", default)))


def _refuse_unimplemented(data: dict, file: pathlib.Path) -> None:
    rope_type = _rope_parameters(data).get("rope_type", _rope_parameters(data).get("type", "default"))
    problems = []
    if rope_type != "default":
        problems.append(f"RoPE scaling {rope_type!r} (only plain RoPE is implemented)")
    if data.get("hidden_act", "silu") != "silu":
        problems.append(f"activation {data['hidden_act']!r} (only silu is implemented)")
    if data.get("use_sliding_window"):
        problems.append("sliding-window attention")
    if problems:
        raise ValueError(f"{file}: the engines do not implement " + "; ".join(problems))
