"""`msa ingest`: documents from files on any fsspec URL into a memory store, as a Ray job.

Sources: `.jsonl` files (one JSON object per line with a text column), `.parquet` files, or a
folder or glob of text files (one document per file). Ray Data reads them in a fixed order;
the driver groups rows into commit batches, allocates ids, hands sub-batches to a pool of
`EncoderActor`s (a GPU each when the cluster has GPUs) and commits each batch once encoded,
through the memory cluster's coordinator when one runs (capacity and quota checked before
anything is written), else straight to the store. While batch k encodes, batch k+1 is read.

Resuming: every document has a stable client id (its id column, else `path:row`, or the path
of a text file), and a batch whose client ids are all live is skipped. A crash loses at most
the batches not yet committed (`commit_every` documents or `commit_interval_s` seconds each);
their allocated ids are never used, so a re-run neither duplicates nor loses a document.

Long documents (over `max_document_tokens`) are split into linked parts (client ids
`<id>#part-<i>-of-<n>`, metadata `parent`, `part`, `parts`), all committed in one batch, or
rejected, by `long_documents`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from msa_cluster.actors.calls import call
from msa_cluster.actors.coordinator import TenantQuota
from msa_cluster.storage_adapters import CommitResult, MemoryStore
from msa_cluster.types import EncodedDocument, check_tenant

__all__ = ["IngestOptions", "IngestProgress", "IngestSummary", "Rejection", "SourceRow", "EncoderPool", "ingest", "run_ingest",
           "read_source", "list_source_files", "find_coordinator", "StoreWriter", "ClusterWriter"]

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
_ID_DIGITS = 15  # ids are wrapped as `[id]` at both ends: reserve room for ids up to 10**15 when splitting


@dataclass(frozen=True)
class IngestOptions:
    """One ingestion run (validated on construction)."""

    tenant: str
    commit_every: int = 256  # documents per commit
    commit_interval_s: float = 30.0  # or a commit at least this often (never one per document)
    long_documents: Literal["split", "reject"] = "split"
    max_document_tokens: int | None = None  # None: the model's position limit
    text_column: str = "text"
    id_column: str | None = None  # None: "client_id" or "id" when the rows have one, else path:row
    num_encoders: int = 1
    encoder_cpus: float = 1.0
    encoder_gpus: float | None = None  # None: 1 when the cluster has GPUs
    encode_timeout_s: float = 600.0  # one sub-batch on one encoder
    progress_s: float = 5.0

    def __post_init__(self) -> None:
        check_tenant(self.tenant)
        if self.commit_every < 1 or self.num_encoders < 1:
            raise ValueError(f"commit_every ({self.commit_every}) and num_encoders ({self.num_encoders}) must be >= 1")
        if self.commit_interval_s <= 0 or self.encode_timeout_s <= 0 or self.encoder_cpus <= 0:
            raise ValueError("commit_interval_s, encode_timeout_s and encoder_cpus must be > 0")
        if self.long_documents not in ("split", "reject"):
            raise ValueError(f"long_documents must be 'split' or 'reject', got {self.long_documents!r}")
        if self.max_document_tokens is not None and self.max_document_tokens < 64:
            raise ValueError(f"max_document_tokens must be >= 64, got {self.max_document_tokens}")


@dataclass(frozen=True)
class SourceRow:
    """One document as read: its stable client id, text (None when unreadable) and where it came from."""

    client_id: str
    text: str | None
    source: str
    metadata: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # why the row cannot be a document (bad JSON, no text, not UTF-8)


@dataclass(frozen=True)
class Rejection:
    client_id: str
    reason: str


@dataclass(frozen=True)
class IngestProgress:
    documents: int  # source rows handled (inserted, skipped or rejected)
    total: int | None
    tokens: int  # tokens encoded
    elapsed_s: float
    commits: int

    @property
    def docs_per_s(self) -> float:
        return self.documents / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        if self.total is None or self.documents == 0:
            return None
        return max(self.total - self.documents, 0) / self.docs_per_s

    def line(self) -> str:
        eta = "?" if self.eta_s is None else f"{self.eta_s:.0f}s"
        of = f"/{self.total}" if self.total is not None else ""
        return (f"{self.documents}{of} documents, {self.docs_per_s:.1f} docs/s, {self.tokens_per_s:.0f} tokens/s, "
                f"{self.commits} commits, ETA {eta}")


@dataclass
class IngestSummary:
    inserted: int = 0  # store documents written (a split source row counts once per part)
    skipped: int = 0  # source rows already in the store (a re-run)
    rejected: list[Rejection] = field(default_factory=list)
    split: int = 0  # source rows split into parts
    commits: int = 0
    tokens: int = 0
    version: int | None = None  # the store version of the last commit
    elapsed_s: float = 0.0

    def lines(self, examples: int = 5) -> list[str]:
        out = [f"inserted {self.inserted} documents ({self.split} source documents split into parts), skipped "
               f"{self.skipped} already stored, rejected {len(self.rejected)}; {self.commits} commits, {self.tokens} "
               f"tokens in {self.elapsed_s:.1f}s; store version {self.version}"]
        reasons = Counter(r.reason.split(":")[0] for r in self.rejected)
        for reason, n in reasons.most_common():
            shown = [r.client_id for r in self.rejected if r.reason.split(":")[0] == reason][:examples]
            out.append(f"  rejected {n}: {reason} (e.g. {', '.join(shown)})")
        return out

    def to_json(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        body["rejected"] = [dataclasses.asdict(r) for r in self.rejected]
        return body


# ---------------------------------------------------------------------------------------------- sources
def _strip_protocol(url: str) -> str:
    return url.split("://", 1)[1] if "://" in url else url


def list_source_files(source: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, list[str], str]:
    """(fsspec filesystem, sorted file paths, the kind: jsonl | parquet | text) of a file, folder or glob.

    ValueError when nothing matches or the files are of mixed or unknown kinds.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(source, **(storage_options or {}))
    if any(c in root for c in "*?["):
        paths = sorted(p for p in fs.glob(root) if fs.isfile(p))
    elif fs.isdir(root):
        paths = sorted(p for p in fs.find(root) if not p.rsplit("/", 1)[-1].startswith("."))
    elif fs.exists(root):
        paths = [root]
    else:
        raise ValueError(f"source {source} does not exist")
    if not paths:
        raise ValueError(f"source {source} matches no files")
    kinds = {_kind(p) for p in paths}
    if len(kinds) != 1 or None in kinds:
        raise ValueError(f"source {source} must be .jsonl files, .parquet files or text files ({', '.join(TEXT_SUFFIXES)}), "
                         f"not a mix; found {sorted(str(k) for k in kinds)}")
    return fs, paths, str(kinds.pop())


