"""The model runner: owns the model, and runs one step of a static batch on it.

ModelRunner(config, source) builds the model (on the meta device, then filled with the weights).
run() turns the batch into tensors, runs the model once and samples. With no KV cache a step is
the whole left-padded batch, [B, T]: every token of every sequence, of which only the last
position's logits are kept.
"""

import torch

from common.engine.cpu_gemm import pack_linear_weights
from common.engine.cpu_memory import keep_freed_memory
from common.engine.memory import weight_bytes
from common.engine.model_source import load_weights

from .config import Config
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

    def stats(self) -> dict:
        return {"weight_bytes": weight_bytes(self.model), "linear_backend": self.linear_backend, "malloc": self.malloc}

    # --- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> SamplerOutput:
        """One forward over every token of every sequence; returns one sampled token per sequence
        (and the logprobs of the sequences that ask)."""
        input_ids, positions, mask = self._prepare(seqs)
        hidden = self.model(input_ids, positions, mask)
        logits = self.model.compute_logits(hidden[:, -1])
        out = self.sampler(logits, seqs)
        prompt_rows = lambda i: hidden[i, -len(seqs[i]):]   # seqs[i]'s positions
        out.prompt_logprobs = prompt_logprobs_for(seqs, self.model.compute_logits, prompt_rows)
        return out

    def _prepare(self, seqs: list[Sequence]):
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
