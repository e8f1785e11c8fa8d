"""Shared fixtures. A new cycle joins the whole suite by adding its package name to CYCLES."""

import importlib
import os

import pytest
import torch

# Without a GPU, our Triton kernels (cycles 6 and 7) are tested in Triton's interpreter. Triton reads
# TRITON_INTERPRET when a kernel is defined, i.e. when its module is first imported; the cycles
# import their kernel modules lazily (when an engine or a test asks for the triton path), and this
# file runs before any test module, so setting it here covers every test. With a GPU it stays
# unset and the real compiled kernels are tested. setdefault: an explicit value from the shell wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

CYCLES = [
    "cycle1_naive",
    "cycle2_kvcache",
    "cycle3_paged",
    "cycle4_batching",
    "cycle5_prefix",
    "cycle6_flash",
    "cycle7_int8",
    "cycle8_graphs",   # the bonus: cycle 7 + decode as a CUDA graph replay; its tokens equal cycle 7's
    "cycle9_chunked",  # bonus 2: cycle 8 + chunked prefill in mixed steps; its tokens equal cycle 8's
    "cycle10_speculative",  # bonus 3: cycle 9 + n-gram speculative decoding (off by default); tokens equal cycle 9's
    "cycle11_tp",  # bonus 4: cycle 10 + tensor parallelism (tensor_parallel_size=1 by default); tokens equal cycle 10's
]

# Exact cycles must reproduce cycle 1 (and HF) token for token; the int8 cycles are measured instead
# (cycle 7 against cycle 6; cycle 8 must equal cycle 7: tests/test_graphs.py; cycle 9 cycle 8:
# tests/test_chunked.py; cycle 10 cycle 9: tests/test_speculative.py; cycle 11 cycle 10: tests/test_tp.py).
INT8_CYCLES = ["cycle7_int8", "cycle8_graphs", "cycle9_chunked", "cycle10_speculative", "cycle11_tp"]
EXACT_CYCLES = [c for c in CYCLES if c not in INT8_CYCLES]

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    """A TCP port nothing listens on now, on the loopback address (for a server a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cycle(name: str):
    return importlib.import_module(name)


def tiny_config(arch: str, **overrides):
    """A tiny random config of the given architecture; head_dim differs from hidden / heads."""
    from transformers import LlamaConfig, Qwen3Config

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    if arch == "qwen3":
        return Qwen3Config(**common, rope_theta=1e6 if "rope_theta" not in overrides else overrides["rope_theta"])
    return LlamaConfig(**common)


def save_tiny_checkpoint(path, arch: str, seed: int = 0, **overrides):
    """save_pretrained a randomly initialised HF model (and a byte-level tokenizer) into `path`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    config.architectures = ["Qwen3ForCausalLM" if arch == "qwen3" else "LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Larger weights than the default init make the next-token distribution sharp, so greedy
    # argmax never hinges on a near-tie that rounding could flip between engines.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    _byte_tokenizer().save_pretrained(path)
    return model.eval()


def _byte_tokenizer():
    """A character-level tokenizer over printable ASCII (ids 3..97); 0 unk, 1 bos, 2 eos."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(3)}
    vocab.update({chr(b): 3 + b - 32 for b in range(32, 127)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<1>", eos_token="<2>", unk_token="<0>")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Three saved checkpoints: Qwen3 tied, Qwen3 untied, Llama (SmolLM2's architecture)."""
    root = tmp_path_factory.mktemp("tiny")
    specs = {"qwen3": ("qwen3", {}), "qwen3_untied": ("qwen3", {"tie_word_embeddings": False}),
             "llama": ("llama", {"head_dim": 16})}
    out = {}
    for name, (arch, overrides) in specs.items():
        path = root / name
        model = save_tiny_checkpoint(path, arch, **overrides)
        out[name] = (str(path), model)
    return out


@pytest.fixture(scope="module")
def tiny_llms(tiny_checkpoints):
    """tiny_llms(cycle, ckpt="qwen3", **options): an engine on a tiny checkpoint, on the CPU,
    built once per test module (engines keep no state between generate calls)."""
    cache = {}

    def get(cycle_name, ckpt="qwen3", **options):
        key = (cycle_name, ckpt, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = cycle(cycle_name).LLM(tiny_checkpoints[ckpt][0], device="cpu", **options)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def smollm2_hf():
    """HF transformers' own SmolLM2 model on the same real weights our engines load."""
    from transformers import AutoModelForCausalLM
    from common.engine.model_source import resolve_model

    source = resolve_model(SMOLLM2)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    return source, model


@pytest.fixture(scope="session")
def char_checkpoint(tmp_path_factory):
    """A tiny Qwen3 checkpoint whose vocabulary is exactly the character tokenizer's (98 ids): every
    generated token decodes to a character, so text comparisons (streaming, stop strings) mean something."""
    path = tmp_path_factory.mktemp("tiny_chars")
    save_tiny_checkpoint(path, "qwen3", vocab_size=98)
    return str(path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from more threads, and lose a lot when the cores are busy: a test
    module that runs many of them asks for this (pytestmark = pytest.mark.usefixtures(...))."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
