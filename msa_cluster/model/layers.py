"""The MSA decoder layer on transformers' Qwen3 building blocks.

Legend: B batch, T tokens, H query heads, Hkv kv heads, D head dim, M hidden size.

Parameter names match the published MSA-4B checkpoint: `self_attn.{q,k,v,o}_proj`,
`self_attn.{q,k}_norm`, and in routing layers `self_attn.router_q_proj.0` [H*D, M] and
`self_attn.router_k_proj.0` [Hkv*D, M]. The layer only computes projections; where the
keys and values go (one document, or a gathered sparse context) is decided by the caller,
so the modules hold no per-request state.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, rotate_half

from msa_cluster.model.config import MSAConfig

__all__ = ["MSAAttention", "MSADecoderLayer", "apply_rope"]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, heads, D]; cos, sin: [B, T, D] -> rotated x (Qwen3's rotate-half convention)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    out: torch.Tensor = x * cos + rotate_half(x) * sin
    return out


class MSAAttention(nn.Module):
    def __init__(self, config: MSAConfig, layer_idx: int, routing: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.routing = routing
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        M, H, Hkv, D = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(M, H * D, bias=bias)
        self.k_proj = nn.Linear(M, Hkv * D, bias=bias)
        self.v_proj = nn.Linear(M, Hkv * D, bias=bias)
        self.o_proj = nn.Linear(H * D, M, bias=bias)
        self.q_norm = Qwen3RMSNorm(D, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(D, eps=config.rms_norm_eps)
        self.decoupled = routing and config.memory.decouple_router
        if self.decoupled:
            # Sequential(Linear) so that the state-dict keys are `router_q_proj.0.weight` as published.
            self.router_q_proj = nn.Sequential(nn.Linear(M, H * D, bias=False))
            self.router_k_proj = nn.Sequential(nn.Linear(M, Hkv * D, bias=False))

    def qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h: [B, T, M] -> q [B, T, H, D], k [B, T, Hkv, D] (post-norm, post-RoPE), v [B, T, Hkv, D]."""
        B, T, _ = h.shape
        q = self.q_norm(self.q_proj(h).view(B, T, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(h).view(B, T, self.num_kv_heads, self.head_dim))
        v = self.v_proj(h).view(B, T, self.num_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def router_q(self, h: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Routing query [B, T, H, D]: router_q_proj(h) (no norm, no RoPE), or the attention's q."""
        if not self.decoupled:
            return q
        B, T, _ = h.shape
        rq: torch.Tensor = self.router_q_proj(h).view(B, T, self.num_heads, self.head_dim)
        return rq

    def router_k(self, h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Routing key [B, T, Hkv, D]: router_k_proj(h), or the attention's k."""
        if not self.decoupled:
            return k
        B, T, _ = h.shape
        rk: torch.Tensor = self.router_k_proj(h).view(B, T, self.num_kv_heads, self.head_dim)
        return rk


class MSADecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). Attention is run by the caller."""

    def __init__(self, config: MSAConfig, layer_idx: int, routing: bool):
        super().__init__()
        self.self_attn = MSAAttention(config, layer_idx, routing)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x: [B, T, M]; attn: [B, T, H, D] attention output before o_proj -> next hidden state."""
        B, T = attn.shape[:2]
        x = x + self.self_attn.o_proj(attn.reshape(B, T, -1))
        out: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return out
