"""HuggingFace transformers baseline, run on the same workloads as our engines.

Two modes, so each engine can be compared against what a user gets "for free":

* ``generate``: static batching with ``model.generate``. Requests are taken in order, in groups of
  ``max_num_seqs``, left-padded, and every group decodes until its longest request is done.
* ``generate_batch``: transformers' own continuous batching (a paged KV cache plus a scheduler running in a
  background thread). ``model.generate_batch`` only takes one ``max_new_tokens`` for all prompts and always
  stops at EOS, so we drive the manager it wraps (``continuous_batching_context_manager`` + ``add_request``)
  directly: that gives per-request ``max_new_tokens`` and EOS settings, and keeps the cache allocation out of the
  timed region. The batching machinery is exactly the one ``generate_batch`` uses.

Both modes decode greedily. Timings start after the model is loaded and a one-request warm-up has run; all
requests arrive at t=0, so TTFT and latency are measured from the start of the run.
"""

import dataclasses
import inspect
import math
import sys
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from common.engine.memory import weight_bytes

try:  # sizing hints for continuous batching; a release without them sizes from its defaults
    from transformers.generation.continuous_batching.utils import WorkloadHints
except ImportError:
    WorkloadHints = None

# Plain SDPA: the default for `generate`, and in transformers 5.x also the paged-cache-aware implementation that
# continuous batching accepts on CPU ("paged|sdpa"/"sdpa_paged" are deprecated spellings of it). On CUDA with
# flash-attn installed, the continuous batching manager switches itself to flash attention; we report what it used.
ATTN_IMPLEMENTATION = "sdpa"

# Continuous batching cache geometry. The page size is transformers' default. The token budget per forward pass is
# the caller's (bench.py passes the cycles' max_num_batched_tokens for the device); this default only serves direct
# calls: on CPU the eager/SDPA path pre-allocates a [max_batch_tokens, cache_tokens + max_batch_tokens] mask.
CB_PAGE_SIZE = 256
CB_MAX_BATCH_TOKENS = 512
# Fields that transformers renamed: our (newest) name -> the name older releases take. transformers 5.17 (on our GPU
# machine) calls the page size `block_size`; later releases call it `page_size` and deprecate `block_size`.
CB_FIELD_RENAMES = {"page_size": "block_size"}
# The FIFO scheduler stops admitting prefills when fewer than 15% of the blocks are free (its default safety
# margin); we size the cache so that this never throttles a workload that fits.
CB_SAFETY_MARGIN = 0.15

WARMUP_PROMPT_LEN = 8
WARMUP_NEW_TOKENS = 4


# --------------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------------


def run_hf(
    model_path: str,
    requests: list,
    device: str,
    dtype: torch.dtype,
    mode: str,
    max_num_seqs: int = 64,
    state_dict: dict | None = None,
    *,
    max_batch_tokens: int = CB_MAX_BATCH_TOKENS,
    cb_overrides: dict | None = None,
) -> dict:
    """Runs `requests` through HuggingFace transformers and returns timings, outputs and memory.

    Args:
        model_path: local HF directory (config.json, and safetensors unless `state_dict` is given).
        requests: objects with `prompt_token_ids`, `max_tokens` and `ignore_eos`; decoding is greedy.
        device: torch device string, e.g. "cpu" or "cuda".
        dtype: weights and activations dtype.
        mode: "generate" (static batching) or "generate_batch" (transformers' continuous batching).
        max_num_seqs: static batch size, or max requests per forward pass for continuous batching.
        state_dict: HF-named weights to use instead of the directory's safetensors (random-weight runs).
        max_batch_tokens: "generate_batch" only: the token budget of one forward pass.
        cb_overrides: extra `ContinuousBatchingConfig` fields for "generate_batch" (e.g. page_size, num_blocks), for
            tuning experiments.

    The result's `cb_settings` holds what the continuous batching config was given (under this release's field
    names) and `unsupported_settings` what this transformers release could not take: reported, never dropped silently.
    """
    if mode not in _RUNNERS:
        raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(_RUNNERS)}")
    if not requests:
        raise ValueError("run_hf needs at least one request")

    model = load_model(model_path, device, dtype, state_dict)
    runner = _RUNNERS[mode]
    if mode == "generate_batch":
        run = runner(model, requests, max_num_seqs, {"max_batch_tokens": max_batch_tokens} | (cb_overrides or {}))
    else:
        run = runner(model, requests, max_num_seqs)

    if run.get("unsupported_settings"):
        print(f"note: transformers {transformers.__version__} cannot take {', '.join(run['unsupported_settings'])} "
              "for continuous batching: it used its own defaults there", file=sys.stderr, flush=True)
    output_tokens = sum(len(ids) for ids in run["token_ids"])
    return {
        "engine": f"hf_{mode}",
        "wall_s": run["wall_s"],
        "output_tokens": output_tokens,
        "throughput_tok_s": output_tokens / run["wall_s"],
        "ttft_s": run["ttft_s"],
        "latency_s": run["latency_s"],
        "token_ids": run["token_ids"],
        "peak_memory_bytes": run["peak_memory_bytes"],
        "weight_bytes": weight_bytes(model),   # the cycles' helper: parameters and buffers, a tied tensor once
        "attn_implementation": run["attn_implementation"],
        "cb_settings": run.get("cb_settings", {}),
        "unsupported_settings": run.get("unsupported_settings", []),
    }


