"""Benchmark: scale on one box (issue 12). Synthetic memory of 16K to 100M tokens served by the
real Ray memory cluster (MemoryCluster over a file:// store), one B=1 query through every
routing layer, timed by part; peak RSS of every process against the theoretical bytes.

Shapes (data is SYNTHETIC: random router keys, K/V sliced at random offsets of a random pool):
    MSA-4B  routing layers 18..35 (R = 18), Hkv 8 x D 128, 64-token chunks, bf16, H = 32 query
            heads, top-k 16; sizes 16K, 1M, 10M tokens
    tiny    the bundled msa-tiny's config (routing layers 3,4,5, Hkv 2 x D 32, 16-token chunks, its
            top_k_docs 4, float32: what `msa ingest` with msa-tiny writes); sizes tiny-1M..tiny-100M
Documents are 2,048 tokens. The store is written in commits of <= 512 MB (never the whole memory,
never float32 copies of bf16 memory), then the running cluster syncs to it (poll_s=0: one load
per size, as an ingestion commit through the coordinator would be).

Cluster: 4 shard pairs (0.25 CPU each) on one local Ray node on 127.0.0.1; every router shard
holds its quarter of the router keys in RAM and reads K/V through its own K/V tier, whose budget
holds one document's K/V at one layer (Shape.kv_budget), so the K/V of a query comes from the store: "warm" = the store's files in
the page cache, "cold" = evicted with posix_fadvise(DONTNEED) just before the query (the bytes the
shard processes then read from disk are printed).

One query = ClusterMemory.snapshot() and snapshot.retrieve(layer) at every routing layer, by the
production path (one round per layer, plain actor calls). Each shard's `score` and K/V `read`
are wrapped in place to record their durations (instance attributes, the real `route` calls
them); per layer the shard that answered last defines the parts:
    routing   its scoring time                 K/V fetch  its K/V read time
    fan-out   the layer's wall time at the driver - routing - K/V fetch (Ray calls, query put,
              merge, assembling the context; plus the snapshot's coordinator call once)
Medians over repeats; each repeat runs a cold then a warm query (interleaved).

Theoretical bytes: router keys = R x Hkv x D x itemsize per chunk (MSA-4B 36,864 B / 64 tokens =
576 B per token; tiny 768 B / 16 tokens = 48 B per token), held once across the router shards;
plus the K/V tier budgets. RSS is read from /proc/<pid>/status (VmRSS now, VmHWM peak) in every
actor process and the driver; "measured B/token" = (router shards' VmRSS - their VmRSS with one
document loaded and one query served) / tokens.

    python bench/bench_scale.py                       # all sizes (~7 min on 2 shared cores, 17 GB of disk at most)
    python bench/bench_scale.py --quick               # 16K and 1M at MSA-4B shape (~1.5 min)
    python bench/bench_scale.py --sizes tiny-100M     # any subset, run in pieces

Legend: B query rows, T routing tokens, H heads, Hkv kv heads, D head dim, R routing layers, C chunks.
"""

from __future__ import annotations

import os
import sys

# Before ray is imported: no auth tokens, no usage stats, every Ray socket on 127.0.0.1.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import ray  # noqa: E402
import torch  # noqa: E402
from _common import ROOT, evict_files  # noqa: E402

from msa_cluster.cluster.placement import ClusterSpec, MemoryCluster  # noqa: E402
from msa_cluster.kernels.routing import prepare_queries  # noqa: E402
from msa_cluster.model.config import MSAConfig  # noqa: E402
from msa_cluster.storage_adapters import MemoryStore  # noqa: E402
from msa_cluster.types import EncodedDocument, ModelFingerprint, RoutingQuery, RoutingSpec  # noqa: E402

TENANT = "scale"
SHARDS = 4
TIMEOUT_S = 600.0
LOAD_TIMEOUT_S = 3600.0  # a shard loading 10M tokens of router keys
COMMIT_BYTES = 512 << 20  # store bytes per commit while writing synthetic memory
DOC_TOKENS = 2048
T = 64  # routing tokens of the query
TOKENS = {"16K": 2**14, "1M": 2**20, "10M": 10_000_000, "100M": 100_000_000}
MSA4B_SIZES, TINY_SIZES = ("16K", "1M", "10M"), ("tiny-1M", "tiny-10M", "tiny-100M")


