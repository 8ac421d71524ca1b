"""Benchmark of the Ray memory cluster (issue 4): fan-out overhead, fan-out placement, batching, scaling.

Every number is a median of interleaved repetitions taken side by side in one run (the compared
variants run in rotating order within each repetition), because the machine is shared.
All data is SYNTHETIC: random router keys and K/V of MSA-4B shapes (Hkv 8 kv heads x D 128, 64-token
chunks, bf16 storage, documents of 2,048 tokens = 32 chunks), random routing queries of T = 64
routing tokens with H = 32 heads folded (head mean) to 8 kv-head slices, top-k 16 documents.
Routing cost does not depend on the values. One routing layer is measured: a model with R
routing layers pays the per-layer cost R times.

Formulas, per routing layer and query row (K = Hkv * D = 1024, the folded inner-product width):
    flops = 2 * T * C * K          (T routing tokens, C chunks of memory)
    bytes = C * K * itemsize       (the bf16 router keys, itemsize 2, read once per query batch)
The canonical CPU score (kernels.routing.chunk_scores_ref) runs in float64 on fixed 256-chunk
tiles (a shard with fewer chunks still pays a full tile) and rounds to float32 once, so achieved
rates are compared with this machine's measured float64 GEMM rate (fp32 printed for context).
Ray shard actors get 0.25 CPU, so Ray runs them with OMP_NUM_THREADS=1 (checked below); the
driver runs torch with 1 thread too, except the variants marked 2t (2 threads).

    python bench/bench_cluster.py            # full: memories 16K..10M tokens (~5-7 min on 2 shared cores)
    python bench/bench_cluster.py --quick    # ~2 min: memories 16K and 128K only, fewer repeats

Legend: B query rows, T routing tokens, H heads, Hkv kv heads, D head dim, C chunks, N documents.
"""

from __future__ import annotations

import os

# Before ray is imported: no auth tokens, no usage stats, every Ray socket on 127.0.0.1.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import argparse  # noqa: E402
import math  # noqa: E402
import pickle  # noqa: E402, TID251  (measures the cost of serialising our own query object; never reads user data)
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import ray  # noqa: E402
import torch  # noqa: E402

from msa_cluster.actors.calls import call, gather, submit  # noqa: E402
from msa_cluster.actors.coordinator import Coordinator  # noqa: E402
from msa_cluster.actors.fanout import fan_out  # noqa: E402
from msa_cluster.actors.kv_shard import KVShard  # noqa: E402
from msa_cluster.actors.memory import ClusterMemory  # noqa: E402
from msa_cluster.actors.router_shard import RouterShard  # noqa: E402
from msa_cluster.cluster.placement import ClusterSpec, MemoryCluster  # noqa: E402
from msa_cluster.kernels.routing import TILE, doc_scores, merge_top_k, prepare_queries  # noqa: E402
from msa_cluster.model import InProcessMemory  # noqa: E402
from msa_cluster.storage_adapters import MemoryStore  # noqa: E402
from msa_cluster.types import EncodedDocument, ModelFingerprint, Retrieval, RoutingQuery, RoutingSpec  # noqa: E402

LAYER = 18  # the one routing layer measured
LAYERS = (LAYER,)
H, HKV, D, CHUNK, T = 32, 8, 128, 64, 64
K = HKV * D
DOC_CHUNKS = 32  # 2,048-token documents
TOP_K = 16
TENANT = "bench"
SPEC = RoutingSpec(similarity="dot", head_reduce="mean", query_reduce="max", chunk_reduce="max", num_heads=H, num_kv_heads=HKV)
FP = ModelFingerprint("bench-msa-4b-shape", LAYERS, "bfloat16", num_kv_heads=HKV, head_dim=D, chunk_size=CHUNK)
SIZES = {"16K": 2**14, "128K": 2**17, "1M": 2**20, "10M": 10_000_000}  # tokens of memory
SHARDS = (1, 2, 4)
CONCURRENT = 32
TIMEOUT_S = 600.0

# ---------------------------------------------------------------------------------------------- helpers


