"""The engine: load a model, then generate with static batches and a contiguous KV cache.

Requests are taken in fixed groups of `max_num_seqs`. A group reserves one contiguous KV buffer
(padded prompt + largest max_tokens, for every member), runs its left-padded prompts once
(prefill), then feeds one token per sequence per step (decode): step n costs O(1) new tokens plus
attention over n cached ones. The next group starts only after the slowest member finishes.
"""

import time

import torch
from tqdm import tqdm

from common.engine.device import resolve_device, resolve_dtype
from common.engine.inputs import prepare_requests
from common.engine.memory import check_static_batch, static_batch_bytes, weight_bytes
from common.engine.metrics import peak_memory_bytes, reset_peak_memory
from common.engine.model_source import eos_token_ids, load_tokenizer, load_weights, resolve_model
from common.engine.outputs import RequestOutput

from .kv_cache import ContiguousKVCache
from .model import CausalLM
from .sampler import Sampler
from .sampling_params import SamplingParams


# The same batch limits as the continuous-batching cycles, so every cycle is measured alike.
DEFAULTS = {"cuda": dict(max_num_seqs=256), "cpu": dict(max_num_seqs=64)}

class LLM:
    def __init__(self, model: str, device=None, dtype=None, weights: str = "auto",
                 max_num_seqs: int | None = None, seed: int | None = None):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        max_num_seqs = max_num_seqs or DEFAULTS["cuda" if self.device.type == "cuda" else "cpu"]["max_num_seqs"]
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        self.source = resolve_model(model, weights)
        self.config = self.source.config
        self.tokenizer = load_tokenizer(self.source)
        self.eos_token_ids = set(eos_token_ids(self.source, self.tokenizer))
        self.max_num_seqs = max_num_seqs
        self.model = _build_model(self.config, self.source, self.device, self.dtype)
        self.sampler = Sampler(self.device, seed)
        self.stats: dict = {}

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = False) -> list[RequestOutput]:
        requests = prepare_requests(prompts, sampling_params, self.tokenizer, self.config.vocab_size,
                                    self.config.max_position_embeddings, SamplingParams)
        memory = self._check_memory(requests)  # before any work: a refusal leaves the engine as it was
        reset_peak_memory(self.device)
        start = time.perf_counter()
        self._kv_peak_bytes = 0
        self._step_times = []
        outputs = []
        bar = tqdm(total=len(requests), disable=not use_tqdm, desc="requests")
        for first in range(0, len(requests), self.max_num_seqs):
            group = requests[first:first + self.max_num_seqs]
            outputs += self._run_group(first, group, start)
            bar.update(len(group))
        bar.close()
        wall = time.perf_counter() - start
        self.stats = {
            "weight_bytes": weight_bytes(self.model),
            "kv_cache_peak_bytes": self._kv_peak_bytes,  # the reservation, padding included
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "output_tokens": sum(len(o.token_ids) for o in outputs),
            "wall_s": wall,
            "max_num_seqs": self.max_num_seqs,
            "step_times": self._step_times,  # [tokens per sequence in the step, seconds], per step
            **memory,
        }
        return outputs

    def _check_memory(self, requests) -> dict:
        """Estimate the peak of the largest static group and refuse the call if it cannot fit.

        No block pool bounds a static batch: its longest sequence decides what it allocates. The
        batch size is this engine's lesson, so a batch that does not fit is refused, never shrunk.
        """
        worst = None
        for first in range(0, len(requests), self.max_num_seqs):
            group = requests[first:first + self.max_num_seqs]
            longest = max(len(r.prompt_token_ids) for r in group)
            largest = max(r.sampling_params.max_tokens for r in group)
            seq_len, kv_tokens = longest, longest + largest  # prefill is the widest step; the cache holds all
            need = static_batch_bytes(self.config, len(group), seq_len, self.dtype, kv_tokens)
            if worst is None or need["total"] > worst[0]["total"]:
                worst = (need, dict(batch=len(group), seq_len=seq_len, longest_prompt=longest,
                                    largest_max_tokens=largest))
        need, shape = worst
        return check_static_batch(need, weight_bytes(self.model), self.device,
                                  max_num_seqs=self.max_num_seqs, **shape)

    @torch.inference_mode()
    def _run_group(self, first_id: int, group, start: float) -> list[RequestOutput]:
        tokens = [list(r.prompt_token_ids) for r in group]
        params = [r.sampling_params for r in group]
        generators = [_request_generator(p.seed, self.device) for p in params]
        outputs = [RequestOutput(first_id + i, r.prompt, r.prompt_token_ids, [], "", "")
                   for i, r in enumerate(group)]
        cache = self._reserve_cache(tokens, params)
        # Prefill: the whole padded prompts once, filling cache columns 0 .. longest-1.
        input_ids, positions, mask = self._left_pad(tokens)
        column = input_ids.shape[1]  # the next free cache column, the same for every row
        last = time.perf_counter() - start
        pads = torch.tensor([column - len(t) for t in tokens], device=self.device)
        hidden = self.model(input_ids, positions, mask, cache, start=0)
        live = list(range(len(group)))
        while True:
            logits = self.model.compute_logits(hidden[:, -1])
            next_tokens = self.sampler(logits, params, generators)
            now = time.perf_counter() - start
            self._step_times.append([column, now - last])
            last = now
            for i in list(live):
                out = outputs[i]
                out.token_ids.append(next_tokens[i])
                tokens[i].append(next_tokens[i])
                if out.metrics.ttft_s is None:
                    out.metrics.ttft_s = now
                reason = self._finish_reason(out.token_ids, params[i])
                if reason:
                    out.finish_reason, out.metrics.latency_s = reason, now
                    live.remove(i)
            if not live:
                break
            # Decode: one new token per row (finished rows too: static batching), at cache column
            # `column`; it may attend to every non-padding column up to and including its own.
            input_ids = torch.tensor(next_tokens, device=self.device).unsqueeze(1)
            positions = (column - pads).unsqueeze(1)
            keys = torch.arange(column + 1, device=self.device)
            mask = (keys.unsqueeze(0) >= pads.unsqueeze(1)).unsqueeze(1)     # [B, 1, column+1]
            hidden = self.model(input_ids, positions, mask, cache, start=column)
            column += 1
        for out in outputs:
            out.text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        return outputs

    def _reserve_cache(self, tokens, params) -> ContiguousKVCache:
        """Room for the longest prompt plus the largest max_tokens, for every row of the batch."""
        attn = self.model.model.layers[0].self_attn
        max_len = max(len(t) for t in tokens) + max(p.max_tokens for p in params)
        cache = ContiguousKVCache(self.config.num_hidden_layers, len(tokens), attn.num_kv_heads, max_len,
                                  attn.head_dim, self.dtype, self.device)
        self._kv_peak_bytes = max(self._kv_peak_bytes, cache.nbytes)
        return cache

    def _finish_reason(self, token_ids: list[int], params: SamplingParams) -> str | None:
        if not params.ignore_eos and token_ids[-1] in self.eos_token_ids:
            return "stop"
        if len(token_ids) >= params.max_tokens:
            return "length"
        return None

    def _left_pad(self, tokens: list[list[int]]):
        """Pad on the left so every row's last token sits in the last column.

        Returns input_ids and positions [B, T] and the attention mask [B, T, T]: causal, never
        looking at padding (a padding row looks only at itself, so its softmax stays finite).
        """
        longest = max(len(t) for t in tokens)
        pads = torch.tensor([longest - len(t) for t in tokens], device=self.device)
        input_ids = torch.tensor([[0] * (longest - len(t)) + t for t in tokens], device=self.device)
        columns = torch.arange(longest, device=self.device)
        positions = (columns.unsqueeze(0) - pads.unsqueeze(1)).clamp(min=0)
        is_real = columns.unsqueeze(0) >= pads.unsqueeze(1)                       # [B, T]
        causal = columns.unsqueeze(1) >= columns.unsqueeze(0)                     # [T, T]
        mask = causal & is_real.unsqueeze(1) | torch.eye(longest, dtype=torch.bool, device=self.device)
        return input_ids, positions, mask


def _build_model(config, source, device, dtype) -> CausalLM:
    # Build on the meta device (no memory, no random init), then allocate and fill with the weights.
    with torch.device("meta"):
        model = CausalLM(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty breaks the tie: restore it
        model.lm_head.weight = model.model.embed_tokens.weight
    load_weights(model, source)
    return model.eval()


def _request_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
