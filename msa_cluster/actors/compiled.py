"""The one round of a routing layer as a Ray compiled graph over a view's router shards.

A plain actor call goes through Ray's task machinery: a task spec, the query and each answer
created, sealed and fetched in the object store. A compiled graph sets up shared-memory
channels once; each execution writes the query into them and reads the answers back. On one
node this costs a fraction of a plain parallel call (BENCHMARKS.md, "Distributed query path").

Limits, and what this module does about them:
- An idle graph is not free: each actor's loop polls its input channel (measured here: about a
  quarter of a core per actor, so 4 shards take a whole core of a 2-core machine). Worth it where
  shards have cores to themselves; on a small shared machine it slows the scoring it waits for.
- A Ray actor serves one compiled graph at a time: a second graph over the same shards hangs.
  `shared_exchange` keeps one graph per process (a graph over an older set of shards that shares
  one is closed first). Across processes nothing can tell, so `compiled=True` is for a process
  that is the cluster's only routing client (one generator replica or driver); with several,
  use plain calls.
- A graph that cannot be compiled (an actor gone, or held by another process's graph) is not
  retried for `RECOMPILE_AFTER_S`: the round goes by plain calls meanwhile.
- A graph is compiled for one tuple of router handles: a new view (a restarted or added shard)
  compiles a new graph, the old one is torn down.
- One execution at a time per graph (a lock); concurrent requests share rows through the
  LayerBatcher instead.
- Every execution has a timeout. A timeout or a dead actor leaves the graph in an unknown state:
  it is torn down and the failure becomes ShardUnavailableError (retryable); the next call
  compiles again. A shard's own error (StaleShardError, SnapshotGoneError, ...) is re-raised as
  that type, and the graph is rebuilt too: with shards on two nodes, Ray 2.60 was seen to hang the
  execution after one that raised (not on one node). Such errors are rare (a shard catching up).
- A graph is compiled only when every shard runs on this process's node. Across nodes Ray 2.60
  moves channel data through the raylets, and tearing such a graph down (after an error, or at
  close) was seen to abort the head node's raylet ("Check failed: ... WriteAcquire ... Channel
  closed" in experimental_mutable_object_provider.cc), which kills every driver and worker of that
  node. A view whose shards span nodes therefore uses plain calls, with one warning.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from msa_cluster.actors.calls import raise_cause
from msa_cluster.actors.fanout import PlainExchange
from msa_cluster.actors.wire import ShardAnswer, WireQuery
from msa_cluster.types import ShardUnavailableError

__all__ = ["CompiledExchange", "shared_exchange", "close_shared"]

log = logging.getLogger(__name__)

RECOMPILE_AFTER_S = 30.0  # after a failed compile, plain calls for this long (a compile costs about a second)

BUFFER_BYTES = (
    4 << 20
)  # first size of each channel: a B=1 answer at MSA-4B shape (16 docs x 2 x 64 KiB) fits; larger ones grow it


NODE_QUERY_TIMEOUT_S = 30.0  # asking each shard for its node, once per exchange


def _node_id(actor: Any) -> str:
    """Run inside a shard by `__ray_call__`: the node it runs on."""
    import ray

    return ray.get_runtime_context().get_node_id()


class CompiledExchange:
    """`Exchange` for `fan_out`: `RouterShard.route` at every shard of `routers`, as one compiled graph.

    Example:
        >>> ex = CompiledExchange(view.routers)                            # doctest: +SKIP
        >>> fan_out(view, 18, query, 16, ["acme"], exchange=ex)             # doctest: +SKIP
        >>> ex.close()                                                      # doctest: +SKIP
    """

    def __init__(self, routers: Sequence[Any], buffer_bytes: int = BUFFER_BYTES):  # Ray actor handles only
        if not routers:
            raise ValueError("a compiled exchange needs at least one router shard")
        self.routers = tuple(routers)
        self.buffer_bytes = buffer_bytes
        self._graph: Any = None
        self._lock = threading.Lock()
        self._plain = PlainExchange(self.routers)
        self._compile_after = 0.0  # monotonic time before which a failed compile is not tried again
        self._closed = False  # closed for good: plain calls (another graph may hold the shards now)
        self.spans_nodes: bool | None = None  # whether a shard runs off this node (then plain calls); None: not asked yet
        self.compiles = 0  # graphs compiled so far (a recompile follows every failure)

    def route(
        self, layer: int, query: WireQuery, top_k: int, tenants: list[str], pins: list[tuple[int, int]], timeout_s: float
    ) -> list[ShardAnswer]:
        with self._lock:
            graph = self._graph if self._graph is not None else self._compile()
            if graph is None:
                return self._plain.route(layer, query, top_k, tenants, pins, timeout_s)
            try:
                answers, failed = self._results(graph.execute(layer, query, top_k, tenants, pins), timeout_s)
            except Exception as e:  # timeout, a dead actor, a broken channel: start over on the next call
                self._teardown()
                raise ShardUnavailableError(f"compiled routing round failed: {type(e).__name__}: {e}") from e
            if failed is not None:  # a shard's own error, re-raised as its type; the graph is rebuilt (see above)
                self._teardown()
                raise_cause(failed)
            return answers

    @staticmethod
    def _results(refs: list[Any], timeout_s: float) -> tuple[list[ShardAnswer], BaseException | None]:
        """Every shard's answer, and the first shard's own error. Each output is read even after an
        error: an unread output would be taken as the next execution's."""
        import ray
        from ray import exceptions as rex

        deadline = time.monotonic() + timeout_s
        answers, failed = [], None
        for ref in refs:
            try:
                answers.append(ray.get(ref, timeout=max(deadline - time.monotonic(), 0.001)))
            except rex.RayTaskError as e:
                failed = failed or e
        return answers, failed

    def _compile(self) -> Any:
        """The graph, or None (plain calls) while a failed compile waits for `RECOMPILE_AFTER_S`."""
        from ray.dag import InputNode, MultiOutputNode

        if self._closed or time.monotonic() < self._compile_after or not self._on_this_node():
            return None

        with InputNode() as inp:
            outputs = [r.route.bind(inp[0], inp[1], inp[2], inp[3], inp[4]) for r in self.routers]
            dag = MultiOutputNode(outputs)
        try:
            self._graph = dag.experimental_compile(_buffer_size_bytes=self.buffer_bytes)
        except Exception as e:  # an actor gone or held by another graph: plain calls for a while
            log.warning("routing graph not compiled (%s: %s); plain calls for %.0f s", type(e).__name__, e, RECOMPILE_AFTER_S)
            self._compile_after = time.monotonic() + RECOMPILE_AFTER_S
            return None
        self.compiles += 1
        return self._graph

    def _on_this_node(self) -> bool:
        """Whether every shard runs on this process's node (asked once; see the module docstring)."""
        import ray

        if self.spans_nodes is None:
            try:
                nodes = ray.get([r.__ray_call__.remote(_node_id) for r in self.routers], timeout=NODE_QUERY_TIMEOUT_S)
            except Exception as e:  # a shard gone or busy: like a failed compile, plain calls for a while
                log.warning("routing graph not compiled: shard nodes unknown (%s: %s)", type(e).__name__, e)
                self._compile_after = time.monotonic() + RECOMPILE_AFTER_S
                return False
            here = ray.get_runtime_context().get_node_id()
            self.spans_nodes = any(n != here for n in nodes)
            if self.spans_nodes:
                log.warning("routing shards span %d nodes: plain calls, not a compiled graph (one node only)", len({here, *nodes}))
        return not self.spans_nodes

    def _teardown(self) -> None:
        graph, self._graph = self._graph, None
        if graph is not None:
            try:
                graph.teardown()
            except Exception as e:  # best effort: its actors may be dead already
                log.debug("compiled graph teardown: %s", e)

    def close(self) -> None:
        """Tear the graph down for good; later rounds through this object use plain calls."""
        with self._lock:
            self._closed = True
            self._teardown()


_shared: dict[tuple[Any, ...], CompiledExchange] = {}
_shared_lock = threading.Lock()


def shared_exchange(routers: Sequence[Any]) -> CompiledExchange:
    """This process's one compiled exchange over `routers` (Ray actor handles), made on first use."""
    key = tuple(routers)
    with _shared_lock:
        exchange = _shared.get(key)
        if exchange is None:
            for other in [k for k in _shared if set(k) & set(key)]:  # its shards can serve one graph only
                _shared.pop(other).close()
            exchange = _shared[key] = CompiledExchange(key)
        return exchange


def close_shared() -> None:
    """Tear down every compiled exchange of this process (before its shards are shut down)."""
    with _shared_lock:
        while _shared:
            _shared.popitem()[1].close()