@dataclass(frozen=True)
class Shape:
    """What the synthetic memory and the query look like."""

    name: str
    fingerprint: ModelFingerprint
    spec: RoutingSpec
    scale: float  # routing query scale (1/sqrt(D) for dot, 1 for cosine)
    top_k: int

    @property
    def layers(self) -> tuple[int, ...]:
        return self.fingerprint.routing_layers

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = getattr(torch, self.fingerprint.dtype)
        return dtype

    @property
    def chunk(self) -> int:
        return self.fingerprint.chunk_size

    @property
    def chunk_elems(self) -> int:
        """Elements of one chunk of one tensor over all routing layers: R x Hkv x D."""
        fp = self.fingerprint
        return len(fp.routing_layers) * fp.num_kv_heads * fp.head_dim

    @property
    def router_bytes_per_chunk(self) -> int:
        return self.chunk_elems * self.dtype.itemsize

    @property
    def doc_chunks(self) -> int:
        return DOC_TOKENS // self.chunk

    @property
    def kv_budget(self) -> int:
        """A K/V tier that holds one document's K and V at one layer: the next read evicts it, so every
        read of a query goes to the store (MSA-4B 128 KiB, tiny 64 KiB)."""
        return 2 * self.doc_chunks * self.fingerprint.num_kv_heads * self.fingerprint.head_dim * self.dtype.itemsize

    def describe(self) -> str:
        fp = self.fingerprint
        return (f"{self.name}: R={len(fp.routing_layers)} routing layers {fp.routing_layers[0]}..{fp.routing_layers[-1]}, "
                f"Hkv={fp.num_kv_heads} x D={fp.head_dim}, H={self.spec.num_heads}, chunk {fp.chunk_size}, {fp.dtype}, "
                f"{self.spec.similarity}, top-k {self.top_k}; router keys {self.router_bytes_per_chunk} B/chunk = "
                f"{self.router_bytes_per_chunk / fp.chunk_size:.0f} B/token, store {3 * self.router_bytes_per_chunk} B/chunk")


def msa4b_shape() -> Shape:
    layers = tuple(range(18, 36))
    fp = ModelFingerprint("bench-msa-4b-shape", layers, "bfloat16", num_kv_heads=8, head_dim=128, chunk_size=64)
    spec = RoutingSpec(similarity="dot", head_reduce="mean", query_reduce="max", chunk_reduce="max", num_heads=32, num_kv_heads=8)
    return Shape("MSA-4B", fp, spec, 128**-0.5, 16)


def tiny_shape() -> Shape:
    cfg = MSAConfig.from_pretrained(str(ROOT / "msa_cluster" / "assets" / "msa-tiny"))
    return Shape("msa-tiny", cfg.fingerprint("float32"), cfg.routing_spec(), cfg.routing_scale(), cfg.memory.top_k_docs)


# ---------------------------------------------------------------------------------------------- synthetic memory


