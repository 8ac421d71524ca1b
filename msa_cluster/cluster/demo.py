"""`msa demo`: the whole system on one machine, over HTTP.

It starts Ray in this process on loopback, encodes the bundled sample corpus into a store in a
temporary folder (each row under its "tenant", 'demo' where it names none), starts the memory
cluster and the Serve app on 127.0.0.1 with a fresh API key per tenant, asks the sample questions
with the stock `openai` client, each with its tenant's key (one of them streamed), shows a routing
search and a write over the memory API, prints answers with their citations, and shuts
everything down (the temporary folder too, unless --keep).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from msa_cluster.types import check_tenant

__all__ = ["DEMO_MODEL", "SAMPLE_QUESTIONS", "sample_questions", "run_demo", "start_local_ray", "free_port", "sample_corpus", "post_json"]

DEMO_MODEL = "msa-tiny"

# Ray on one machine without token auth (see the toolchain notes). Ray rewrites 127.0.0.1 to the
# machine's network address, but not the rest of 127.0.0.0/8, so on Linux the node takes 127.0.0.2.
LOCAL_RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
LOCAL_NODE_IP = "127.0.0.2" if sys.platform.startswith("linux") else "127.0.0.1"


def _asset_rows(name: str) -> list[dict[str, Any]]:
    text = (resources.files("msa_cluster") / "assets" / name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def sample_corpus() -> list[dict[str, Any]]:
    """The demo's documents: held-out task facts among fillers (scripts/make_sample_corpus.py)."""
    return _asset_rows("sample_corpus.jsonl")


def sample_questions() -> list[dict[str, Any]]:
    """The demo's questions over the sample corpus, each with its task and expected answer."""
    return _asset_rows("sample_questions.jsonl")


SAMPLE_QUESTIONS = tuple(q["question"] for q in sample_questions())


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_local_ray(num_cpus: int | None = None) -> None:
    """An embedded single-node Ray bound to 127.0.0.1, unless this process is connected already."""
    import ray

    if ray.is_initialized():
        return
    for k, v in LOCAL_RAY_ENV.items():
        os.environ.setdefault(k, v)
    ray.init(address="local", _node_ip_address=LOCAL_NODE_IP, include_dashboard=False, num_cpus=num_cpus or max(os.cpu_count() or 2, 4),
             logging_level=logging.ERROR, log_to_driver=False, namespace="msa")


def _tenants(rows: Sequence[dict[str, Any]], default: str) -> dict[str, list[dict[str, Any]]]:
    """The rows of each tenant (a row's "tenant", else `default`), in order of first appearance."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(check_tenant(str(r.get("tenant") or default)), []).append(r)
    return out


def _encode_corpus(store_url: str, model_name: str, rows: Sequence[dict[str, Any]], tenant: str) -> Any:
    """Encode `rows` into a new store (as `msa ingest` would), each under its tenant (`tenant` where a
    row names none), and return the model's fingerprint."""
    from msa_cluster.model import MSAForCausalLM
    from msa_cluster.model.protocol import encode_document
    from msa_cluster.model.tokenizer import load_codec
    from msa_cluster.storage_adapters import MemoryStore

    model, codec = MSAForCausalLM.from_pretrained(model_name), load_codec(model_name)
    from dataclasses import replace

    store = MemoryStore.open(store_url, model.fingerprint(), create=True)
    for name, mine in _tenants(rows, tenant).items():
        client_ids = [str(r.get("client_id") or f"sample-{r.get('id', i)}") for i, r in enumerate(mine)]
        ids = store.allocate_ids(name, client_ids=client_ids)
        tokens = [encode_document(codec, i, r["text"]) for i, r in zip(ids, mine)]
        docs = model.encode_documents(tokens, texts=[r["text"] for r in mine], tenants=[name] * len(mine), doc_ids=ids,
                                      sources=["sample_corpus.jsonl"] * len(mine))
        store.insert([replace(d, client_id=c) for d, c in zip(docs, client_ids)])
    store.close()
    return model.fingerprint()


