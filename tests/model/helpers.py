"""Test helpers: tiny random models and documents, and an independent dense MSA reference.

The dense reference below is written from the digest, not from msa_cluster.model: its own
RMSNorm, RoPE, routing (float64, per head, no folding), and one plain softmax attention over
[template head, EVERY document's pooled chunks, prompt] with an explicit mask that hides the
chunks of documents a layer did not select.
"""

from __future__ import annotations

import math

import torch

from msa_cluster.model import MSAConfig, MSAForCausalLM
from msa_cluster.model.tiny import tiny_config_dict


def make_model(seed: int = 0, heads: int = 4, kv_heads: int = 2, layers: int = 4, routing: str = "2,3",
               top_k: int = 3, chunk: int = 8, dtype=torch.float32, **msa) -> MSAForCausalLM:
    cfg = tiny_config_dict(
        num_attention_heads=heads, num_key_value_heads=kv_heads, num_hidden_layers=layers, max_window_layers=layers,
        msa_config={"router_layer_idx": routing, "top_k_docs": top_k, "pooling_kernel_size": chunk, **msa},
    )
    torch.manual_seed(seed)
    model = MSAForCausalLM(MSAConfig(**cfg)).eval()
    # Random weights with std 0.02 make every score nearly equal; widen them so routing has margins.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.2 if "router" in name or "embed" in name else 0.08)
    return model.to(dtype)


def random_docs(lengths, vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def random_prompt(model, n: int, seed: int = 2, routing=slice(3, None)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (1, n), generator=g)
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, routing] = True
    mask[0, :3] = False
    return ids, mask


