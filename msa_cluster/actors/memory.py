"""ClusterMemory: the model's MemoryBackend over the Ray cluster (or plain shard objects).

A request takes one `ClusterView` from the coordinator (the version and placement epoch the
cluster serves, and the shard handles) and uses it for every layer and interleave round.
Transient failures (a shard restarting or catching up) are retried with the package's backoff
policy; concurrent requests in this process share fan-outs through a `LayerBatcher`.
A routing layer is one round to the router shards: by plain actor calls, or (`compiled=True`)
through a Ray compiled graph, which is faster but holds the shards for this process: only for
a cluster's one routing client, and only while every shard runs on this process's node (see
`actors.compiled`; a view across nodes goes by plain calls).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from msa_cluster.actors.batching import LayerBatcher, Row
from msa_cluster.actors.calls import CoordinatorHandle, call, is_actor
from msa_cluster.actors.compiled import CompiledExchange, shared_exchange
from msa_cluster.actors.fanout import ClusterView, fan_out, fetch_texts
from msa_cluster.retry import Backoff, retry
from msa_cluster.types import DEFAULT_TENANT, Retrieval, RoutingQuery, ShardUnavailableError, check_tenant

__all__ = ["ClusterMemory", "ClusterSnapshot"]


class ClusterMemory:
    """MemoryBackend over shards. `coordinator` is a Ray handle or a plain Coordinator.

    Example:
        >>> memory = ClusterMemory(coordinator_handle)                   # doctest: +SKIP
        >>> out = model.prefill(ids, memory, routing_mask, tenant="acme")  # doctest: +SKIP
    """

    def __init__(self, coordinator: CoordinatorHandle, *, timeout_s: float = 30.0, batch_window_s: float = 0.0,
                 max_batch: int = 64, retries: int = 2, retry_delay_s: float = 0.5, compiled: bool = False,
                 rounds: int = 1):
        if rounds not in (1, 2):
            raise ValueError(f"rounds must be 1 or 2, got {rounds}")
        self.coordinator = coordinator
        self.timeout_s = timeout_s
        self.compiled, self.rounds = compiled, rounds
        self.policy = Backoff(attempts=retries + 1, initial_s=retry_delay_s, max_s=5.0)
        # A follower waits as long as its leader can take: every attempt's timeout plus the waits between.
        self.batcher = LayerBatcher(window_s=batch_window_s, max_batch=max_batch,
                                    max_wait_s=self.policy.attempts * timeout_s + self.policy.total_s() + 1.0)

    @property
    def active_requests(self) -> Callable[[], int] | None:
        return self.batcher.active_requests

    @active_requests.setter
    def active_requests(self, fn: Callable[[], int] | None) -> None:
        """Set by a Generator: how many requests are in flight (one alone never waits for a batch)."""
        self.batcher.active_requests = fn

    def view(self) -> ClusterView:
        """The version and placement the cluster serves now, and its shards; retried while the coordinator restarts."""
        view: ClusterView = retry(lambda: call(self.coordinator, "view", timeout_s=self.timeout_s),
                                  retry_on=(ShardUnavailableError,), policy=self.policy)
        return view

    def snapshot(self, tenant: str = DEFAULT_TENANT) -> ClusterSnapshot:
        return ClusterSnapshot(self, self.view(), check_tenant(tenant))

    def retrieve(self, view: ClusterView, layer: int, query: RoutingQuery, top_k: int, tenant: str) -> Retrieval:
        """One request's rows at one layer; batched with concurrent requests when a window is set."""

        def run(q: RoutingQuery, tenants: Sequence[str], pins: Sequence[tuple[int, int]]) -> Retrieval:
            return retry(lambda: fan_out(view, layer, q, top_k, tenants, pins, rounds=self.rounds, exchange=self._exchange_for(view)),
                         retry_on=(ShardUnavailableError,), policy=self.policy)

        # Rows of one batch are served by the leader's shards: only views of one placement epoch may share it.
        return self.batcher.submit((layer, top_k, view.epoch), Row(query, tenant, (view.version, view.epoch)), run)

    def _exchange_for(self, view: ClusterView) -> CompiledExchange | None:
        """The process's compiled graph over this view's router shards; None: plain calls."""
        if not self.compiled or self.rounds != 1 or not all(is_actor(r) for r in view.routers):
            return None
        return shared_exchange(view.routers)


class ClusterSnapshot:
    """One request's pinned view: the same version and epoch for every layer and interleave round."""

    def __init__(self, memory: ClusterMemory, view: ClusterView, tenant: str):
        self.memory, self.view, self.tenant = memory, view, tenant
        self.version = view.version

    def retrieve(self, layer: int, query: RoutingQuery, top_k: int) -> Retrieval:
        return self.memory.retrieve(self.view, layer, query, top_k, self.tenant)

    def texts(self, doc_ids: Sequence[int]) -> dict[int, str]:
        return retry(lambda: fetch_texts(self.view, list(doc_ids), self.tenant, self.version),
                     retry_on=(ShardUnavailableError,), policy=self.memory.policy)

    def close(self) -> None:
        """Nothing is held remotely for a snapshot; shards keep removed entries for a grace period."""
