"""The `msa` subcommands that ingest into and operate a store and a running memory cluster.

Settings come from the same pydantic `AppConfig` as `msa serve` (--config YAML < MSA_* environment <
flags): `store`, `storage_options`, `model`, `limits` (quotas, max_document_tokens), `cluster`
(which running cluster to go through) and `ingest` (commit cadence, encoders). The CLI owns output:
progress and summaries go to stdout/stderr here, never from the library.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

__all__ = ["register"]


# ---------------------------------------------------------------------------------------------- helpers
def _json_arg(text: str | None, what: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{what} must be a JSON object: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _config(args: argparse.Namespace, **flags: Any) -> Any:
    """The AppConfig of an operations command (auth is the Serve app's concern: never needed here)."""
    from msa_cluster.cluster.config import load_config

    over: dict[str, Any] = {"store": getattr(args, "store", None), "model": getattr(args, "model", None),
                            "auth": {"disabled": True}, **flags}
    opts = getattr(args, "storage_options", None)
    if opts:
        over["storage_options"] = _json_arg(opts, "--storage-options")
    if getattr(args, "cluster_name", None):
        over["cluster"] = {"name": args.cluster_name}
    return load_config(args.config, over)


def _ray(args: argparse.Namespace, *, start: bool = True) -> bool:
    """Connect to Ray (--address, RAY_ADDRESS, a running cluster; else a local one if `start`)."""
    import ray

    from msa_cluster.cluster.cli import _connect_ray

    if ray.is_initialized():
        return False
    if not start:
        ray.init(address=args.address or "auto", logging_level=logging.WARNING, namespace="msa")
        return False
    return _connect_ray(args.address)


def _cluster(cfg: Any, required: bool) -> Any:
    """The running memory cluster named by the config, or None (ValueError when `required`)."""
    from msa_cluster.cluster.ingest import find_coordinator
    from msa_cluster.cluster.placement import MemoryCluster

    spec = cfg.cluster.spec()
    if find_coordinator(spec.name, spec.namespace) is None:
        if required:
            raise ValueError(f"no memory cluster {spec.name!r} runs in Ray namespace {spec.namespace!r} "
                             "(start one with `msa serve --start-cluster`)")
        return None
    return MemoryCluster.connect(spec, cfg.storage_options or None)


def _quota(cfg: Any) -> Any:
    from msa_cluster.actors.coordinator import TenantQuota

    return TenantQuota(cfg.limits.max_documents_per_tenant, cfg.limits.max_tokens_per_tenant)


def _ingest_options(cfg: Any, args: argparse.Namespace, tenant: str) -> Any:
    from msa_cluster.cluster.ingest import IngestOptions

    ing = cfg.ingest
    return IngestOptions(tenant=tenant, commit_every=ing.commit_every, commit_interval_s=ing.commit_interval_s,
                         long_documents=ing.long_documents, max_document_tokens=cfg.limits.max_document_tokens,
                         text_column=getattr(args, "text_column", None) or "text", id_column=getattr(args, "id_column", None),
                         num_encoders=ing.num_encoders, encoder_cpus=ing.encoder_cpus, encoder_gpus=ing.encoder_gpus,
                         encode_timeout_s=ing.encode_timeout_s, progress_s=ing.progress_s)


def _progress(prefix: str = "") -> Any:
    def show(p: Any) -> None:
        print(f"{prefix}{p.line()}", file=sys.stderr, flush=True)

    return show


def _print_summary(summary: Any, as_json: bool, prefix: str = "") -> None:
    if as_json:
        print(json.dumps(summary.to_json()))
        return
    for line in summary.lines():
        print(prefix + line)


def _ingest_flags(args: argparse.Namespace) -> dict[str, Any]:
    ingest = {k: v for k, v in (("commit_every", args.commit_every), ("commit_interval_s", args.commit_interval),
                                ("long_documents", args.long_documents), ("num_encoders", args.encoders),
                                ("encoder_cpus", args.encoder_cpus)) if v is not None}
    flags: dict[str, Any] = {"ingest": ingest} if ingest else {}
    if args.max_document_tokens is not None:
        flags["limits"] = {"max_document_tokens": args.max_document_tokens}
    return flags


# ---------------------------------------------------------------------------------------------- commands
def cmd_ingest(args: argparse.Namespace) -> int:
    """Read SOURCE with Ray Data, encode it on a pool of encoders, commit to the store in batches."""
    from msa_cluster.cluster.ingest import ingest

    cfg = _config(args, **_ingest_flags(args))
    _ray(args)
    spec = cfg.cluster.spec()
    summary = ingest(args.source, cfg.store, cfg.model, _ingest_options(cfg, args, args.tenant),
                     storage_options=cfg.storage_options or None,
                     source_options=_json_arg(args.source_options, "--source-options") or cfg.storage_options or None,
                     quota=_quota(cfg), cluster=None if args.no_cluster else (spec.name, spec.namespace),
                     write_timeout_s=spec.write_timeout_s, on_progress=_progress())
    _print_summary(summary, args.json)
    return 0


def cmd_reencode(args: argparse.Namespace) -> int:
    """Re-encode every stored text with another model into a new store."""
    from msa_cluster.cluster.ops import reencode

    cfg = _config(args, store=args.to, **_ingest_flags(args))
    _ray(args)
    src_options = _json_arg(args.from_options, "--from-options") or cfg.storage_options or None
    out = reencode(args.source_store, cfg.store, cfg.model, _ingest_options(cfg, args, "default"), src_options=src_options,
                   dst_options=cfg.storage_options or None, on_progress=lambda t, p: _progress(f"[{t}] ")(p))
    if args.json:
        print(json.dumps({t: s.to_json() for t, s in out.items()}))
    for tenant, summary in out.items():
        if not args.json:
            _print_summary(summary, False, prefix=f"[{tenant}] ")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    """Copy one committed version of a store to an empty location and verify the copy."""
    from msa_cluster.cluster.ops import copy_version

    cfg = _config(args)
    report = copy_version(cfg.store, args.to, args.version, src_options=cfg.storage_options or None,
                          dst_options=_json_arg(args.to_options, "--to-options") or cfg.storage_options or None)
    verb = "restored" if args.command == "restore" else "backed up"
    print(f"{verb} version {report.version} of {cfg.store} to {args.to}: {report.files} files, {report.bytes} bytes; "
          f"the copy verifies ({report.verified.documents} documents)")
    return 0


def cmd_tenant(args: argparse.Namespace) -> int:
    """Delete a whole tenant; --purge also compacts and collects garbage so its data leaves the store's files."""
    from msa_cluster.cluster.ops import open_store, purge_tenant

    cfg = _config(args)
    if not args.purge:
        raise ValueError("`msa tenant delete` needs --purge: the tenant's text and tensors are removed from the store "
                         "for good (backups are not touched)")
    store = open_store(cfg.store, cfg.storage_options or None)
    cluster = _cluster(cfg, required=False) if _try_ray(args) else None
    report = purge_tenant(store, args.tenant, coordinator=None if cluster is None else cluster.coordinator,
                          timeout_s=cfg.cluster.write_timeout_s)
    print(f"tenant {report.tenant!r}: deleted {report.deleted} documents, compacted to version {report.version}, "
          f"removed {len(report.gc.deleted_files)} files and {len(report.gc.deleted_versions)} old versions. "
          "Backups still hold the tenant: purge them yourself")
    return 0


def _try_ray(args: argparse.Namespace) -> bool:
    """Connect to the Ray cluster named by --address or RAY_ADDRESS (set inside a Ray job), if any.

    Without either, no cluster is looked for: an operations command never joins some other Ray
    session of this machine by accident.
    """
    import os

    import ray

    if ray.is_initialized():
        return True
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        return False
    _ray(args, start=False)
    return True


def cmd_status(args: argparse.Namespace) -> int:
    """Store version, documents, tokens, bytes per tier; with a running cluster, its shards and nodes."""
    from msa_cluster.cluster.ops import cluster_status, open_store, store_status

    cfg = _config(args)
    st = store_status(open_store(cfg.store, cfg.storage_options or None))
    out: dict[str, Any] = {"store": {"url": st.url, "version": st.version, "versions_kept": st.versions_kept,
                                     "documents": st.documents, "tokens": st.tokens, "segments": st.segments,
                                     "bytes": st.bytes, "tenants": {t: {"documents": n, "tokens": k} for t, (n, k) in st.tenants.items()}}}
    cluster = _cluster(cfg, required=False) if _try_ray(args) else None
    if cluster is not None:
        out["cluster"] = cluster_status(cluster)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    s = out["store"]
    print(f"store {s['url']}: version {s['version']} ({s['versions_kept']} kept), {s['documents']} documents, "
          f"{s['tokens']} tokens, {s['segments']} segments; bytes: " + ", ".join(f"{k} {v}" for k, v in sorted(st.bytes.items())))
    for t, u in sorted(s["tenants"].items()):
        print(f"  tenant {t}: {u['documents']} documents, {u['tokens']} tokens")
    if cluster is None:
        print("no memory cluster is running")
        return 0
    c = out["cluster"]
    print(f"cluster: serves version {c['version']} (epoch {c['epoch']}), store latest {c['store_version']}, "
          f"{c['documents']} documents on {len(c['shards'])} shard pairs, nodes {', '.join(c['nodes'])}")
    if c["refused_version"] is not None:
        print(f"  refused version {c['refused_version']}: {c['refused_reason']}")
    for sh in c["shards"]:
        print(f"  shard {sh['shard']}: serves version {sh['serves_version']}, {sh['documents']} documents, {sh['tokens']} "
              f"tokens, {sh['chunks']} chunks; router on {sh['router_node']}, kv on {sh['kv_node']}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every file of the store's latest version; with a running cluster, every shard's holdings."""
    from msa_cluster.cluster.ops import open_store, verify_cluster

    cfg = _config(args)
    store = open_store(cfg.store, cfg.storage_options or None)
    rep = store.verify()
    print(f"store version {rep.version}: {rep.files} files, {rep.documents} rows, {rep.bytes} bytes verified")
    cluster = _cluster(cfg, required=False) if _try_ray(args) else None
    if cluster is None:
        print("no memory cluster is running: shards not checked")
        return 0
    version, checks = verify_cluster(cluster, store)
    bad = [c for c in checks if not c.ok]
    for c in checks:
        where = "unplaced documents" if c.shard < 0 else f"shard {c.shard}"
        state = "ok" if c.ok else f"MISMATCH missing {list(c.missing)[:10]} extra {list(c.extra)[:10]}"
        print(f"  {where}: {c.held}/{c.expected} documents at version {version}: {state}")
    if bad:
        print(f"msa: error: {len(bad)} shard(s) disagree with the store at version {version}", file=sys.stderr)
        return 1
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    """Set the number of shard pairs of the running cluster (documents are rebalanced)."""
    cfg = _config(args, store=args.store or "unused://")
    if args.num_shards < 1:
        raise ValueError(f"the number of shard pairs must be >= 1, got {args.num_shards}")
    _ray(args, start=False)
    version = _cluster(cfg, required=True).scale(args.num_shards)
    print(f"the cluster serves version {version} on {args.num_shards} shard pairs")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    """Rewrite segments holding deleted rows; --gc-grace S also removes versions superseded over S seconds ago."""
    from msa_cluster.cluster.ops import compact, open_store

    cfg = _config(args)
    rep = compact(open_store(cfg.store, cfg.storage_options or None), args.gc_grace)
    print(f"compacted: store version {rep.commit.version}" + ("" if rep.gc is None else
          f"; removed {len(rep.gc.deleted_versions)} versions and {len(rep.gc.deleted_files)} files"))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    """Delete documents of a tenant by id or client id (through the running cluster when there is one)."""
    from msa_cluster.cluster.ops import open_store, resolve_refs

    cfg = _config(args)
    store = open_store(cfg.store, cfg.storage_options or None)
    ids = resolve_refs(store, args.refs, args.tenant)
    cluster = _cluster(cfg, required=False) if _try_ray(args) else None
    if cluster is not None:
        result = cluster.delete(ids, tenant=args.tenant)
    else:
        result = store.delete(ids, tenant=args.tenant)
    print(f"deleted {len(result.deleted)} documents of tenant {args.tenant!r}: store version {result.version}")
    return 0


# ---------------------------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser, store_help: str = "memory store URL (file://, s3://, ...)") -> None:
    p.add_argument("--config", help="YAML AppConfig (the same file as `msa serve`)")
    p.add_argument("--store", help=store_help)
    p.add_argument("--storage-options", help="fsspec options of the store as JSON, e.g. '{\"endpoint_url\": ...}'")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS or a running cluster)")
    p.add_argument("--cluster-name", help="the memory cluster's name (config cluster.name)")


def _ingest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory or bundled model name (default msa-tiny)")
    p.add_argument("--commit-every", type=int, help="documents per commit (config ingest.commit_every, 256)")
    p.add_argument("--commit-interval", type=float, help="seconds between commits at most (ingest.commit_interval_s, 30)")
    p.add_argument("--long-documents", choices=["split", "reject"], help="documents over the length limit (default split)")
    p.add_argument("--max-document-tokens", type=int, help="length limit (limits.max_document_tokens; default the model's)")
    p.add_argument("--encoders", type=int, help="encoder actors (ingest.num_encoders, 1)")
    p.add_argument("--encoder-cpus", type=float, help="CPUs per encoder actor (ingest.encoder_cpus, 1)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def register(sub: Any) -> None:
    """Add the ingestion and operations subcommands to the `msa` parser's subparsers."""
    ing = sub.add_parser("ingest", help="encode documents from files (jsonl, parquet, text; any fsspec URL) into a store",
                         description="Read SOURCE with Ray Data, encode on a pool of encoder actors, commit in batches "
                                     "(through the running memory cluster when there is one). Re-running resumes. Works "
                                     "as `ray job submit -- msa ingest ...`.")
    ing.add_argument("source", help="a .jsonl or .parquet file, a folder or a glob of them or of text files")
    ing.add_argument("--tenant", required=True, help="the tenant that owns the documents")
    ing.add_argument("--source-options", help="fsspec options of SOURCE as JSON (default: the store's)")
    ing.add_argument("--text-column", help="the column holding the text (default 'text')")
    ing.add_argument("--id-column", help="the column of stable client ids (default 'client_id' or 'id', else path:row)")
    ing.add_argument("--no-cluster", action="store_true", help="write the store directly even when a cluster runs")
    _common(ing)
    _ingest_args(ing)
    ing.set_defaults(func=cmd_ingest)

    re = sub.add_parser("reencode", help="re-encode every stored text with another model into a new store",
                        description="Switch models: the new store takes the new model's fingerprint. Re-running resumes.")
    re.add_argument("--from", dest="source_store", required=True, help="the store to read")
    re.add_argument("--from-options", help="fsspec options of --from as JSON (default: the store's)")
    re.add_argument("--to", required=True, help="the new store (created)")
    _common(re)
    _ingest_args(re)
    re.set_defaults(func=cmd_reencode)

    for name, what in (("backup", "copy one committed version of a store to an empty location, and verify the copy"),
                       ("restore", "copy a backup (one version) into an empty store location, and verify it")):
        b = sub.add_parser(name, help=what, description=what)
        _common(b, "the store to copy from (the backup, for restore)")
        b.add_argument("--to", required=True, help="an empty location to copy to")
        b.add_argument("--to-options", help="fsspec options of --to as JSON (default: the store's)")
        b.add_argument("--version", type=int, help="the committed version to copy (default: the latest)")
        b.set_defaults(func=cmd_backup)

    tn = sub.add_parser("tenant", help="tenant-wide operations")
    tsub = tn.add_subparsers(dest="tenant_command", required=True)
    td = tsub.add_parser("delete", help="delete a whole tenant; --purge removes its data from the store's files",
                         description="Delete every document of TENANT, compact, and collect garbage at once. Backups are "
                                     "not touched.")
    td.add_argument("tenant")
    td.add_argument("--purge", action="store_true", help="required: confirms that the data is removed for good")
    _common(td)
    td.set_defaults(func=cmd_tenant)

    st = sub.add_parser("status", help="store version, documents, tokens, bytes per tier; the running cluster's shards")
    _common(st)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    ve = sub.add_parser("verify", help="check the store's files, and every running shard's documents against the store")
    _common(ve)
    ve.set_defaults(func=cmd_verify)

    sc = sub.add_parser("scale", help="set the number of shard pairs of the running memory cluster")
    sc.add_argument("num_shards", type=int)
    _common(sc)
    sc.set_defaults(func=cmd_scale)

    co = sub.add_parser("compact", help="rewrite segments that hold deleted documents")
    co.add_argument("--gc-grace", type=float, help="then remove versions superseded more than this many seconds ago")
    _common(co)
    co.set_defaults(func=cmd_compact)

    de = sub.add_parser("delete", help="delete documents of a tenant by id or client id")
    de.add_argument("refs", nargs="+", help="document ids (all digits) or client ids")
    de.add_argument("--tenant", required=True)
    _common(de)
    de.set_defaults(func=cmd_delete)
