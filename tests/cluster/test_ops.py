"""Operating a store through the `msa` CLI: backup and restore (file:// and moto S3), tenant purge down
to the bytes of every file, compact, delete, one-line errors; `status`, `verify` and `scale` on a running
cluster of the session's two Ray nodes."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import yaml

from msa_cluster.cluster.cli import main
from msa_cluster.cluster.ops import copy_version, open_store
from msa_cluster.storage_adapters import MemoryStore
from tests.cluster.cli_output import own_lines
from tests.storage_adapters.conftest import s3_server  # noqa: F401  (the session's moto server fixture)
from tests.storage_adapters.store_helpers import FP32, make_doc

SECRET = "globex-vault-code-4471-zebra"  # the purged tenant's text, searched for in every file's bytes


def _store(url: str, options: dict | None = None, n: int = 6) -> MemoryStore:
    """acme holds n documents, globex two whose texts carry SECRET."""
    store = MemoryStore.open(url, FP32, create=True, storage_options=options)
    acme = store.allocate_ids("acme", client_ids=[f"a{i}" for i in range(n)])
    globex = store.allocate_ids("globex", client_ids=["g0", "g1"])
    store.insert([make_doc(d, tenant="acme", client_id=f"a{i}", text=f"acme note {i}") for i, d in enumerate(acme)] +
                 [make_doc(d, tenant="globex", client_id=f"g{i}", text=f"{SECRET} #{i}") for i, d in enumerate(globex)])
    return store


def _msa(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, own_lines(out.out), own_lines(out.err)


def test_backup_and_restore_round_trip_a_version_on_file_and_s3(tmp_path, s3_server, capsys):  # noqa: F811
    """backup copies one committed version (not later ones) to S3; restore brings it back; both copies verify."""
    import s3fs

    src = _store(f"file://{tmp_path}/live")
    v = src.latest_version()
    src.delete([0], tenant="acme")  # after the backed-up version
    bucket = f"bk-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(**s3_server).mkdir(bucket)
    opts = json.dumps(s3_server)
    rc, out, _ = _msa(capsys, "backup", "--store", f"file://{tmp_path}/live", "--to", f"s3://{bucket}/b", "--to-options", opts,
                      "--version", str(v))
    assert rc == 0 and f"version {v}" in out and "verifies" in out
    rc, out, _ = _msa(capsys, "restore", "--store", f"s3://{bucket}/b", "--storage-options", opts, "--to", f"file://{tmp_path}/back",
                      "--to-options", "{}")
    assert rc == 0, out
    back = open_store(f"file://{tmp_path}/back").snapshot()
    assert back.version == v and len(back.doc_ids("acme")) == 6 and back.texts([0], "acme") == {0: "acme note 0"}
    rc, _, err = _msa(capsys, "restore", "--store", f"s3://{bucket}/b", "--storage-options", opts, "--to", f"file://{tmp_path}/back")
    assert rc == 2 and err.count("\n") == 1 and "already holds a memory store" in err
    with pytest.raises(ValueError, match="no version 99"):
        copy_version(f"file://{tmp_path}/live", f"file://{tmp_path}/other", 99)


def test_tenant_purge_removes_the_text_from_every_file(tmp_path, capsys):
    """After `msa tenant delete --purge` no byte sequence of the tenant's text is left in any file of the store."""
    url = f"file://{tmp_path}/store"
    _store(url)
    files = [p for p in Path(tmp_path, "store").rglob("*") if p.is_file()]
    assert any(SECRET.encode() in p.read_bytes() for p in files)
    rc, _, err = _msa(capsys, "tenant", "delete", "globex", "--store", url)
    assert rc == 2 and "--purge" in err
    rc, out, _ = _msa(capsys, "tenant", "delete", "globex", "--purge", "--store", url)
    assert rc == 0 and "deleted 2 documents" in out and "Backups" in out
    files = [p for p in Path(tmp_path, "store").rglob("*") if p.is_file()]
    assert files and not any(SECRET.encode() in p.read_bytes() for p in files)
    snap = open_store(url).snapshot()
    assert snap.doc_ids("globex") == [] and len(snap.doc_ids("acme")) == 6
    assert open_store(url).verify().documents == 6


