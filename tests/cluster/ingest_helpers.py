"""Corpora for the ingestion tests, written in each source format, and checks on the store they produce."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence

MODEL = "msa-tiny-random"


def texts(n: int, seed: int = 0) -> list[str]:
    words = ["harbour", "ferry", "lighthouse", "pier", "keeper", "logbook", "storm", "tide", "island", "bell"]
    return [" ".join(words[(seed + i * 7 + k * 3) % len(words)] for k in range(5 + i % 7)) + f" (doc {seed}-{i})"
            for i in range(n)]


def write_corpus(fs, root: str, kind: str, docs: Sequence[str], with_ids: bool = False) -> None:
    """`docs` under `root` (no protocol) on fsspec filesystem `fs`: two files of each kind, or one text file per doc."""
    fs.makedirs(root, exist_ok=True)
    half = (len(docs) + 1) // 2
    groups = [list(enumerate(docs))[:half], list(enumerate(docs))[half:]]
    if kind == "text":
        for i, t in enumerate(docs):
            fs.makedirs(f"{root}/sub{i % 2}", exist_ok=True)
            fs.pipe_file(f"{root}/sub{i % 2}/doc{i:03d}.txt", t.encode())
        return
    for g, rows in enumerate(groups):
        recs = [{"text": t, **({"id": f"doc-{i}"} if with_ids else {}), "metadata": {"n": str(i)}} for i, t in rows]
        if kind == "jsonl":
            fs.pipe_file(f"{root}/part{g}.jsonl", "".join(json.dumps(r) + "\n" for r in recs).encode())
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            buf = io.BytesIO()
            table = pa.table({"text": [r["text"] for r in recs], **({"id": [r["id"] for r in recs]} if with_ids else {})})
            pq.write_table(table, buf)
            fs.pipe_file(f"{root}/part{g}.parquet", buf.getvalue())


def stored(store, tenant: str) -> dict[str, str]:
    """{client id: text} of the tenant's live documents; asserts client ids are unique."""
    snap = store.snapshot()
    ids = snap.doc_ids(tenant)
    infos = [snap.info(i, tenant) for i in ids]
    found = snap.texts(ids, tenant)
    out = {info.client_id: found[info.doc_id] for info in infos}
    assert len(out) == len(ids), "two live documents share a client id"
    return out