def _kind(path: str) -> str | None:
    name = path.lower()
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def _common_root(paths: Sequence[str]) -> str:
    if len(paths) == 1:
        return paths[0].rsplit("/", 1)[0]
    parts = [p.split("/") for p in paths]
    common = []
    for seg in zip(*parts):
        if len(set(seg)) != 1:
            break
        common.append(seg[0])
    return "/".join(common)


def read_source(source: str, options: IngestOptions, storage_options: dict[str, Any] | None = None) -> tuple[Iterator[SourceRow], int]:
    """Read SOURCE with Ray Data in a fixed order; returns (rows, number of rows).

    Rows keep the order of the sorted files and of rows within each file, so a derived client
    id (`relative/path:row`) names the same document on every run.
    """
    import pyarrow.fs as pafs
    import ray.data

    fs, paths, kind = list_source_files(source, storage_options)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    pa_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    if kind == "jsonl":
        ds = ray.data.read_text(paths, filesystem=pa_fs, include_paths=True, drop_empty_lines=False)
    elif kind == "parquet":
        ds = ray.data.read_parquet(paths, filesystem=pa_fs, include_paths=True)
    else:
        ds = ray.data.read_binary_files(paths, filesystem=pa_fs, include_paths=True)
    total = ds.count()
    root = _common_root(paths)
    return _rows(ds, kind, root, options), total


def _rows(ds: Any, kind: str, root: str, options: IngestOptions) -> Iterator[SourceRow]:
    position: Counter[str] = Counter()
    for batch in ds.iter_batches(batch_size=256, batch_format="pyarrow"):
        for rec in batch.to_pylist():
            path = str(rec.pop("path"))
            rel = path[len(root):].lstrip("/") if path.startswith(root) else path
            if kind == "text":
                yield _text_file_row(rec["bytes"], rel, path)
                continue
            row = position[rel]
            position[rel] += 1
            if kind == "jsonl":
                line = rec["text"]
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    yield SourceRow(f"{rel}:{row}", None, path, error=f"not JSON: {e}")
                    continue
                if not isinstance(rec, dict):
                    yield SourceRow(f"{rel}:{row}", None, path, error="not a JSON object")
                    continue
            yield _record_row(rec, f"{rel}:{row}", path, options)