def test_delete_by_client_id_then_compact_and_one_line_errors(tmp_path, capsys):
    """`msa delete` takes ids or client ids; `msa compact` drops the dead rows; bad input is one line."""
    url = f"file://{tmp_path}/store"
    _store(url)
    rc, out, _ = _msa(capsys, "delete", "a1", "2", "--tenant", "acme", "--store", url)
    assert rc == 0 and "deleted 2 documents" in out
    rc, out, _ = _msa(capsys, "compact", "--store", url, "--gc-grace", "0")
    assert rc == 0 and "compacted" in out
    assert open_store(url).snapshot().doc_ids("acme") == [0, 3, 4, 5]
    rc, _, err = _msa(capsys, "delete", "nope", "--tenant", "acme", "--store", url)
    assert rc == 2 and err.strip() == "msa: error: no documents with client ids ['nope'] in tenant 'acme'"
    rc, _, err = _msa(capsys, "status", "--store", f"file://{tmp_path}/absent")
    assert rc == 2 and err.count("\n") == 1 and "no memory store" in err


@pytest.fixture
def running(ray_nodes, tmp_path):
    """A two-pair memory cluster on the session's Ray nodes over a store, and a config naming it."""
    from msa_cluster.cluster.placement import ClusterSpec, MemoryCluster

    url = f"file://{tmp_path}/store"
    _store(url, n=10)
    spec = ClusterSpec(name=f"ops-{uuid.uuid4().hex[:6]}", namespace="msa-tests", num_shards=2, cpus_per_actor=0.25)
    cluster = MemoryCluster.start(url, FP32, spec)
    cfg = tmp_path / "app.yaml"
    cfg.write_text(yaml.safe_dump({"store": url, "auth": {"disabled": True},
                                   "cluster": {"name": spec.name, "namespace": spec.namespace}}))
    yield cluster, str(cfg)
    MemoryCluster.connect(spec).shutdown()


def test_status_verify_and_scale_on_a_running_cluster(running, capsys):
    """status names shards, their nodes and served versions; verify agrees with the store; scale 3 rebalances."""
    cluster, cfg = running
    rc, out, _ = _msa(capsys, "status", "--config", cfg, "--json")
    assert rc == 0
    st = json.loads(out)
    assert st["store"]["documents"] == 12 and st["store"]["tenants"]["globex"]["documents"] == 2
    assert set(st["store"]["bytes"]) == {"docs", "router", "content"}
    c = st["cluster"]
    assert c["version"] == st["store"]["version"] and len(c["shards"]) == 2
    assert sum(s["documents"] for s in c["shards"]) == 12
    assert all(s["serves_version"] == c["version"] for s in c["shards"])
    rc, out, _ = _msa(capsys, "verify", "--config", cfg)
    assert rc == 0 and out.count(": ok") == 2
    rc, out, _ = _msa(capsys, "scale", "3", "--config", cfg)
    assert rc == 0 and "3 shard pairs" in out
    rc, out, _ = _msa(capsys, "delete", "a0", "--tenant", "acme", "--config", cfg)
    assert rc == 0
    rc, out, _ = _msa(capsys, "verify", "--config", cfg)
    assert rc == 0 and out.count(": ok") == 3 and "11/11" not in out
    rc, out, _ = _msa(capsys, "status", "--config", cfg)
    assert rc == 0 and "3 shard pairs" in out and "11 documents" in out
    assert os.environ.get("RAY_AUTH_MODE") == "disabled"


@pytest.mark.parametrize("argv", [["ingest"], ["reencode"], ["backup"], ["restore"], ["tenant", "delete"], ["status"],
                                  ["verify"], ["scale"], ["compact"], ["delete"]])
def test_every_operations_command_has_help(argv, capsys):
    """Each subcommand prints its help (and exits 0)."""
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0 and "--store" in capsys.readouterr().out


def test_ingest_bad_source_is_one_line(tmp_path, capsys):
    """A source of unknown files fails before anything is written, in one line."""
    from msa_cluster.cluster.ingest import IngestOptions, list_source_files

    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="must be .jsonl files, .parquet files or text files"):
        list_source_files(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        list_source_files(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="commit_every"):
        IngestOptions(tenant="acme", commit_every=0)
