"""Routing: score routing queries against pooled router keys, reduce to document scores, top-k.

Legend: B batch, T routing-query tokens, H query heads, Hkv kv heads, G = H // Hkv,
D head dim, C chunks, N documents, K = Hkv * D (folded inner-product width).

The canonical score (digest 2.4), for query token t and chunk c:
    s[t, c] = head_reduce_h <q[t, h], k[c, h // G]>           (q already scaled)
    chunk_score[c] = query_reduce_t s[t, c]                    (over routing tokens only)
    doc_score[n]   = chunk_reduce_{c in n} chunk_score[c]
With head_reduce == "mean" the head mean folds exactly into one K-wide inner product
(q is pre-summed per kv-head group and divided by H), so routing is a plain MIPS.

Reproducibility: a document's score must not depend on which other documents share its shard,
or distributed selections would differ from local ones. The reference path therefore scores
in fixed-width chunk tiles (one GEMM shape for every tile of every shard) in float64 and rounds
to float32 once, after the token reduction; top-k orders by (score desc, doc id asc).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from msa_cluster.types import RoutingQuery, RoutingSpec, ScoredDoc

__all__ = ["prepare_queries", "normalize_heads", "doc_scores", "doc_scores_ref", "select_top_k", "merge_top_k"]

TILE = 256  # chunks per scoring tile: fixed so that every tile of every shard runs the same GEMM


def normalize_heads(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise the last (head-dim) axis in float32: cosine routing."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def prepare_queries(q: torch.Tensor, mask: torch.Tensor, spec: RoutingSpec, scale: float) -> RoutingQuery:
    """Turn per-head routing queries into the canonical RoutingQuery.

    q: [B, T, H, D] (any float dtype), mask: [B, T] bool. Cosine normalises each head first;
    then the scale is applied; with head_reduce "mean" the heads are folded to [B, T, Hkv, D].
    """
    q = normalize_heads(q) if spec.similarity == "cosine" else q.float()
    q = q * scale
    if spec.head_reduce == "mean":
        B, T, H, D = q.shape
        q = q.view(B, T, spec.num_kv_heads, spec.group, D).sum(dim=3) / H  # [B, T, Hkv, D]
        return RoutingQuery(vectors=q.contiguous(), mask=mask.bool(), spec=spec, folded=True)
    return RoutingQuery(vectors=q.contiguous(), mask=mask.bool(), spec=spec, folded=False)


def _token_scores(query: RoutingQuery, keys: torch.Tensor) -> torch.Tensor:
    """Per-token scores for one tile of keys [tile, Hkv, D] -> [B, T, tile] float64."""
    q = query.vectors.double()
    k = keys.double()
    B, T, Hr, D = q.shape
    if query.folded:
        return (q.reshape(B * T, Hr * D) @ k.reshape(k.shape[0], -1).T).view(B, T, -1)
    G = query.spec.group
    per_head = torch.einsum("btgrd,cgd->btgrc", q.view(B, T, -1, G, D), k)  # [B, T, Hkv, G, tile]
    return per_head.amax(dim=(2, 3))


def _reduce_tokens(s: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """s: [B, T, tile] float64, mask [B, T] -> [B, tile]; rows with no routing token are -inf."""
    m = mask.unsqueeze(-1)
    if how == "max":
        return s.masked_fill(~m, -math.inf).amax(dim=1)
    if how == "mean":
        n = mask.sum(dim=1, keepdim=True).double()
        out = (s * m).sum(dim=1) / n.clamp_min(1)
        return out.masked_fill(n == 0, -math.inf)
    # "last": the last routing token of each row
    idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, idx, -1).amax(dim=1)  # [B]
    out = s[torch.arange(s.shape[0], device=s.device), last.clamp_min(0)]
    return out.masked_fill((last < 0).unsqueeze(-1), -math.inf)


def chunk_scores_ref(query: RoutingQuery, router_keys: torch.Tensor) -> torch.Tensor:
    """[B, C] float32 chunk scores of router_keys [C, Hkv, D] (cosine: pass normalised keys)."""
    B, C = query.batch_size, router_keys.shape[0]
    out = torch.empty(B, C, dtype=torch.float32, device=router_keys.device)
    for start in range(0, C, TILE):
        tile = router_keys[start : start + TILE]
        n = tile.shape[0]
        if n < TILE:  # pad so that the GEMM shape is the same for every tile
            tile = torch.cat([tile, tile.new_zeros(TILE - n, *tile.shape[1:])])
        s = _token_scores(query, tile)
        out[:, start : start + n] = _reduce_tokens(s, query.mask, query.spec.query_reduce)[:, :n].float()
    return out


def _reduce_chunks(chunk: torch.Tensor, doc_offsets: torch.Tensor, how: str) -> torch.Tensor:
    """chunk [B, C] -> [B, N] by contiguous document ranges doc_offsets [N + 1]."""
    lengths = (doc_offsets[1:] - doc_offsets[:-1]).to(chunk.device)
    N = lengths.numel()
    if N == 0:
        return chunk.new_empty(chunk.shape[0], 0)
    doc_of_chunk = torch.repeat_interleave(torch.arange(N, device=chunk.device), lengths)
    index = doc_of_chunk.expand(chunk.shape[0], -1)
    if how == "max":
        out = chunk.new_full((chunk.shape[0], N), -math.inf)
        return out.scatter_reduce(1, index, chunk, reduce="amax", include_self=True)
    total = chunk.double().new_zeros(chunk.shape[0], N).scatter_add(1, index, chunk.double())
    return (total / lengths.double()).float()


def doc_scores_ref(query: RoutingQuery, router_keys: torch.Tensor, doc_offsets: torch.Tensor) -> torch.Tensor:
    """Document scores [B, N] float32.

    router_keys: [C, Hkv, D], the chunks of N documents laid out contiguously;
    doc_offsets: [N + 1] int64, document n owns chunks doc_offsets[n]:doc_offsets[n + 1].
    Rows of the query with no routing token score -inf everywhere.
    """
    if router_keys.shape[0] == 0:
        return torch.empty(query.batch_size, doc_offsets.numel() - 1, dtype=torch.float32)
    keys = normalize_heads(router_keys) if query.spec.similarity == "cosine" else router_keys
    return _reduce_chunks(chunk_scores_ref(query, keys), doc_offsets, query.spec.chunk_reduce)


def doc_scores(query: RoutingQuery, router_keys: torch.Tensor, doc_offsets: torch.Tensor) -> torch.Tensor:
    """Dispatcher: the canonical document scores [B, N] float32 (see `doc_scores_ref`)."""
    return doc_scores_ref(query, router_keys, doc_offsets)


def select_top_k(scores: torch.Tensor, doc_ids: torch.Tensor, k: int) -> list[list[ScoredDoc]]:
    """Top-k documents per row of scores [B, N], best first, ties to the lower doc id.

    doc_ids: [N] int64 global ids of the columns. -inf scores (no routing token) are never selected.
    """
    if k < 1:
        raise ValueError(f"top-k must be >= 1, got {k}")
    out: list[list[ScoredDoc]] = []
    ids = doc_ids.cpu().tolist()
    for row in scores.float().cpu():
        finite = torch.isfinite(row) | (row == math.inf)
        cand = torch.nonzero(finite).flatten()
        if cand.numel() > k:  # keep every column that can reach the k-th place, ties included
            kth = torch.topk(row[cand], k).values[-1]
            cand = cand[row[cand] >= kth]
        ranked = sorted(((-float(row[i]), ids[i]) for i in cand.tolist()))[:k]
        out.append([ScoredDoc(doc_id=d, score=-s) for s, d in ranked])
    return out


def merge_top_k(parts: Sequence[list[list[ScoredDoc]]], k: int) -> list[list[ScoredDoc]]:
    """Merge per-shard top-k lists (each [B] rows) into the global top-k with the same order rule."""
    if not parts:
        return []
    merged = []
    for rows in zip(*parts):
        pool = sorted(((-d.score, d.doc_id) for row in rows for d in row))[:k]
        merged.append([ScoredDoc(doc_id=d, score=-s) for s, d in pool])
    return merged
