"""Distributed routing: fan a layer's routing queries out to every router shard, merge, fetch K/V.

Legend: B query rows, T tokens, Hr routing heads, D head dim, C chunks, Hkv kv heads.

`ClusterView` is what a request needs: the store version it pins and the (router, kv) shard
pairs. A router shard and the KV shard of the same index own the same documents, so the shard
that returned a winner is the one to ask for its K/V: no placement map travels.
`fan_out` is exact: each shard returns its local top-k with the canonical scores; the merge
keeps the global top-k by (score desc, doc id asc), the same order one shard holding every
document would give.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from msa_cluster.actors.calls import KVHandle, RouterHandle, gather, is_actor, submit
from msa_cluster.kernels.routing import merge_top_k
from msa_cluster.types import Retrieval, RoutingQuery, ScoredDoc, ShardUnavailableError

__all__ = ["ClusterView", "fan_out", "fetch_texts"]


@dataclass(frozen=True)
class ClusterView:
    """What one request pins: the store version and placement epoch the cluster serves, and its shards."""

    version: int
    routers: tuple[RouterHandle, ...]
    kvs: tuple[KVHandle, ...]
    timeout_s: float = 30.0
    epoch: int = 0


def fan_out(view: ClusterView, layer: int, query: RoutingQuery, top_k: int, tenants: Sequence[str],
            pins: Sequence[tuple[int, int]] | None = None) -> Retrieval:
    """Score at every router shard, merge to the global top-k, fetch the winners' K/V in one pass.

    pins[b] = (version, epoch) of row b (the view's own by default): rows of several requests may
    share one fan-out, each keeping its own snapshot and tenant.
    """
    pins = [(view.version, view.epoch)] * query.batch_size if pins is None else [tuple(p) for p in pins]  # type: ignore[misc]
    deadline = time.monotonic() + view.timeout_s
    q = _shared(RoutingQuery(query.vectors.contiguous(), query.mask, query.spec, query.folded), view.routers)
    parts = _unique(gather([submit(r, "score", layer, q, top_k, list(tenants), pins) for r in view.routers], view.timeout_s))
    owner: dict[int, int] = {}
    for shard, rows in enumerate(parts):
        for row in rows:
            for d in row:
                owner[d.doc_id] = shard
    merged = merge_top_k(parts, top_k)
    # One fetch per (shard, version, tenant) with the union of the rows' winners, then split per row.
    wanted: dict[tuple[int, int, str], list[int]] = {}
    for row, (version, _), tenant in zip(merged, pins, tenants):
        for d in row:
            ids = wanted.setdefault((owner[d.doc_id], version, tenant), [])
            if d.doc_id not in ids:
                ids.append(d.doc_id)
    groups = list(wanted)
    remaining = max(deadline - time.monotonic(), 0.001)
    fetched = gather([submit(view.kvs[s], "fetch", layer, wanted[(s, v, t)], v, t) for s, v, t in groups], remaining)
    pieces: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for group, (k, val, counts) in zip(groups, fetched):
        start, version = 0, group[1]
        for doc_id, c in zip(wanted[group], counts):
            pieces[(doc_id, version)] = (k[start : start + c], val[start : start + c])
            start += c
    keys, values = [], []
    for row, (version, _) in zip(merged, pins):
        ks = [pieces[(d.doc_id, version)][0] for d in row]
        vs = [pieces[(d.doc_id, version)][1] for d in row]
        keys.append(torch.cat(ks) if ks else torch.empty(0))
        values.append(torch.cat(vs) if vs else torch.empty(0))
    return Retrieval(selected=merged, keys=keys, values=values)


def _unique(parts: list[list[list[ScoredDoc]]]) -> list[list[list[ScoredDoc]]]:
    """Keep a document once per row. Epochs already make a moved document visible on one shard per
    pin; this guards the merge against a shard that has not retired an entry yet."""
    seen: list[set[int]] = [set() for _ in (parts[0] if parts else [])]
    out = []
    for rows in parts:
        kept = []
        for b, row in enumerate(rows):
            kept.append([d for d in row if d.doc_id not in seen[b]])
            seen[b].update(d.doc_id for d in row)
        out.append(kept)
    return out


def _shared(query: RoutingQuery, routers: Sequence[RouterHandle]) -> Any:
    """Put the query in the object store once when several actors read it (else it is sent to each)."""
    if sum(1 for r in routers if is_actor(r)) < 2:
        return query
    import ray

    return ray.put(query)


def fetch_texts(view: ClusterView, doc_ids: Sequence[int], tenant: str, version: int) -> dict[int, str]:
    """Raw texts (tenant-filtered, live at `version`); any KV shard can read any text from the store."""
    if not doc_ids:
        return {}
    for attempt, kv in enumerate(view.kvs):
        try:
            return gather([submit(kv, "texts", list(doc_ids), version, tenant)], view.timeout_s)[0]
        except ShardUnavailableError:
            if attempt == len(view.kvs) - 1:
                raise
    return {}


