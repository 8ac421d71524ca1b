"""The memory cluster's roles: plain classes, unit-tested without Ray, and their Ray actors.

Plain classes: `RouterShard`, `KVShard`, `Coordinator`, `Generator`, `Encoder`, and the model's
backend over them, `ClusterMemory`. Ray actors (subclasses that load themselves from the store):
`RouterShardActor`, `KVShardActor`, `CoordinatorActor` (in `actors.remote`), `GeneratorActor`,
`EncoderActor` (in `actors.model_actors`, which imports the model stack).
"""

from __future__ import annotations

from typing import Any

from msa_cluster.actors.batching import LayerBatcher
from msa_cluster.actors.calls import CoordinatorHandle, KVHandle, RouterHandle, call, gather, submit
from msa_cluster.actors.coordinator import Assignment, ClusterStatus, Coordinator, balance
from msa_cluster.actors.fanout import ClusterView, fan_out
from msa_cluster.actors.kv_shard import KVShard
from msa_cluster.actors.memory import ClusterMemory, ClusterSnapshot
from msa_cluster.actors.router_shard import RouterShard, ShardState

__all__ = [
    "Assignment",
    "ClusterMemory",
    "ClusterSnapshot",
    "ClusterStatus",
    "ClusterView",
    "Coordinator",
    "CoordinatorHandle",
    "KVHandle",
    "KVShard",
    "LayerBatcher",
    "RouterHandle",
    "RouterShard",
    "ShardState",
    "balance",
    "call",
    "fan_out",
    "gather",
    "submit",
    "Generator",
    "Encoder",
]


def __getattr__(name: str) -> Any:  # the model stack (transformers) loads only where it is used
    if name == "Generator":
        from msa_cluster.actors.generator import Generator

        return Generator
    if name == "Encoder":
        from msa_cluster.actors.encoder import Encoder

        return Encoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
