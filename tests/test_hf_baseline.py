"""Tests for the HuggingFace transformers baseline (common/benchmark/hf_baseline.py), on a tiny random Llama."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from common.benchmark.hf_baseline import _useful_tokens, run_hf

EOS = 3
RESULT_KEYS = {
    "engine",
    "wall_s",
    "output_tokens",
    "throughput_tok_s",
    "ttft_s",
    "latency_s",
    "token_ids",
    "peak_memory_bytes",
    "weight_bytes",
    "attn_implementation",
    "cb_settings",
    "unsupported_settings",
}


def _tiny_config(tie_word_embeddings: bool) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=0,
        tie_word_embeddings=tie_word_embeddings,
    )


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny random Llama (untied, so greedy outputs vary instead of echoing the last token)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    AutoModelForCausalLM.from_config(_tiny_config(tie_word_embeddings=False)).save_pretrained(path)
    return str(path)


def _requests():
    # Different prompt lengths (exercises padding), different max_tokens, all ignoring EOS.
    return [
        SimpleNamespace(prompt_token_ids=[5, 6, 7], max_tokens=4, ignore_eos=True),
        SimpleNamespace(prompt_token_ids=list(range(10, 22)), max_tokens=7, ignore_eos=True),
        SimpleNamespace(prompt_token_ids=[8, 9], max_tokens=2, ignore_eos=True),
    ]


def _check_result(result, requests, engine):
    assert set(result) == RESULT_KEYS
    assert result["engine"] == engine
    assert [len(ids) for ids in result["token_ids"]] == [r.max_tokens for r in requests]
    assert result["output_tokens"] == sum(r.max_tokens for r in requests)
    assert result["wall_s"] > 0
    assert result["throughput_tok_s"] == pytest.approx(result["output_tokens"] / result["wall_s"])
    assert len(result["ttft_s"]) == len(result["latency_s"]) == len(requests)
    for ttft, latency in zip(result["ttft_s"], result["latency_s"]):
        assert 0 < ttft <= latency <= result["wall_s"]
    assert result["peak_memory_bytes"] is None  # CPU: the caller measures RSS
    assert result["weight_bytes"] > 0
    assert result["attn_implementation"]


def _reference_greedy(model_dir, request):
    """One request alone, unpadded, with no EOS stopping: the order/padding-independent expected output."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([request.prompt_token_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=request.max_tokens, eos_token_id=[], pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("mode", ["generate", "generate_batch"])
def test_schema_lengths_and_order(tiny_model_dir, mode):
    requests = _requests()
    # max_num_seqs=2 forces two static groups / a queued request under continuous batching.
    result = run_hf(tiny_model_dir, requests, "cpu", torch.float32, mode, max_num_seqs=2)
    _check_result(result, requests, f"hf_{mode}")
    # Outputs come back in input order: each matches that request run on its own.
    for request, token_ids in zip(requests, result["token_ids"]):
        assert token_ids == _reference_greedy(tiny_model_dir, request)