# --------------------------------------------------------------------------- dense reference
def _rms(x, w, eps):
    x32 = x.float()
    return (w.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def _rope(x, pos, theta):  # x [T, heads, D]
    D = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    ang = pos.float()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None, :], torch.cat([ang, ang], -1).sin()[:, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Dense:
    def __init__(self, model: MSAForCausalLM):
        self.sd = {k: v.detach().float() for k, v in model.state_dict().items()}
        c = model.config
        self.c, self.m = c, c.memory
        self.H, self.Hkv, self.D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.theta = c.rope_parameters["rope_theta"]
        self.route_layers = set(c.routing_layers)

    def w(self, i, name):
        return self.sd[f"model.layers.{i}.{name}"]

    def _proj(self, i, h, pos):
        T = h.shape[0]
        eps = self.c.rms_norm_eps
        q = _rms((h @ self.w(i, "self_attn.q_proj.weight").T).view(T, self.H, self.D), self.w(i, "self_attn.q_norm.weight"), eps)
        k = _rms((h @ self.w(i, "self_attn.k_proj.weight").T).view(T, self.Hkv, self.D), self.w(i, "self_attn.k_norm.weight"), eps)
        v = (h @ self.w(i, "self_attn.v_proj.weight").T).view(T, self.Hkv, self.D)
        return _rope(q, pos, self.theta), _rope(k, pos, self.theta), v

    def _attend(self, q, k, v, visible):  # q [T,H,D], k/v [S,Hkv,D], visible [T,S]
        G = self.H // self.Hkv
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        s = torch.einsum("thd,shd->hts", q, k) / math.sqrt(self.D)
        s = s.masked_fill(~visible, float("-inf"))
        return torch.einsum("hts,shd->thd", s.softmax(-1), v)

    def _finish(self, i, x, o):
        x = x + o.reshape(x.shape[0], -1) @ self.w(i, "self_attn.o_proj.weight").T
        h = _rms(x, self.w(i, "post_attention_layernorm.weight"), self.c.rms_norm_eps)
        g, u = h @ self.w(i, "mlp.gate_proj.weight").T, h @ self.w(i, "mlp.up_proj.weight").T
        return x + (torch.nn.functional.silu(g) * u) @ self.w(i, "mlp.down_proj.weight").T

    def encode(self, doc):
        """{layer: (K, V, RK)} chunk means [C, Hkv, D] of one document encoded alone."""
        ids = torch.tensor(doc)
        T, P = len(doc), self.m.pooling_kernel_size
        x = self.sd["model.embed_tokens.weight"][ids]
        pos = torch.arange(T)
        causal = pos[:, None] >= pos[None, :]
        out = {}
        for i in range(self.c.num_hidden_layers):
            h = _rms(x, self.w(i, "input_layernorm.weight"), self.c.rms_norm_eps)
            q, k, v = self._proj(i, h, pos)
            if i in self.route_layers:
                rk = (h @ self.w(i, "self_attn.router_k_proj.0.weight").T).view(T, self.Hkv, self.D) if self.m.decouple_router else k
                mean = lambda t: torch.stack([t[s : s + P].double().mean(0) for s in range(0, T, P)]).float()  # noqa: E731
                out[i] = (mean(k), mean(v), mean(rk))
            x = self._finish(i, x, self._attend(q, k, v, causal))
        return out

    def _select(self, rq, mask, rks, k):
        """rq [T,H,D]; rks: list of [C,Hkv,D] per document id -> ids best first (float64, per head)."""
        G = self.H // self.Hkv
        sim = self.m.resolved_similarity
        rq = rq.double()
        if sim == "cosine":
            rq = rq / rq.norm(dim=-1, keepdim=True)
        scale = 1.0 if sim == "cosine" else 1 / math.sqrt(self.D)
        scores = []
        for rk in rks:
            rk = rk.double()
            if sim == "cosine":
                rk = rk / rk.norm(dim=-1, keepdim=True)
            s = torch.einsum("thd,chd->thc", rq, rk.repeat_interleave(G, 1)) * scale  # [T, H, C]
            s = s.mean(1) if self.m.head_reduce_method == "mean" else s.amax(1)  # [T, C]
            s = s[mask]
            if self.m.query_reduce_method == "max":
                s = s.amax(0)
            elif self.m.query_reduce_method == "mean":
                s = s.mean(0)
            else:
                s = s[-1]
            scores.append(float(s.amax() if self.m.chunk_reduce_method == "max" else s.mean()))
        order = sorted(range(len(rks)), key=lambda n: (-scores[n], n))
        return order[: min(k, len(rks))]

    def prefill(self, ids, mask, pooled):
        """ids [T], mask [T] bool, pooled: list (by doc id) of encode() outputs -> logits [T, V], selections."""
        T, tmpl, k = ids.numel(), self.m.template_head_len, self.m.top_k_docs
        pos = torch.arange(T)
        pos = torch.where(pos < tmpl, pos, pos + k)
        x = self.sd["model.embed_tokens.weight"][ids]
        selections = {}
        for i in range(self.c.num_hidden_layers):
            h = _rms(x, self.w(i, "input_layernorm.weight"), self.c.rms_norm_eps)
            q, kk, v = self._proj(i, h, pos)
            chunks_k, chunks_v, owner = [], [], []
            if i in self.route_layers:
                for n, p in enumerate(pooled):
                    chunks_k.append(p[i][0])
                    chunks_v.append(p[i][1])
                    owner += [n] * p[i][0].shape[0]
                sel = []
                if mask.any() and pooled:
                    rq = (h @ self.w(i, "self_attn.router_q_proj.0.weight").T).view(T, self.H, self.D) if self.m.decouple_router else q
                    sel = self._select(rq, mask, [p[i][2] for p in pooled], k)
                selections[i] = sel
            C = len(owner)
            K = torch.cat([kk[:tmpl], *chunks_k, kk[tmpl:]])
            V = torch.cat([v[:tmpl], *chunks_v, v[tmpl:]])
            visible = torch.zeros(T, tmpl + C + T - tmpl, dtype=torch.bool)
            for t in range(T):
                if t < tmpl:
                    visible[t, : t + 1] = True
                else:
                    visible[t, :tmpl] = True
                    visible[t, tmpl : tmpl + C] = torch.tensor([o in selections.get(i, []) for o in owner], dtype=torch.bool)
                    visible[t, tmpl + C : tmpl + C + t - tmpl + 1] = True
            x = self._finish(i, x, self._attend(q, K, V, visible))
        logits = _rms(x, self.sd["model.norm.weight"], self.c.rms_norm_eps) @ self.sd["model.embed_tokens.weight"].T
        return logits, selections
