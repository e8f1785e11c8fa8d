"""The model runner: owns the model and the static batch's KV cache, and runs one step on them.

ModelRunner(config, source) builds the model (on the meta device, then filled with the weights).
allocate_kv_cache() reserves a contiguous cache for a static batch, free_kv_cache() drops it.
run() turns a step into tensors, runs the model once and samples. Prefill is the left-padded
prompts, [B, T], written to cache columns 0 .. T-1; decode is one token per row, [B, 1], written
to the next column, so every row's cache columns stay aligned. A sequence that finished leaves the
batch: its row is dropped and the rows after it move up.
"""

import torch

from common.engine.cpu_gemm import pack_linear_weights
from common.engine.cpu_memory import keep_freed_memory
from common.engine.memory import weight_bytes
from common.engine.model_source import load_weights

from .config import Config
from .kv_cache import ContiguousKVCache
from .model import CausalLM
from .sampler import Sampler, SamplerOutput, prompt_logprobs_for
from .sequence import Sequence


class ModelRunner:
    def __init__(self, config: Config, source, eos_token_ids=()):
        self.config = config
        self.device = config.device
        self.model = build_model(source, config.device, config.dtype)
        # On a CPU: weights packed once for oneDNN, freed memory kept for the next step (chapter 1).
        self.linear_backend = pack_linear_weights(self.model, config.device, config.dtype, config.cpu_fast_paths)
        self.malloc = keep_freed_memory(config.device, config.cpu_fast_paths)
        self.sampler = Sampler(config.device, config.seed, eos_token_ids)   # eos: for min_tokens
        self.kv_cache: ContiguousKVCache | None = None
        self.num_columns = 0      # cache columns filled so far, the same for every row
        self.pads = None          # each row's left padding, set by the prefill

    def allocate_kv_cache(self, seqs: list[Sequence]) -> None:
        """Room for the longest prompt plus the largest max_tokens, for every row of the batch."""
        attn = self.model.model.layers[0].self_attn
        max_len = max(len(s) for s in seqs) + max(s.sampling_params.max_tokens for s in seqs)
        self.kv_cache = ContiguousKVCache(self.model.config.num_hidden_layers, len(seqs), attn.num_kv_heads,
                                          max_len, attn.head_dim, self.config.dtype, self.device)
        self.num_columns = 0
        self.rows = [s.seq_id for s in seqs]   # the sequence in each row of the cache

    def free_kv_cache(self) -> None:
        self.kv_cache = None

    def stats(self) -> dict:
        return {"weight_bytes": weight_bytes(self.model), "linear_backend": self.linear_backend, "malloc": self.malloc}

    # --- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> SamplerOutput:
        """One forward over the step's tokens; returns one sampled token per sequence
        (and the logprobs of the sequences that ask)."""
        if len(seqs) < len(self.rows):   # some sequences finished: their rows leave the batch
            self._keep_rows(seqs)
        input_ids, positions, mask = self._prepare_prefill(seqs) if is_prefill else self._prepare_decode(seqs)
        hidden = self.model(input_ids, positions, mask, self.kv_cache, start=self.num_columns)
        self.num_columns += input_ids.shape[1]
        logits = self.model.compute_logits(hidden[:, -1])
        out = self.sampler(logits, seqs)
        prompt_rows = lambda i: hidden[i, -len(seqs[i]):]   # seqs[i]'s positions
        out.prompt_logprobs = prompt_logprobs_for(seqs, self.model.compute_logits, prompt_rows)
        return out

    def _keep_rows(self, seqs: list[Sequence]) -> None:
        """Keep the cache rows of `seqs` only, in order, and their padding."""
        keep = [self.rows.index(s.seq_id) for s in seqs]
        self.kv_cache.keep_rows(keep, self.num_columns)
        self.pads = self.pads[keep]
        self.rows = [s.seq_id for s in seqs]

    def _prepare_prefill(self, seqs: list[Sequence]):
        """Pad on the left so every row's last token sits in the last column.

        Returns input_ids and positions [B, T] and the attention mask [B, T, T]: causal, never
        looking at padding (a padding row looks only at itself, so its softmax stays finite).
        """
        tokens = [s.token_ids for s in seqs]
        longest = max(len(t) for t in tokens)
        pads = torch.tensor([longest - len(t) for t in tokens], device=self.device)
        input_ids = torch.tensor([[0] * (longest - len(t)) + t for t in tokens], device=self.device)
        columns = torch.arange(longest, device=self.device)
        positions = (columns.unsqueeze(0) - pads.unsqueeze(1)).clamp(min=0)
        is_real = columns.unsqueeze(0) >= pads.unsqueeze(1)                       # [B, T]
        causal = columns.unsqueeze(1) >= columns.unsqueeze(0)                     # [T, T]
        mask = causal & is_real.unsqueeze(1) | torch.eye(longest, dtype=torch.bool, device=self.device)
        self.pads = pads          # a row's position is its cache column less its padding
        return input_ids, positions, mask

    def _prepare_decode(self, seqs: list[Sequence]):
        """One new token per row, [B, 1], at cache column num_columns; it may attend to every
        non-padding column up to and including its own."""
        column = self.num_columns
        input_ids = torch.tensor([[s.last_token] for s in seqs], device=self.device)
        positions = (column - self.pads).unsqueeze(1)
        keys = torch.arange(column + 1, device=self.device)
        mask = (keys.unsqueeze(0) >= self.pads.unsqueeze(1)).unsqueeze(1)     # [B, 1, column+1]
        return input_ids, positions, mask


def build_model(source, device: torch.device, dtype: torch.dtype) -> CausalLM:
    # Build on the meta device (no memory, no random init), then allocate and fill with the weights.
    with torch.device("meta"):
        model = CausalLM(source.config)
    model = model.to(dtype=dtype).to_empty(device=device)
    if source.config.tie_word_embeddings:  # to_empty breaks the tie: restore it
        model.lm_head.weight = model.model.embed_tokens.weight
    load_weights(model, source)
    return model.eval()
