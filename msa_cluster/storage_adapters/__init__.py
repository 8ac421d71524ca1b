"""The memory store: durable, versioned source of truth of an encoded memory, over fsspec.

Every shard can be rebuilt from it. No Ray here. Shape legend: R routing layers, C chunks,
Hkv kv heads, D head dim, N documents.

Layout under one root URL (a local path, `file://`, `s3://bucket/prefix`, `memory://`, or any
fsspec URL whose filesystem can create a file only-if-absent):

    manifest/v000000000042.json     one immutable JSON per committed version (with a CRC32)
    segments/<id>.docs.arrow        per document: id, tenant, source, metadata, counts, CRCs,
                                    offsets of its K/V and text in the content file
    segments/<id>.router.arrow      router keys, one column per routing layer: bulk scans
    segments/<id>.content.arrow     K||V of every layer contiguous per document, and the text
    artifacts/<name>-<id>.safetensors   named tensors, e.g. the template-head K/V

Public API:
    MemoryStore.open(url, fingerprint, *, create=False, storage_options=None, config=None)
        .insert(docs, *, replace=False) -> CommitResult   # idempotent for identical re-inserts
        .update(docs) / .delete(doc_ids, *, tenant=None, missing_ok=False) -> CommitResult
        .put_tensors(name, {str: Tensor}) -> CommitResult
        .snapshot(version=None) -> StoreSnapshot           # pins one version
        .compact() -> CommitResult; .gc(grace_s=None) -> GCReport; .verify(version=None) -> VerifyReport
    StoreSnapshot
        .doc_ids(tenant=None) -> list[int]; .info(doc_id) -> DocInfo; .texts(ids) -> {id: str}
        .read_kv(doc_id) -> (K, V)            # each [R, C, Hkv, D], one range read, zero-copy locally
        .router_keys(doc_ids=None, tenant=None) -> RouterKeys   # keys [R, sum C, Hkv, D] in bulk
        .documents(doc_ids=None, tenant=None) -> list[EncodedDocument]; .tensors(name)
    TieredKVReader(snapshot, budget_bytes)   .get(id) -> (K, V); .gather(layer, ids) -> (K, V) [sum C, Hkv, D]
    RouterTier(capacity_bytes)               .load(snapshot, ids) (MemoryFullError when full); .keys()

Example (runs as is):
    >>> import tempfile, torch
    >>> from msa_cluster.storage_adapters import MemoryStore
    >>> from msa_cluster.types import EncodedDocument, ModelFingerprint
    >>> fp = ModelFingerprint("tiny-cfg", routing_layers=(1, 2), dtype="bfloat16",
    ...                       num_kv_heads=2, head_dim=8, chunk_size=64)
    >>> url = "file://" + tempfile.mkdtemp()                     # or "s3://bucket/prefix", "memory://..."
    >>> store = MemoryStore.open(url, fp, create=True)
    >>> k = torch.randn(2, 3, 2, 8).to(torch.bfloat16)            # [R, C, Hkv, D], 3 chunks
    >>> doc = EncodedDocument(doc_id=5, keys=k, values=k + 1, router_keys=k - 1, num_tokens=150,
    ...                       routing_layers=(1, 2), text="a document", tenant="acme")
    >>> store.insert([doc]).version
    1
    >>> snap = store.snapshot()
    >>> K, V = snap.read_kv(5)
    >>> torch.equal(K, k), snap.doc_ids(tenant="other")
    (True, [])
    >>> rk = snap.router_keys()                                   # what a router shard loads
    >>> tuple(rk.layer(2).shape), rk.doc_offsets.tolist()
    ((3, 2, 8), [0, 3])
    >>> store.delete([5]).version, 5 in store.snapshot(), 5 in snap   # snap stays pinned
    (2, False, True)
"""

from msa_cluster.storage_adapters._maintenance import GCReport, VerifyReport
from msa_cluster.storage_adapters.errors import (
    CommitConflictError,
    CorruptStoreError,
    DocumentExistsError,
    FingerprintMismatchError,
    SnapshotExpiredError,
    StoreError,
    StoreNotFoundError,
)
from msa_cluster.storage_adapters.snapshot import DocInfo, RouterKeys, StoreSnapshot
from msa_cluster.storage_adapters.store import CommitResult, MemoryStore, StoreConfig
from msa_cluster.storage_adapters.tiered import RouterTier, TieredKVReader, TierStats

TEMPLATE_ARTIFACT = "template"  # name under which the model's template-head K/V is stored

__all__ = [
    "MemoryStore",
    "StoreConfig",
    "CommitResult",
    "StoreSnapshot",
    "DocInfo",
    "RouterKeys",
    "TieredKVReader",
    "TierStats",
    "RouterTier",
    "GCReport",
    "VerifyReport",
    "TEMPLATE_ARTIFACT",
    "StoreError",
    "StoreNotFoundError",
    "CorruptStoreError",
    "FingerprintMismatchError",
    "CommitConflictError",
    "DocumentExistsError",
    "SnapshotExpiredError",
]
