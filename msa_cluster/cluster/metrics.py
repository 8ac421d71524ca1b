"""The Serve app's Prometheus metrics, through `ray.util.metrics` (Ray exports them on every node's
metrics port with a `ray_` prefix; `msa_cluster/actors/remote.py` exports the cluster's own:
versions, documents, chunks and tokens per shard, and the K/V RAM tier's hits, misses and evictions).

| metric | type | tags |
|---|---|---|
| msa_api_requests | counter | route, status, tenant |
| msa_api_request_latency_s | histogram | route |
| msa_api_errors | counter | type |
| msa_api_tokens_in / msa_api_tokens_out | counter | tenant |
| msa_routing_latency_s | histogram | layer (one routing call: fan-out to every shard, merge, K/V fetch) |
| msa_fanout_latency_s | histogram | (a request's routing time over all its layers and rounds) |
| msa_kv_bytes_fetched | counter | layer |
| msa_interleave_rounds | histogram | |
"""

from __future__ import annotations

import threading

from msa_cluster.cluster.service import Observer

__all__ = ["ApiMetrics"]

_LATENCY = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


class ApiMetrics:
    """Created in a Serve replica (a Ray worker). `observer()` feeds the service's measurements in."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Histogram

        self.requests = Counter("msa_api_requests", description="HTTP requests by route, status and tenant",
                                tag_keys=("route", "status", "tenant"))
        self.latency = Histogram("msa_api_request_latency_s", description="HTTP request latency (to the last byte for streams)",
                                 boundaries=_LATENCY, tag_keys=("route",))
        self.errors = Counter("msa_api_errors", description="errors answered, by type", tag_keys=("type",))
        self.tokens_in = Counter("msa_api_tokens_in", description="prompt tokens (incl. texts read)", tag_keys=("tenant",))
        self.tokens_out = Counter("msa_api_tokens_out", description="answer tokens", tag_keys=("tenant",))
        self.routing = Histogram("msa_routing_latency_s", description="one routing call per layer (fan-out, merge, K/V)",
                                 boundaries=_LATENCY, tag_keys=("layer",))
        self.fanout = Histogram("msa_fanout_latency_s", description="a request's routing time over all layers and rounds",
                                boundaries=_LATENCY)
        self.kv_bytes = Counter("msa_kv_bytes_fetched", description="pooled K/V bytes fetched from KV shards", tag_keys=("layer",))
        self.rounds = Histogram("msa_interleave_rounds", description="memory-interleave rounds per chat request",
                                boundaries=[1, 2, 3, 4, 5, 6, 8, 10, 16])
        self._local = threading.local()

    def observer(self) -> Observer:
        def retrieve(layer: int, seconds: float, nbytes: int) -> None:
            tags = {"layer": str(layer)}
            self.routing.observe(seconds, tags=tags)
            if nbytes > 0:
                self.kv_bytes.inc(nbytes, tags=tags)
            self._local.routing_s = getattr(self._local, "routing_s", 0.0) + seconds

        def rounds(n: int) -> None:
            self.rounds.observe(n)
            self.fanout.observe(getattr(self._local, "routing_s", 0.0))
            self._local.routing_s = 0.0

        def tokens(tenant: str, tokens_in: int, tokens_out: int) -> None:
            if tokens_in:
                self.tokens_in.inc(tokens_in, tags={"tenant": tenant})
            if tokens_out:
                self.tokens_out.inc(tokens_out, tags={"tenant": tenant})

        return Observer(retrieve=retrieve, rounds=rounds, tokens=tokens)

    def request(self, route: str, status: int, tenant: str, seconds: float) -> None:
        self.requests.inc(1, tags={"route": route, "status": str(status), "tenant": tenant or "-"})
        self.latency.observe(seconds, tags={"route": route})

    def error(self, kind: str) -> None:
        self.errors.inc(1, tags={"type": kind})
