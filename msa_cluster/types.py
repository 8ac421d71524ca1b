"""Plain data types that the layers of msa-cluster exchange. No logic beyond validation.

Shape legend: R routing layers, C chunks, Hkv kv heads, D head dim, T tokens, Hr routing
heads (Hkv when the head reduction is folded, else the query head count H), B batch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = [
    "DEFAULT_TENANT",
    "Similarity",
    "HeadReduce",
    "QueryReduce",
    "ChunkReduce",
    "EncodedDocument",
    "ModelFingerprint",
    "RoutingSpec",
    "RoutingQuery",
    "ScoredDoc",
    "Retrieval",
    "Citation",
    "MSAMemoryError",
    "MemoryError_",
    "MemoryFullError",
    "ShardUnavailableError",
    "ShardUnavailable",
    "SnapshotGoneError",
    "StaleShardError",
    "UnknownDocumentError",
    "DocumentExistsError",
    "LimitExceededError",
    "ContextTooLargeError",
    "QuotaExceededError",
    "check_tenant",
    "routing_row",
]

DEFAULT_TENANT = "default"

Similarity = Literal["dot", "cosine"]
HeadReduce = Literal["mean", "max"]
QueryReduce = Literal["max", "mean", "last"]
ChunkReduce = Literal["max", "mean"]


class MSAMemoryError(RuntimeError):
    """Base class of memory-layer errors a caller can handle."""


MemoryError_ = MSAMemoryError  # deprecated name, kept for callers of 0.1


class MemoryFullError(MSAMemoryError):
    """The router tier cannot take more documents: it never evicts, so it refuses the change whole."""


class ShardUnavailableError(MSAMemoryError):
    """A shard did not answer in time, is dead or is catching up; the request can be retried."""


ShardUnavailable = ShardUnavailableError  # deprecated name, kept for callers of 0.1


class StaleShardError(ShardUnavailableError):
    """A shard has not applied the version a request pinned yet (it is catching up): retryable."""


class SnapshotGoneError(MSAMemoryError):
    """A pinned version is no longer kept (collected, or past its grace period); retry with a new snapshot."""


class UnknownDocumentError(MSAMemoryError, KeyError):
    """A document id (or client id) that this tenant does not hold at this version.

    Another tenant's id gets exactly this error, with the same message as an id never used.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DocumentExistsError(MSAMemoryError, ValueError):
    """A write names a live document (or client id) of the same tenant with other content, without replace."""


class LimitExceededError(MSAMemoryError):
    """A request goes over a configured bound. `limit` names it, `maximum` is its value and
    `requested` what the request needed; the message says all three."""

    def __init__(self, limit: str, maximum: int, requested: int, detail: str = ""):
        self.limit, self.maximum, self.requested, self.detail = limit, maximum, requested, detail
        msg = f"{limit}={maximum} exceeded: this request needs {requested}"
        super().__init__(f"{msg} ({detail})" if detail else msg)

    def __reduce__(self) -> tuple[Any, tuple[str, int, int, str]]:
        # rebuilt from its fields, so that it crosses process boundaries (a Ray actor's error) intact
        return type(self), (self.limit, self.maximum, self.requested, self.detail)


class ContextTooLargeError(LimitExceededError, ValueError):
    """A request would exceed a context bound (e.g. `max_chunks_per_query`); raised before any allocation.

    Not retryable as is: the Serve API answers 422 with the message.
    """


class QuotaExceededError(LimitExceededError):
    """A write would take a tenant over its quota of stored documents or tokens; nothing was written."""


_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


def check_tenant(tenant: object) -> str:
    """Return `tenant` if it is a valid tenant name, else raise ValueError naming it and the rule."""
    if not isinstance(tenant, str) or not _TENANT.match(tenant):
        raise ValueError(f"tenant {tenant!r} is not a valid tenant name: 1-128 characters of letters, digits and ._:@- "
                         "starting with a letter or digit")
    return tenant


def routing_row(routing_layers: tuple[int, ...], layer: int) -> int:
    """Row of decoder layer `layer` in tensors stacked over `routing_layers`; ValueError if it does not route."""
    try:
        return routing_layers.index(layer)
    except ValueError:
        raise ValueError(f"layer {layer} is not a routing layer; routing layers: {routing_layers}") from None