@pytest.mark.parametrize("mode", ["generate", "generate_batch"])
def test_eos_stops_only_requests_that_do_not_ignore_it(tmp_path, mode):
    """Make the 2nd greedy token of a prompt the EOS; in one batch, a request honouring EOS stops there while an
    identical one with ignore_eos runs to max_tokens with the very same tokens."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(tie_word_embeddings=False))
    model.save_pretrained(tmp_path)
    prompt = [5, 6, 7]
    full = _reference_greedy(str(tmp_path), SimpleNamespace(prompt_token_ids=prompt, max_tokens=6))
    model.generation_config.eos_token_id = full[1]
    model.save_pretrained(tmp_path)

    requests = [
        SimpleNamespace(prompt_token_ids=prompt, max_tokens=6, ignore_eos=False),
        SimpleNamespace(prompt_token_ids=prompt, max_tokens=6, ignore_eos=True),
    ]
    result = run_hf(str(tmp_path), requests, "cpu", torch.float32, mode)
    assert result["token_ids"] == [full[: full.index(full[1]) + 1], full]
    assert result["output_tokens"] == len(result["token_ids"][0]) + 6


def test_state_dict_without_tied_lm_head(tmp_path):
    """Random-weight runs pass HF-named weights; a tied lm_head may be missing from them."""
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(_tiny_config(tie_word_embeddings=True))
    model.config.save_pretrained(tmp_path)  # config only, no safetensors
    state_dict = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    requests = _requests()
    result = run_hf(str(tmp_path), requests, "cpu", torch.float32, "generate", state_dict=state_dict)
    _check_result(result, requests, "hf_generate")
    # Tied weights count once: embeddings (128 x 64) are not doubled by the lm_head.
    assert result["weight_bytes"] == sum(p.numel() * 4 for p in model.parameters())


def test_state_dict_mismatch_is_an_error(tmp_path):
    model = AutoModelForCausalLM.from_config(_tiny_config(tie_word_embeddings=False))
    model.config.save_pretrained(tmp_path)
    state_dict = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # untied: really missing
    with pytest.raises(ValueError, match="lm_head"):
        run_hf(str(tmp_path), _requests(), "cpu", torch.float32, "generate", state_dict=state_dict)


def test_useful_tokens_stops_at_eos_unless_ignored():
    request = SimpleNamespace(prompt_token_ids=[1], max_tokens=4, ignore_eos=False)
    assert _useful_tokens([9, EOS, 9, 9, 9], request, [EOS]) == [9, EOS]
    request.ignore_eos = True
    assert _useful_tokens([9, EOS, 9, 9, 9], request, [EOS]) == [9, EOS, 9, 9]


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown mode"):
        run_hf("unused", _requests(), "cpu", torch.float32, "vllm")


# --------------------------------------------------------------------------------------------------------------------
# Fair settings: the cycles' limits, the names each transformers release takes, one weight count
# --------------------------------------------------------------------------------------------------------------------


def test_cb_settings_take_the_name_this_release_uses_and_report_the_rest():
    from common.benchmark.hf_baseline import cb_field_names

    settings = {"page_size": 256, "num_blocks": 9, "max_batch_tokens": 512, "no_such_field": 1}
    # transformers 5.17 calls the page size block_size
    passed, unsupported = cb_field_names(settings, {"block_size", "num_blocks", "max_batch_tokens"})
    assert passed == {"block_size": 256, "num_blocks": 9, "max_batch_tokens": 512}
    assert unsupported == ["no_such_field"]
    passed, _ = cb_field_names(settings, {"page_size", "block_size", "num_blocks"})
    assert passed["page_size"] == 256 and "block_size" not in passed


def test_cb_config_of_the_installed_release_takes_every_setting():
    from common.benchmark.hf_baseline import _cb_config

    requests = _requests()
    config, passed, unsupported = _cb_config(requests, 2, {"max_batch_tokens": 96})
    assert unsupported == [] and config.max_batch_tokens == 96 and config.max_requests_per_batch == 2
    assert passed["max_batch_tokens"] == 96


def test_missing_workload_hints_are_reported(tiny_model_dir, monkeypatch):
    import common.benchmark.hf_baseline as hf

    monkeypatch.setattr(hf, "WorkloadHints", None)
    result = run_hf(tiny_model_dir, _requests(), "cpu", torch.float32, "generate_batch", max_num_seqs=2)
    assert result["unsupported_settings"] == ["workload_hints"]
    assert [len(t) for t in result["token_ids"]] == [r.max_tokens for r in _requests()]


@pytest.mark.parametrize("ckpt", ["qwen3", "qwen3_untied"])
def test_weight_bytes_mean_the_same_as_the_cycles(tiny_checkpoints, tiny_llms, ckpt):
    from cycle1_naive import SamplingParams

    path, _ = tiny_checkpoints[ckpt]
    result = run_hf(path, _requests(), "cpu", torch.float32, "generate")
    llm = tiny_llms("cycle1_naive", ckpt)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=1))
    assert result["weight_bytes"] == llm.stats["weight_bytes"]


def test_bench_gives_hf_the_cycles_limits_and_reports_what_it_cannot_take(tiny_checkpoints):
    from common.benchmark.bench import run_engine
    from cycle4_batching.config import DEFAULTS

    path, _ = tiny_checkpoints["llama"]
    batch = run_engine("hf_generate_batch", "throughput", "cpu", path, quick=True,
                       options={"max_num_batched_tokens": 64})
    assert batch["stats"]["max_num_seqs"] == DEFAULTS["cpu"]["max_num_seqs"]
    assert batch["stats"]["cb_settings"]["max_batch_tokens"] == 64
    assert batch["stats"]["cb_settings"]["max_requests_per_batch"] == DEFAULTS["cpu"]["max_num_seqs"]
    assert batch["ignored_options"] == [] and batch["attention_backend"] and batch["int8_path"] is None

    static = run_engine("hf_generate", "throughput", "cpu", path, quick=True,
                        options={"max_num_batched_tokens": 64, "max_num_seqs": 2})
    assert static["ignored_options"] == ["max_num_batched_tokens"]   # static generate has no token budget
    assert static["stats"]["max_num_seqs"] == 2
    assert static["token_ids"] == batch["token_ids"]