def post_json(url: str, key: str, body: dict[str, Any], method: str = "POST", timeout_s: float = 120.0) -> Any:
    """A JSON request with the API key; HTTPError (with the server's one-line reason) on a 4xx/5xx."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method=method,
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:  # noqa: S310 - the URL is the user's server
        return json.loads(r.read() or b"null")


def _show_citations(citations: list[dict[str, Any]]) -> str:
    parts = []
    for c in citations:
        how = "+".join(k for k in ("routed", "read") if c.get(k))
        score = f"{c['score']:.4f}" if c.get("score") is not None else "-"
        parts.append(f"[{c['id']}] {c.get('client_id') or ''} r{c['round']} {how} score={score} layers={c.get('layers')}")
    return "\n    ".join(parts) or "(none)"


def _describe(by_tenant: dict[str, list[dict[str, Any]]]) -> str:
    total = sum(map(len, by_tenant.values()))
    if len(by_tenant) == 1:
        return f"{total} documents of tenant {next(iter(by_tenant))!r}"
    return f"{total} documents: " + ", ".join(f"{len(r)} of tenant {t!r}" for t, r in by_tenant.items())


def run_demo(model: str | None = None, questions: Sequence[str] = SAMPLE_QUESTIONS, *, max_tokens: int = 64,
             max_rounds: int = 3, mode: str = "interleave", keep: bool = False, corpus: Sequence[dict[str, Any]] | None = None,
             out: Any = print) -> int:
    import ray
    from openai import OpenAI
    from ray import serve

    from msa_cluster.cluster.config import load_config
    from msa_cluster.cluster.keys import create_key
    from msa_cluster.cluster.placement import MemoryCluster
    from msa_cluster.cluster.serve_app import build_app
    t0 = time.monotonic()
    model_name = model or DEMO_MODEL
    known = sample_questions() if corpus is None else []
    expected = {q["question"]: q["answer"] for q in known}
    rows = list(corpus) if corpus is not None else sample_corpus()
    by_tenant = _tenants(rows, "demo")
    tenant_of = {q["question"]: q["tenant"] for q in known}  # other questions go to the first tenant
    work = Path(tempfile.mkdtemp(prefix="msa-demo-"))
    tenant = next(iter(by_tenant), "demo")
    started_ray = not ray.is_initialized()
    cluster: MemoryCluster | None = None
    try:
        store_url = (work / "store").as_uri()
        fingerprint = _encode_corpus(store_url, model_name, rows, tenant)
        keys = {name: create_key(work / "keys.json", name, name="msa demo")[0] for name in by_tenant}
        key = keys[tenant]
        port = free_port()
        cfg = load_config(overrides={
            "store": store_url, "model": model_name, "port": port, "mode": mode,
            "auth": {"keys_file": str(work / "keys.json")},
            "cluster": {"name": "msa-demo", "namespace": "msa-demo", "num_shards": 2, "poll_s": 1.0},
            "deployment": {"num_cpus": 0.5},
        })
        out(f"model: {model_name} ({cfg.served_model_name}); store: {store_url}; " + _describe(by_tenant))
        start_local_ray()
        cluster = MemoryCluster.start(cfg.store, fingerprint, cfg.cluster.spec())
        serve.start(http_options={"host": cfg.host, "port": cfg.port}, proxy_location="HeadOnly")
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
        base = f"http://{cfg.host}:{cfg.port}"
        out(f"serving {base}/v1 (memory cluster: 2 shard pairs, Serve app {cfg.app_name!r}), ready in {time.monotonic() - t0:.1f} s")
        clients = {name: OpenAI(base_url=f"{base}/v1", api_key=k, timeout=120, max_retries=2) for name, k in keys.items()}
        extra = {"msa_max_rounds": max_rounds}
        for n, q in enumerate(questions):
            asked = tenant_of.get(q, tenant)
            client = clients[asked]
            out(f"\nQ: {q}" + (f"  [tenant {asked!r}]" if len(keys) > 1 else ""))
            if n == 0:  # streamed: deltas as they come, citations in the last chunk
                text, cites, finish = "", [], None
                for chunk in client.chat.completions.create(model=cfg.served_model_name, messages=[{"role": "user", "content": q}],
                                                            max_tokens=max_tokens, stream=True, extra_body=extra):
                    if chunk.choices and chunk.choices[0].delta.content:
                        text += chunk.choices[0].delta.content
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
                        cites = (chunk.model_extra or {}).get("msa_citations", [])
                msa = {}
            else:
                resp = client.chat.completions.create(model=cfg.served_model_name, messages=[{"role": "user", "content": q}],
                                                      max_tokens=max_tokens, extra_body=extra)
                text, finish = resp.choices[0].message.content or "", resp.choices[0].finish_reason
                cites, msa = (resp.model_extra or {}).get("msa_citations", []), (resp.model_extra or {}).get("msa", {})
            why = f", {msa.get('finish_reason')}" if msa else ""
            shown = repr(text) if text else "(no answer: the model named no document and gave no answer within its token budget)"
            out(f"A ({finish}{why}{', streamed' if n == 0 else ''}): {shown}")
            if q in expected:
                out(f"  expected: {expected[q]!r} ({'correct' if expected[q].lower() in text.lower() else 'WRONG'})")
            out(f"  citations:\n    {_show_citations(cites)}")
        hits = post_json(f"{base}/v1/memories/search", key, {"query": questions[0], "top_k": 3})
        out(f"\nsearch {questions[0]!r}: " + ", ".join(f"[{h['id']}] score={h['score']:.4f}" for h in hits["data"]))
        added = post_json(f"{base}/v1/memories", key, {"text": "The lighthouse museum opens at nine.", "client_id": "museum"})
        out(f"added document {added['data'][0]['id']} (client id 'museum') at store version {added['version']}; "
            f"an answer now may cite it")
        out(f"\ndemo finished in {time.monotonic() - t0:.1f} s")
        return 0
    finally:
        try:
            serve.shutdown()
        except Exception:  # noqa: S110 - best effort on the way out
            pass
        if cluster is not None:
            cluster.shutdown()
        if started_ray:
            ray.shutdown()
        if keep:
            out(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
