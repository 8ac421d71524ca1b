"""Shared helpers of the storage tests (a uniquely named module, importable from test files)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from msa_cluster.types import EncodedDocument, ModelFingerprint

ROUTING_LAYERS = (1, 3)
FP32 = ModelFingerprint("test-config", ROUTING_LAYERS, "float32", num_kv_heads=2, head_dim=8, chunk_size=4)
BF16 = ModelFingerprint("test-config", ROUTING_LAYERS, "bfloat16", num_kv_heads=2, head_dim=8, chunk_size=4)
BUCKET = "msa-test"


@dataclass(frozen=True)
class Location:
    """Where a test's store lives: a URL plus fsspec storage options."""

    protocol: str
    url: str
    storage_options: dict = field(default_factory=dict)


def grant(store, count: int, tenant: str = "default") -> list[int]:
    """Allocate `count` fresh ids to `tenant` (one commit); a new store hands out 0, 1, 2, ..."""
    return store.allocate_ids(tenant, count=count)


def make_doc(
    doc_id: int,
    num_tokens: int | None = None,
    *,
    fp: ModelFingerprint = FP32,
    tenant: str = "default",
    text: str | None = "",
    seed: int = 0,
    metadata: dict | None = None,
    client_id: str | None = None,
) -> EncodedDocument:
    """A document whose tensors depend only on (doc_id, seed): re-making it gives identical bytes."""
    num_tokens = num_tokens if num_tokens is not None else 1 + (doc_id * 7) % 13
    chunks = math.ceil(num_tokens / fp.chunk_size)
    g = torch.Generator().manual_seed(doc_id * 1000 + seed)
    dtype = getattr(torch, fp.dtype)
    shape = (len(fp.routing_layers), chunks, fp.num_kv_heads, fp.head_dim)
    k, v, rk = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    return EncodedDocument(
        doc_id=doc_id,
        keys=k,
        values=v,
        router_keys=rk,
        num_tokens=num_tokens,
        routing_layers=fp.routing_layers,
        text=f"document {doc_id} seed {seed}" if text == "" else text,
        tenant=tenant,
        source=f"test://doc/{doc_id}",
        metadata=metadata if metadata is not None else {"n": str(doc_id)},
        client_id=client_id,
    )


def assert_same_doc(a: EncodedDocument, b: EncodedDocument) -> None:
    """Bit-exact equality of two documents (tensors compared as raw bytes)."""
    for name in ("keys", "values", "router_keys"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)), name
    for name in ("doc_id", "num_tokens", "routing_layers", "text", "tenant", "source", "client_id"):
        assert getattr(a, name) == getattr(b, name), name
    assert dict(a.metadata) == dict(b.metadata)
