"""Exact top-k routing at fp32 cost: the canonical selections and scores of `doc_scores_ref`.

Legend: B query rows, T tokens, Hr query head slices, Hkv kv heads, D head dim, C chunks,
N documents, k top-k, Q chunks kept for the float64 pass, P (token, chunk) pairs re-scored.

1. First pass, fp32 (`routing.first_pass`: fused tiles on CPU; the Triton kernel on CUDA): chunk
   scores a with a rigorous bound e, |a - exact| <= e (`_exact.fp32_dot_error`).
2. The boundary. Every bound is rounded outward to fp32 (ub up, lb down), so ties created by the
   final rounding to fp32 are covered too. thr[b] = the k-th largest document lower bound among
   visible documents. A document can only be selected if some (token, chunk) pair of it has
   ub >= thr (chunk max), or if its own ub >= thr (chunk mean).
   With chunk max, thr is tracked while streaming the tiles (a running top-k of the lower bounds
   of the documents that start in each tile, each counted once), and only chunks with ub >= the
   running thr are kept: memory holds the kept chunks, not [B, C].
3. Float64 pass (`routing.exact_pair_scores`, the fixed order): the kept chunks' pairs whose
   fp32 ub reaches max(thr, the chunk's own lower bound) (token max), or all routing tokens
   (token mean); documents reduce their exact chunk scores as the reference does.
Documents below the boundary may get a lower value than their canonical one (pruned pairs), but
they rank after the k documents whose lower bounds set thr either way; every document that can be
selected, the k winners included, gets its canonical value. So the result equals
`select_top_k(doc_scores_ref(...))` bit for bit, whatever the tile, thread count or device.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from msa_cluster.kernels._common import FLOAT_DTYPES, check_tensor, use_triton
from msa_cluster.kernels._exact import bound, fixed_sum, lower, round_down_fp32, round_up_fp32, upper
from msa_cluster.kernels.routing import (
    FirstPass,
    _check_doc_offsets,
    _pair_scores32,
    _token_view,
    bound_coef,
    chunk_scores_triton,
    exact_pair_scores,
    first_pass,
    head_norms,
    normalize_heads,
    query_norms,
    reduce_doc_chunks,
    tile_chunks,
)
from msa_cluster.types import RoutingQuery, ScoredDoc

__all__ = ["route_top_k", "one_torch_thread"]

_TILES_PER_WORKER = 4
_MIN_TILE_FLOP = 1 << 26  # a tile's GEMM at least this big (~1 ms here): its bookkeeping (~0.2 ms) stays small
_PAIR_BLOCK = 4096  # (token, chunk) pairs per float64 block: bounds the pass's memory, never its values


class _Boundary:
    """Pass 1 state for chunk_reduce "max": a running top-k of document lower bounds and the kept chunks."""

    def __init__(self, B: int, k: int, offsets: torch.Tensor, visible: torch.Tensor):
        self.offsets, self.visible, self.k = offsets, visible, k
        self.best = torch.full((B, k), -math.inf, device=visible.device)  # k largest lower bounds, fp32
        self.rows: list[torch.Tensor] = []
        self.chunks: list[torch.Tensor] = []
        self.ubs: list[torch.Tensor] = []

    def add(self, start: int, a: torch.Tensor, e: torch.Tensor) -> None:
        """a [B, n] fp32 chunk scores of chunks start..start+n-1, e [B, n] their bounds."""
        n = a.shape[1]
        doc = torch.searchsorted(self.offsets, torch.arange(start, start + n, device=a.device), right=True) - 1  # [n]
        ok = self.visible[:, doc] & (a > -math.inf)
        ub = upper(a, e).masked_fill(~ok, -math.inf)
        lb = lower(a, e).masked_fill(~ok, -math.inf)
        rows, cols = torch.nonzero(ok & (ub >= self.best[:, -1:]), as_tuple=True)
        self.rows.append(rows)
        self.chunks.append(cols + start)
        self.ubs.append(ub[rows, cols])
        # documents that start in this tile enter the running top-k once, with the lower bound of
        # their chunks in this tile (a valid lower bound of their score)
        first = int(doc[0])
        local = (doc - first).expand(a.shape[0], -1)
        nd = int(doc[-1]) - first + 1
        doc_lb = lb.new_full((a.shape[0], nd), -math.inf).scatter_reduce(1, local, lb, reduce="amax")
        doc_lb = doc_lb[:, self.offsets[first : first + nd] >= start]
        merged = torch.cat([self.best, doc_lb], dim=1)
        self.best = merged.topk(self.k, dim=1).values

    @classmethod
    def merge(cls, parts: Sequence[_Boundary]) -> _Boundary:
        """One boundary from workers' boundaries over disjoint tiles (each document counted once)."""
        out = parts[0]
        for p in parts[1:]:
            out.rows += p.rows
            out.chunks += p.chunks
            out.ubs += p.ubs
            out.best = torch.cat([out.best, p.best], dim=1).topk(out.k, dim=1).values
        return out

    def needed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows [Q], chunks [Q], floor [Q] fp32): the chunks the float64 pass must score."""
        thr = self.best[:, -1]  # [B]
        rows, chunks, ubs = torch.cat(self.rows), torch.cat(self.chunks), torch.cat(self.ubs)
        keep = ubs >= thr[rows]
        return rows[keep], chunks[keep], thr[rows[keep]]


_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 1


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch runs single-threaded inside (restored by the last of overlapping callers): the
    workers own the cores. Two-thread torch GEMMs on tiles this small stall whenever one of their
    threads is descheduled (measured in bench/bench_routing.py on a loaded machine)."""
    global _threads_users, _threads_saved
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_saved)