def chunks_of(tokens: int) -> int:
    return math.ceil(tokens / CHUNK)


def doc_ranges(chunks: int) -> list[tuple[int, int]]:
    """(first chunk, chunks) of each 32-chunk document; the last one may be shorter."""
    return [(s, min(DOC_CHUNKS, chunks - s)) for s in range(0, chunks, DOC_CHUNKS)]


def synthetic(chunks: int, seed: int) -> torch.Tensor:
    """Random bf16 [C, Hkv, D], made in blocks so a 10M-token memory never exists in float32."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(chunks, HKV, D, dtype=torch.bfloat16)
    for s in range(0, chunks, 16384):
        n = min(16384, chunks - s)
        out[s : s + n] = torch.randn(n, HKV, D, generator=g)
    return out


def make_query(rows: int, seed: int):
    """A RoutingQuery [B, T=64, Hkv=8, D=128] float32: 32 heads folded by the canonical preparation."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, T, H, D, generator=g)  # [B, T, H, D]
    return prepare_queries(q, torch.ones(rows, T, dtype=torch.bool), SPEC, D**-0.5)


def make_docs(first_id: int, chunks: int, seed: int) -> list[EncodedDocument]:
    """Synthetic documents of 2,048 tokens: K, V, router K each [R=1, C, Hkv, D] bf16."""
    kv = [synthetic(chunks, seed + i) for i in range(3)]
    return [
        EncodedDocument(first_id + n, kv[0][None, s : s + c], kv[1][None, s : s + c], kv[2][None, s : s + c],
                        num_tokens=c * CHUNK, routing_layers=LAYERS, text=f"synthetic document {first_id + n}", tenant=TENANT)
        for n, (s, c) in enumerate(doc_ranges(chunks))
    ]  # fmt: skip


def run_variants(variants: dict[str, Callable[[], object]], reps: int, warmup: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each variant: one warm-up each, then `reps` rounds in rotating order."""
    for fn in variants.values() if warmup else ():
        fn()
    names, times = list(variants), {n: [] for n in variants}
    for r in range(reps):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - start)
    return times


def ms(xs: list[float]) -> float:
    return 1e3 * statistics.median(xs)


def threads(n: int, fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with torch using n intra-op threads (the default restored after)."""

    def run():
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(old)

    return run


def flops(rows: int, chunks: int) -> float:
    return 2.0 * rows * T * chunks * K


# ---------------------------------------------------------------------------------------------- machine


def header(args, name: str = "bench_cluster") -> None:
    free = subprocess.run(["free", "-h"], capture_output=True, text=True).stdout.rstrip()
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"{name} {'--quick' if args.quick else '(full)'}  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  commit {commit}")
    print(f"machine: nproc {nproc}, {cpu}, torch {torch.__version__} ({torch.get_num_threads()} threads), ray {ray.__version__}")
    print(free)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"data: SYNTHETIC random keys/K/V, Hkv={HKV} D={D} bf16, chunk {CHUNK}, docs {DOC_CHUNKS * CHUNK} tokens, "
          f"query T={T} routing tokens x H={H} heads folded, top-k {TOP_K}, one routing layer")  # fmt: skip


def listening() -> set[str]:
    """Local addresses (host:port) of the TCP sockets listening on this machine."""
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    return {ln.split()[3] for ln in out.splitlines() if ln.strip()}