class Writer:
    """Writes random documents of one shape into a store, a commit of <= COMMIT_BYTES at a time."""

    def __init__(self, store: MemoryStore, shape: Shape, seed: int):
        self.store, self.shape = store, shape
        self.g = torch.Generator().manual_seed(seed)
        self.tokens = 0
        self.doc_elems = shape.doc_chunks * shape.chunk_elems
        # K/V only travel (never scored here): slices of one random pool at random offsets
        self.pool = self._random(16 * self.doc_elems)
        self.seconds = 0.0
        self.bytes = 0

    def _random(self, n: int) -> torch.Tensor:
        """n standard-normal values in the shape's dtype, made in float32 blocks of 16M at most."""
        out = torch.empty(n, dtype=self.shape.dtype)
        for s in range(0, n, 1 << 24):
            out[s : s + (1 << 24)] = torch.randn(min(1 << 24, n - s), generator=self.g)
        return out

    def _docs(self, ids: list[int]) -> list[EncodedDocument]:
        sh, C = self.shape, self.shape.doc_chunks
        fp = sh.fingerprint
        dims = (len(fp.routing_layers), C, fp.num_kv_heads, fp.head_dim)  # [R, C, Hkv, D]
        router = self._random(len(ids) * self.doc_elems).view(len(ids), *dims)
        offsets = torch.randint(0, self.pool.numel() - 2 * self.doc_elems, (len(ids),), generator=self.g).tolist()
        return [
            EncodedDocument(doc_id, self.pool[o : o + self.doc_elems].view(dims), self.pool[o + self.doc_elems : o + 2 * self.doc_elems].view(dims),
                            router[n], num_tokens=DOC_TOKENS, routing_layers=fp.routing_layers, text=f"synthetic {doc_id}",
                            tenant=TENANT)
            for n, (doc_id, o) in enumerate(zip(ids, offsets))
        ]  # fmt: skip

    def grow(self, tokens: int) -> None:
        """Commit documents until the store holds `tokens` (rounded up to whole documents)."""
        per_commit = max(1, COMMIT_BYTES // (3 * self.doc_elems * self.shape.dtype.itemsize))
        todo = math.ceil((tokens - self.tokens) / DOC_TOKENS)
        while todo > 0:
            n = min(per_commit, todo)
            ids = self.store.allocate_ids(TENANT, count=n)
            docs = self._docs(ids)
            start = time.perf_counter()
            self.store.insert(docs)
            self.seconds += time.perf_counter() - start
            self.bytes += n * 3 * self.doc_elems * self.shape.dtype.itemsize
            self.tokens += n * DOC_TOKENS
            todo -= n


def make_query(shape: Shape, seed: int) -> RoutingQuery:
    """A B=1 routing query [1, T, H, D] of random values, prepared the canonical way (heads folded)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, shape.spec.num_heads, shape.fingerprint.head_dim, generator=g)  # [B, T, H, D]
    return prepare_queries(q, torch.ones(1, T, dtype=torch.bool), shape.spec, shape.scale)


# ---------------------------------------------------------------------------------------------- inside the shard actors


def proc_memory() -> dict[str, int]:
    """This process's resident bytes now and at peak (VmRSS, VmHWM) and bytes it made the kernel read from disk."""
    with open("/proc/self/status") as f:
        kib = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in f) if k in ("VmRSS", "VmHWM")}
    with open("/proc/self/io") as f:
        read = int(next(ln for ln in f if ln.startswith("read_bytes:")).split()[1])
    return {"rss": kib["VmRSS"] << 10, "hwm": kib["VmHWM"] << 10, "read_bytes": read}


