"""`msa ingest` on the session's two-node Ray cluster: every source format on file:// and on the moto
S3 server, idempotent re-runs, long documents split or rejected, commits through a running cluster
(capacity and quota refuse a batch whole)."""

from __future__ import annotations

import uuid

import fsspec
import pytest

from msa_cluster.actors.coordinator import TenantQuota
from msa_cluster.cluster import ingest as ingest_module
from msa_cluster.cluster.ingest import EncoderPool, IngestOptions
from msa_cluster.cluster.ops import open_store
from msa_cluster.cluster.placement import ClusterSpec, MemoryCluster
from msa_cluster.types import MemoryFullError, QuotaExceededError
from tests.cluster.ingest_helpers import MODEL, stored, texts, write_corpus
from tests.storage_adapters.conftest import s3_server  # noqa: F401  (the session's moto server fixture)

# commit_interval_s: commits by count only, so the counts asserted below hold on a loaded machine too
FAST = dict(encoder_cpus=0.5, progress_s=0.01, commit_interval_s=3600.0)


def _opts(**kw) -> IngestOptions:
    return IngestOptions(**{"tenant": "acme", "commit_every": 4, **FAST, **kw})


@pytest.fixture(scope="module")
def pool(ray_nodes):
    """One encoder actor for the module (starting one costs seconds)."""
    p = EncoderPool(MODEL, _opts())
    yield p
    p.close()


@pytest.fixture
def ingest(pool):
    """`ingest` with the module's encoder pool."""
    return lambda *a, **kw: ingest_module.ingest(*a, pool=pool, **kw)


@pytest.fixture
def s3(s3_server):  # noqa: F811
    """A fresh bucket on the moto server; yields (url prefix, storage options)."""
    import s3fs

    bucket = f"ingest-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(**s3_server).mkdir(bucket)
    return f"s3://{bucket}", dict(s3_server)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "text"])
def test_every_format_on_file_ingests_once_and_resumes_as_a_no_op(ingest, tmp_path, kind):
    """Each format lands with stable derived client ids; a re-run skips everything and commits nothing."""
    docs = texts(9)
    write_corpus(fsspec.filesystem("file"), f"{tmp_path}/src", kind, docs)
    url = f"file://{tmp_path}/store"
    progress = []
    first = ingest(f"file://{tmp_path}/src", url, MODEL, _opts(), on_progress=progress.append)
    assert (first.inserted, first.skipped, first.rejected, first.commits) == (9, 0, [], 3)
    assert progress and progress[-1].documents == 9 and progress[-1].total == 9 and progress[-1].tokens_per_s > 0
    store = open_store(url)
    got = stored(store, "acme")
    assert sorted(got.values()) == sorted(docs)
    if kind == "text":
        assert set(got) == {f"sub{i % 2}/doc{i:03d}.txt" for i in range(9)}
    else:
        assert set(got) == {f"part{g}.{kind}:{r}" for g, n in ((0, 5), (1, 4)) for r in range(n)}
    version = store.latest_version()
    again = ingest(f"file://{tmp_path}/src", url, MODEL, _opts())
    assert (again.inserted, again.skipped, again.commits) == (0, 9, 0)
    assert open_store(url).latest_version() == version
    assert open_store(url).verify().documents == 9


def test_a_slow_source_is_committed_every_interval_not_only_every_count(ingest, tmp_path):
    """commit_interval_s: with a count never reached, documents still land in commits of their own time."""
    docs = texts(4, seed=5)
    write_corpus(fsspec.filesystem("file"), f"{tmp_path}/src", "jsonl", docs)
    summary = ingest(f"file://{tmp_path}/src", f"file://{tmp_path}/store", MODEL, _opts(commit_every=100, commit_interval_s=1e-6))
    assert summary.inserted == 4 and summary.commits >= 2  # by count alone: one commit at the end
    assert sorted(stored(open_store(f"file://{tmp_path}/store"), "acme").values()) == sorted(docs)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "text"])
def test_every_format_on_moto_s3(ingest, s3, kind):
    """Source and store on the S3 server: ids from an id column (or the file's path), metadata kept."""
    prefix, options = s3
    docs = texts(6, seed=3)
    write_corpus(fsspec.filesystem("s3", **options), prefix.removeprefix("s3://") + "/src", kind, docs, with_ids=True)
    source = f"{prefix}/src" if kind == "text" else f"{prefix}/src/*.{kind}"
    summary = ingest(source, f"{prefix}/store", MODEL, _opts(commit_every=100), storage_options=options, source_options=options)
    assert (summary.inserted, summary.commits, summary.rejected) == (6, 1, [])
    store = open_store(f"{prefix}/store", options)
    got = stored(store, "acme")
    assert sorted(got.values()) == sorted(docs)
    if kind != "text":
        assert set(got) == {f"doc-{i}" for i in range(6)}
    if kind == "jsonl":
        snap = store.snapshot()
        assert {snap.info(i, "acme").metadata["n"] for i in snap.doc_ids("acme")} == {str(i) for i in range(6)}