# --------------------------------------------------------------------------------------------------------------------
# Model loading and shared helpers
# --------------------------------------------------------------------------------------------------------------------


def load_model(model_path: str, device: str, dtype: torch.dtype, state_dict: dict | None = None):
    """Loads the model in eval mode; from `state_dict` when given (the directory then only holds the config)."""
    if state_dict is None:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
    else:
        config = AutoConfig.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
        _load_hf_state_dict(model, state_dict)
    return model.to(device).eval()


def _load_hf_state_dict(model, state_dict: dict) -> None:
    """Loads HF-named weights, tolerating only a missing lm_head when it is tied to the embeddings."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # A tied lm_head shares its Parameter with the input embeddings, so loading the embeddings filled it too.
    tied_names = set(getattr(model, "_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else set()
    really_missing = [name for name in missing if name not in tied_names]
    if really_missing or unexpected:
        raise ValueError(f"state_dict does not match the model: missing={really_missing}, unexpected={unexpected}")


def _eos_token_ids(model) -> list[int]:
    """The model's EOS ids as a list (generation_config may hold an int, a list or nothing)."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _pad_token_id(model, eos_ids: list[int]) -> int:
    """Any valid id works: padded positions are masked out and post-EOS fill is truncated away."""
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.config.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return pad


def _useful_tokens(generated: list[int], request, eos_ids: list[int]) -> list[int]:
    """What the request would have returned: at most max_tokens tokens, ending at the first EOS unless ignore_eos."""
    tokens = generated[: request.max_tokens]
    if not request.ignore_eos:
        for i, token in enumerate(tokens):
            if token in eos_ids:
                return tokens[: i + 1]  # the EOS itself counts as an output token, as in vLLM
    return tokens


def _sync(device: torch.device) -> None:
    """Waits for queued kernels, so wall-clock timestamps mean the work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> int | None:
    # On CPU there is no allocator counter worth reporting: the caller measures process RSS instead.
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


class _WarmupRequest:
    """Minimal request object for the warm-up run."""

    def __init__(self, prompt_token_ids: list[int]):
        self.prompt_token_ids = prompt_token_ids
        self.max_tokens = WARMUP_NEW_TOKENS
        self.ignore_eos = True


def _warmup_prompt(model) -> list[int]:
    """A short prompt of valid ids; its content does not matter, it only pays one-time costs before timing."""
    return [i % model.config.vocab_size for i in range(1, WARMUP_PROMPT_LEN + 1)]


# --------------------------------------------------------------------------------------------------------------------
# Mode "generate": static batching
# --------------------------------------------------------------------------------------------------------------------


class _TokenClock(BaseStreamer):
    """Streamer that only records when each decoding step's tokens reach the host.

    `generate` calls `put` once with the prompt, then once per step with that step's tokens (already copied to the
    CPU, which on CUDA waits for the step), so times[k] is when token k of every sequence in the batch existed.
    """

    def __init__(self):
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding keeps every prompt's last token in the last column, where generation continues."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _generation_config(group: list, eos_ids: list[int], pad_id: int) -> GenerationConfig:
    """Greedy decoding config for one static group.

    EOS stopping can only be switched off for the whole batch, so it is off as soon as one member ignores EOS; the
    others are cut at their first EOS afterwards. We switch it off with `eos_token_id=[]`: generate then builds an
    EOS stopping criterion over an empty set, which never fires, while the logits stay untouched. (`None` would be
    replaced by the model's default EOS, and `min_new_tokens` would mask EOS in the logits and change the tokens.)
    """
    stop_at_eos = not any(r.ignore_eos for r in group)
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=max(r.max_tokens for r in group),
        eos_token_id=eos_ids if stop_at_eos else [],
        pad_token_id=pad_id,
    )


def _generate_group(model, group: list, eos_ids: list[int], pad_id: int) -> tuple[list[list[int]], list[float]]:
    """Runs one static batch; returns each member's generated ids and the per-step token times."""
    input_ids, attention_mask = _left_pad([r.prompt_token_ids for r in group], pad_id, model.device)
    clock = _TokenClock()
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=_generation_config(group, eos_ids, pad_id),
        streamer=clock,
    )
    generated = output[:, input_ids.shape[1] :].tolist()
    return generated, clock.times