def _stream_max(query: RoutingQuery, router_keys: torch.Tensor, offsets: torch.Tensor, visible: torch.Tensor, k: int,
                tile: int, workers: int) -> _Boundary:
    """Pass 1 with chunk max on CPU: `workers` threads (one torch thread each) take tiles from one
    queue, so a descheduled worker delays the call by at most one tile, never the others. A
    torch GEMM on two threads splits every tile between them and waits for both at its end: on a
    loaded machine that costs 10-20x (bench/bench_routing.py, 128K tokens, 2 threads, loaded)."""
    scorer = FirstPass(query, router_keys)
    C, B = router_keys.shape[0], query.batch_size
    starts = iter(range(0, C, tile))
    lock = threading.Lock()

    def run() -> _Boundary:
        boundary, buf = _Boundary(B, k, offsets, visible), scorer.buffer(tile)
        while True:
            with lock:
                start = next(starts, None)
            if start is None:
                return boundary
            boundary.add(start, *scorer.tile(start, min(tile, C - start), buf))

    # at least 4 tiles per worker: the queue then absorbs a descheduled worker (it takes fewer
    # tiles); with fewer tiles the call would wait for it, so one thread does them all
    workers = max(1, min(workers, -(-C // tile) // _TILES_PER_WORKER))
    with one_torch_thread():  # never torch's own threads: their barriers stall under load
        if workers == 1:
            return run()
        with ThreadPoolExecutor(workers) as pool:
            return _Boundary.merge([f.result() for f in [pool.submit(run) for _ in range(workers)]])


def _tile_for(C: int, width: int, rows: int, workers: int) -> int:
    """Chunks per CPU tile: small enough for `workers` to get _TILES_PER_WORKER tiles each, but no
    smaller than _MIN_TILE_FLOP of work for `rows` query rows of `width`, and no larger than
    `tile_chunks` (the cache bound)."""
    if workers <= 1:
        return tile_chunks(width)
    least = -(-_MIN_TILE_FLOP // (2 * max(rows, 1) * max(width, 1)))
    spread = -(-C // (_TILES_PER_WORKER * workers))
    return max(1, min(tile_chunks(width), max(least, spread)))


def _mean_candidates(B: int, k: int, offsets: torch.Tensor, visible: torch.Tensor,
                     tiles: Iterable[tuple[int, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk_reduce "mean": (rows [P], docs [P]) of the documents whose ub reaches the k-th lower bound."""
    lengths = offsets[1:] - offsets[:-1]
    N = lengths.numel()
    total = torch.zeros(B, N, dtype=torch.float64, device=visible.device)
    slack = torch.zeros_like(total)
    for start, a, e in tiles:
        doc = torch.searchsorted(offsets, torch.arange(start, start + a.shape[1], device=a.device), right=True) - 1
        total.index_add_(1, doc, a.double())
        slack.index_add_(1, doc, e.double())
    mean = total / lengths.clamp_min(1).double()
    err = slack / lengths.clamp_min(1).double() * 1.001  # + the float64 rounding of these sums
    ok = visible & (lengths > 0)[None, :] & (mean > -math.inf)
    ub = round_up_fp32(mean + err).masked_fill(~ok, -math.inf)
    lb = round_down_fp32(mean - err).masked_fill(~ok, -math.inf)
    thr = lb.topk(min(k, N), dim=1).values[:, -1:]
    rows, docs = torch.nonzero(ok & (ub >= thr), as_tuple=True)
    return rows, docs


def _exact_pairs(vectors: torch.Tensor, keys: torch.Tensor, q_idx: torch.Tensor, rows: torch.Tensor,
                 toks: torch.Tensor, query: RoutingQuery) -> torch.Tensor:
    """Canonical scores [P] float64 of pairs (token toks[p] of row rows[q_idx[p]], kept chunk q_idx[p])."""
    out = torch.empty(q_idx.numel(), dtype=torch.float64, device=keys.device)
    for s in range(0, q_idx.numel(), _PAIR_BLOCK):
        q, t = q_idx[s : s + _PAIR_BLOCK], toks[s : s + _PAIR_BLOCK]
        out[s : s + q.numel()] = exact_pair_scores(vectors[rows[q], t], keys[q], query.folded, query.spec.group)
    return out


def _rescore32(vectors: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, query: RoutingQuery) -> torch.Tensor:
    """fp32 scores [Q, T] of each kept chunk against its own row's tokens (a loop over rows, <= B)."""
    out = keys.new_empty(rows.numel(), vectors.shape[1])
    for b in rows.unique().tolist():
        sel = torch.nonzero(rows == b).flatten()
        out[sel] = _pair_scores32(vectors[b : b + 1], keys[sel], query.folded, query.spec.group)[0].T
    return out


def _exact_chunks(query: RoutingQuery, router_keys: torch.Tensor, rows: torch.Tensor, chunks: torch.Tensor,
                  floor: torch.Tensor) -> torch.Tensor:
    """Canonical chunk scores [Q] float64 of kept chunks; a pair whose ub is below max(floor, the
    chunk's lower bound) is skipped (token max), which can only lower a chunk that cannot matter."""
    vectors, mask, how = _token_view(query)
    keys = router_keys[chunks].float()  # [Q, Hkv, D]: only the kept chunks
    if query.spec.similarity == "cosine":
        keys = normalize_heads(keys)
    Q, T = rows.numel(), vectors.shape[1]
    routed = mask[rows]  # [Q, T]
    if how == "mean":  # every routing token, summed in the fixed order
        q_idx, toks = torch.nonzero(routed, as_tuple=True)
        dense = torch.zeros(Q, T, dtype=torch.float64, device=keys.device)
        dense[q_idx, toks] = _exact_pairs(vectors, keys, q_idx, rows, toks, query)
        count = routed.sum(dim=1).double()
        return (fixed_sum(dense, dim=1) / count.clamp_min(1)).masked_fill(count == 0, -math.inf)
    s32 = _rescore32(vectors, keys, rows, query)
    e = bound(bound_coef(query), head_norms(vectors, query.folded)[rows], head_norms(keys, query.folded)[:, None])
    lb_chunk = lower(s32, e).masked_fill(~routed, -math.inf).amax(dim=1)  # [Q]
    q_idx, toks = torch.nonzero(routed & (upper(s32, e) >= torch.maximum(floor, lb_chunk)[:, None]), as_tuple=True)
    exact = _exact_pairs(vectors, keys, q_idx, rows, toks, query)
    out = torch.full((Q,), -math.inf, dtype=torch.float64, device=keys.device)
    return out.scatter_reduce(0, q_idx, exact, reduce="amax")


def _rank(rows: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor, B: int, k: int) -> list[list[ScoredDoc]]:
    """Top-k per row of candidate (row, doc id, fp32 score) triples, by (score desc, id asc)."""
    out: list[list[ScoredDoc]] = [[] for _ in range(B)]
    keep = ~torch.isnan(scores) & (scores > -math.inf)
    for b, s, d in sorted(zip(rows[keep].tolist(), (-scores[keep]).tolist(), ids[keep].tolist())):
        if len(out[b]) < k:
            out[b].append(ScoredDoc(doc_id=int(d), score=-s))
    return out


def _check(query: RoutingQuery, router_keys: object, doc_offsets: object, doc_ids: object, k: int,
           visible: object) -> torch.Tensor:
    """Validate the inputs; returns visible as [B, N] bool on the keys' device."""
    if k < 1:
        raise ValueError(f"top-k must be >= 1, got {k}")
    check_tensor("router_keys", router_keys, shape="[C, Hkv, D]", ndim=3, dtypes=FLOAT_DTYPES, contiguous=False)
    assert isinstance(router_keys, torch.Tensor) and isinstance(doc_offsets, torch.Tensor)  # checked above / below
    _check_doc_offsets(doc_offsets, router_keys.shape[0])
    N = doc_offsets.numel() - 1
    check_tensor("doc_ids", doc_ids, shape="[N]", ndim=1, dtypes=(torch.int32, torch.int64), contiguous=False)
    assert isinstance(doc_ids, torch.Tensor)
    if doc_ids.numel() != N:
        raise ValueError(f"doc_ids has {doc_ids.numel()} entries for N={N} documents")
    B = query.batch_size
    if visible is None:
        return torch.ones(B, N, dtype=torch.bool, device=router_keys.device)
    if not isinstance(visible, torch.Tensor) or visible.dtype != torch.bool or tuple(visible.shape) not in ((N,), (B, N)):
        raise ValueError(f"visible must be a bool tensor [B={B}, N={N}] or [N={N}], got {getattr(visible, 'shape', visible)!r}")
    return visible.to(router_keys.device).expand(B, N)


def route_top_k(query: RoutingQuery, router_keys: torch.Tensor, doc_offsets: torch.Tensor, doc_ids: torch.Tensor,
                k: int, visible: torch.Tensor | None = None, *, tile: int | None = None,
                workers: int | None = None) -> list[list[ScoredDoc]]:
    """Exact top-k documents of each query row: [B] lists, best first, equal (ids and fp32 scores)
    to `select_top_k(doc_scores_ref(...) masked by visible, doc_ids, k)` bit for bit.

    router_keys: [C, Hkv, D] fp32/bf16/fp16 of N documents laid out contiguously; doc_offsets
    [N + 1]; doc_ids [N] int64; visible: [B, N] or [N] bool (None: all). `tile` (CPU chunks per
    first-pass tile; default `_tile_for`) and `workers` (CPU threads scoring tiles, one torch thread
    each; default torch.get_num_threads()) change speed only. Example:
        >>> from msa_cluster.types import RoutingSpec
        >>> from msa_cluster.kernels.routing import prepare_queries
        >>> spec = RoutingSpec(num_heads=2, num_kv_heads=1)
        >>> query = prepare_queries(torch.randn(1, 3, 2, 4), torch.ones(1, 3, dtype=torch.bool), spec, 0.5)
        >>> [len(row) for row in route_top_k(query, torch.randn(5, 1, 4), torch.tensor([0, 2, 5]), torch.tensor([7, 9]), 1)]
        [1]
    """
    vis = _check(query, router_keys, doc_offsets, doc_ids, k, visible)
    B, N, C = query.batch_size, doc_offsets.numel() - 1, router_keys.shape[0]
    if C == 0 or N == 0:
        return [[] for _ in range(B)]
    dev = router_keys.device
    offsets = doc_offsets.to(dev, torch.int64)
    query = query if query.vectors.device == dev else RoutingQuery(query.vectors.to(dev), query.mask.to(dev), query.spec, query.folded)
    cuda = use_triton(query.vectors, router_keys)
    workers = workers or torch.get_num_threads()
    tile = tile or _tile_for(C, router_keys[0].numel(), query.batch_size * _token_view(query)[0].shape[1], workers)
    tiles: Iterable[tuple[int, torch.Tensor, torch.Tensor]]
    if cuda:  # one launch over every chunk: a single tile
        keys = normalize_heads(router_keys) if query.spec.similarity == "cosine" else router_keys
        vectors, mask, _ = _token_view(query)
        e = bound(bound_coef(query), query_norms(vectors, mask, query.folded)[:, None], head_norms(keys, query.folded)[None, :])
        tiles = [(0, chunk_scores_triton(query, keys.contiguous()), e)]
    else:  # lazy: the chunk-max path streams its tiles through `_stream_max` instead
        tiles = first_pass(query, router_keys, tile)
    if query.spec.chunk_reduce == "max":
        if cuda:
            boundary = _Boundary(B, k, offsets, vis)
            for start, a, e in tiles:
                boundary.add(start, a, e)
        else:
            boundary = _stream_max(query, router_keys, offsets, vis, k, tile, workers)
        rows, chunks, floor = boundary.needed()
        exact = _exact_chunks(query, router_keys, rows, chunks, floor)
        docs = torch.searchsorted(offsets, chunks, right=True) - 1
        key, inverse = torch.unique(rows * N + docs, return_inverse=True)
        best = torch.full((key.numel(),), -math.inf, dtype=torch.float64, device=dev)
        scores = best.scatter_reduce(0, inverse, exact, reduce="amax")
        doc_rows, doc_idx = key // N, key % N
    else:
        with one_torch_thread():
            doc_rows, doc_idx = _mean_candidates(B, k, offsets, vis, tiles)
        scores = _exact_doc_means(query, router_keys, offsets, doc_rows, doc_idx)
    return _rank(doc_rows.cpu(), doc_ids.cpu()[doc_idx.cpu()], scores.float().cpu(), B, k)


def _exact_doc_means(query: RoutingQuery, router_keys: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor,
                     docs: torch.Tensor) -> torch.Tensor:
    """Canonical chunk-mean scores [P] float64 of candidate documents (every chunk of each)."""
    lengths = offsets[docs + 1] - offsets[docs]  # [P]
    pair = torch.repeat_interleave(torch.arange(docs.numel(), device=docs.device), lengths)  # [Q]
    within = torch.arange(pair.numel(), device=docs.device) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    chunks = offsets[docs][pair] + within
    floor = torch.full((pair.numel(),), -math.inf, device=docs.device)
    exact = _exact_chunks(query, router_keys, rows[pair], chunks, floor)  # [Q]
    local = torch.cat([torch.zeros(1, dtype=torch.int64, device=docs.device), lengths.cumsum(0)])
    return reduce_doc_chunks(exact.unsqueeze(0), local, "mean")[0]
