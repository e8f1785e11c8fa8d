"""Cycle 1's transformer against HF transformers' logits, in fp32, on tiny random checkpoints."""

import pytest
import torch

from conftest import cycle


@pytest.mark.parametrize("ckpt", ["qwen3", "qwen3_untied", "llama"])
def test_logits_match_hf(ckpt, tiny_checkpoints):
    path, hf = tiny_checkpoints[ckpt]
    llm = cycle("cycle1_naive").LLM(path, device="cpu")
    prompts = [[5, 9, 13, 70, 22, 8, 3], [40, 41, 42]]
    Sequence, params = cycle("cycle1_naive").sequence.Sequence, cycle("cycle1_naive").SamplingParams()
    input_ids, positions, mask = llm.model_runner._prepare([Sequence(i, None, p, params, None) for i, p in enumerate(prompts)])
    model = llm.model_runner.model
    with torch.no_grad():
        ours = model.compute_logits(model(input_ids, positions, mask))
        for row, prompt in enumerate(prompts):
            ref = hf(torch.tensor([prompt])).logits[0]
            got = ours[row, -len(prompt):]
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_untied_checkpoint_keeps_its_own_lm_head(tiny_checkpoints):
    llm = cycle("cycle1_naive").LLM(tiny_checkpoints["qwen3_untied"][0], device="cpu")
    model = llm.model_runner.model
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    model = cycle("cycle1_naive").LLM(tiny_checkpoints["qwen3"][0], device="cpu").model_runner.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import GPT2Config
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2)
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ValueError, match="not supported"):
        cycle("cycle1_naive").model.CausalLM(config)