def _run_generate(model, requests: list, max_num_seqs: int) -> dict:
    eos_ids = _eos_token_ids(model)
    pad_id = _pad_token_id(model, eos_ids)
    device = model.device

    with torch.inference_mode():
        warm = _WarmupRequest(_warmup_prompt(model))
        _generate_group(model, [warm], eos_ids, pad_id)
        _sync(device)
        _reset_peak_memory(device)

        token_ids, ttft, latency = [], [], []
        start = time.perf_counter()
        for first in range(0, len(requests), max_num_seqs):
            group = requests[first : first + max_num_seqs]
            generated, step_times = _generate_group(model, group, eos_ids, pad_id)
            for request, tokens in zip(group, generated):
                useful = _useful_tokens(tokens, request, eos_ids)
                token_ids.append(useful)
                # Every member of the group gets its first token at the same step; its last useful token is
                # produced at step len(useful) - 1, even though the group may keep decoding for others.
                ttft.append(step_times[0] - start)
                latency.append(step_times[max(len(useful), 1) - 1] - start)
        _sync(device)
        wall_s = time.perf_counter() - start

    return _timings(wall_s, token_ids, ttft, latency, device, model.config._attn_implementation)


# --------------------------------------------------------------------------------------------------------------------
# Mode "generate_batch": transformers' continuous batching
# --------------------------------------------------------------------------------------------------------------------


def _timings(wall_s, token_ids, ttft, latency, device, attn_implementation) -> dict:
    """What both modes measure, in one shape."""
    return {"wall_s": wall_s, "token_ids": token_ids, "ttft_s": ttft, "latency_s": latency,
            "peak_memory_bytes": _peak_memory(device), "attn_implementation": attn_implementation}


def _cb_config(requests: list, max_num_seqs: int, overrides: dict) -> tuple[ContinuousBatchingConfig, dict, list[str]]:
    """Continuous batching config sized for this workload.

    `num_blocks` must be set explicitly on CPU: left to None, transformers sizes the cache at 60% of free system RAM.
    We give it room for the `max_num_seqs` largest requests at once (like an engine whose KV budget never forces
    preemption) plus the scheduler's safety margin.
    """
    page_size = overrides.get("page_size", CB_PAGE_SIZE)
    blocks_per_request = sorted(
        (math.ceil((len(r.prompt_token_ids) + r.max_tokens) / page_size) for r in requests), reverse=True
    )
    needed = sum(blocks_per_request[:max_num_seqs])
    settings = {
        "page_size": page_size,
        "num_blocks": math.ceil(needed / (1 - CB_SAFETY_MARGIN)) + 1,
        "max_batch_tokens": CB_MAX_BATCH_TOKENS,
        "max_requests_per_batch": max_num_seqs,
        # Random benchmark prompts share no prefixes; prefix sharing would only add bookkeeping.
        "allow_block_sharing": False,
    }
    settings.update(overrides)
    passed, unsupported = cb_field_names(settings, {f.name for f in dataclasses.fields(ContinuousBatchingConfig)})
    return ContinuousBatchingConfig(**passed), passed, unsupported