def _text_file_row(data: bytes, rel: str, path: str) -> SourceRow:
    try:
        return SourceRow(rel, data.decode("utf-8"), path)
    except UnicodeDecodeError as e:
        return SourceRow(rel, None, path, error=f"not UTF-8 text: {e.reason} at byte {e.start}")


def _record_row(rec: dict[str, Any], derived_id: str, path: str, options: IngestOptions) -> SourceRow:
    id_col = options.id_column or next((c for c in ("client_id", "id") if rec.get(c) is not None), None)
    client_id = derived_id
    if id_col is not None:
        value = rec.get(id_col)
        if value is None or str(value) == "":
            return SourceRow(derived_id, None, path, error=f"no id: column {id_col!r} is missing or empty")
        client_id = str(value)
    text = rec.get(options.text_column)
    if not isinstance(text, str):
        return SourceRow(client_id, None, path, error=f"no text: column {options.text_column!r} is missing or not a string")
    meta = rec.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        return SourceRow(client_id, None, path, error="bad metadata: must be an object of strings")
    source = str(rec.get("source") or path)
    return SourceRow(client_id, text, source, {str(k): str(v) for k, v in (meta or {}).items()})


# ---------------------------------------------------------------------------------------------- writers
class StoreWriter:
    """Commits straight to the store (no cluster running); the tenant quota is checked first."""

    def __init__(self, store: MemoryStore, quota: TenantQuota | None = None):
        self.store, self.quota = store, quota

    def allocate_ids(self, tenant: str, client_ids: Sequence[str]) -> list[int]:
        return self.store.allocate_ids(tenant, client_ids=list(client_ids))

    def insert(self, docs: list[EncodedDocument]) -> CommitResult:
        self.store.check_writes(docs, live=False)
        if self.quota is not None:
            self.quota.check(self.store.snapshot(), docs)
        return self.store.insert(docs)


class ClusterWriter:
    """Commits through a running cluster's coordinator: refused whole (MemoryFullError,
    QuotaExceededError) before anything is written, and served as soon as committed."""

    def __init__(self, coordinator: Any, quota: TenantQuota | None = None, timeout_s: float = 300.0):
        self.coordinator, self.quota, self.timeout_s = coordinator, quota, timeout_s

    def allocate_ids(self, tenant: str, client_ids: Sequence[str]) -> list[int]:
        ids: list[int] = call(self.coordinator, "allocate_ids", tenant, client_ids=list(client_ids), timeout_s=self.timeout_s)
        return ids

    def insert(self, docs: list[EncodedDocument]) -> CommitResult:
        result: CommitResult = call(self.coordinator, "insert", docs, quota=self.quota, timeout_s=self.timeout_s)
        return result


# ---------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class _Part:
    client_id: str
    text: str
    source: str
    metadata: dict[str, str]


