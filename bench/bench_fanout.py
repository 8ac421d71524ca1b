"""Benchmark of the distributed query path (issue 12): one round per routing layer, numpy K/V, compiled graphs.

Every number is a median of interleaved repetitions taken side by side in one run (the variants
run in rotating order within each repetition), because the machine is shared. Data is SYNTHETIC,
as in bench_cluster.py: random router keys and K/V of MSA-4B shapes (Hkv 8 x D 128, bf16, 64-token
chunks, 2,048-token documents), random queries of T = 64 routing tokens x 32 heads folded, top-k 16,
4 shard pairs (--shards) on one local Ray node. One routing layer is stored and measured (a model with R
routing layers pays the per-layer cost R times); at 10M tokens that keeps the store at ~0.9 GB
instead of MSA-4B's 18-layer 16 GB.

Variants of one B=1 routing layer:
    inproc      InProcessMemory in this process (best of 1 and 2 torch threads: "in-process scoring")
    floor       one parallel empty plain actor call to the same router shards (the engine's floor)
    before      the fan-out as it was at --before (score round, then fetch round, torch payloads)
    two rounds  today's fan_out(rounds=2): numpy K/V, winners only
    one round   fan_out(): each shard answers with its local top-k and their K/V (plain calls)
    compiled    the one round through a Ray compiled graph (CompiledExchange), timed in a second
                group with in-process and floor again, while the graph is alive: its idle actors
                poll their channels (about 0.25 core each here), which slows everything else
Goal: (variant - inproc) <= 1.5 x floor, both from the group with no graph alive.

Batching at 1M tokens: 32 concurrent B=1 queries through a batching ClusterMemory against 32
sequential ones. Upper bound the scoring cost allows = seq32 / (N shards x score(B=32, 1/N of memory)
/ min(N, cores)); goal: speed-up >= 0.8 x that bound, i.e. batched time <= 1.25 x the scoring floor.

    python bench/bench_fanout.py                # 16K, 1M, 10M (~6-8 min on 2 shared cores)
    python bench/bench_fanout.py --quick        # 16K and 128K, fewer repeats (~2 min)
    python bench/bench_fanout.py --shards 2     # one shard pair per core of a 2-core machine

Legend: B query rows, T routing tokens, H heads, Hkv kv heads, D head dim, C chunks.
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
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import ray  # noqa: E402
import torch  # noqa: E402
from _common import module_from_git  # noqa: E402
from bench_cluster import (  # noqa: E402
    CONCURRENT,
    SIZES,
    TENANT,
    TIMEOUT_S,
    TOP_K,
    Bench,
    concurrently,
    header,
    make_query,
    ms,
    run_variants,
    threads,
)

from msa_cluster.actors.calls import call  # noqa: E402
from msa_cluster.actors.compiled import close_shared, shared_exchange  # noqa: E402
from msa_cluster.actors.fanout import PlainExchange, fan_out  # noqa: E402
from msa_cluster.actors.memory import ClusterMemory  # noqa: E402
from msa_cluster.actors.wire import WireQuery  # noqa: E402
from msa_cluster.types import RoutingQuery  # noqa: E402

LAYER = 18


def same(a, b) -> bool:
    return a.selected == b.selected and all(torch.equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values))


def overhead(bench: Bench, name: str, reps: int, old_fan_out) -> dict[str, float]:
    """One B=1 routing layer, every variant; asserts they all equal in-process first.

    Two interleaved groups: the plain variants with no compiled graph alive, then in-process,
    floor and compiled while the graph is alive (an idle graph's actors poll their channels, about
    a quarter core each here, which slows everything else on this 2-core machine).
    """
    q = make_query(1, seed=7)
    view = call(bench.coord, "view", timeout_s=TIMEOUT_S)
    pins = [(view.version, view.epoch)]
    inproc = bench.inproc.snapshot(TENANT)
    close_shared()  # the plain group runs with no graph alive
    variants = {
        "inproc": threads(1, lambda: inproc.retrieve(LAYER, q, TOP_K)),
        "inproc 2t": threads(2, lambda: inproc.retrieve(LAYER, q, TOP_K)),
        "floor": lambda: ray.get([r.ready.remote() for r in view.routers], timeout=TIMEOUT_S),
        "before": lambda: old_fan_out(view, LAYER, q, TOP_K, [TENANT], pins),
        "two rounds": lambda: fan_out(view, LAYER, q, TOP_K, [TENANT], pins, rounds=2),
        "one round": lambda: fan_out(view, LAYER, q, TOP_K, [TENANT], pins),
    }
    ref = variants["inproc"]()
    for k in ("before", "two rounds", "one round"):
        assert same(variants[k](), ref), f"{k} differs from in-process"
    answers = PlainExchange(view.routers).route(LAYER, WireQuery.of(q), TOP_K, [TENANT], pins, TIMEOUT_S)
    sent = sum(a.nbytes() for a in answers) / 2**20
    kept = (ref.keys[0].numel() + ref.values[0].numel()) * 2 / 2**20
    t = {k: ms(v) for k, v in run_variants(variants, reps).items()}
    close_shared()
    exchange = shared_exchange(view.routers)  # compiled now, kept alive for the second group
    graph = {
        "inproc (graph alive)": variants["inproc"],
        "floor (graph alive)": variants["floor"],
        "compiled": lambda: fan_out(view, LAYER, q, TOP_K, [TENANT], pins, exchange=exchange),
    }
    assert same(graph["compiled"](), ref), "compiled differs from in-process"
    t.update({k: ms(v) for k, v in run_variants(graph, reps).items()})
    close_shared()
    t["inproc best"] = min(t["inproc"], t["inproc 2t"])
    t["kv sent MiB"], t["kv kept MiB"] = sent, kept
    print(f"  {name:>5}: inproc {t['inproc']:7.2f} (2t {t['inproc 2t']:7.2f}) | floor {t['floor']:6.2f} | before {t['before']:7.2f} | "
          f"two rounds {t['two rounds']:7.2f} | one round {t['one round']:7.2f} || graph alive: inproc {t['inproc (graph alive)']:7.2f} | "
          f"floor {t['floor (graph alive)']:6.2f} | compiled {t['compiled']:7.2f} ms | K/V sent {sent:.1f} MiB for {kept:.1f} MiB kept")  # fmt: skip
    return t


def batching(bench: Bench, name: str, reps: int, window_s: float, compiled: bool) -> dict[str, float]:
    """32 concurrent B=1 queries (threads, batching ClusterMemory) vs 32 sequential; the scoring floor."""
    qs = [make_query(1, seed=100 + i) for i in range(CONCURRENT)]
    q32 = RoutingQuery(torch.cat([q.vectors for q in qs]), torch.cat([q.mask for q in qs]), qs[0].spec, folded=True)
    seq_mem = ClusterMemory(bench.coord, timeout_s=TIMEOUT_S, compiled=compiled)
    seq = seq_mem.snapshot(TENANT)
    mem = ClusterMemory(bench.coord, timeout_s=TIMEOUT_S, batch_window_s=window_s, max_batch=64, compiled=compiled)
    snap = mem.snapshot(TENANT)
    pin = [(bench.plain.version, bench.plain.epoch)]
    out: dict[int, object] = {}
    variants = {
        "seq32": lambda: [seq.retrieve(LAYER, q, TOP_K) for q in qs],
        "batched32": lambda: concurrently(snap, qs, out),
        "shard B=32": lambda: bench.routers[0].score(LAYER, q32, TOP_K, [TENANT] * CONCURRENT, pin * CONCURRENT),
    }
    if not compiled:  # what the shard actors' scoring takes in parallel on this machine now; one B=32 fan-out each way
        view = seq.view
        pins = [(view.version, view.epoch)] * CONCURRENT
        variants["score round B=32"] = lambda: ray.get(
            [r.score.remote(LAYER, ref, TOP_K, [TENANT] * CONCURRENT, pins) for ref in [ray.put(q32)] for r in view.routers]
        )
        variants["fan_out B=32 1 round"] = lambda: fan_out(view, LAYER, q32, TOP_K, [TENANT] * CONCURRENT, pins)
        variants["fan_out B=32 2 rounds"] = lambda: fan_out(view, LAYER, q32, TOP_K, [TENANT] * CONCURRENT, pins, rounds=2)
    t = {k: ms(v) for k, v in run_variants(variants, reps).items()}
    for i, q in enumerate(qs):  # batching changes no selection
        assert out[i].selected == seq.retrieve(LAYER, q, TOP_K).selected  # type: ignore[attr-defined]
    close_shared()  # no graph alive after this test
    n = bench.shards
    cores = min(n, len(os.sched_getaffinity(0)))
    t["floor"] = floor = n * t["shard B=32"] / cores
    t["bound"], t["speedup"] = t["seq32"] / floor, t["seq32"] / t["batched32"]
    tag = "compiled" if compiled else "plain"
    print(f"  {name:>5} {tag:>8}: 32 sequential {t['seq32']:8.1f} ms | 32 threads (window {window_s * 1e3:.0f} ms) {t['batched32']:8.1f} ms | "
          f"scoring floor {n} x {t['shard B=32']:.1f} / {cores} cores = {floor:.1f} ms | speed-up {t['speedup']:.2f}x of bound "
          f"{t['bound']:.2f}x = {t['speedup'] / t['bound']:.2f}")  # fmt: skip
    if "score round B=32" in t:
        t["bound measured"] = t["seq32"] / t["score round B=32"]
        print(f"         the {n} shard actors' B=32 score round alone {t['score round B=32']:.1f} ms (bound measured {t['bound measured']:.2f}x: "
              f"speed-up = {t['speedup'] / t['bound measured']:.2f} of it) | one B=32 fan_out: 1 round {t['fan_out B=32 1 round']:.1f} ms, "
              f"2 rounds {t['fan_out B=32 2 rounds']:.1f} ms")  # fmt: skip
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="16K and 128K only, fewer repeats")
    ap.add_argument("--sizes", default=None, help="comma-separated memory sizes (of 16K,128K,1M,10M)")
    ap.add_argument("--batch-sizes", default=None, help="sizes to run the batching test at (default 1M, or 128K with --quick)")
    ap.add_argument("--before", default="24a7451", help="commit whose fanout.py is the 'before' variant")
    ap.add_argument("--shards", type=int, default=4, help="shard pairs (default 4; as many as cores gives each shard a core)")
    ap.add_argument("--window-ms", type=float, default=20.0, help="ClusterMemory batch window for the batching test")
    args = ap.parse_args()
    sizes = (args.sizes or ("16K,128K" if args.quick else "16K,1M,10M")).split(",")
    batch_sizes = (args.batch_sizes or ("128K" if args.quick else "1M")).split(",")
    t_start = time.perf_counter()
    header(args, "bench_fanout")
    old = module_from_git(args.before, "msa_cluster/actors/fanout.py", "fanout_before")
    torch.set_num_threads(1)  # the driver runs single-threaded like the 0.25-CPU shard actors; "2t" variants use 2
    tmp = tempfile.mkdtemp(prefix="bench-fanout-")
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="ERROR", namespace="msa-bench")
    res: dict[str, dict] = {"overhead": {}, "batch": {}}
    try:
        bench = Bench(tmp, shards=args.shards)
        print(
            f"\n[1] one B=1 routing layer, {args.shards} shard pairs; median ms of interleaved repeats (cluster up at {time.perf_counter() - t_start:.0f} s)"
        )
        try:
            for name in sizes:
                bench.grow(SIZES[name])
                reps = 5 if name == "10M" else (10 if args.quick else 30)
                res["overhead"][name] = overhead(bench, name, reps, old.fan_out)
                if name in batch_sizes:
                    for compiled in (False, True):
                        res["batch"][(name, compiled)] = batching(
                            bench, name, 2 if args.quick else 3, args.window_ms / 1e3, compiled
                        )
                print(f"  (at {time.perf_counter() - t_start:.0f} s)")
        finally:
            close_shared()
            bench.cluster.shutdown()
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    summary(res)
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; total {time.perf_counter() - t_start:.0f} s")


def summary(res: dict) -> None:
    print(
        "\n[2] summary: extra ms per routing layer over in-process scoring (best of 1 and 2 threads, no graph alive), "
        "and its ratio to the floor (goal <= 1.5)"
    )
    for name, t in res["overhead"].items():
        cells = " | ".join(f"{k} {t[k] - t['inproc best']:+7.2f} ({(t[k] - t['inproc best']) / t['floor']:5.2f}x)"
                           for k in ("before", "two rounds", "one round", "compiled"))  # fmt: skip
        print(f"  {name:>5}: floor {t['floor']:5.2f} ms | {cells}")
    for (name, compiled), t in res["batch"].items():
        measured = (
            f"; of the measured score-round bound {t['bound measured']:.2f}x: {t['speedup'] / t['bound measured']:.2f}"
            if "bound measured" in t
            else ""
        )
        print(f"  batching {name} {'compiled' if compiled else 'plain'}: speed-up {t['speedup']:.2f}x / bound {t['bound']:.2f}x "
              f"= {t['speedup'] / t['bound']:.2f} of the bound (goal >= 0.8){measured}")  # fmt: skip


if __name__ == "__main__":
    main()