def test_long_documents_split_into_linked_parts_or_are_rejected(ingest, tmp_path):
    """Over max_document_tokens: split keeps all the text in linked parts that each fit; reject names the length."""
    long_text = " ".join(f"word{i}" for i in range(150))
    fs = fsspec.filesystem("file")
    fs.makedirs(f"{tmp_path}/src")
    fs.pipe_file(f"{tmp_path}/src/c.jsonl", (f'{{"id": "long", "text": "{long_text}"}}\n{{"id": "short", "text": "tiny"}}\n'
                                             '{"id": "empty", "text": "  "}\nnot json\n{"id": "short", "text": "again"}\n').encode())
    split = ingest(f"{tmp_path}/src", f"file://{tmp_path}/split", MODEL, _opts(max_document_tokens=128))
    reasons = {r.client_id: r.reason for r in split.rejected}
    assert reasons.keys() == {"empty", "c.jsonl:3", "short"}
    assert reasons["empty"] == "empty text" and reasons["c.jsonl:3"].startswith("not JSON")
    assert reasons["short"].startswith("duplicate id")
    store = open_store(f"file://{tmp_path}/split")
    snap = store.snapshot()
    parts = sorted((snap.info(i, "acme") for i in snap.doc_ids("acme") if snap.info(i, "acme").client_id != "short"),
                   key=lambda d: int(d.metadata["part"]))
    assert len(parts) == split.inserted - 1 >= 3 and split.split == 1
    assert all(p.metadata["parent"] == "long" and p.metadata["parts"] == str(len(parts)) for p in parts)
    assert all(p.num_tokens <= 128 for p in parts)
    assert "".join(snap.texts([p.doc_id for p in parts], "acme")[p.doc_id] for p in parts) == long_text

    reject = ingest(f"{tmp_path}/src", f"file://{tmp_path}/reject", MODEL, _opts(max_document_tokens=128, long_documents="reject"))
    assert reject.inserted == 1 and any(r.client_id == "long" and r.reason.startswith("too long") for r in reject.rejected)
    assert set(stored(open_store(f"file://{tmp_path}/reject"), "acme")) == {"short"}


def test_through_a_running_cluster_capacity_and_quota_refuse_a_batch_whole(ingest, tmp_path):
    """With a cluster running, commits go through its coordinator: served at once; a full router tier
    or a tenant quota refuses the batch whole, and earlier batches stay committed."""
    from msa_cluster.actors.model_actors import EncoderActor  # noqa: F401  (imported so a failure here is clear)
    from msa_cluster.model import MSAForCausalLM

    fp = MSAForCausalLM.from_pretrained(MODEL).fingerprint()
    url = f"file://{tmp_path}/store"
    fs = fsspec.filesystem("file")
    write_corpus(fs, f"{tmp_path}/a", "jsonl", texts(4))
    write_corpus(fs, f"{tmp_path}/b", "jsonl", texts(8, seed=1) + ["x " * 400])
    open_store_args = dict(create=True)
    from msa_cluster.storage_adapters import MemoryStore

    MemoryStore.open(url, fp, **open_store_args)
    spec = ClusterSpec(name=f"ing-{uuid.uuid4().hex[:6]}", namespace="msa-tests", num_shards=1, router_capacity_bytes=2048,
                       cpus_per_actor=0.25)
    cluster = MemoryCluster.start(url, fp, spec)
    try:
        first = ingest(f"{tmp_path}/a", url, MODEL, _opts(), cluster=(spec.name, spec.namespace))
        assert first.inserted == 4 and cluster.status().version == first.version  # served as committed
        with pytest.raises(QuotaExceededError, match="max_documents_per_tenant"):
            ingest(f"{tmp_path}/b", url, MODEL, _opts(tenant="globex"), cluster=(spec.name, spec.namespace),
                   quota=TenantQuota(max_documents=2))
        assert open_store(url).snapshot().doc_ids("globex") == []
        with pytest.raises(MemoryFullError, match="nothing was written"):
            ingest(f"{tmp_path}/b", url, MODEL, _opts(tenant="globex", commit_every=100), cluster=(spec.name, spec.namespace))
        assert open_store(url).snapshot().doc_ids("globex") == []
        assert len(open_store(url).snapshot().doc_ids("acme")) == 4
    finally:
        cluster.shutdown()


def test_reencode_into_a_store_of_a_second_fingerprint(ingest, ray_nodes, tmp_path):
    """reencode carries every tenant's texts, client ids and metadata into a store of the new model's
    fingerprint (which the old fingerprint cannot open); a re-run resumes as a no-op."""
    import json
    import shutil
    from importlib import resources

    from msa_cluster.cluster.ops import reencode, store_fingerprint
    from msa_cluster.storage_adapters import FingerprintMismatchError, MemoryStore

    src_model = resources.files("msa_cluster") / "assets" / MODEL
    other = tmp_path / "msa-tiny-other"
    shutil.copytree(str(src_model), other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rope_theta"] = 10000
    (other / "config.json").write_text(json.dumps(cfg))
    write_corpus(fsspec.filesystem("file"), f"{tmp_path}/src", "jsonl", texts(5))
    old, new = f"file://{tmp_path}/old", f"file://{tmp_path}/new"
    ingest(f"{tmp_path}/src", old, MODEL, _opts())
    ingest(f"{tmp_path}/src", old, MODEL, _opts(tenant="globex"))
    pool = EncoderPool(str(other), _opts())
    try:
        out = reencode(old, new, str(other), _opts(), pool=pool)
        assert {t: s.inserted for t, s in out.items()} == {"acme": 5, "globex": 5}
        again = reencode(old, new, str(other), _opts(), pool=pool)
        assert {t: (s.inserted, s.skipped) for t, s in again.items()} == {"acme": (0, 5), "globex": (0, 5)}
    finally:
        pool.close()
    assert store_fingerprint(new) == pool.fingerprint != store_fingerprint(old)
    with pytest.raises(FingerprintMismatchError):
        MemoryStore.open(new, store_fingerprint(old))
    for tenant in ("acme", "globex"):
        assert stored(open_store(new), tenant) == stored(open_store(old), tenant)
    snap = open_store(new).snapshot()
    assert {snap.info(i, "acme").metadata["n"] for i in snap.doc_ids("acme")} == {str(i) for i in range(5)}