def gemm_rate(dtype: torch.dtype, m: int, k: int, n: int, nthreads: int) -> float:
    """Best FLOP/s of an [m, k] @ [k, n] matmul over a few runs with `nthreads` torch threads."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    reps = max(1, int(2e8 / (2 * m * k * n)))

    def run():
        for _ in range(reps):
            a @ b

    return 2.0 * m * k * n * reps / min(run_variants({"g": threads(nthreads, run)}, 5)["g"])


def limits() -> dict[str, float]:
    """Measured matmul rates: the canonical tile GEMM [T=64, K] @ [K, 256] and a 1024^3 GEMM."""
    out = {}
    for dtype, tag in ((torch.float64, "fp64"), (torch.float32, "fp32")):
        for nt in (1, 2):
            out[f"{tag} tile {nt}t"] = gemm_rate(dtype, T, K, TILE, nt)
            out[f"{tag} 1024^3 {nt}t"] = gemm_rate(dtype, 1024, 1024, 1024, nt)
    print("\nmeasured matmul limits (GFLOP/s, best of 5): " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in out.items()))
    return out


# ---------------------------------------------------------------------------------------------- cluster


class Bench:
    """The same synthetic memory three ways: InProcessMemory, `shards` plain shards in this process, `shards` Ray shard pairs."""

    def __init__(self, tmp: str, shards: int = 4):
        self.url, self.shards = f"file://{tmp}/store", shards
        self.store = MemoryStore.open(self.url, FP, create=True)
        self.docs: list[EncodedDocument] = []
        self.inproc = InProcessMemory(routing_layers=LAYERS)
        self.routers = routers = [RouterShard(shard_id=i, routing_layers=LAYERS, store=self.store) for i in range(shards)]
        kvs = [KVShard(shard_id=i, store=self.store) for i in range(shards)]
        self.plain = Coordinator(store=self.store, routers=routers, kvs=kvs, timeout_s=TIMEOUT_S)
        self.plain.attach(routers, kvs)
        self.cluster = MemoryCluster.start(self.url, FP, ClusterSpec(name="bench", num_shards=shards, timeout_s=TIMEOUT_S))
        self.coord = self.cluster.coordinator

    def grow(self, tokens: int) -> None:
        """Commit synthetic documents until memory holds `tokens`; every view syncs to the new version."""
        have = sum(d.num_chunks for d in self.docs)
        new = make_docs(len(self.docs), chunks_of(tokens) - have, seed=1000 + len(self.docs))
        ids = [d.doc_id for d in new]
        # Ids are allocated by the store (and by InProcessMemory): one tenant, so they run on from the last.
        assert self.store.allocate_ids(TENANT, count=len(new)) == ids == self.inproc.allocate_ids(TENANT, count=len(new))
        self.store.insert(new)
        self.docs += new
        self.inproc.add(new)
        self.plain.sync()
        call(self.coord, "sync", timeout_s=TIMEOUT_S)

    def views(self) -> dict[str, object]:
        return {
            "inproc": self.inproc.snapshot(TENANT),
            "plain4": ClusterMemory(self.plain, timeout_s=TIMEOUT_S).snapshot(TENANT),
            "gen4": ClusterMemory(self.coord, timeout_s=TIMEOUT_S).snapshot(TENANT),
        }


def fanout_overhead(bench: Bench, name: str, reps: int) -> dict[str, float]:
    """One B=1 query per call: in-process vs generator-side vs coordinator-side fan-out (4 shards)."""
    q = make_query(1, seed=7)
    snaps = bench.views()
    variants = {k: (lambda s=s: s.retrieve(LAYER, q, TOP_K)) for k, s in snaps.items()}
    variants["inproc 2t"] = threads(2, variants["inproc"])
    variants["coord4"] = lambda: call(bench.coord, "retrieve", LAYER, q, TOP_K, [TENANT], timeout_s=TIMEOUT_S)
    results = {k: fn() for k, fn in variants.items()}
    ref = results["inproc"]
    for k, res in results.items():  # the cluster selects exactly what one process does
        assert res.selected == ref.selected and torch.equal(res.keys[0], ref.keys[0]), k
    t = {k: ms(v) for k, v in run_variants(variants, reps).items()}
    t["best inproc"] = best = min(t["inproc"], t["inproc 2t"])
    C = chunks_of(SIZES[name])
    kv_mib = ref.keys[0].numel() * 2 * 2 / 2**20
    print(f"  {name:>5} C={C:>7}: inproc {t['inproc']:7.2f} (2t {t['inproc 2t']:7.2f}) | plain4 {t['plain4']:7.2f} | "
          f"gen4 {t['gen4']:7.2f} | coord4 {t['coord4']:7.2f} ms | gen4 - best inproc {t['gen4'] - best:+7.2f} ms = "
          f"{t['gen4'] / best:.2f}x | coord4/gen4 {t['coord4'] / t['gen4']:.2f}x (K/V returned {kv_mib:.1f} MiB)")  # fmt: skip
    return t


def concurrently(snap, qs: list[RoutingQuery], out: dict[int, Retrieval]) -> None:
    """out[i] = snap.retrieve(qs[i]) from one thread per query, all released together."""
    barrier = threading.Barrier(len(qs))

    def one(i):
        barrier.wait()
        out[i] = snap.retrieve(LAYER, qs[i], TOP_K)

    ts = [threading.Thread(target=one, args=(i,)) for i in range(len(qs))]
    for th in ts:
        th.start()
    for th in ts:
        th.join()


def batching(bench: Bench, name: str, reps: int, window_s: float) -> dict[str, float]:
    """32 queries: 32 sequential B=1 calls vs 32 threads through a batching ClusterMemory vs one B=32 fan_out."""
    qs = [make_query(1, seed=100 + i) for i in range(CONCURRENT)]
    q32 = RoutingQuery(torch.cat([q.vectors for q in qs]), torch.cat([q.mask for q in qs]), SPEC, folded=True)  # the same 32 rows
    seq = ClusterMemory(bench.coord, timeout_s=TIMEOUT_S).snapshot(TENANT)
    mem = ClusterMemory(bench.coord, timeout_s=TIMEOUT_S, batch_window_s=window_s, max_batch=64)
    snap = mem.snapshot(TENANT)
    rows_per_fanout = mem.batcher.recent_sizes  # requests served by each batched fan-out
    out: dict[int, Retrieval] = {}
    variants = {
        "seq32": lambda: [seq.retrieve(LAYER, q, TOP_K) for q in qs],
        "batched32": lambda: concurrently(snap, qs, out),
        "fanout_B32": lambda: fan_out(seq.view, LAYER, q32, TOP_K, [TENANT] * CONCURRENT),
        # the scoring alone, on one plain shard (a quarter of memory), 1 thread: does a row get cheaper in a batch?
        "shard B=1": lambda: bench.routers[0].score(LAYER, qs[0], TOP_K, [TENANT], [(bench.plain.version, bench.plain.epoch)]),
        "shard B=32": lambda: bench.routers[0].score(LAYER, q32, TOP_K, [TENANT] * CONCURRENT,
                                                     [(bench.plain.version, bench.plain.epoch)] * CONCURRENT),
    }
    t = {k: ms(v) for k, v in run_variants(variants, reps).items()}
    direct = variants["fanout_B32"]()
    for i, q in enumerate(qs):  # batching changes no selection
        assert out[i].selected == seq.retrieve(LAYER, q, TOP_K).selected == direct.selected[i : i + 1]
    print(f"  {name:>5}: 32 sequential {t['seq32']:9.1f} ms | 32 threads, window {window_s * 1e3:.0f} ms "
          f"{t['batched32']:9.1f} ms ({statistics.median(rows_per_fanout):.0f} rows/fan-out, median) | one B=32 fan_out "
          f"{t['fanout_B32']:9.1f} ms | speed-up batched {t['seq32'] / t['batched32']:.2f}x, direct {t['seq32'] / t['fanout_B32']:.2f}x")
    cores = min(4, len(os.sched_getaffinity(0)))
    floor = 4 * t["shard B=32"] / cores  # 4 shards' scoring of 32 rows on this machine's cores, nothing else
    print(f"         scoring one shard (1 thread): B=1 {t['shard B=1']:.1f} ms, B=32 {t['shard B=32']:.1f} ms -> a row in a batch of 32 "
          f"costs {t['shard B=32'] / 32 / t['shard B=1']:.2f}x a lone row; 32-row scoring floor on {cores} cores {floor:.0f} ms "
          f"= {floor / t['batched32']:.0%} of the batched time; speed-up bound with this scoring {t['seq32'] / floor:.2f}x")  # fmt: skip
    return t


# ---------------------------------------------------------------------------------------------- where the time goes


@ray.remote(num_cpus=0.25)  # the shard actors' CPU share, hence the same thread count
class _Probe:
    def ping(self):
        return None

    def sink(self, x):
        return None

    def threads(self):
        return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()


def phases(bench: Bench, reps: int) -> dict[str, float]:
    """The two fan-out rounds of one B=1 query, timed apart: score at 4 shards, then fetch K/V."""
    q = make_query(1, seed=7)
    view = call(bench.coord, "view")

    def score():
        return gather([submit(r, "score", LAYER, q, TOP_K, [TENANT], [(view.version, view.epoch)]) for r in view.routers], TIMEOUT_S)

    parts = score()
    owner = {d.doc_id: s for s, rows in enumerate(parts) for row in rows for d in row}
    want: dict[int, list[int]] = {}
    for d in merge_top_k(parts, TOP_K)[0]:
        want.setdefault(owner[d.doc_id], []).append(d.doc_id)

    def fetch():
        return gather([submit(view.kvs[s], "fetch", LAYER, ids, view.version, TENANT) for s, ids in want.items()], TIMEOUT_S)

    return {k: ms(v) for k, v in run_variants({"score round": score, "fetch round": fetch}, reps).items()}


def compiled_graph(probes: list, q) -> tuple[dict[str, Callable[[], object]], Callable[[], None]]:
    """A Ray compiled graph (shared-memory channels) over the same 4 probes: what a per-layer
    fan-out could cost without an RPC per call. Returns the variants and a teardown."""
    from ray.dag import InputNode, MultiOutputNode

    with InputNode() as inp:
        dag = MultiOutputNode([p.sink.bind(inp) for p in probes])
    graph = dag.experimental_compile()
    return {
        "compiled graph, 4 actors, empty": lambda: ray.get(graph.execute(None)),
        "compiled graph, 4 actors, B=1 query": lambda: ray.get(graph.execute(q)),
    }, graph.teardown


def costs(bench: Bench, reps: int) -> dict[str, float]:
    """Fixed costs on this machine: actor round trips, moving the query to 4 shards, K/V serialization."""
    probes = [_Probe.remote() for _ in range(4)]
    omp, nt = ray.get(probes[0].threads.remote())
    print(f"  a 0.25-CPU actor runs with OMP_NUM_THREADS={omp}, torch threads {nt}")
    q1 = make_query(1, seed=3)
    kv = (torch.randn(TOP_K * DOC_CHUNKS, HKV, D).bfloat16(), torch.randn(TOP_K * DOC_CHUNKS, HKV, D).bfloat16())  # one row's K, V
    kv_np = tuple(x.view(torch.int16).numpy() for x in kv)
    variants = {
        "empty call, 1 actor": lambda: ray.get(probes[0].ping.remote()),
        "empty call, 4 actors in parallel": lambda: ray.get([p.ping.remote() for p in probes]),
        "B=1 query (256 KiB) to 4 actors, by value": lambda: ray.get([p.sink.remote(q1) for p in probes]),
        "B=1 query to 4 actors, ray.put once": lambda: ray.get([p.sink.remote(r) for r in [ray.put(q1)] for p in probes]),
        "B=1 query to 4 actors, as numpy, by value": lambda: ray.get([p.sink.remote(q1.vectors.numpy()) for p in probes]),
        "coordinator.view()": lambda: call(bench.coord, "view"),
        "pickle dumps+loads B=1 query": lambda: pickle.loads(pickle.dumps(q1, protocol=5)),  # noqa: S301
        "ray.put+get K/V of one row, torch (2 MiB)": lambda: ray.get(ray.put(kv)),
        "ray.put+get K/V of one row, numpy (2 MiB)": lambda: ray.get(ray.put(kv_np)),
    }
    graph, teardown = compiled_graph(probes, q1)
    try:
        t = {k: ms(v) for k, v in run_variants({**variants, **graph}, reps).items()}
    finally:
        teardown()
    for k, v in t.items():
        print(f"  {k:<44} {v:8.3f} ms")
    for p in probes:
        ray.kill(p)
    return t


def tile_cost(reps: int) -> dict[str, float]:
    """Where one shard's scoring time goes, 1 thread: tile padding (64 chunks = 16K tokens over 4
    shards) and, at 4,096 chunks (1M tokens over 4 shards), GEMMs vs the bf16 -> float64 conversion."""
    q = make_query(1, seed=3)
    C = 4096
    keys = synthetic(C, seed=9)  # [C, Hkv, D]
    qd, kd = q.vectors.double().reshape(T, K), keys.double().reshape(C, K)
    qf, kf = q.vectors.reshape(T, K), keys.float().reshape(C, K)
    variants = {
        f"score {c} chunks": lambda c=c: doc_scores(q, keys[:c], torch.arange(0, c + 1, DOC_CHUNKS).clamp_max(c))
        for c in (64, TILE, C)
    }
    variants.update({
        f"{C // TILE} tile GEMMs fp64": lambda: [qd @ kd[s : s + TILE].T for s in range(0, C, TILE)],
        f"bf16 -> fp64 of {C} chunks": lambda: [keys[s : s + TILE].double() for s in range(0, C, TILE)],  # per tile, as the score does
        "one fp64 GEMM": lambda: qd @ kd.T,
        "one fp32 GEMM": lambda: qf @ kf.T,
    })  # fmt: skip
    t = {k: ms(v) for k, v in run_variants(variants, reps).items()}
    print("  one shard's score, 1 thread: " + ", ".join(f"{k} {v:.2f} ms" for k, v in t.items()))
    print(f"  -> a 64-chunk shard costs {t['score 64 chunks'] / t[f'score {TILE} chunks']:.2f}x a full {TILE}-chunk tile; at {C} "
          f"chunks the tile GEMMs are {t[f'{C // TILE} tile GEMMs fp64'] / t[f'score {C} chunks']:.0%} and the conversion "
          f"{t[f'bf16 -> fp64 of {C} chunks'] / t[f'score {C} chunks']:.0%} of the score")  # fmt: skip
    return t


# ---------------------------------------------------------------------------------------------- scaling


def split(ranges: list[tuple[int, int]], n: int) -> list[list[tuple[int, int, int]]]:
    """Documents (id, first chunk, chunks) in n contiguous groups of (nearly) equal document count."""
    docs = [(i, s, c) for i, (s, c) in enumerate(ranges)]
    return [docs[len(docs) * j // n : len(docs) * (j + 1) // n] for j in range(n)]


def plain_shards(n: int, keys: torch.Tensor, ranges) -> list[RouterShard]:
    shards = []
    for j, docs in enumerate(split(ranges, n)):
        shard = RouterShard(shard_id=j, routing_layers=LAYERS)
        shard.apply(1, added=[(i, TENANT, keys[None, s : s + c]) for i, s, c in docs])  # [R=1, C, Hkv, D]
        shards.append(shard)
    return shards


@ray.remote(num_cpus=0.25, max_concurrency=8)  # as MemoryCluster starts RouterShardActor
class _ShardHost:
    """A Ray actor around one plain RouterShard, wired like RouterShardActor; `load` puts a fresh
    shard in the same worker process, so each memory size does not start new processes."""

    def load(self, shard_id: int, added: list) -> int:
        self.shard = None  # free the previous arena first
        self.shard = RouterShard(shard_id=shard_id, routing_layers=LAYERS)
        return self.shard.apply(1, added=added).version

    def score(self, layer, query, top_k, tenants, pins):
        return self.shard.score(layer, query, top_k, tenants, pins)


def load_hosts(hosts: dict[int, list], keys: torch.Tensor, ranges) -> None:
    """The same documents as the plain shards. Each document's keys travel as their own tensor:
    a pickled view would carry its whole base storage."""
    for n, acts in hosts.items():
        ray.get([a.load.remote(j, [(i, TENANT, keys[None, s : s + c].clone()) for i, s, c in docs])
                 for j, (a, docs) in enumerate(zip(acts, split(ranges, n)))], timeout=TIMEOUT_S)  # fmt: skip


def scaling_size(name: str, reps: int, hosts: dict[int, list]) -> dict[str, float]:
    """One memory size: per-shard scoring time with 1, 2, 4 plain shards; end-to-end with 4 actors."""
    C = chunks_of(SIZES[name])
    keys, ranges = synthetic(C, seed=SIZES[name] % 9973), doc_ranges(C)
    q = make_query(1, seed=5)
    plain = {n: plain_shards(n, keys, ranges) for n in SHARDS}
    load_hosts(hosts, keys, ranges)
    del keys
    per_shard: dict[tuple[int, int], list[float]] = {}

    def timed_shards(n):
        parts = []
        for j, shard in enumerate(plain[n]):
            start = time.perf_counter()
            parts.append(shard.score(LAYER, q, TOP_K, [TENANT], [(1, 0)]))
            per_shard.setdefault((n, j), []).append(time.perf_counter() - start)
        return merge_top_k(parts, TOP_K)

    variants: dict[str, Callable[[], object]] = {f"plain{n}": threads(1, lambda n=n: timed_shards(n)) for n in SHARDS}
    variants["1 shard 2t"] = threads(2, lambda: plain[1][0].score(LAYER, q, TOP_K, [TENANT], [(1, 0)]))
    for n, acts in hosts.items():
        variants[f"ray{n}"] = lambda acts=acts: merge_top_k(ray.get([a.score.remote(LAYER, q, TOP_K, [TENANT], [(1, 0)]) for a in acts]), TOP_K)
    first = {k: fn() for k, fn in variants.items()}
    assert all(v == first["plain1"] for k, v in first.items() if k.startswith(("plain", "ray"))), "selections differ"
    per_shard.clear()
    t = {k: ms(v) for k, v in run_variants(variants, reps, warmup=False).items()}
    shard_ms = {n: max(ms(per_shard[(n, j)]) for j in range(n)) for n in SHARDS}  # slowest shard: the critical path
    row = {"chunks": C, **t, **{f"shard{n}": v for n, v in shard_ms.items()}}
    print(f"  {name:>4} C={C:>7}: per-shard ms " + " ".join(f"{n}sh {shard_ms[n]:8.2f}" for n in SHARDS)
          + f" | 1 shard 2t {t['1 shard 2t']:8.2f}"
          + " | ray e2e " + " ".join(f"{n}sh {t[f'ray{n}']:8.2f}" for n in SHARDS)
          + f" | keys {C * K * 2 / 2**20:.0f} MiB, {flops(1, C) / 1e9:.2f} GFLOP")  # fmt: skip
    return row


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="< 2 minutes: smaller memories, fewer repeats")
    ap.add_argument("--window-ms", type=float, default=20.0, help="ClusterMemory batch window for the batching test")
    args = ap.parse_args()
    t_start = time.perf_counter()
    header(args)
    # Driver-side torch runs single-threaded like the 0.25-CPU shard actors; variants marked 2t use 2
    # threads (on this shared machine small 2-thread ops often wait for a descheduled thread).
    torch.set_num_threads(1)
    rate = limits()
    tmp = tempfile.mkdtemp(prefix="bench-cluster-")
    before = listening()
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="ERROR", namespace="msa-bench")
    try:
        nodes = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
        print(f"ray: one local node, node addresses {nodes}, GCS {ray.get_runtime_context().gcs_address}")
        results = run_all(args, tmp)
        print(f"hosts of sockets that started listening during the run (Ray's, and any other user's): {sorted({a.rsplit(':', 1)[0] for a in listening() - before})}")
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nmatmul limits again at the end, to take the best seen:")
    rate = {k: max(v, rate[k]) for k, v in limits().items()}
    summarize(results, args, rate)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; total {time.perf_counter() - t_start:.0f} s; "
          f"driver peak RSS {rss:.2f} GiB; Ray shut down, {tmp} deleted: {not os.path.exists(tmp)}")  # fmt: skip


def run_all(args, tmp: str) -> dict:
    quick = args.quick
    cluster_sizes = ["16K", "128K"] if quick else ["16K", "128K", "1M"]
    batch_sizes = ["16K"] if quick else ["128K", "1M"]
    res: dict = {"fanout": {}, "batch": {}, "scale": {}}
    start = time.perf_counter()
    bench = Bench(tmp)
    print(f"\n[1] fan-out overhead per routing layer, B=1, top-k {TOP_K}, 4 shard pairs (file:// store under {tmp}); "
          f"cluster up in {time.perf_counter() - start:.1f} s. Median ms of interleaved repeats; 2t = 2 torch threads.")  # fmt: skip
    try:
        for name in cluster_sizes:
            bench.grow(SIZES[name])
            res["fanout"][name] = fanout_overhead(bench, name, reps=9 if name == "1M" else (10 if quick else 30))
            if name == "16K":
                res["phases"] = phases(bench, reps=10 if quick else 20)
                print("  16K, the two rounds of gen4 timed apart: " + ", ".join(f"{k} {v:.2f} ms" for k, v in res["phases"].items()))
            if name in batch_sizes:
                print(f"  batching at {name}: {CONCURRENT} concurrent B=1 queries vs {CONCURRENT} sequential (ms per 32 queries)")
                res["batch"][name] = batching(bench, name, 2 if quick else 3, args.window_ms / 1e3)
        print(f"  (section done at {time.perf_counter() - start:.0f} s)\n\n[2] where the time goes (fixed costs on this machine, median ms)")
        res["costs"] = costs(bench, reps=10 if quick else 50)
        res["tiles"] = tile_cost(reps=3 if quick else 7)
    finally:
        bench.cluster.shutdown()
    print(f"  (section done at {time.perf_counter() - start:.0f} s)\n\n[3] scaling: one B=1 query; plain RouterShards loaded with RouterShard.apply (no store), 1 thread, "
          "per-shard time = slowest shard; then the same shards as Ray actors (ray e2e = scatter + gather + merge)")  # fmt: skip
    hosts = {n: [_ShardHost.remote() for _ in range(n)] for n in SHARDS}
    for name in (["16K", "128K"] if quick else list(SIZES)):
        res["scale"][name] = scaling_size(name, 2 if quick else (3 if name in ("1M", "10M") else 5), hosts)
    for a in (a for acts in hosts.values() for a in acts):
        ray.kill(a)
    print(f"  (section done at {time.perf_counter() - start:.0f} s)")
    return res


def summarize(res: dict, args, rate: dict[str, float]) -> None:
    print("\n[4] summary")
    for name, t in res["fanout"].items():
        print(f"  fan-out {name:>5}: extra per layer gen4 - best in-process {t['gen4'] - t['best inproc']:+.2f} ms "
              f"({t['gen4'] / t['best inproc']:.2f}x); Ray vs the same 4 shards in-process {t['gen4'] - t['plain4']:+.2f} ms; "
              f"coordinator-side - generator-side {t['coord4'] - t['gen4']:+.2f} ms ({t['coord4'] / t['gen4']:.2f}x)")  # fmt: skip
    for name, t in res["batch"].items():
        print(f"  batching {name:>5}: 32 threads via ClusterMemory (window {args.window_ms:.0f} ms) {t['seq32'] / t['batched32']:.2f}x, "
              f"one B=32 fan_out {t['seq32'] / t['fanout_B32']:.2f}x the throughput of 32 sequential queries (goal 8x at >= 1M tokens)")  # fmt: skip
    names = list(res["scale"])
    base = res["scale"][names[-1]]
    for name in names:
        s = res["scale"][name]
        gfs = flops(1, s["chunks"]) / (s["shard1"] / 1e3)
        print(f"  scaling {name:>4}: 1 shard {1e3 * s['shard1'] / s['chunks']:6.2f} us/chunk "
              f"({(s['shard1'] / s['chunks']) / (base['shard1'] / base['chunks']):.2f}x of {names[-1]}), "
              f"{gfs / 1e9:5.2f} GFLOP/s = {gfs / rate['fp64 tile 1t']:.0%} of fp64 tile 1t; "
              f"per-shard time 1/2/4 shards = 1 / {s['shard2'] / s['shard1']:.2f} / {s['shard4'] / s['shard1']:.2f}; "
              f"ray e2e = 1 / {s['ray2'] / s['ray1']:.2f} / {s['ray4'] / s['ray1']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
