"""Qwen3 and Llama decoder-only transformers, written out in plain torch.

Module and parameter names follow the HuggingFace checkpoints (model.layers.0.self_attn.q_proj, ...)
so a state dict loads straight in. The two architectures differ only in Qwen3's per-head RMSNorm on
q and k. Attention runs as one fused kernel (attention.py), chosen when the engine starts.

The KV cache is paged (cycle 3): each attention layer writes the K and V of the tokens it is given
into a pool of fixed-size blocks through a slot mapping, then reads each sequence's keys and values
back through its block table. Cycle 4 packs a step's tokens into one flat batch of N tokens with no
padding: every linear layer runs on [N, hidden], and only attention, which must keep sequences
apart, looks at the per-sequence layout.
Cycle 11: tensor parallelism. Each rank builds the model with 1/world_size of the heads and MLP
channels (parallel_layers.py): q, k and v merged into one column-parallel matmul of this rank's
heads, gate and up into another, o_proj and down_proj row-parallel (one all-reduce each), the
vocabulary split over the ranks. The KV cache holds this rank's KV heads only.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from common.engine.model_source import rope_theta

from .attention import ATTENTION
from .parallel_layers import ParallelLMHead, RowParallelLinear, Shard, VocabParallelEmbedding, vocab_rows
from .parallel_state import TPGroup

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
    def __init__(self, config, qk_norm: bool, attention_backend: str, tp: TPGroup):
        super().__init__()
        self.attend = ATTENTION[attention_backend]
        self.num_heads = config.num_attention_heads // tp.world_size        # this rank's heads
        self.num_kv_heads = config.num_key_value_heads // tp.world_size
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        bias = getattr(config, "attention_bias", False)
        hidden = config.hidden_size
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # Column-parallel, q, k and v in one matmul: this rank's heads; row-parallel o_proj sums them up.
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, hidden, bias, tp)
        if qk_norm:  # Qwen3: RMSNorm over each head's vector, before the rotary embedding
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = qk_norm
        self.rotate = apply_rotary    # compiled_ops.compile_small_ops() may put the compiled one here

    def forward(self, x, cos, sin, meta: AttentionMetadata, k_cache, v_cache):
        """x: [N, hidden], a flat batch; k/v_cache: this layer's pool, [num_blocks, block_size, KVH, D]."""
        N = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(N, self.num_heads, self.head_dim)
        k = k.view(N, self.num_kv_heads, self.head_dim)
        v = v.view(N, self.num_kv_heads, self.head_dim)
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
    """SwiGLU: down(silu(gate(x)) * up(x)); gate and up column-parallel in one matmul (this rank's
    channels), down row-parallel."""

    def __init__(self, config, tp: TPGroup):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size // tp.world_size, bias=bias)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias, tp)
        self.act_mul = silu_mul       # compiled_ops.compile_small_ops() may put the compiled one here

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_mul(gate, up))


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return nn.functional.silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, config, qk_norm: bool, attention_backend: str, tp: TPGroup):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, qk_norm, attention_backend, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, tp)

    def forward(self, x, cos, sin, meta, k_cache, v_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, k_cache, v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config, qk_norm: bool, attention_backend: str, tp: TPGroup):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(config, qk_norm, attention_backend, tp)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, config, attention_backend: str = "sdpa", tp: TPGroup | None = None):
        super().__init__()
        arch = (config.architectures or ["?"])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"architecture {arch} is not supported; this course implements {sorted(ARCHITECTURES)}")
        self.config, self.tp = config, tp or TPGroup()
        self.model = Backbone(config, ARCHITECTURES[arch], attention_backend, self.tp)
        head_dim = self.model.layers[0].self_attn.head_dim
        self.rotary = RotaryEmbedding(head_dim, rope_theta(config))
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, self.tp)
        if config.tie_word_embeddings:
            self.lm_head.linear.weight = self.model.embed_tokens.embedding.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache) -> torch.Tensor:
        """input_ids, positions: [N], a flat batch. Returns hidden states [N, hidden]."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, meta, kv_cache.k[i], kv_cache.v[i])
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits in fp32 for the positions we sample from only (the lm_head is the largest matmul);
        on rank 0, gathered from every rank's share of the vocabulary; None on the other ranks."""
        return self.lm_head(hidden)

    def checkpoint_targets(self) -> dict:
        """Checkpoint name -> where this rank keeps its part: a Shard (a slice of a split weight) or
        the parameter itself (norms and row-parallel biases, whole on every rank). load_weights fills them."""
        c, r, n = self.config, self.tp.rank, self.tp.world_size
        hidden = c.hidden_size
        start, rows = vocab_rows(c.vocab_size, self.tp)
        targets = {"model.embed_tokens.weight": Shard(self.model.embed_tokens.embedding.weight,
                                                      (c.vocab_size, hidden), 0, start, rows),
                   "lm_head.weight": Shard(self.lm_head.linear.weight, (c.vocab_size, hidden), 0, start, rows),
                   "model.norm.weight": self.model.norm.weight}
        for i, layer in enumerate(self.model.layers):
            attn, mlp, p = layer.self_attn, layer.mlp, f"model.layers.{i}."
            q, kv, inter = attn.q_size, attn.kv_size, c.intermediate_size // n
            for kind, param in (("weight", attn.qkv_proj.weight), ("bias", attn.qkv_proj.bias)):
                if param is not None:   # the rank's rows of q, k and v, one after the other
                    for name, size, into in (("q_proj", q, 0), ("k_proj", kv, q), ("v_proj", kv, q + kv)):
                        targets[f"{p}self_attn.{name}.{kind}"] = Shard(param, (size * n, hidden)[:param.dim()],
                                                                       0, r * size, size, into)
            for kind, param in (("weight", mlp.gate_up_proj.weight), ("bias", mlp.gate_up_proj.bias)):
                if param is not None:
                    for name, into in (("gate_proj", 0), ("up_proj", inter)):
                        targets[f"{p}mlp.{name}.{kind}"] = Shard(param, (inter * n, hidden)[:param.dim()],
                                                                 0, r * inter, inter, into)
            for name, layer_in, width in (("self_attn.o_proj", attn.o_proj, q), ("mlp.down_proj", mlp.down_proj, inter)):
                targets[f"{p}{name}.weight"] = Shard(layer_in.linear.weight, (hidden, width * n), 1, r * width, width)
                if layer_in.bias is not None:
                    targets[f"{p}{name}.bias"] = layer_in.bias
            targets[f"{p}input_layernorm.weight"] = layer.input_layernorm.weight
            targets[f"{p}post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
            if attn.qk_norm:
                targets[f"{p}self_attn.q_norm.weight"] = attn.q_norm.weight
                targets[f"{p}self_attn.k_norm.weight"] = attn.k_norm.weight
        return targets
