"""LayerBatcher: concurrent requests in one process share one fan-out per routing layer.

Legend: B query rows, T tokens.

The first request to reach a layer leads a batch: it waits up to `window_s` for the other
requests in flight, then one call serves every row (each row keeps its own tenant and pin).
Followers wait for the leader's result for as long as the leader may take, retries included.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from msa_cluster.types import Retrieval, RoutingQuery, ShardUnavailableError

__all__ = ["LayerBatcher", "Row"]


@dataclass(frozen=True)
class Row:
    """One request's rows of a batch: its queries, tenant and pinned (version, epoch)."""

    query: RoutingQuery
    tenant: str
    pin: tuple[int, int]


@dataclass
class _Batch:
    rows: list[Row] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    joined: threading.Event = field(default_factory=threading.Event)  # set each time a request joins
    result: Retrieval | None = None
    error: BaseException | None = None
    runs: int = 0  # how many rows the one fan-out served (for tests and metrics)


RunBatch = Callable[[RoutingQuery, Sequence[str], Sequence[tuple[int, int]]], Retrieval]


class LayerBatcher:
    """Batches rows per (layer, top_k); `run(query, tenants, pins)` does the fan-out (with retries).

    max_wait_s: how long a follower may wait for its leader, which must cover the leader's retries.
    """

    def __init__(self, *, window_s: float, max_batch: int, max_wait_s: float,
                 active_requests: Callable[[], int] | None = None):
        if window_s < 0 or max_batch < 1 or max_wait_s <= 0:
            raise ValueError(f"invalid batching: window_s={window_s} >= 0, max_batch={max_batch} >= 1, max_wait_s={max_wait_s} > 0")
        self.window_s = window_s
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.active_requests = active_requests  # with one request in flight, waiting only adds latency
        self.batches_run = 0  # fan-outs that served rows of more than one request
        self.recent_sizes: deque[int] = deque(maxlen=1024)  # requests served by each recent batched fan-out
        self._lock = threading.Lock()
        self._open: dict[tuple[int, ...], _Batch] = {}

    def submit(self, key: tuple[int, ...], row: Row, run: RunBatch) -> Retrieval:
        """This request's slice of the batch's Retrieval (rows in the order it sent them)."""
        alone = self.active_requests is not None and self.active_requests() <= 1
        if self.window_s <= 0 or alone:
            return run(row.query, [row.tenant] * row.query.batch_size, [row.pin] * row.query.batch_size)
        with self._lock:
            batch = self._open.get(key)
            leader = batch is None
            if batch is None:
                batch = self._open[key] = _Batch()
            start = sum(r.query.batch_size for r in batch.rows)
            batch.rows.append(row)
            if start + row.query.batch_size >= self.max_batch:
                self._open.pop(key, None)
        if leader:
            self._wait_for_company(batch)
            with self._lock:
                if self._open.get(key) is batch:
                    del self._open[key]
            self._run(batch, run)
        else:
            batch.joined.set()
            if not batch.done.wait(self.max_wait_s):
                raise ShardUnavailableError(f"the batched routing call of layer {key[0]} did not finish in {self.max_wait_s:.1f}s")
        if batch.error is not None:
            raise batch.error
        assert batch.result is not None
        rows = slice(start, start + row.query.batch_size)
        return Retrieval(batch.result.selected[rows], batch.result.keys[rows], batch.result.values[rows])

    def _wait_for_company(self, batch: _Batch) -> None:
        """Wait up to the window, but stop as soon as every request in flight has joined."""
        deadline = time.monotonic() + self.window_s
        while (left := deadline - time.monotonic()) > 0:
            if sum(r.query.batch_size for r in batch.rows) >= self.max_batch:
                return
            if self.active_requests is not None and len(batch.rows) >= self.active_requests():
                return
            batch.joined.wait(left)
            batch.joined.clear()

    def _run(self, batch: _Batch, run: RunBatch) -> None:
        try:
            queries = [r.query for r in batch.rows]
            T = max(q.vectors.shape[1] for q in queries)
            pad = torch.nn.functional.pad
            vec = torch.cat([pad(q.vectors, (0, 0, 0, 0, 0, T - q.vectors.shape[1])) for q in queries])  # [B, T, Hr, D]
            mask = torch.cat([pad(q.mask, (0, T - q.mask.shape[1])) for q in queries])  # [B, T]
            merged = RoutingQuery(vec, mask, queries[0].spec, queries[0].folded)
            tenants = [r.tenant for r in batch.rows for _ in range(r.query.batch_size)]
            pins = [r.pin for r in batch.rows for _ in range(r.query.batch_size)]
            batch.runs = len(batch.rows)
            self.recent_sizes.append(batch.runs)
            if len(batch.rows) > 1:
                self.batches_run += 1
            batch.result = run(merged, tenants, pins)
        except Exception as e:  # handed to every waiting request, then re-raised there
            batch.error = e
        finally:
            batch.done.set()
