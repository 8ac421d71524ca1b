"""ClusterMemory: the model's MemoryBackend over the Ray cluster (or plain shard objects).

A request takes one `ClusterView` from the coordinator (the latest committed version and the
shard handles) and uses it for every layer and interleave round. Concurrent requests in this
process are batched per routing layer: the first caller waits `batch_window_s` for others,
then one fan-out serves all their rows, so throughput grows with concurrency.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from msa_cluster.actors.calls import call
from msa_cluster.actors.fanout import ClusterView, fan_out, fetch_texts
from msa_cluster.types import DEFAULT_TENANT, Retrieval, RoutingQuery, ShardUnavailable

__all__ = ["ClusterMemory", "ClusterSnapshot"]


class _Batch:
    def __init__(self):
        self.rows: list[tuple[RoutingQuery, str, int]] = []
        self.done = threading.Event()
        self.joined = threading.Event()  # set each time another request adds its rows
        self.result: Retrieval | None = None
        self.error: BaseException | None = None


class ClusterMemory:
    """MemoryBackend over shards. `coordinator` is a Ray handle or a plain Coordinator.

    Example:
        >>> memory = ClusterMemory(coordinator_handle)                   # doctest: +SKIP
        >>> out = model.prefill(ids, memory, routing_mask, tenant="acme")  # doctest: +SKIP
    """

    def __init__(self, coordinator: Any, timeout_s: float = 30.0, batch_window_s: float = 0.0,
                 max_batch: int = 64, retries: int = 2, retry_delay_s: float = 0.5):
        self.coordinator = coordinator
        self.timeout_s = timeout_s
        self.batch_window_s = batch_window_s
        self.max_batch = max_batch
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        # Set by a Generator: how many requests are in flight. With one, waiting for a batch only adds latency.
        self.active_requests: Callable[[], int] | None = None
        self._lock = threading.Lock()
        self._open: dict[tuple[int, int], _Batch] = {}  # (layer, top_k) -> batch filling

    def view(self) -> ClusterView:
        """The latest committed version and the shards; retried while the coordinator restarts."""
        for attempt in range(self.retries + 1):
            try:
                return call(self.coordinator, "view", timeout_s=self.timeout_s)
            except ShardUnavailable:
                if attempt == self.retries:
                    raise
                self._backoff(attempt)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> None:
        """Exponential wait between retries (a killed actor takes seconds to restart), capped at 5 s."""
        time.sleep(min(self.retry_delay_s * 2**attempt, 5.0))

    def snapshot(self, tenant: str = DEFAULT_TENANT) -> ClusterSnapshot:
        return ClusterSnapshot(self, self.view(), tenant)

    def retrieve(self, view: ClusterView, layer: int, query: RoutingQuery, top_k: int, tenant: str) -> Retrieval:
        """One row block of one request; batched with concurrent requests when a window is set."""
        alone = self.active_requests is not None and self.active_requests() <= 1
        if self.batch_window_s <= 0 or alone:
            return self._with_retries(view, layer, query, top_k, [tenant] * query.batch_size, [view.version] * query.batch_size)
        key = (layer, top_k)  # rows carry their own tenant and version; the leader's shards serve all
        with self._lock:
            batch = self._open.get(key)
            leader = batch is None
            if leader:
                batch = self._open[key] = _Batch()
            start = sum(q.batch_size for q, _, _ in batch.rows)
            batch.rows.append((query, tenant, view.version))
            full = start + query.batch_size >= self.max_batch
            if full:
                self._open.pop(key, None)
        if not leader:
            batch.joined.set()
        if leader:
            if not full:
                self._wait_for_company(batch)
                with self._lock:
                    if self._open.get(key) is batch:
                        del self._open[key]
            self._run(view, layer, top_k, batch)
        elif not batch.done.wait(self.timeout_s * (self.retries + 1) + 1):
            raise ShardUnavailable(f"batched routing at layer {layer} did not finish in time")
        if batch.error is not None:
            raise batch.error
        res = batch.result
        rows = slice(start, start + query.batch_size)
        return Retrieval(res.selected[rows], res.keys[rows], res.values[rows])

    def _wait_for_company(self, batch: _Batch) -> None:
        """Wait up to the window, but stop as soon as every request in flight has joined."""
        deadline = time.monotonic() + self.batch_window_s
        while (left := deadline - time.monotonic()) > 0:
            if self.active_requests is not None and len(batch.rows) >= self.active_requests():
                return
            batch.joined.wait(left)
            batch.joined.clear()

    def _run(self, view: ClusterView, layer: int, top_k: int, batch: _Batch) -> None:
        try:
            queries = [q for q, _, _ in batch.rows]
            T = max(q.vectors.shape[1] for q in queries)
            vec = torch.cat([torch.nn.functional.pad(q.vectors, (0, 0, 0, 0, 0, T - q.vectors.shape[1])) for q in queries])
            mask = torch.cat([torch.nn.functional.pad(q.mask, (0, T - q.mask.shape[1])) for q in queries])
            merged = RoutingQuery(vec, mask, queries[0].spec, queries[0].folded)
            tenants = [t for q, t, _ in batch.rows for _ in range(q.batch_size)]
            versions = [v for q, _, v in batch.rows for _ in range(q.batch_size)]
            batch.result = self._with_retries(view, layer, merged, top_k, tenants, versions)
        except Exception as e:  # handed to every waiting request, then re-raised there
            batch.error = e
        finally:
            batch.done.set()

    def _with_retries(self, view, layer, query, top_k, tenants, versions) -> Retrieval:
        for attempt in range(self.retries + 1):
            try:
                return fan_out(view, layer, query, top_k, tenants, versions)
            except ShardUnavailable:
                if attempt == self.retries:
                    raise
                self._backoff(attempt)
        raise AssertionError("unreachable")


class ClusterSnapshot:
    """One request's pinned view: same version for every layer and interleave round."""

    def __init__(self, memory: ClusterMemory, view: ClusterView, tenant: str):
        self.memory, self.view, self.tenant = memory, view, tenant
        self.version = view.version

    def retrieve(self, layer: int, query: RoutingQuery, top_k: int) -> Retrieval:
        return self.memory.retrieve(self.view, layer, query, top_k, self.tenant)

    def texts(self, doc_ids: Sequence[int]) -> dict[int, str]:
        return fetch_texts(self.view, list(doc_ids), self.tenant, self.version)

    def close(self) -> None:
        """Nothing is held remotely for a snapshot; shards keep removed entries for a grace period."""
