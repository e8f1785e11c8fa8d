"""Qwen3 and Llama decoder-only transformers, written out in plain torch.

Module and parameter names follow the HuggingFace checkpoints (model.layers.0.self_attn.q_proj, ...)
so a state dict loads straight in. The two architectures differ only in Qwen3's per-head RMSNorm on
q and k. Attention runs as one fused kernel (attention.py), chosen when the engine starts.

The KV cache is paged (cycle 3): each attention layer writes the K and V of the tokens it is given
into a pool of fixed-size blocks through a slot mapping, then reads each sequence's keys and values
back through its block table. Cycle 4 packs a step's tokens into one flat batch of N tokens with no
padding: every linear layer runs on [N, hidden], and only attention, which must keep sequences
apart, looks at the per-sequence layout.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from common.engine.model_source import rope_theta

from .attention import ATTENTION

ARCHITECTURES = {"Qwen3ForCausalLM": True, "LlamaForCausalLM": False}  # name -> has q/k norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.op = rms_norm            # compiled_ops.compile_small_ops() may put the compiled one here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 (bf16 loses too much in the mean of squares), scale in the input dtype.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings, computed per forward from the positions."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponent = torch.arange(0, self.head_dim, 2, device=positions.device, dtype=torch.float32) / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponent)
        angles = positions.float().unsqueeze(-1) * inv_freq      # [..., head_dim / 2]
        angles = torch.cat((angles, angles), dim=-1)              # [..., head_dim]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., heads, head_dim]; cos/sin: [..., head_dim] (broadcast over heads)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


@dataclass
class AttentionMetadata:
    """How a flat batch of N tokens from B sequences maps onto the paged cache.

    `slot_mapping` [N]: where each token's K/V is stored. `cu_seqlens_q` [B + 1]: sequence b owns
    tokens cu_seqlens_q[b] .. cu_seqlens_q[b+1]-1; `cu_seqlens_k` and `context_lens` [B] count
    its keys (cached prefix included). `block_tables` [B, max_blocks]: each sequence's blocks.
    All int32, as the kernels (flash_attn, triton) take them. Backends that take dense tensors
    (sdpa) also get the per-sequence layout [B, Tq]: `query_index` [B, Tq] picks the queries from
    the flat batch (short sequences repeat their last token), `token_index` [N] puts the results
    back, `mask` [B, Tq, max_blocks * block_size] lets each query see keys up to its own position.
    The other backends do not need it, and it is not built for them (None).
    Cycle 9: a step mixes decode rows (one query) and prompt chunks (several, after the sequence's
    computed tokens): `is_prefill` means some row has more than one query, and the first
    `num_decodes` rows have exactly one. Each row's queries are the last positions of its context,
    so query i of a row sees key j iff j <= context_len - query_len + i.
    """
    is_prefill: bool
    slot_mapping: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    query_index: torch.Tensor | None = None
    token_index: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    num_decodes: int = 0


class Attention(nn.Module):
    def __init__(self, config, qk_norm: bool, attention_backend: str):
        super().__init__()
        self.attend = ATTENTION[attention_backend]
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        bias = getattr(config, "attention_bias", False)
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        if qk_norm:  # Qwen3: RMSNorm over each head's vector, before the rotary embedding
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = qk_norm
        self.rotate = apply_rotary    # compiled_ops.compile_small_ops() may put the compiled one here

    def forward(self, x, cos, sin, meta: AttentionMetadata, k_cache, v_cache):
        """x: [N, hidden], a flat batch; k/v_cache: this layer's pool, [num_blocks, block_size, KVH, D]."""
        N = x.shape[0]
        q = self.q_proj(x).view(N, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(N, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(N, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        store_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        out = self.attend(q, k_cache, v_cache, meta, self.scale)   # [N, H, D], one fused kernel
        return self.o_proj(out.reshape(N, self.num_heads * self.head_dim))


def store_kv(k_cache, v_cache, k, v, slot_mapping: torch.Tensor) -> None:
    """Scatter the tokens' K and V [N, KVH, D] into their slots of the pool."""
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act_mul = silu_mul       # compiled_ops.compile_small_ops() may put the compiled one here

    def forward(self, x):
        return self.down_proj(self.act_mul(self.gate_proj(x), self.up_proj(x)))


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return nn.functional.silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, config, qk_norm: bool, attention_backend: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, qk_norm, attention_backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, meta, k_cache, v_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config, qk_norm: bool, attention_backend: str):
        super().__init__()
        # from_pretrained skips nn.Embedding's random init: on the meta device that one call imports
        # torch's compiler (~2.5 s per process), and load_weights overwrites the values anyway.
        self.embed_tokens = nn.Embedding.from_pretrained(torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, qk_norm, attention_backend)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, config, attention_backend: str = "sdpa"):
        super().__init__()
        arch = (config.architectures or ["?"])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"architecture {arch} is not supported; this course implements {sorted(ARCHITECTURES)}")
        self.config = config
        self.model = Backbone(config, ARCHITECTURES[arch], attention_backend)
        head_dim = self.model.layers[0].self_attn.head_dim
        self.rotary = RotaryEmbedding(head_dim, rope_theta(config))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache) -> torch.Tensor:
        """input_ids, positions: [N], a flat batch. Returns hidden states [N, hidden]."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, meta, kv_cache.k[i], kv_cache.v[i])
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in fp32 for the positions we sample from only (the lm_head is the largest matmul)."""
        return self.lm_head(hidden).float()
