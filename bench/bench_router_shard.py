"""Router shard query path: what a score() call costs beyond the scoring kernel itself.

The previous RouterShard walked every entry in Python on each call (building offsets and a
per-(version, tenant) table); the arena-based one keeps offsets with the arena and filters by
tenant and pin with vectorised comparisons. Both run side by side here, on the same keys:

    python bench/bench_router_shard.py [--docs 200000] [--reps 7]

Data: synthetic one-chunk documents at the bundled model's routing shape (Hkv 2 x D 16, fp32),
one routing layer, B = 1 query of T = 16 routing tokens, top-16, two tenants (half each).
Ratios printed last: each variant's time over the bare kernel (`doc_scores` on the tenant's keys).
The old shard is loaded from git history (commit 1850af8) into a temporary module.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msa_cluster.actors.router_shard import RouterShard  # noqa: E402
from msa_cluster.kernels.routing import doc_scores, prepare_queries  # noqa: E402
from msa_cluster.types import RoutingSpec  # noqa: E402

LAYERS = (1,)
HKV, D, H, T, TOP_K = 2, 16, 4, 16, 16
OLD_COMMIT = "1850af8"


def old_shard_class():
    src = subprocess.run(["git", "show", f"{OLD_COMMIT}:msa_cluster/actors/router_shard.py"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_router_shard.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_router_shard", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_router_shard"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module.RouterShard


def timed(fn, reps: int) -> float:
    fn()  # warm
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(len(LAYERS), args.docs, HKV, D, generator=g)  # [R, C, Hkv, D], one chunk per document
    added = [(i, ("a", "b")[i % 2], keys[:, i : i + 1]) for i in range(args.docs)]
    query = prepare_queries(torch.randn(1, T, H, D, generator=g), torch.ones(1, T, dtype=torch.bool),
                            RoutingSpec(num_heads=H, num_kv_heads=HKV), 0.25)

    new = RouterShard(shard_id=0, routing_layers=LAYERS)
    new.apply(1, added=added)
    old = old_shard_class()(0, LAYERS)
    old.apply(1, added=added)
    want = new.score(1, query, TOP_K, ["a"], [(1, 0)])
    assert old.score(1, query, TOP_K, ["a"], 1) == want, "old and new shards must select the same documents"

    mine = keys[0, 0::2].contiguous()  # tenant a's keys alone: what the new shard scores
    offsets = torch.arange(mine.shape[0] + 1)
    everything = keys[0]
    offsets_all = torch.arange(args.docs + 1)
    t = {
        "kernel, tenant's keys": timed(lambda: doc_scores(query, mine, offsets), args.reps),
        "kernel, all keys": timed(lambda: doc_scores(query, everything, offsets_all), args.reps),
        "new shard score()": timed(lambda: new.score(1, query, TOP_K, ["a"], [(1, 0)]), args.reps),
        "old shard score()": timed(lambda: old.score(1, query, TOP_K, ["a"], 1), args.reps),
    }
    print(f"bench_router_shard  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  torch {torch.__version__}, 1 thread")
    print(f"data: {args.docs} one-chunk documents, 2 tenants, Hkv={HKV} D={D} fp32, B=1 T={T}, top-{TOP_K}; medians of {args.reps}")
    for k, v in t.items():
        print(f"  {k:24s} {v:8.2f} ms")
    base = t["kernel, tenant's keys"]
    print(f"new shard: {t['new shard score()'] - base:.2f} ms over the kernel ({t['new shard score()'] / base:.2f}x)")
    print(f"old shard: {t['old shard score()'] - t['kernel, all keys']:.2f} ms over its kernel on all keys "
          f"({t['old shard score()'] / base:.2f}x the tenant's kernel)")
    print(f"ratio old/new score(): {t['old shard score()'] / t['new shard score()']:.2f}x")


if __name__ == "__main__":
    main()
