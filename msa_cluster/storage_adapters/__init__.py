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
        .allocate_ids(tenant, *, count=None, client_ids=None) -> list[int]   # the only source of ids
        .insert(docs, *, replace=False) -> CommitResult   # idempotent for identical re-inserts
        .update(docs) / .delete(doc_ids, *, tenant, missing_ok=False) -> CommitResult
        .put_tensors(name, {str: Tensor}) -> CommitResult
        .snapshot(version=None) -> StoreSnapshot           # pins one version
        .diff(old_version, new_version) -> StoreDiff      # added / removed ids, from changed segments only
        .compact() -> CommitResult; .gc(grace_s=None) -> GCReport; .verify(version=None) -> VerifyReport
    StoreSnapshot (every read names its tenant, or ALL_TENANTS for the cluster's own reads)
        .doc_ids(tenant) -> list[int]; .info(doc_id, tenant) -> DocInfo; .texts(ids, tenant) -> {id: str}
        .resolve(client_ids, tenant) -> {client id: id}
        .read_kv(doc_id, tenant, layer=None) -> (K, V)   # each [R, C, Hkv, D] (layer: [C, Hkv, D], that
                                                          # layer's bytes only), read into fresh memory
        .router_keys(doc_ids=None, *, tenant) -> RouterKeys   # keys [R, sum C, Hkv, D] in bulk
        .documents(doc_ids=None, *, tenant) -> list[EncodedDocument]; .tensors(name)
    TieredKVReader(snapshot, budget_bytes, tenant)   .get(id) -> (K, V); .layer(id, layer) -> (K, V) [C, Hkv, D]
        .gather(layer, ids) -> (K, V) [sum C, Hkv, D]     # cold documents read at that layer only

Document ids are ints that the store allocates, each to one tenant, and never reuses; a client
id is a tenant's own optional alias of a document (unique per tenant). To a tenant, another
tenant's id is exactly an id that was never used.

Example (runs as is):
    >>> import tempfile, torch
    >>> from msa_cluster.storage_adapters import ALL_TENANTS, MemoryStore
    >>> from msa_cluster.types import EncodedDocument, ModelFingerprint, UnknownDocumentError
    >>> fp = ModelFingerprint("tiny-cfg", routing_layers=(1, 2), dtype="bfloat16",
    ...                       num_kv_heads=2, head_dim=8, chunk_size=64)
    >>> url = "file://" + tempfile.mkdtemp()                     # or "s3://bucket/prefix", "memory://..."
    >>> store = MemoryStore.open(url, fp, create=True)
    >>> store.allocate_ids("acme", client_ids=["a.txt", "b.txt"])   # version 1 records the allocation
    [0, 1]
    >>> k = torch.randn(2, 3, 2, 8).to(torch.bfloat16)            # [R, C, Hkv, D], 3 chunks
    >>> doc = EncodedDocument(doc_id=1, keys=k, values=k + 1, router_keys=k - 1, num_tokens=150,
    ...                       routing_layers=(1, 2), text="a document", tenant="acme", client_id="b.txt")
    >>> store.insert([doc]).version
    2
    >>> store.allocate_ids("acme", client_ids=["b.txt", "c.txt"])   # a live client id keeps its id
    [1, 2]
    >>> snap = store.snapshot()
    >>> K, V = snap.read_kv(1, "acme")
    >>> torch.equal(K, k), snap.doc_ids("other"), snap.texts([1], "other"), snap.info(1, "acme").client_id
    (True, [], {}, 'b.txt')
    >>> snap.read_kv(1, "other")
    Traceback (most recent call last):
    ...
    msa_cluster.types.UnknownDocumentError: document 1 is not a document of tenant 'other'
    >>> rk = snap.router_keys(tenant=ALL_TENANTS)                 # what a router shard loads
    >>> tuple(rk.layer(2).shape), rk.doc_offsets.tolist(), rk.tenants
    ((3, 2, 8), [0, 3], ('acme',))
    >>> store.delete([1], tenant="acme").version, 1 in store.snapshot(), 1 in snap   # snap stays pinned
    (4, False, True)
    >>> d = store.diff(snap.version, store.latest_version())
    >>> d.added, d.removed
    ((), (1,))
"""

from msa_cluster.storage_adapters._diff import StoreDiff
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
from msa_cluster.storage_adapters.snapshot import ALL_TENANTS, DocInfo, RouterKeys, StoreSnapshot, TenantScope
from msa_cluster.storage_adapters.store import CommitResult, MemoryStore, StoreConfig
from msa_cluster.storage_adapters.tiered import TieredKVReader, TierStats

TEMPLATE_ARTIFACT = "template"  # name under which the model's template-head K/V is stored

__all__ = [
    "MemoryStore",
    "StoreConfig",
    "CommitResult",
    "StoreSnapshot",
    "DocInfo",
    "RouterKeys",
    "StoreDiff",
    "ALL_TENANTS",
    "TenantScope",
    "TieredKVReader",
    "TierStats",
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