class _Splitter:
    """Decides, per source row, the documents it becomes (parts) or why it is rejected."""

    def __init__(self, codec: Any, max_tokens: int, mode: str):
        self.codec, self.max_tokens, self.mode = codec, max_tokens, mode
        probe = 10**_ID_DIGITS - 1
        self.overhead = len(_wrapped(codec, probe, "")) + 1

    def plan(self, row: SourceRow) -> list[_Part] | Rejection:
        if row.error is not None or row.text is None:
            return Rejection(row.client_id, row.error or "no text")
        if not row.text.strip():
            return Rejection(row.client_id, "empty text")
        n = len(self.codec.encode(row.text)) + self.overhead
        if n <= self.max_tokens:
            return [_Part(row.client_id, row.text, row.source, row.metadata)]
        if self.mode == "reject":
            return Rejection(row.client_id, f"too long: {n} tokens, over max_document_tokens={self.max_tokens}")
        pieces = self._pieces(row.text)
        return [_Part(f"{row.client_id}#part-{i}-of-{len(pieces)}", p, row.source,
                      {**row.metadata, "parent": row.client_id, "part": str(i), "parts": str(len(pieces))})
                for i, p in enumerate(pieces)]

    def _pieces(self, text: str) -> list[str]:
        """Cut `text` into consecutive pieces that each fit, preferring to cut at whitespace."""
        budget = self.max_tokens - self.overhead
        out, start = [], 0
        while start < len(text):
            length = min(len(text) - start, budget)
            while True:
                end = start + length
                if end < len(text):
                    cut = text.rfind(" ", start + length // 2, end)
                    end = cut + 1 if cut > start else end
                if len(self.codec.encode(text[start:end])) <= budget:
                    break
                length = max(1, length * 3 // 4)
            out.append(text[start:end])
            start = end
        return out


def _wrapped(codec: Any, doc_id: int, text: str) -> list[int]:
    from msa_cluster.model.protocol import encode_document

    return encode_document(codec, doc_id, text)


# ---------------------------------------------------------------------------------------------- encoders
class EncoderPool:
    """A pool of EncoderActors (a GPU each when the cluster has GPUs); knows the model's fingerprint."""

    def __init__(self, model: str, options: IngestOptions):
        import ray

        from msa_cluster.actors.model_actors import EncoderActor

        gpus = options.encoder_gpus
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        self.model, self.timeout_s = model, options.encode_timeout_s
        self.actors = [EncoderActor.options(num_cpus=options.encoder_cpus, num_gpus=gpus)  # type: ignore[attr-defined]
                       .remote(checkpoint=model, max_tokens=1 << 40) for _ in range(options.num_encoders)]
        try:
            self.fingerprint, self.position_limit = ray.get(self.actors[0].describe.remote(), timeout=self.timeout_s)
        except BaseException:
            self.close()
            raise

    def submit(self, rows: list[dict[str, Any]]) -> list[Any]:
        """Spread `rows` over the pool; returns the pending results, in order."""
        per = -(-len(rows) // len(self.actors))
        return [a.encode.remote(rows[k * per:(k + 1) * per]) for k, a in enumerate(self.actors) if rows[k * per:(k + 1) * per]]

    def results(self, refs: list[Any]) -> list[EncodedDocument]:
        import ray

        return [d for chunk in ray.get(refs, timeout=self.timeout_s) for d in chunk]

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class _Batch:
    rows: list[tuple[SourceRow, list[_Part]]] = field(default_factory=list)
    opened: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        return sum(len(parts) for _, parts in self.rows)


@dataclass
class _Encoding:
    batch: _Batch
    todo: list[_Part]
    refs: list[Any]


class _Run:
    """One ingestion: batches rows, encodes them on the pool, commits them in order."""

    def __init__(self, options: IngestOptions, store: MemoryStore, writer: Any, pool: EncoderPool, total: int | None,
                 on_progress: Callable[[IngestProgress], None] | None):
        self.o, self.store, self.writer, self.pool = options, store, writer, pool
        limit = min(pool.position_limit, options.max_document_tokens or pool.position_limit)
        self.splitter = _Splitter(_codec(pool), limit, options.long_documents)
        self.total, self.on_progress = total, on_progress
        self.summary = IngestSummary()
        self.seen: set[str] = set()
        self.handled = 0
        self.started = time.monotonic()
        self.last_progress = self.started

    def run(self, rows: Iterable[SourceRow]) -> IngestSummary:
        batch, inflight = _Batch(), None
        for row in rows:
            self._add(batch, row)
            if batch.size >= self.o.commit_every or (batch.rows and time.monotonic() - batch.opened >= self.o.commit_interval_s):
                inflight = self._advance(inflight, batch)
                batch = _Batch()
        inflight = self._advance(inflight, batch)
        self._advance(inflight, _Batch())
        self.summary.elapsed_s = time.monotonic() - self.started
        self._progress(force=True)
        return self.summary

    def _add(self, batch: _Batch, row: SourceRow) -> None:
        if row.client_id in self.seen:
            self._reject(Rejection(row.client_id, "duplicate id: the source has this client id more than once"))
            return
        self.seen.add(row.client_id)
        plan = self.splitter.plan(row)
        if isinstance(plan, Rejection):
            self._reject(plan)
        else:
            batch.rows.append((row, plan))

    def _reject(self, rejection: Rejection) -> None:
        self.summary.rejected.append(rejection)
        self.handled += 1

    def _advance(self, inflight: _Encoding | None, batch: _Batch) -> _Encoding | None:
        """Start encoding `batch`, then commit the batch that was encoding (commits stay in source order)."""
        started = self._start(batch) if batch.rows else None
        if inflight is not None:
            self._commit(inflight)
        self._progress()
        return started

    def _start(self, batch: _Batch) -> _Encoding:
        parts = [p for _, ps in batch.rows for p in ps]
        live = self.store.snapshot().resolve([p.client_id for p in parts], self.o.tenant)
        todo = [p for p in parts if p.client_id not in live]
        done_rows = sum(1 for _, ps in batch.rows if all(p.client_id in live for p in ps))
        self.summary.skipped += done_rows
        self.handled += done_rows
        if not todo:
            return _Encoding(batch, [], [])
        ids = self.writer.allocate_ids(self.o.tenant, [p.client_id for p in todo])
        rows = [{"id": i, "text": p.text, "tenant": self.o.tenant, "source": p.source, "metadata": p.metadata}
                for i, p in zip(ids, todo)]
        return _Encoding(batch, todo, self.pool.submit(rows))

    def _commit(self, enc: _Encoding) -> None:
        if not enc.todo:
            return
        docs = [dataclasses.replace(d, client_id=p.client_id) for d, p in zip(self.pool.results(enc.refs), enc.todo)]
        result = self.writer.insert(docs)
        written = {p.client_id for p in enc.todo}
        rows = [ps for _, ps in enc.batch.rows if any(p.client_id in written for p in ps)]
        s = self.summary
        s.inserted += len(docs)
        s.split += sum(1 for ps in rows if len(ps) > 1)
        s.tokens += sum(d.num_tokens for d in docs)
        s.commits += 1
        s.version = result.version
        self.handled += len(rows)
        log.info("committed %d documents as store version %d", len(docs), result.version)

    def _progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.on_progress is None or (not force and now - self.last_progress < self.o.progress_s):
            return
        self.last_progress = now
        self.on_progress(IngestProgress(self.handled, self.total, self.summary.tokens, now - self.started, self.summary.commits))


def _codec(pool: EncoderPool) -> Any:
    from msa_cluster.model.tokenizer import load_codec

    return load_codec(pool.model)


def run_ingest(rows: Iterable[SourceRow], store: MemoryStore, pool: EncoderPool, options: IngestOptions, *,
               writer: Any = None, total: int | None = None,
               on_progress: Callable[[IngestProgress], None] | None = None) -> IngestSummary:
    """Encode `rows` on `pool` and commit them to `store` (through `writer`: by default straight to
    the store). Needs a connected Ray. Returns the summary.

    MemoryFullError / QuotaExceededError: a batch was refused whole; earlier batches stay committed.
    """
    return _Run(options, store, writer or StoreWriter(store), pool, total, on_progress).run(rows)


def find_coordinator(name: str, namespace: str) -> Any | None:
    """The running memory cluster's coordinator actor, or None when no cluster runs."""
    import ray

    try:
        return ray.get_actor(f"{name}-coordinator", namespace=namespace)
    except ValueError:
        return None


def ingest(source: str, store_url: str, model: str, options: IngestOptions, *, storage_options: dict[str, Any] | None = None,
           source_options: dict[str, Any] | None = None, quota: TenantQuota | None = None, cluster: tuple[str, str] | None = None,
           write_timeout_s: float = 300.0, on_progress: Callable[[IngestProgress], None] | None = None,
           pool: EncoderPool | None = None) -> IngestSummary:
    """`msa ingest`: read SOURCE, encode, commit to the store at `store_url` (created if absent).

    cluster: (name, namespace) of a memory cluster to commit through when it runs; None: the store.
    pool: encoders of `model` to use (kept open); by default a pool is started and closed here.
    """
    own = pool is None
    pool = pool or EncoderPool(model, options)
    try:
        store = MemoryStore.open(store_url, pool.fingerprint, create=True, storage_options=storage_options)
        coordinator = find_coordinator(*cluster) if cluster is not None else None
        writer: Any = StoreWriter(store, quota) if coordinator is None else ClusterWriter(coordinator, quota, write_timeout_s)
        if coordinator is not None:
            log.info("committing through the running memory cluster %s", cluster)
        rows, total = read_source(source, options, source_options)
        return run_ingest(rows, store, pool, options, writer=writer, total=total, on_progress=on_progress)
    finally:
        if own:
            pool.close()