def _instrument(shard: Any) -> int:
    """Run inside a router shard actor: wrap its `score` and its K/V tier's `read` (instance
    attributes, which the real `route` calls) so each records (kind, layer, seconds). Returns the pid."""
    if getattr(shard, "bench_times", None) is None:
        shard.bench_times = []

        def timed(kind: str, fn: Any) -> Any:
            def run(layer: int, *args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return fn(layer, *args, **kwargs)
                finally:
                    shard.bench_times.append((kind, layer, time.perf_counter() - start))

            return run

        shard.score = timed("score", shard.score)
        shard.kv.read = timed("read", shard.kv.read)
    return os.getpid()


def _drain(shard: Any) -> dict[str, Any]:
    """Run inside a router shard actor: the recorded durations (then cleared) and the tier's counters."""
    times, shard.bench_times = shard.bench_times, []
    return {"times": times, "tier": shard.kv.stats()["tier"], "io": proc_memory()["read_bytes"]}


def _memory(_actor: Any) -> dict[str, int]:
    return proc_memory()


# ---------------------------------------------------------------------------------------------- one size


class Served:
    """A store of one shape, the cluster serving it, and the measurements."""

    def __init__(self, shape: Shape, root: str):
        self.shape, self.root = shape, root
        url = f"file://{root}"
        self.store = MemoryStore.open(url, shape.fingerprint, create=True)
        self.writer = Writer(self.store, shape, seed=len(shape.name))
        spec = ClusterSpec(name=f"scale-{shape.fingerprint.chunk_size}", namespace="msa-bench", num_shards=SHARDS,
                           kv_budget_bytes=shape.kv_budget, timeout_s=TIMEOUT_S, start_timeout_s=LOAD_TIMEOUT_S,
                           write_timeout_s=LOAD_TIMEOUT_S, poll_s=0.0)
        self.cluster = MemoryCluster.start(url, shape.fingerprint, spec)
        self.memory = self.cluster.memory()
        self.pids = ray.get([r.__ray_call__.remote(_instrument) for r in self.cluster.routers], timeout=TIMEOUT_S)
        # The baseline: every process after one document was loaded and one query served (imports, buffers)
        self.grow(DOC_TOKENS)
        self.query({layer: make_query(shape, seed=layer) for layer in shape.layers}, cold=False)
        self.empty = self.rss()

    def rss(self) -> dict[str, list[dict[str, int]]]:
        groups = {"router": self.cluster.routers, "kv": self.cluster.kvs, "coordinator": [self.cluster.coordinator]}
        out = {k: ray.get([a.__ray_call__.remote(_memory) for a in acts], timeout=TIMEOUT_S) for k, acts in groups.items()}
        out["driver"] = [proc_memory()]
        return out

    def grow(self, tokens: int) -> float:
        """Write up to `tokens` and have the cluster serve them; returns the load (sync) seconds."""
        self.writer.grow(tokens)
        start = time.perf_counter()
        self.cluster.sync()
        return time.perf_counter() - start

    def query(self, queries: dict[int, RoutingQuery], cold: bool) -> dict[str, float]:
        """One B=1 request through every routing layer; its parts in ms (see the module docstring)."""
        if cold:
            evict_files(self.root)
        before = ray.get([r.__ray_call__.remote(_drain) for r in self.cluster.routers], timeout=TIMEOUT_S)
        walls = {}
        start = time.perf_counter()
        snap = self.memory.snapshot(TENANT)
        view_s = time.perf_counter() - start
        for layer in self.shape.layers:
            t0 = time.perf_counter()
            got = snap.retrieve(layer, queries[layer], self.shape.top_k)
            walls[layer] = time.perf_counter() - t0
            assert len(got.selected[0]) == min(self.shape.top_k, self.writer.tokens // DOC_TOKENS), "too few documents selected"
        total = time.perf_counter() - start
        after = ray.get([r.__ray_call__.remote(_drain) for r in self.cluster.routers], timeout=TIMEOUT_S)
        parts = {"routing": 0.0, "fetch": 0.0}
        for layer in self.shape.layers:
            per_shard = [{k: sum(s for kind, lay, s in a["times"] if kind == k and lay == layer) for k in ("score", "read")}
                         for a in after]  # fmt: skip
            last = max(per_shard, key=lambda p: p["score"] + p["read"])
            parts["routing"] += last["score"]
            parts["fetch"] += last["read"]
        out = {k: 1e3 * v for k, v in parts.items()}
        out["total"] = 1e3 * total
        out["fanout"] = out["total"] - out["routing"] - out["fetch"]
        out["view"] = 1e3 * view_s
        out["disk MiB"] = sum(a["io"] - b["io"] for a, b in zip(after, before)) / 2**20
        out["tier hits"] = sum(a["tier"]["hits"] - b["tier"]["hits"] for a, b in zip(after, before))
        out["tier misses"] = sum(a["tier"]["misses"] - b["tier"]["misses"] for a, b in zip(after, before))
        return out

    def close(self) -> None:
        self.cluster.shutdown()


def measure(served: Served, name: str, reps: int) -> dict[str, Any]:
    """Grow to `name`, then `reps` x (cold query, warm query) after one untimed warm-up query."""
    shape = served.shape
    tokens = TOKENS[name.removeprefix("tiny-")]
    w0, t0 = served.writer.seconds, time.perf_counter()
    load_s = served.grow(tokens)
    write_s = served.writer.seconds - w0
    queries = {layer: make_query(shape, seed=1000 * tokens.bit_length() + layer) for layer in shape.layers}
    served.query(queries, cold=False)
    runs: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    for _ in range(reps):
        runs["cold"].append(served.query(queries, cold=True))
        runs["warm"].append(served.query(queries, cold=False))
    med = {kind: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for kind, rs in runs.items()}
    chunks = served.writer.tokens // shape.chunk
    row = {"shape": shape.name, "size": name, "tokens": served.writer.tokens, "chunks": chunks, "reps": reps,
           "write_s": write_s, "write_GBps": served.writer.bytes / 1e9 / max(served.writer.seconds, 1e-9), "load_s": load_s,
           "rss": served.rss(), "empty": served.empty, **med}
    c, w = med["cold"], med["warm"]
    print(f"  {shape.name} {name:>9} ({served.writer.tokens:,} tokens, C={chunks:,}; store written in {write_s:.0f} s, "
          f"{row['write_GBps']:.2f} GB/s; loaded by the shards in {load_s:.1f} s; total {time.perf_counter() - t0:.0f} s; "
          f"load average {os.getloadavg()[0]:.2f})\n"
          f"      warm: routing {w['routing']:9.1f} | K/V fetch {w['fetch']:7.1f} | fan-out {w['fanout']:7.1f} | total {w['total']:9.1f} ms"
          f" | tier hits/misses {w['tier hits']:.0f}/{w['tier misses']:.0f}, disk {w['disk MiB']:.1f} MiB\n"
          f"      cold: routing {c['routing']:9.1f} | K/V fetch {c['fetch']:7.1f} | fan-out {c['fanout']:7.1f} | total {c['total']:9.1f} ms"
          f" | disk read by the shards {c['disk MiB']:.1f} MiB", flush=True)  # fmt: skip
    return row


# ---------------------------------------------------------------------------------------------- report


def gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def report(rows: list[dict[str, Any]]) -> None:
    shapes = {"MSA-4B": msa4b_shape(), "msa-tiny": tiny_shape()}
    print("\n[1] latency of one B=1 query over all routing layers (median ms; cold = store files evicted first)")
    print("| shape | memory | chunks | routing | K/V fetch warm | K/V fetch cold | fan-out warm | fan-out cold | total warm | total cold "
          "| routing us/chunk/layer | fan-out per layer warm | document-layers of K/V read |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        R = len(shapes[r["shape"]].layers)
        w, c = r["warm"], r["cold"]
        print(f"| {r['shape']} | {r['size']} | {r['chunks']:,} | {w['routing']:.1f} | {w['fetch']:.1f} | {c['fetch']:.1f} | "
              f"{w['fanout']:.1f} | {c['fanout']:.1f} | {w['total']:.1f} | {c['total']:.1f} | "
              f"{1e3 * w['routing'] / r['chunks'] / R:.3f} | {w['fanout'] / R:.2f} | {w['tier misses']:.0f} |")  # fmt: skip
    print("\n[2] memory (GiB; VmRSS now / VmHWM peak, summed over the 4 processes of a kind) against theory")
    print("| shape | memory | router shards RSS | their peak | minus baseline | theory (router keys) | measured / theory "
          "| B/token measured / theory | B/token since the previous size | kv actors RSS | coordinator RSS | driver RSS / peak |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    held: dict[str, tuple[int, int]] = {}  # shape -> (tokens, router shards' RSS) of its previous size
    for r in rows:
        shape = shapes[r["shape"]]
        rss, empty = r["rss"], r["empty"]
        routers = sum(p["rss"] for p in rss["router"])
        grown = routers - sum(p["rss"] for p in empty["router"])
        theory = r["chunks"] * shape.router_bytes_per_chunk
        before = held.get(r["shape"])
        step = "-" if before is None else f"{(routers - before[1]) / (r['tokens'] - before[0]):.1f}"
        held[r["shape"]] = (r["tokens"], routers)
        print(f"| {r['shape']} | {r['size']} | {gib(routers)} | {gib(sum(p['hwm'] for p in rss['router']))} | {gib(grown)} | "
              f"{gib(theory)} (+{SHARDS} x {shape.kv_budget >> 10} KiB tier) | {grown / theory:.2f} | {grown / r['tokens']:.1f} / "
              f"{theory / r['tokens']:.1f} | {step} | {gib(sum(p['rss'] for p in rss['kv']))} | {gib(rss['coordinator'][0]['rss'])} | "
              f"{gib(rss['driver'][0]['rss'])} / {gib(rss['driver'][0]['hwm'])} |")  # fmt: skip
    print("\n[3] ratios, each size against the previous size of its shape (warm; linear routing: routing x = memory x)")
    for name in shapes:
        mine = [r for r in rows if r["shape"] == name]
        for base, r in zip(mine, mine[1:]):
            w, b = r["warm"], base["warm"]
            print(f"  {name} {base['size']:>9} -> {r['size']:>9}: memory x{r['chunks'] / base['chunks']:6.1f} | "
                  f"routing x{w['routing'] / b['routing']:6.2f} | K/V fetch warm x{w['fetch'] / b['fetch']:.2f}, "
                  f"cold x{r['cold']['fetch'] / base['cold']['fetch']:.2f} (document-layers read {b['tier misses']:.0f} -> {w['tier misses']:.0f}) | "
                  f"fan-out x{w['fanout'] / b['fanout']:.2f} | routing share of the total {b['routing'] / b['total']:.0%} -> "
                  f"{w['routing'] / w['total']:.0%}")  # fmt: skip


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=None, help=f"comma-separated, of {','.join(MSA4B_SIZES + TINY_SIZES)} (default all)")
    ap.add_argument("--quick", action="store_true", help="16K and 1M at MSA-4B shape only")
    ap.add_argument("--dir", default="/tmp", help="where the stores go (deleted at the end)")
    ap.add_argument("--reps", type=int, default=None, help="cold+warm repeats per size (default 5, 3 from 10M tokens on)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--report", default=None, help="only print the tables of results written earlier with --json")
    args = ap.parse_args()
    if args.report:
        with open(args.report) as f:
            report(json.load(f))
        return
    sizes = (args.sizes or (",".join(MSA4B_SIZES[:2]) if args.quick else ",".join(MSA4B_SIZES + TINY_SIZES))).split(",")
    unknown = set(sizes) - set(MSA4B_SIZES + TINY_SIZES)
    if unknown:
        ap.error(f"unknown sizes {sorted(unknown)}; choose from {MSA4B_SIZES + TINY_SIZES}")
    t_start = time.perf_counter()
    torch.set_num_threads(1)
    print(f"bench_scale {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; sizes {sizes}; nproc {len(os.sched_getaffinity(0))}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; torch {torch.__version__}, ray {ray.__version__}")
    groups = [(shape, [s for s in order if s in sizes]) for shape, order in ((msa4b_shape(), MSA4B_SIZES), (tiny_shape(), TINY_SIZES))]
    for shape, names in groups:
        if names:
            print("  " + shape.describe())
    tmp = tempfile.mkdtemp(prefix="bench-scale-", dir=args.dir)
    rows: list[dict[str, Any]] = []
    ray.init(address="local", num_cpus=8, object_store_memory=2 << 30, include_dashboard=False, logging_level=logging.ERROR,
             namespace="msa-bench")
    try:
        for shape, names in groups:
            if not names:
                continue
            root = os.path.join(tmp, shape.name)
            served = Served(shape, root)
            print(f"\n{shape.name}: cluster of {SHARDS} shard pairs up at {time.perf_counter() - t_start:.0f} s (store {root})", flush=True)
            try:
                for name in names:
                    reps = args.reps or (3 if TOKENS[name.removeprefix("tiny-")] >= 10_000_000 else 5)
                    rows.append(measure(served, name, reps))
            finally:
                served.close()
                shutil.rmtree(root, ignore_errors=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; total {time.perf_counter() - t_start:.0f} s; "
          f"Ray shut down; {tmp} deleted: {not os.path.exists(tmp)}")  # fmt: skip
    report(rows)


if __name__ == "__main__":
    main()
