"""End to end over HTTP (issue 12): the Serve app on 127.0.0.1 under 1, 8 and 32 concurrent clients.

What runs is what a user runs: a store encoded by msa-tiny (held-out filler documents of the
evaluation split plus the sample corpus, up to the memory size), the memory cluster (2 shard
pairs), the Serve app (one replica) with a fresh API key, and clients posting
`/v1/chat/completions` with the sample questions in turn. Each level sends a bounded number of
requests (`--requests`, after one warm-up request per client).

Reported per (memory, clients): p50 and p99 latency, requests/s and answer tokens/s, and where a
request's time goes, from the server's own timing (`msa.timing` in each response):
- retrieve: routing + K/V fetch, every routing layer and round (the fan-out to the shards);
- prefill: the rest of the prefills (attention and MLPs over the gathered context);
- decode: every generated token (retrieval rounds and answer);
- HTTP + queue: the client's latency minus the server's total (proxy, replica queue, JSON).
Ratios printed last: throughput at 8 and 32 clients over 1 client, and the shares of the time.

    python bench/bench_http.py                      # memories 16K and 1M (1M takes minutes to encode)
    python bench/bench_http.py --sizes 16K --requests 16 --clients 1,8   # a quick look
    python bench/bench_http.py --store file:///data/mem --tenant big      # serve a store `msa ingest` built
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402


def _build_store(store_url: str, model_name: str, tokens: int, tenant: str) -> tuple[Any, int, int]:
    """A store of about `tokens` tokens: the sample corpus plus held-out filler documents."""
    import torch

    from msa_cluster.cluster.demo import sample_corpus
    from msa_cluster.model import MSAForCausalLM
    from msa_cluster.model.protocol import encode_document
    from msa_cluster.model.tokenizer import load_codec
    from msa_cluster.storage_adapters import MemoryStore
    from msa_cluster.training.tasks import filler_texts

    model, codec = MSAForCausalLM.from_pretrained(model_name, dtype=torch.float32), load_codec(model_name)
    store = MemoryStore.open(store_url, model.fingerprint(), create=True)
    texts = [r["text"] for r in sample_corpus()]
    fillers = filler_texts(7, "eval")
    held = docs = 0
    while held < tokens:
        batch = texts if docs == 0 else list(itertools.islice(fillers, 4096))
        ids = store.allocate_ids(tenant, count=len(batch))
        wrapped = [encode_document(codec, i, t) for i, t in zip(ids, batch)]
        if docs:
            keep = 0
            while keep < len(wrapped) and held + sum(len(w) for w in wrapped[:keep]) < tokens:
                keep += 1
            ids, wrapped, batch = ids[:keep], wrapped[:keep], batch[:keep]
        with torch.inference_mode():
            store.insert(model.encode_documents(wrapped, texts=batch, tenants=[tenant] * len(batch), doc_ids=ids))
        held += sum(len(w) for w in wrapped)
        docs += len(batch)
    store.close()
    return model.fingerprint(), held, docs


def _existing_store(store_url: str, model_name: str, tenant: str) -> tuple[Any, int, int]:
    """The fingerprint, tokens and documents of `tenant` in a store built by `msa ingest` (it must hold them)."""
    import torch

    from msa_cluster.model import MSAForCausalLM
    from msa_cluster.storage_adapters import MemoryStore

    fingerprint = MSAForCausalLM.from_pretrained(model_name, dtype=torch.float32).fingerprint()
    store = MemoryStore.open(store_url, fingerprint)
    try:
        snap = store.snapshot()
        docs, tokens = snap.usage().get(tenant, (0, 0))
    finally:
        store.close()
    if not docs:
        raise SystemExit(f"store {store_url} holds no documents of tenant {tenant!r}")
    return fingerprint, tokens, docs


def _post(url: str, key: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})  # fmt: skip
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:  # noqa: S310 - our own server on loopback
        out = json.loads(r.read())
    return time.perf_counter() - t0, out


def _level(url: str, key: str, model: str, questions: list[str], clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    """`requests` chat requests from `clients` threads (each warmed up once); latency and timing per request."""
    lock, results = threading.Lock(), []
    counter = itertools.count()

    def body(i: int) -> dict[str, Any]:
        return {"model": model, "messages": [{"role": "user", "content": questions[i % len(questions)]}], "max_tokens": max_tokens}

    ready = threading.Barrier(clients)
    spans: list[tuple[float, float]] = []

    def client(c: int) -> None:
        _post(url, key, body(c))  # warm-up, not counted
        ready.wait()  # every client warm before the counted requests start
        while (i := next(counter)) < requests:
            start = time.perf_counter()
            took, out = _post(url, key, body(i))
            with lock:
                results.append((took, out))
                spans.append((start, start + took))

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    lat = sorted(r[0] for r in results)
    timing = [r[1]["msa"]["timing"] for r in results]
    tokens = sum(r[1]["usage"]["completion_tokens"] for r in results)
    mean = lambda k: statistics.fmean(t[k] for t in timing)  # noqa: E731
    http = statistics.fmean(r[0] - r[1]["msa"]["timing"]["total_s"] for r in results)
    return {
        "clients": clients, "requests": len(results), "p50_s": statistics.median(lat),
        "p99_s": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))], "req_per_s": len(results) / wall,
        "tokens_per_s": tokens / wall, "retrieve_s": mean("retrieve_s"), "prefill_s": mean("prefill_s"),
        "decode_s": mean("decode_s"), "server_s": mean("total_s"), "http_queue_s": http, "wall_s": wall,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="msa-tiny")
    ap.add_argument("--sizes", default="16K,1M", help="memory sizes in tokens (K/M binary units)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=48, help="counted requests per level (bounded)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--store", help="serve this existing store (e.g. built by `msa ingest`) instead of building one per size")
    ap.add_argument("--tenant", default="bench", help="the tenant of --store to query (default 'bench')")
    args = ap.parse_args()

    import ray
    from ray import serve

    from msa_cluster.cluster.config import load_config
    from msa_cluster.cluster.demo import free_port, sample_questions, start_local_ray
    from msa_cluster.cluster.keys import create_key
    from msa_cluster.cluster.placement import MemoryCluster
    from msa_cluster.cluster.serve_app import build_app
    from msa_cluster.training.memory_eval import format_size, parse_size

    questions = [q["question"] for q in sample_questions()]
    levels = [int(c) for c in args.clients.split(",")]
    rows: list[dict[str, Any]] = []
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    start_local_ray()
    sizes = [0] if args.store else [parse_size(s) for s in args.sizes.split(",")]
    for size in sizes:
        work = Path(tempfile.mkdtemp(prefix="bench-http-"))
        cluster = None
        try:
            t0 = time.perf_counter()
            if args.store:
                store_url, tenant = args.store, args.tenant
                fingerprint, held, docs = _existing_store(store_url, args.model, tenant)
                size = held
                print(f"{args.store} ({tenant}): {docs:,} documents, {held:,} tokens", flush=True)
            else:
                store_url, tenant = (work / "store").as_uri(), "bench"
                fingerprint, held, docs = _build_store(store_url, args.model, size, tenant)
                print(f"{format_size(size)}: {docs:,} documents, {held:,} tokens encoded in {time.perf_counter() - t0:.0f} s", flush=True)
            key, _ = create_key(work / "keys.json", tenant)
            port = free_port()
            cfg = load_config(overrides={
                "store": store_url, "model": args.model, "port": port, "auth": {"keys_file": str(work / "keys.json")},
                "limits": {"requests_per_minute": 100000, "burst": 100000, "max_concurrent_requests": 64,
                           "queue_timeout_s": 600, "request_timeout_s": 600},
                "cluster": {"name": "bench-http", "namespace": "bench-http", "num_shards": 2, "poll_s": 1.0},
                "deployment": {"num_cpus": 0.5, "num_replicas": args.replicas, "max_ongoing_requests": 64},
            })  # fmt: skip
            cluster = MemoryCluster.start(cfg.store, fingerprint, cfg.cluster.spec())
            serve.start(http_options={"host": cfg.host, "port": cfg.port}, proxy_location="HeadOnly")
            serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
            url = f"http://{cfg.host}:{cfg.port}/v1/chat/completions"
            _post(url, key, {"model": cfg.served_model_name, "messages": [{"role": "user", "content": questions[0]}], "max_tokens": 4})
            for clients in levels:
                row = {"memory": format_size(size), "tokens": held, **_level(url, key, cfg.served_model_name, questions, clients,
                                                                             args.requests, args.max_tokens)}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            try:
                serve.shutdown()
            except Exception:  # noqa: S110 - best effort between sizes
                pass
            if cluster is not None:
                cluster.shutdown()
            shutil.rmtree(work, ignore_errors=True)
    ray.shutdown()

    print("\n| memory | clients | p50 | p99 | req/s | answer tok/s | retrieve | prefill | decode | HTTP + queue |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['memory']} | {r['clients']} | {r['p50_s'] * 1e3:.0f} ms | {r['p99_s'] * 1e3:.0f} ms | {r['req_per_s']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {r['retrieve_s'] * 1e3:.0f} ms | {r['prefill_s'] * 1e3:.0f} ms | "
              f"{r['decode_s'] * 1e3:.0f} ms | {r['http_queue_s'] * 1e3:.0f} ms |")  # fmt: skip
    print("\nratios (same run):")
    for mem in dict.fromkeys(r["memory"] for r in rows):
        mine = {r["clients"]: r for r in rows if r["memory"] == mem}
        base = mine.get(1)
        for c, r in mine.items():
            if base is not None and c != 1:
                print(f"  {mem}: throughput at {c} clients / 1 client = {r['req_per_s'] / base['req_per_s']:.2f}")
        for c, r in mine.items():
            lat = r["server_s"] + r["http_queue_s"]
            print(f"  {mem}, {c} clients: retrieve {r['retrieve_s'] / lat:.0%}, prefill {r['prefill_s'] / lat:.0%}, "
                  f"decode {r['decode_s'] / lat:.0%}, HTTP + queue {r['http_queue_s'] / lat:.0%} of the mean latency")


if __name__ == "__main__":
    main()
