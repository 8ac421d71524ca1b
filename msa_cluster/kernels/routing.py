"""Routing: score routing queries against pooled router keys, reduce to document scores, top-k.

Legend: B batch, T routing-query tokens, H query heads, Hkv kv heads, G = H // Hkv,
D head dim, C chunks, N documents, K = Hkv * D (folded inner-product width), W the width of one
inner product (K folded, D per head).

The canonical score (digest 2.4), for query token t and chunk c:
    s[t, c] = head_reduce_h <q[t, h], k[c, h // G]>           (q already scaled)
    chunk_score[c] = query_reduce_t s[t, c]                    (over routing tokens only)
    doc_score[n]   = chunk_reduce_{c in n} chunk_score[c]
With head_reduce == "mean" the head mean folds exactly into one K-wide inner product
(q is pre-summed per kv-head group and divided by H), so routing is a plain MIPS.

Exactness: the canonical value is computed in float64 in one fixed, hand-written order
(`_exact.fixed_sum`: elementwise products, exact in float64, then pairwise halving; sums over
tokens and chunks likewise) and rounded to float32 once. It is a function of the query and the
document alone, identical on every device, thread count, tile, shard and batch. `doc_scores_ref`
computes it densely (readable, differentiable, for tests and training). `routing_exact.route_top_k`
gets the same selections and scores at fp32 cost: an fp32 first pass (`doc_scores`, fused tiles
on CPU, the Triton kernel on CUDA) with a rigorous error bound, then the float64 pass on only the
pairs that could cross the top-k boundary. Top-k orders by (score desc, doc id asc).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from msa_cluster.kernels._common import (
    FLOAT_DTYPES,
    HAS_TRITON,
    INDEX_DTYPES,
    check_tensor,
    require_triton,
    use_triton,
)
from msa_cluster.kernels._exact import UNIT_FP32, bound, fixed_norm, fixed_sum, fp32_dot_error, gamma, norm_upper
from msa_cluster.types import RoutingQuery, RoutingSpec, ScoredDoc

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "prepare_queries",
    "normalize_heads",
    "chunk_scores_ref",
    "chunk_scores_triton",
    "doc_scores",
    "doc_scores_ref",
    "doc_scores_triton",
    "first_pass",
    "FirstPass",
    "select_top_k",
    "merge_top_k",
]

# Bytes of fp32 keys per first-pass tile on CPU: the largest tile the routing uses. Any tile gives
# the same selections and scores (the float64 pass decides them). 4 MiB (1,024 chunks at MSA-4B's
# K = 1024) amortises the per-tile bookkeeping; of 64- to 1,024-chunk tiles (conversion + GEMM,
# one thread, 2026-12-03) it was the fastest here. The bf16 -> fp32 conversion goes into one
# reused buffer of this size.
TILE_BYTES = 4 << 20
TILE = 1024  # chunks per tile at K = 1024 (TILE_BYTES // (4 * K)); other widths scale with K


def tile_chunks(width: int) -> int:
    """Chunks per first-pass tile for an inner-product width K: TILE_BYTES of fp32 keys, at least 64."""
    return max(64, TILE_BYTES // (4 * max(width, 1)))


# Triton tiles. Fixed, never derived from the number of chunks: a chunk's score is computed by
# the same instructions in the same order wherever it sits in a shard of any size.
_BLOCK_T = 16  # query tokens per step
_BLOCK_C = 64  # chunks per program
_BLOCK_K = 32  # inner-product width per step (the fixed K-axis reduction order)
_BLOCK_DOC = 64  # chunks per step of the chunk -> document reduction
_SCORE_WARPS = 8  # no register spills at these tiles on sm_80 / sm_90 (ptxas reports)


def normalize_heads(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise the last (head-dim) axis: cosine routing. The norm and the division run in
    float64 in the fixed order, then round to float32, so every device normalises alike."""
    x64 = x.double()
    out: torch.Tensor = (x64 / fixed_norm(x64).clamp_min(eps).unsqueeze(-1)).float()
    return out