@dataclass(frozen=True)
class EncodedDocument:
    """One document after the model's stage-1 encoding.

    keys, values, router_keys: [R, C, Hkv, D] in the model's dtype, one row per routing layer
    in ascending layer order (`routing_layers`). keys are the chunk means of post-norm,
    post-RoPE K at document-local positions; values the means of V; router_keys the means of
    the router-K projection (or of K itself when the model has no router projections).
    """

    doc_id: int
    keys: torch.Tensor
    values: torch.Tensor
    router_keys: torch.Tensor
    num_tokens: int
    routing_layers: tuple[int, ...]
    text: str | None = None
    tenant: str = DEFAULT_TENANT
    source: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    client_id: str | None = None  # the tenant's own name for the document; unique per tenant

    def __post_init__(self) -> None:
        if not isinstance(self.doc_id, int) or isinstance(self.doc_id, bool) or self.doc_id < 0:
            raise ValueError(f"doc_id must be a non-negative int, got {self.doc_id!r}")
        check_tenant(self.tenant)
        if self.client_id is not None and (not isinstance(self.client_id, str) or not 0 < len(self.client_id) <= 256):
            raise ValueError(f"client_id must be a non-empty string of at most 256 characters, got {self.client_id!r}")
        shape = tuple(self.keys.shape)
        for name in ("values", "router_keys"):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} shape {tuple(getattr(self, name).shape)} != keys shape {shape}")
        if len(shape) != 4 or shape[0] != len(self.routing_layers):
            raise ValueError(f"keys must be [R={len(self.routing_layers)}, C, Hkv, D], got {shape}")
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")

    @property
    def num_chunks(self) -> int:
        return int(self.keys.shape[1])

    def layer_index(self, layer: int) -> int:
        """Row of `layer` (an absolute decoder layer index) in the stacked tensors."""
        return routing_row(self.routing_layers, layer)


@dataclass(frozen=True)
class ModelFingerprint:
    """What a stored memory was encoded with; a store refuses a model whose fingerprint differs.

    config_hash: sha256 of the model config's canonical JSON (architecture fields only).
    """

    config_hash: str
    routing_layers: tuple[int, ...]
    dtype: str  # torch dtype name of the pooled tensors, e.g. "bfloat16"
    num_kv_heads: int
    head_dim: int
    chunk_size: int


@dataclass(frozen=True)
class RoutingSpec:
    """How routing scores are reduced; fixed by the model config."""

    similarity: Similarity = "dot"
    head_reduce: HeadReduce = "mean"
    query_reduce: QueryReduce = "max"
    chunk_reduce: ChunkReduce = "max"
    num_heads: int = 1
    num_kv_heads: int = 1

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class RoutingQuery:
    """A batch of routing queries for one routing layer.

    vectors: [B, T, Hr, D] float32, already scaled (and per-head normalised for cosine);
      Hr == Hkv when `folded` (head-mean folded into the KV-head layout), else Hr == H.
    mask: [B, T] bool, True on routing tokens. A row with no True selects nothing.
    """

    vectors: torch.Tensor
    mask: torch.Tensor
    spec: RoutingSpec
    folded: bool

    def __post_init__(self) -> None:
        if self.vectors.dtype != torch.float32:
            raise TypeError(f"routing vectors must be float32, got {self.vectors.dtype}")
        if self.vectors.dim() != 4 or tuple(self.mask.shape) != tuple(self.vectors.shape[:2]):
            raise ValueError(
                f"vectors [B, T, Hr, D] and mask [B, T] disagree: {tuple(self.vectors.shape)} vs {tuple(self.mask.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return int(self.vectors.shape[0])


@dataclass(frozen=True)
class ScoredDoc:
    doc_id: int
    score: float


@dataclass(frozen=True)
class Retrieval:
    """What a memory returns for one routing layer and a batch of queries.

    selected[b]: the chosen documents of query b, best first (score desc, then doc id asc).
    keys[b], values[b]: [C_b, Hkv, D] the pooled K/V of all chunks of selected[b], in the
      order of selected[b], in the stored dtype.
    """

    selected: list[list[ScoredDoc]]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


@dataclass(frozen=True)
class Citation:
    """A document the answer read: its id, the interleave round, the best routing score seen."""

    doc_id: int
    round: int
    score: float | None
    source: str = ""