def cb_field_names(settings: dict, accepted: set[str]) -> tuple[dict, list[str]]:
    """Settings under the names this transformers release takes (page_size is block_size in 5.17), and the names of
    those it has no field for at all: the caller reports them."""
    passed, unsupported = {}, []
    for key, value in settings.items():
        name = key if key in accepted else CB_FIELD_RENAMES.get(key)
        if name in accepted:
            passed[name] = value
        else:
            unsupported.append(key)
    return passed, unsupported


def _workload_hints(model, requests: list) -> tuple[dict, list[str]]:
    """The hints generate_batch derives from its inputs (they size e.g. the flash decode block table), as keyword
    arguments for the context manager; where this release takes none, no keyword and the name to report."""
    takes = "workload_hints" in inspect.signature(model.continuous_batching_context_manager).parameters
    if WorkloadHints is None or not takes:
        return {}, ["workload_hints"]
    hints = WorkloadHints(max_prompt_length=max(len(r.prompt_token_ids) for r in requests),
                          max_generated_length=max(r.max_tokens for r in requests), num_requests=len(requests))
    return {"workload_hints": hints}, []


def _cb_generation_config(eos_ids: list[int], pad_id: int) -> GenerationConfig:
    """Greedy decoding; EOS and max_new_tokens are set per request in `add_request`."""
    # -1 rather than None when the model has no EOS: None makes the manager warn and then use -1 anyway.
    return GenerationConfig(do_sample=False, eos_token_id=eos_ids or -1, pad_token_id=pad_id, max_new_tokens=1)


def _submit(manager, request_id: str, request, eos_ids: list[int]) -> None:
    # eos_token_id=-1 is continuous batching's "no EOS" (negative ids are dropped from the stop set); None would fall
    # back to the generation config's EOS.
    manager.add_request(
        input_ids=list(request.prompt_token_ids),
        request_id=request_id,
        max_new_tokens=request.max_tokens,
        eos_token_id=-1 if request.ignore_eos or not eos_ids else eos_ids,
        record_timestamps=True,
    )


def _collect(manager, num_results: int) -> dict:
    """Blocks until `num_results` requests finished; returns their outputs by request id."""
    results = {}
    while len(results) < num_results:
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                raise RuntimeError(f"continuous batching stopped with {num_results - len(results)} requests pending")
            continue
        if result.is_finished():
            if result.error is not None:
                raise RuntimeError(f"request {result.request_id} failed: {result.error}")
            results[result.request_id] = result
    return results


def _run_generate_batch(model, requests: list, max_num_seqs: int, overrides: dict) -> dict:
    eos_ids = _eos_token_ids(model)
    pad_id = _pad_token_id(model, eos_ids)
    device = model.device

    cb_config, cb_settings, unsupported = _cb_config(requests, max_num_seqs, overrides)
    hints, no_hints = _workload_hints(model, requests)
    context = model.continuous_batching_context_manager(
        generation_config=_cb_generation_config(eos_ids, pad_id),
        continuous_batching_config=cb_config,
        **hints,
        block=True,
        # `warmup` here captures CUDA graphs where they are used; it also allocates the paged cache before we time.
        warmup=True,
    )
    with torch.inference_mode(), context as manager:
        # The manager may have switched attention (e.g. to flash on CUDA): record what actually runs.
        attn_implementation = model.config._attn_implementation
        _submit(manager, "warmup", _WarmupRequest(_warmup_prompt(model)), eos_ids)
        _collect(manager, 1)
        _sync(device)
        _reset_peak_memory(device)

        start = time.perf_counter()
        for index, request in enumerate(requests):
            _submit(manager, f"req_{index}", request, eos_ids)
        results = _collect(manager, len(requests))
        _sync(device)
        wall_s = time.perf_counter() - start

    token_ids, ttft, latency = [], [], []
    for index, request in enumerate(requests):
        result = results[f"req_{index}"]
        useful = _useful_tokens(list(result.generated_tokens), request, eos_ids)
        token_ids.append(useful)
        # Per-token perf_counter stamps, taken by the background loop when each token is appended (after the forward
        # pass's outputs reached the host), so they are the true first/last useful token times.
        stamps = result.timestamps
        ttft.append(stamps[0] - start)
        latency.append(stamps[max(len(useful), 1) - 1] - start)

    return _timings(wall_s, token_ids, ttft, latency, device, attn_implementation) | {
        "cb_settings": cb_settings, "unsupported_settings": unsupported + no_hints}


_RUNNERS = {"generate": _run_generate, "generate_batch": _run_generate_batch}