def prepare_queries(q: torch.Tensor, mask: torch.Tensor, spec: RoutingSpec, scale: float) -> RoutingQuery:
    """Turn per-head routing queries into the canonical RoutingQuery.

    q: [B, T, H, D] (any float dtype), mask: [B, T] bool. Cosine normalises each head first;
    then the scale is applied; with head_reduce "mean" the heads are folded to [B, T, Hkv, D]
    (the G heads of a group added one after another, an order every device follows).
    """
    q = normalize_heads(q) if spec.similarity == "cosine" else q.float()
    q = q * scale
    if spec.head_reduce == "mean":
        B, T, H, D = q.shape
        grouped = q.view(B, T, spec.num_kv_heads, spec.group, D)
        folded = grouped[:, :, :, 0]
        for r in range(1, spec.group):
            folded = folded + grouped[:, :, :, r]
        return RoutingQuery(vectors=(folded / H).contiguous(), mask=mask.bool(), spec=spec, folded=True)
    return RoutingQuery(vectors=q.contiguous(), mask=mask.bool(), spec=spec, folded=False)


def _token_view(query: RoutingQuery) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(vectors [B, T', Hr, D], mask [B, T'], "max" | "mean"): query_reduce "last" becomes a max over
    each row's last routing token alone (T' = 1), so only max and mean remain."""
    if query.spec.query_reduce != "last":
        return query.vectors, query.mask, query.spec.query_reduce
    mask = query.mask
    idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, idx, -1).amax(dim=1)  # [B]
    rows = torch.arange(mask.shape[0], device=mask.device)
    return query.vectors[rows, last.clamp_min(0)].unsqueeze(1), (last >= 0).unsqueeze(1), "max"


def _last_token(query: RoutingQuery) -> tuple[torch.Tensor, torch.Tensor]:
    """query_reduce "last" as a one-token max: vectors [B, 1, Hr, D] and mask [B, 1]."""
    vectors, mask, _ = _token_view(query)
    return vectors, mask


def _check_doc_offsets(doc_offsets: object, num_chunks: int) -> torch.Tensor:
    """Validate doc_offsets [N + 1]: starts at 0, non-decreasing, ends at num_chunks."""
    check_tensor("doc_offsets", doc_offsets, shape="[N + 1]", ndim=1, dtypes=INDEX_DTYPES, contiguous=False)
    assert isinstance(doc_offsets, torch.Tensor)  # check_tensor raised otherwise
    off = doc_offsets.cpu()
    if off.numel() == 0 or int(off[0]) != 0 or int(off[-1]) != num_chunks:
        shown = off.tolist()[:8]
        raise ValueError(f"doc_offsets must run from 0 to C={num_chunks}, got {shown}... ({off.numel()} entries)")
    if bool((off[1:] < off[:-1]).any()):
        raise ValueError("doc_offsets must be non-decreasing")
    return doc_offsets


# -- the error bound of the fp32 first pass


def head_norms(x: torch.Tensor, folded: bool) -> torch.Tensor:
    """An upper bound of |x| per row for the error bound: x [..., Hr, D] -> [...] float64; the K-wide
    norm when folded, else the largest per-head norm (a head-max score is bounded by its largest head's bound)."""
    if folded:
        return norm_upper(x.flatten(-2))
    return norm_upper(x).amax(dim=-1)


def query_norms(vectors: torch.Tensor, mask: torch.Tensor, folded: bool) -> torch.Tensor:
    """[B] float64: the largest |q_t| over each row's routing tokens (0 for a row without any)."""
    return head_norms(vectors, folded).masked_fill(~mask, 0.0).amax(dim=1)


def bound_coef(query: RoutingQuery, fast_cosine: bool = False) -> float:
    """c such that the first pass's chunk score is within c * |q|_max * |k_c| (+ tiny) of the exact
    one. fast_cosine: the keys were normalised in fp32 by `_normalize_fast`, not canonically."""
    vectors, _, _ = _token_view(query)
    B, T, Hr, D = vectors.shape
    key_error = gamma(D + 2) + 4 * UNIT_FP32 if fast_cosine else 0.0
    return fp32_dot_error(Hr * D if query.folded else D, T, key_error)


def _normalize_fast(keys: torch.Tensor) -> torch.Tensor:
    """fp32 cosine normalisation in any order: within gamma_{D+2} + 4u (relative, elementwise) of
    `normalize_heads`, which the bound then covers; the float64 pass uses the canonical one."""
    norm: torch.Tensor = torch.linalg.vector_norm(keys, dim=-1, keepdim=True)
    return keys / norm.clamp_min(1e-12)


# -- the fp32 first pass on CPU


def _pair_scores32(vectors: torch.Tensor, keys: torch.Tensor, folded: bool, group: int) -> torch.Tensor:
    """fp32 head-reduced scores: vectors [B, T, Hr, D], keys [n, Hkv, D] -> [B, T, n]."""
    B, T, Hr, D = vectors.shape
    n = keys.shape[0]
    if folded:
        return (vectors.reshape(B * T, Hr * D) @ keys.reshape(n, -1).T).view(B, T, n)
    per_head = torch.einsum("btgrd,cgd->btgrc", vectors.view(B, T, -1, group, D), keys)  # [B, T, Hkv, G, n]
    return per_head.amax(dim=(2, 3))


def _reduce_tokens(s: torch.Tensor, mask: torch.Tensor, how: str, exact: bool) -> torch.Tensor:
    """s [B, T, n], mask [B, T] -> [B, n]; rows with no routing token are -inf. `exact`: the mean
    sums in the fixed order (float64 input), else any order."""
    m = mask.unsqueeze(-1)
    if how == "max":
        return s.masked_fill(~m, -math.inf).amax(dim=1)
    count = mask.sum(dim=1, keepdim=True).to(s.dtype)
    zeroed = s.masked_fill(~m, 0.0)
    total = fixed_sum(zeroed, dim=1) if exact else zeroed.sum(dim=1)
    return (total / count.clamp_min(1)).masked_fill(count == 0, -math.inf)


class FirstPass:
    """The fp32 first pass on CPU, one tile of chunks at a time: `tile(start, n, buf)` gives the
    chunk scores a [B, n] fp32 of chunks start..start+n-1 and bounds e [B, n] float64 with
    |a - exact chunk score| <= e. Safe to call from several threads, each with its own buffer.

    A bf16/fp16 tile is converted into the caller's fp32 buffer [n, Hkv, D] (the arena is never
    copied whole), so memory does not grow with C.
    """

    def __init__(self, query: RoutingQuery, router_keys: torch.Tensor):
        self.query, self.router_keys = query, router_keys
        self.vectors, self.mask, self.how = _token_view(query)
        self.q_norm = query_norms(self.vectors, self.mask, query.folded)  # [B]
        self.cosine = query.spec.similarity == "cosine"
        self.coef = bound_coef(query, fast_cosine=self.cosine)

    def buffer(self, tile: int) -> torch.Tensor:
        return self.router_keys.new_empty(min(tile, self.router_keys.shape[0]), *self.router_keys.shape[1:], dtype=torch.float32)

    def tile(self, start: int, n: int, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.router_keys[start : start + n]
        if keys.dtype != torch.float32:
            keys = buf[:n].copy_(keys)  # bf16 / fp16 -> fp32, per tile
        if self.cosine:
            keys = _normalize_fast(keys)
        s = _pair_scores32(self.vectors, keys, self.query.folded, self.query.spec.group)  # [B, T, n]
        a = _reduce_tokens(s, self.mask, self.how, exact=False)
        return a, bound(self.coef, self.q_norm[:, None], head_norms(keys, self.query.folded)[None, :])


def first_pass(query: RoutingQuery, router_keys: torch.Tensor, tile: int | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """`FirstPass` over every tile in order, on this thread: yields (start, a [B, n], e [B, n])."""
    C = router_keys.shape[0]
    tile = tile or tile_chunks(router_keys[0].numel() if C else 1)
    scorer = FirstPass(query, router_keys)
    buf = scorer.buffer(tile)
    for start in range(0, C, tile):
        n = min(tile, C - start)
        yield (start, *scorer.tile(start, n, buf))


if HAS_TRITON:

    # C (and N) are not specialised on: every shard size runs the same compiled code
    @triton.jit(do_not_specialize=["C"])
    def _chunk_score_kernel(  # type: ignore[no-untyped-def]  # Triton reads the signature
        q_ptr,  # [B, T, HR, W] float32
        mask_ptr,  # [B, T] int8, 1 on routing tokens
        k_ptr,  # [C, HKV, W]
        out_ptr,  # [B, C] float32
        T,
        C,
        HR,
        HKV,
        W,
        TOKEN_MEAN: tl.constexpr,  # reduce tokens by masked mean (else max)
        BLOCK_T: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """One program: BLOCK_C chunks of one query row. Folded routing comes in as HR = HKV = 1,
        W = Hkv * D; unfolded as HR = H heads of width W = D, head h reading kv head h // (HR // HKV)."""
        pid_c = tl.program_id(0)
        b = tl.program_id(1)
        G = HR // HKV
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        # addresses are a 64-bit scalar base plus small int32 offsets, which keeps registers free
        q_off = tl.arange(0, BLOCK_T)[:, None] * (HR * W) + tl.arange(0, BLOCK_K)[None, :]
        k_off = tl.arange(0, BLOCK_C)[:, None] * (HKV * W) + tl.arange(0, BLOCK_K)[None, :]
        k_tile = pid_c.to(tl.int64) * BLOCK_C * HKV * W
        best = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
        total = tl.zeros([BLOCK_C], dtype=tl.float32)
        count = tl.zeros([BLOCK_C], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_ok = offs_t < T
            routed = tl.load(mask_ptr + b.to(tl.int64) * T + offs_t, mask=t_ok, other=0) != 0
            s = tl.full([BLOCK_T, BLOCK_C], float("-inf"), dtype=tl.float32)  # head-max of scores
            for h in range(0, HR):
                q_row = ((b.to(tl.int64) * T + t0) * HR + h) * W
                k_head = k_tile + (h // G) * W
                acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
                for k0 in range(0, W, BLOCK_K):  # fixed order over the inner-product axis
                    k_ok = (k0 + tl.arange(0, BLOCK_K)) < W
                    q = tl.load(q_ptr + q_row + k0 + q_off, mask=t_ok[:, None] & k_ok[None, :], other=0.0)
                    key = tl.load(k_ptr + k_head + k0 + k_off, mask=c_ok[:, None] & k_ok[None, :], other=0.0)
                    key = key.to(tl.float32)  # widen right after the load (bf16 is exact so under the interpreter)
                    acc += tl.dot(q, tl.trans(key), input_precision="ieee")  # never TF32
                s = tl.maximum(s, acc)
            if TOKEN_MEAN:
                total += tl.sum(tl.where(routed[:, None], s, 0.0), axis=0)
                count += tl.sum(routed.to(tl.float32), axis=0)
            else:
                best = tl.maximum(best, tl.max(tl.where(routed[:, None], s, float("-inf")), axis=0))
        if TOKEN_MEAN:
            best = tl.where(count > 0, total / tl.maximum(count, 1.0), float("-inf"))
        tl.store(out_ptr + b.to(tl.int64) * C + offs_c, best, mask=c_ok)

    @triton.jit(do_not_specialize=["C", "N"])
    def _doc_reduce_kernel(  # type: ignore[no-untyped-def]  # Triton reads the signature
        chunk_ptr,  # [B, C] float32
        off_ptr,  # [N + 1] int64
        out_ptr,  # [B, N] float32
        C,
        N,
        CHUNK_MEAN: tl.constexpr,  # reduce a document's chunks by mean (float64 sum), else max
        BLOCK: tl.constexpr,
    ):
        """One program: one document of one query row, its chunks read in a fixed order from its start."""
        n = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        start = tl.load(off_ptr + n)
        end = tl.load(off_ptr + n + 1)
        best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        total = tl.zeros([BLOCK], dtype=tl.float64)
        for c0 in range(start, end, BLOCK):
            offs = c0 + tl.arange(0, BLOCK)
            ok = offs < end
            x = tl.load(chunk_ptr + b * C + offs, mask=ok, other=float("-inf"))
            if CHUNK_MEAN:
                total += tl.where(ok, x.to(tl.float64), 0.0)
            else:
                best = tl.maximum(best, x)
        if CHUNK_MEAN:  # an empty document gives 0 / 0 = nan, like the reference
            res = (tl.sum(total, axis=0) / (end - start).to(tl.float64)).to(tl.float32)
        else:
            res = tl.max(best, axis=0)
        tl.store(out_ptr + b * N + n, res)


def chunk_scores_triton(query: RoutingQuery, router_keys: torch.Tensor) -> torch.Tensor:
    """Triton launcher of the first pass: [B, C] float32 chunk scores, within `bound_coef` of exact.

    router_keys: [C, Hkv, D] float32/bfloat16/float16, contiguous, on the query's device (CUDA,
    or CPU under the Triton interpreter). Scores are fp32 (no TF32) and bit-reproducible on one
    device class: a chunk's score depends only on the query and that chunk.
    """
    vectors, mask = query.vectors, query.mask
    dev = vectors.device
    check_tensor("query.vectors", vectors, shape="[B, T, Hr, D]", ndim=4, dtypes=(torch.float32,))
    check_tensor("query.mask", mask, shape="[B, T]", ndim=2, dtypes=(torch.bool,), device=dev, contiguous=False)
    check_tensor("router_keys", router_keys, shape="[C, Hkv, D]", ndim=3, dtypes=FLOAT_DTYPES, device=dev)
    B, T, Hr, D = vectors.shape
    C, Hkv, Dk = router_keys.shape
    if Dk != D:
        raise ValueError(f"router_keys head dim {Dk} != query head dim {D}")
    if query.folded and Hr != Hkv:
        raise ValueError(f"folded query has {Hr} kv-head slices, router_keys has {Hkv} kv heads")
    if not query.folded and (Hkv == 0 or Hr != query.spec.group * Hkv):
        raise ValueError(f"unfolded query has {Hr} heads, expected group {query.spec.group} x {Hkv} kv heads")
    if B > 65535:
        raise ValueError(f"at most 65535 query rows per launch, got B={B}")
    out = torch.empty(B, C, dtype=torch.float32, device=dev)
    if out.numel() == 0:
        return out
    require_triton()
    if query.spec.query_reduce == "last":
        vectors, mask = _last_token(query)
        T = 1
    hr, hkv, w = (1, 1, Hkv * D) if query.folded else (Hr, Hkv, D)  # folded: one Hkv*D-wide product
    grid = (triton.cdiv(C, _BLOCK_C), B)
    _chunk_score_kernel[grid](
        vectors.contiguous(), mask.to(torch.int8).contiguous(), router_keys, out, T, C, hr, hkv, w,
        TOKEN_MEAN=query.spec.query_reduce == "mean", BLOCK_T=_BLOCK_T, BLOCK_C=_BLOCK_C, BLOCK_K=_BLOCK_K,
        num_warps=_SCORE_WARPS,
    )  # fmt: skip
    return out


def doc_scores_triton(query: RoutingQuery, router_keys: torch.Tensor, doc_offsets: torch.Tensor) -> torch.Tensor:
    """Triton launcher of the first pass's document scores: [B, N] float32.

    Cosine keys are normalised in torch (per chunk, so position-independent), chunks are scored
    by `chunk_scores_triton`, and each document's chunks are reduced by one program in a fixed
    order (max, or a float64 mean), so a document's score never depends on its neighbours.
    """
    check_tensor("router_keys", router_keys, shape="[C, Hkv, D]", ndim=3, dtypes=FLOAT_DTYPES)
    C = router_keys.shape[0]
    _check_doc_offsets(doc_offsets, C)
    B, N = query.batch_size, doc_offsets.numel() - 1
    if C == 0:  # every document is empty: nothing can be selected
        return torch.full((B, N), -math.inf, dtype=torch.float32, device=router_keys.device)
    keys = normalize_heads(router_keys) if query.spec.similarity == "cosine" else router_keys
    chunk = chunk_scores_triton(query, keys.contiguous())
    out = torch.empty(B, N, dtype=torch.float32, device=chunk.device)
    if out.numel() == 0:
        return out
    require_triton()
    offsets = doc_offsets.to(device=chunk.device, dtype=torch.int64).contiguous()
    _doc_reduce_kernel[(N, B)](
        chunk, offsets, out, C, N, CHUNK_MEAN=query.spec.chunk_reduce == "mean", BLOCK=_BLOCK_DOC
    )
    return out


# -- the canonical (exact) scores, dense


def exact_pair_scores(q: torch.Tensor, k: torch.Tensor, folded: bool, group: int) -> torch.Tensor:
    """Canonical head-reduced scores in float64, the fixed order: q [..., Hr, D], k [..., Hkv, D]
    (broadcast against each other) -> [...]. Folded: one K-wide sum; else the max over heads of
    D-wide sums, head h reading kv head h // group."""
    q64, k64 = q.double(), k.double()
    if folded:
        return fixed_sum((q64 * k64).flatten(-2))
    return fixed_sum(q64 * k64.repeat_interleave(group, dim=-2)).amax(dim=-1)


def reduce_doc_chunks(chunk: torch.Tensor, doc_offsets: torch.Tensor, how: str) -> torch.Tensor:
    """Canonical chunk -> document reduction: chunk [B, C] float64, doc_offsets [N + 1] -> [B, N]
    float64. Max, or the mean summed in the fixed order from each document's first chunk (an
    empty document is -inf for max and nan for mean, and is never selected)."""
    off = doc_offsets.to(chunk.device, torch.int64)
    lengths = off[1:] - off[:-1]  # [N]
    B, N = chunk.shape[0], lengths.numel()
    L = int(lengths.max()) if N else 0
    if L == 0:
        return chunk.new_full((B, N), -math.inf if how == "max" else math.nan)
    pos = torch.arange(L, device=chunk.device)
    valid = pos[None, :] < lengths[:, None]  # [N, L]
    idx = (off[:-1, None] + pos[None, :]).clamp_max(max(chunk.shape[1] - 1, 0))
    gathered = chunk[:, idx]  # [B, N, L]
    if how == "max":
        return gathered.masked_fill(~valid, -math.inf).amax(dim=-1)
    return fixed_sum(gathered.masked_fill(~valid, 0.0), dim=-1) / lengths.double()


def _exact_chunk_scores(query: RoutingQuery, keys: torch.Tensor) -> torch.Tensor:
    """[B, C] float64 canonical chunk scores of keys [C, Hkv, D] (cosine: already normalised)."""
    vectors, mask, how = _token_view(query)
    s = exact_pair_scores(vectors[:, :, None], keys[None, None], query.folded, query.spec.group)  # [B, T, C]
    return _reduce_tokens(s, mask, how, exact=True)


def chunk_scores_ref(query: RoutingQuery, router_keys: torch.Tensor) -> torch.Tensor:
    """[B, C] float32 canonical chunk scores of router_keys [C, Hkv, D] (cosine: pass normalised keys)."""
    return _exact_chunk_scores(query, router_keys).float()


def doc_scores_ref(query: RoutingQuery, router_keys: torch.Tensor, doc_offsets: torch.Tensor) -> torch.Tensor:
    """Canonical document scores [B, N] float32: float64 in the fixed order, rounded once.

    router_keys: [C, Hkv, D], the chunks of N documents laid out contiguously;
    doc_offsets: [N + 1] int64, document n owns chunks doc_offsets[n]:doc_offsets[n + 1].
    Rows of the query with no routing token score -inf everywhere. Dense ([B, T, C, W] products):
    for tests and training (it is differentiable); `route_top_k` selects by it at fp32 cost.
    """
    if router_keys.shape[0] == 0:  # every document is empty: nothing can be selected
        return torch.full((query.batch_size, doc_offsets.numel() - 1), -math.inf, dtype=torch.float32)
    keys = normalize_heads(router_keys) if query.spec.similarity == "cosine" else router_keys
    chunk = _exact_chunk_scores(query, keys)
    return reduce_doc_chunks(chunk, doc_offsets, query.spec.chunk_reduce).float()


# -- the first pass's document scores (dispatcher)


def _reduce_chunks_fp32(chunk: torch.Tensor, doc_offsets: torch.Tensor, how: str) -> torch.Tensor:
    """First-pass chunk [B, C] -> [B, N] by contiguous document ranges (any order)."""
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


def doc_scores(query: RoutingQuery, router_keys: torch.Tensor, doc_offsets: torch.Tensor) -> torch.Tensor:
    """First-pass document scores [B, N] float32 of N documents' router_keys [C, Hkv, D]: within
    the `bound_coef` bound of `doc_scores_ref` (use `route_top_k` for exact selections).

    Triton on CUDA, fused fp32 tiles elsewhere. Example:
        >>> spec = RoutingSpec(num_heads=2, num_kv_heads=1)
        >>> query = prepare_queries(torch.randn(1, 3, 2, 4), torch.ones(1, 3, dtype=torch.bool), spec, 0.5)
        >>> doc_scores(query, torch.randn(5, 1, 4), torch.tensor([0, 2, 5])).shape
        torch.Size([1, 2])
    """
    if use_triton(query.vectors, router_keys):
        return doc_scores_triton(query, router_keys.contiguous(), doc_offsets)
    C = router_keys.shape[0]
    _check_doc_offsets(doc_offsets, C)
    if C == 0:
        return torch.full((query.batch_size, doc_offsets.numel() - 1), -math.inf, dtype=torch.float32)
    chunk = torch.cat([a for _, a, _ in first_pass(query, router_keys)], dim=1)  # [B, C]
    return _reduce_chunks_fp32(chunk, doc_offsets, query.spec.chunk_reduce)


# Top-k selection: plain Python over [B, N] scores, identical on every device.


def select_top_k(scores: torch.Tensor, doc_ids: torch.Tensor, k: int) -> list[list[ScoredDoc]]:
    """Top-k documents per row of scores [B, N], best first, ties to the lower doc id.

    doc_ids: [N] int64 global ids of the columns. -inf scores (no routing token) are never selected.
    """
    if k < 1:
        raise ValueError(f"top-k must be >= 1, got {k}")
    out: list[list[ScoredDoc]] = []
    ids = doc_ids.cpu()
    for row in scores.float().cpu():
        finite = torch.isfinite(row) | (row == math.inf)
        cand = torch.nonzero(finite).flatten()
        if cand.numel() > k:  # keep every column that can reach the k-th place, ties included
            kth = torch.topk(row[cand], k).values[-1]
            cand = cand[row[cand] >= kth]
        # Python touches only the candidates (about k), never every document.
        ranked = sorted(zip((-row[cand]).tolist(), ids[cand].tolist()))[:k]
        out.append([ScoredDoc(doc_id=d, score=-s) for s, d in ranked])
    return out


def merge_top_k(parts: Sequence[list[list[ScoredDoc]]], k: int) -> list[list[ScoredDoc]]:
    """Merge per-shard top-k lists (each [B] rows) into the global top-k with the same order rule."""
    if not parts:
        return []
    merged = []
    for rows in zip(*parts):
        pool = sorted((-d.score, d.doc_id) for row in rows for d in row)[:k]
        merged.append([ScoredDoc(doc_id=d, score=-s) for s, d in pool])
    return merged
