"""Qwen3 and Llama decoder-only transformers, written out in plain torch.

Module and parameter names follow the HuggingFace checkpoints (model.layers.0.self_attn.q_proj, ...)
so a state dict loads straight in. The two architectures differ only in Qwen3's per-head RMSNorm on
q and k. Attention is spelled out (QK^T, mask, softmax, V): fused kernels are cycle 6's lesson.

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

ARCHITECTURES = {"Qwen3ForCausalLM": True, "LlamaForCausalLM": False}  # name -> has q/k norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 loses too much in the mean of squares), scale in the input dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


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
    tokens cu_seqlens_q[b] .. cu_seqlens_q[b+1]-1. `block_tables` [B, max_blocks]: each sequence's
    blocks; gathering them gives its keys in position order. For the explicit attention, queries
    are laid out per sequence as [B, Tq]: `query_index` [B, Tq] picks them from the flat batch
    (short sequences repeat their last token), `token_index` [N] puts the results back, and
    `mask` [B, Tq, max_blocks * block_size] lets each query see keys up to its own position.
    """
    slot_mapping: torch.Tensor
    cu_seqlens_q: torch.Tensor
    block_tables: torch.Tensor
    query_index: torch.Tensor
    token_index: torch.Tensor
    mask: torch.Tensor


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_size, KVH, D] indexed by [B, max_blocks] -> [B, KVH, max_blocks * block_size, D]."""
    B = block_tables.shape[0]
    # index_select copies whole blocks (block_size * KVH * D values in a row); indexing with a
    # tensor computes an offset per element and ran 3.6-5x slower on a CPU (chapter 8).
    blocks = cache.index_select(0, block_tables.flatten())        # [B * max_blocks, block_size, KVH, D]
    return blocks.view(B, -1, *cache.shape[2:]).transpose(1, 2)


def grouped_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """Explicit attention with grouped-query heads.

    q: [B, H, Tq, D]; k, v: [B, KVH, Tk, D]; mask: [B, Tq, Tk] bool, True where a query may look.
    The H // KVH query heads that share a KV head are stacked so K and V are never copied per head.
    """
    B, H, Tq, D = q.shape
    kv_heads = k.shape[1]
    group = H // kv_heads
    q = q.reshape(B, kv_heads, group * Tq, D)
    scores = (q @ k.transpose(-1, -2)) * scale                          # [B, KVH, G*Tq, Tk]
    scores = scores.view(B, kv_heads, group, Tq, -1)
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)           # softmax in fp32, like HF
    out = probs.view(B, kv_heads, group * Tq, -1) @ v                   # [B, KVH, G*Tq, D]
    return out.view(B, H, Tq, D)


class Attention(nn.Module):
    def __init__(self, config, qk_norm: bool):
        super().__init__()
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

    def forward(self, x, cos, sin, meta: AttentionMetadata, k_cache, v_cache):
        """x: [N, hidden], a flat batch; k/v_cache: this layer's pool, [num_blocks, block_size, KVH, D]."""
        N = x.shape[0]
        q = self.q_proj(x).view(N, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(N, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(N, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        store_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        keys = gather_blocks(k_cache, meta.block_tables)       # each sequence's K/V, in position order
        values = gather_blocks(v_cache, meta.block_tables)
        queries = q[meta.query_index].transpose(1, 2)          # [B, H, Tq, D]
        out = grouped_attention(queries, keys, values, meta.mask, self.scale)
        out = out.transpose(1, 2).reshape(-1, self.num_heads * self.head_dim)[meta.token_index]
        return self.o_proj(out)


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

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config, qk_norm: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, qk_norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, meta, k_cache, v_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config, qk_norm: bool):
        super().__init__()
        # from_pretrained skips nn.Embedding's random init: on the meta device that one call imports
        # torch's compiler (~2.5 s per process), and load_weights overwrites the values anyway.
        self.embed_tokens = nn.Embedding.from_pretrained(torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, qk_norm) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        arch = (config.architectures or ["?"])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"architecture {arch} is not supported; this course implements {sorted(ARCHITECTURES)}")
        self.config = config
        self.model = Backbone(config, qk_norm=ARCHITECTURES[arch])
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
