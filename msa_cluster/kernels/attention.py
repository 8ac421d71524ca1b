"""Attention over a gathered context: [template head, pooled memory chunks, prompt, generated].

Legend: Tq query tokens, S context slots, H query heads, Hkv kv heads, G = H // Hkv, D head dim.

The context of one request at one layer is a single buffer of S key/value slots. A query at
buffer slot p sees every slot j <= p. Placing the template head at slots 0..2, the selected
chunks after it and the prompt after them makes this exactly MSA's rule: template tokens see
only earlier template tokens, prompt tokens see the template, all selected chunks, and the
prompt up to themselves (bottom-right causal alignment).
"""

from __future__ import annotations

import torch

__all__ = ["gathered_attention", "gathered_attention_ref"]


def gathered_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_slots: torch.Tensor, scale: float
) -> torch.Tensor:
    """q: [Tq, H, D]; k, v: [S, Hkv, D]; q_slots: [Tq] int64 buffer slot of each query -> [Tq, H, D].

    Softmax in float32; the output has q's dtype.
    """
    Tq, H, D = q.shape
    S, Hkv, _ = k.shape
    if H % Hkv:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {Hkv}")
    G = H // Hkv
    kf = k.float().repeat_interleave(G, dim=1)  # [S, H, D]
    vf = v.float().repeat_interleave(G, dim=1)
    logits = torch.einsum("thd,shd->hts", q.float(), kf) * scale  # [H, Tq, S]
    visible = torch.arange(S, device=q.device).unsqueeze(0) <= q_slots.unsqueeze(1)  # [Tq, S]
    logits = logits.masked_fill(~visible, float("-inf"))
    out = torch.einsum("hts,shd->thd", torch.softmax(logits, dim=-1), vf)
    return out.to(q.dtype)


def gathered_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_slots: torch.Tensor, scale: float
) -> torch.Tensor:
    """Dispatcher for `gathered_attention_ref` semantics."""
    return gathered_attention_ref(q, k, v, q_slots, scale)
