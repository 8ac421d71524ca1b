"""Distributed routing: fan a layer's routing queries out to every router shard, merge, fetch K/V.

Legend: B query rows, T tokens, Hr routing heads, D head dim, C chunks, Hkv kv heads.

`ClusterView` is what a request needs: the store version it pins and the (router, kv) shard
pairs. A router shard and the KV shard of the same index own the same documents, so the shard
that returned a winner is the one to ask for its K/V: no placement map travels.
`fan_out` is exact: each shard returns its local top-k with the canonical scores; the merge
keeps the global top-k by (score desc, doc id asc), the same order one shard holding every
document would give. By default a layer is one round: each router shard answers with its local
top-k and their K/V (read in its own process), the query is put in the object store once, and
K/V travels as numpy and is copied once, into each row's context (`actors.wire`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from msa_cluster.actors.calls import KVHandle, RouterHandle, gather, is_actor, submit
from msa_cluster.actors.wire import ShardAnswer, WireQuery, assemble, to_numpy
from msa_cluster.kernels.routing import merge_top_k
from msa_cluster.types import Retrieval, RoutingQuery, ScoredDoc, ShardUnavailableError

__all__ = ["ClusterView", "Exchange", "PlainExchange", "fan_out", "fetch_texts"]


@dataclass(frozen=True)
class ClusterView:
    """What one request pins: the store version and placement epoch the cluster serves, and its shards."""

    version: int
    routers: tuple[RouterHandle, ...]
    kvs: tuple[KVHandle, ...]
    timeout_s: float = 30.0
    epoch: int = 0


def fan_out(view: ClusterView, layer: int, query: RoutingQuery, top_k: int, tenants: Sequence[str],
            pins: Sequence[tuple[int, int]] | None = None, *, rounds: int = 1,
            exchange: Exchange | None = None) -> Retrieval:
    """The global top-k of every row at `layer` and the winners' K/V, exact.

    pins[b] = (version, epoch) of row b (the view's own by default): rows of several requests may
    share one fan-out, each keeping its own snapshot and tenant.
    rounds=1: one call per router shard returns its local top-k with their K/V (`RouterShard.route`);
      the K/V of local candidates that lose the merge travels too, at most (shards - 1) * top_k
      documents per row. rounds=2: score everywhere, then fetch only the winners from the KV shards.
    exchange: how the one round reaches the shards (default: plain actor calls; see `actors.compiled`).
    """
    pins = [(view.version, view.epoch)] * query.batch_size if pins is None else [(int(v), int(e)) for v, e in pins]
    if len(tenants) != query.batch_size or len(pins) != query.batch_size:
        raise ValueError(f"{query.batch_size} query rows need {query.batch_size} tenants and pins, got {len(tenants)} and {len(pins)}")
    if rounds == 2:
        return _two_rounds(view, layer, query, top_k, list(tenants), pins)
    if rounds != 1:
        raise ValueError(f"rounds must be 1 or 2, got {rounds}")
    exchange = exchange if exchange is not None else PlainExchange(view.routers)
    answers = exchange.route(layer, WireQuery.of(query), top_k, list(tenants), pins, view.timeout_s)
    merged = merge_top_k(_unique([a.selected for a in answers]), top_k)
    keys, values = assemble(merged, [v for v, _ in pins], answers)
    return Retrieval(selected=merged, keys=keys, values=values)


class Exchange(Protocol):
    """Runs one routing round at every router shard of a view: one ShardAnswer per shard, in order."""

    def route(self, layer: int, query: WireQuery, top_k: int, tenants: list[str], pins: list[tuple[int, int]],
              timeout_s: float) -> list[ShardAnswer]: ...


class PlainExchange:
    """The one round as plain calls: the query put in the object store once, `route` at every shard."""

    def __init__(self, routers: Sequence[RouterHandle]):
        self.routers = tuple(routers)

    def route(self, layer: int, query: WireQuery, top_k: int, tenants: list[str], pins: list[tuple[int, int]],
              timeout_s: float) -> list[ShardAnswer]:
        q = _shared(query, self.routers)
        answers: list[ShardAnswer] = gather([submit(r, "route", layer, q, top_k, tenants, pins) for r in self.routers], timeout_s)
        return answers


def _two_rounds(view: ClusterView, layer: int, query: RoutingQuery, top_k: int, tenants: list[str],
                pins: list[tuple[int, int]]) -> Retrieval:
    """Score at every router shard, merge, then fetch only the winners' K/V from their KV shards."""
    deadline = time.monotonic() + view.timeout_s
    q = _shared(WireQuery.of(query).query(), view.routers)
    parts = _unique(gather([submit(r, "score", layer, q, top_k, tenants, pins) for r in view.routers], view.timeout_s))
    owner = {d.doc_id: shard for shard, rows in enumerate(parts) for row in rows for d in row}
    merged = merge_top_k(parts, top_k)
    # One fetch per (shard, version, tenant) with the union of the rows' winners.
    wanted: dict[tuple[int, int, str], dict[int, None]] = {}
    for row, (version, _), tenant in zip(merged, pins, tenants):
        for d in row:
            wanted.setdefault((owner[d.doc_id], version, tenant), {})[d.doc_id] = None
    groups = list(wanted)
    remaining = max(deadline - time.monotonic(), 0.001)
    fetched = gather([submit(view.kvs[s], "fetch", layer, list(wanted[(s, v, t)]), v, t) for s, v, t in groups], remaining)
    pieces: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    dtype = "float32"
    for (_, version, _), ids, (k, val, counts) in zip(groups, (list(wanted[g]) for g in groups), fetched):
        dtype = str(k.dtype).removeprefix("torch.")
        bounds = np.cumsum([0, *counts]).tolist()
        for doc_id, a, b in zip(ids, bounds, bounds[1:]):
            pieces[(doc_id, version)] = (to_numpy(k[a:b]), to_numpy(val[a:b]))
    keys, values = assemble(merged, [v for v, _ in pins], [ShardAnswer([], pieces, dtype)])
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


def _shared(query: Any, routers: Sequence[RouterHandle]) -> Any:
    """Put the query in the object store once when several actors read it (else it is serialized for each)."""
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


