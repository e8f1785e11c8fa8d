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
    # build_model, before the runner packs the linear layers for oneDNN (common/engine/cpu_gemm.py)
    from common.engine.model_source import resolve_model

    build = lambda name: cycle("cycle1_naive").model_runner.build_model(
        resolve_model(tiny_checkpoints[name][0]), torch.device("cpu"), torch.float32)
    model = build("qwen3_untied")
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    model = build("qwen3")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_cpu_linear_layers_are_packed_for_onednn_and_counted(tiny_checkpoints):
    from common.engine.cpu_gemm import ONEDNN_PACKED, PackedLinear, linear_backend

    if linear_backend(torch.device("cpu"), torch.float32) != ONEDNN_PACKED:
        pytest.skip("oneDNN packing applies to float32 on x86 CPUs only")
    llm = cycle("cycle1_naive").LLM(tiny_checkpoints["qwen3"][0], device="cpu")
    model, stats = llm.model_runner.model, llm.model_runner.stats()
    assert stats["linear_backend"] == ONEDNN_PACKED and isinstance(model.lm_head, PackedLinear)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    # every packed weight counts as the weight it replaced, but the tied lm_head's packed copy: the
    # embedding keeps its float table (as in vLLM's CPU backend), and the checkpoint holds it once
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    params = sum(p.numel() for p in model.parameters()) + sum(m.packed_weight.numel() for m in packed if m is not model.lm_head)
    assert stats["weight_bytes"] == 4 * params and "lm_head.packed_weight" not in model.state_dict()


def test_cpu_bf16_linear_layers_run_widened_without_native_bf16(tiny_checkpoints):
    from common.engine.cpu_gemm import ONEDNN_PACKED_WIDENED, linear_backend, native_bf16

    bf16 = cycle("cycle1_naive").LLM(tiny_checkpoints["qwen3"][0], device="cpu", dtype="bfloat16")
    model, backend = bf16.model_runner.model, bf16.model_runner.stats()["linear_backend"]
    if native_bf16() or linear_backend(torch.device("cpu"), torch.bfloat16) != ONEDNN_PACKED_WIDENED:
        assert backend == "torch" and isinstance(model.lm_head, torch.nn.Linear)
        return
    assert backend == ONEDNN_PACKED_WIDENED and model.lm_head.widen
    x = torch.randn(3, model.lm_head.in_features, dtype=torch.bfloat16)
    out = model.lm_head(x)
    # float32 products and sums over the bf16 values, rounded once to bf16 at the end
    want = (x.float() @ model.model.embed_tokens.weight.float().T).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), want.float(), rtol=1e-2, atol=1e-3)


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import GPT2Config
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2)
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ValueError, match="not supported"):
        cycle("cycle1_naive").model.CausalLM(config)
