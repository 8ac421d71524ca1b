"""Exact routing (`route_top_k`) against one plain fp32 GEMM of the same shape, quiet and loaded.

    python bench/bench_routing.py                  # 128K and 1M tokens, B = 1 and 32; ~4 minutes on 2 cores
    python bench/bench_routing.py --quick          # 128K only, fewer repeats

Shape (MSA-4B routing, synthetic keys): Hkv 8 x D 128 (K = 1024) bf16 router keys, 64-token
chunks, 2,048-token (32-chunk) documents; queries of T = 64 routing tokens, H = 32 heads folded
to K, top-16. C chunks = tokens / 64.

Variants, timed in rotating order inside each repeat (medians of the repeats):
- gemm:   q [B*T, K] @ k [K, C], keys already fp32: the issue's yardstick.
- route:  route_top_k on the bf16 keys: fp32 first pass + exact float64 re-score + top-k.
- before: the previous canonical score (float64 256-chunk tiles, commit cd4fe2d, loaded from git
          history) + select_top_k, on the same keys.
FLOP = 2 * B * T * K * C for every variant (the GEMM's count; the re-score is extra work).
"loaded": two busy processes (1-thread fp32 matmul loops) run on the 2 cores during the repeats,
so the routing gets about its share. Torch threads 1 and 2 are both measured.
Before timing, route and before must select the same documents (scores within 1e-6).
Ratios printed last: gemm time / route time (the goal is >= 0.9), and before / route.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import interleaved, module_from_git  # noqa: E402  (bench/ is this script's directory)

from msa_cluster.kernels import routing_exact  # noqa: E402
from msa_cluster.kernels.routing import prepare_queries, select_top_k  # noqa: E402
from msa_cluster.kernels.routing_exact import route_top_k  # noqa: E402
from msa_cluster.types import RoutingSpec  # noqa: E402

H, HKV, D, T, TOP_K, DOC_CHUNKS = 32, 8, 128, 64, 16, 32
K = HKV * D
OLD_COMMIT = "cd4fe2d"
BUSY = "import torch; torch.set_num_threads(1); a = torch.randn(512, 512)\nwhile True: a @ a"


def old_routing() -> ModuleType:
    """The routing module as it was before exact routing (float64 tiles), from git history."""
    return module_from_git(OLD_COMMIT, "msa_cluster/kernels/routing.py", "old_routing")


def peak_gemm(threads: int) -> float:
    """GFLOP/s of a 2048^3 fp32 matmul, best of 5, with `threads` torch threads."""
    torch.set_num_threads(threads)
    a = torch.randn(2048, 2048)
    a @ a
    best = min(_once(lambda: a @ a) for _ in range(5))
    return 2 * 2048**3 / best / 1e9


def _once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Load:
    """`n` busy processes for the duration of a with-block."""

    def __init__(self, n: int):
        self.n = n
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Load:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.procs = [subprocess.Popen([sys.executable, "-c", BUSY], env=env) for _ in range(self.n)]
        time.sleep(1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def kept_chunks(query, keys, offsets, ids) -> int:
    """How many chunks one route_top_k call hands to its float64 pass (what its memory holds beyond a tile)."""
    real, seen = routing_exact._exact_chunks, []

    def spy(q, k, rows, chunks, floor):  # type: ignore[no-untyped-def]
        seen.append(rows.numel())
        return real(q, k, rows, chunks, floor)

    routing_exact._exact_chunks = spy
    try:
        route_top_k(query, keys, offsets, ids, TOP_K)
    finally:
        routing_exact._exact_chunks = real
    return seen[0]


def case(tokens: int, B: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    C = tokens // 64
    keys = (torch.randn(C, HKV, D, generator=g) * 0.5).bfloat16()
    offsets = torch.arange(0, C + 1, DOC_CHUNKS)
    if offsets[-1] != C:
        offsets = torch.cat([offsets, torch.tensor([C])])
    query = prepare_queries(torch.randn(B, T, H, D, generator=g), torch.ones(B, T, dtype=torch.bool),
                            RoutingSpec(num_heads=H, num_kv_heads=HKV), D**-0.5)
    return query, keys, offsets, torch.arange(offsets.numel() - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="131072,1048576")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.reps = "131072", 3
    old = old_routing()
    print(f"bench_routing  {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  nproc {os.cpu_count()}  "
          f"torch {torch.__version__}  load {os.getloadavg()[0]:.2f}")
    peaks = {n: peak_gemm(n) for n in (1, 2)}
    print(f"peak fp32 GEMM 2048^3 (quiet, best of 5): 1 thread {peaks[1]:.1f} GFLOP/s, 2 threads {peaks[2]:.1f} GFLOP/s")
    ratios = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        for B in (int(b) for b in args.batches.split(",")):
            query, keys, offsets, ids = case(tokens, B)
            C = keys.shape[0]
            flop = 2 * B * T * K * C
            q2d, kf = query.vectors.reshape(B * T, K), keys.float().reshape(C, K)
            got = route_top_k(query, keys, offsets, ids, TOP_K)
            before = select_top_k(old.doc_scores_ref(query, keys, offsets), ids, TOP_K)
            assert [[d.doc_id for d in r] for r in got] == [[d.doc_id for d in r] for r in before]
            assert all(abs(a.score - b.score) <= 1e-6 for r, s in zip(got, before) for a, b in zip(r, s))
            print(f"{tokens // 1024:>5}K C={C:>6} B={B:>2}: the float64 pass re-scores {kept_chunks(query, keys, offsets, ids)} "
                  f"chunks of {B} x {C}", flush=True)
            fns: dict[str, Callable[[], object]] = {
                "gemm": lambda: q2d @ kf.T,
                "route": lambda: route_top_k(query, keys, offsets, ids, TOP_K),
            }
            if B == 1:
                fns["before"] = lambda: select_top_k(old.doc_scores_ref(query, keys, offsets), ids, TOP_K)
            reps = args.reps if B == 1 else max(3, args.reps // 2)
            for loaded in (False, True):
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    if loaded:
                        with Load(2):
                            t = interleaved(fns, reps)
                    else:
                        t = interleaved(fns, reps)
                    label = f"{tokens // 1024:>5}K C={C:>6} B={B:>2} {threads}t {'loaded' if loaded else 'quiet '}"
                    rates = "  ".join(f"{n} {t[n] * 1e3:8.1f} ms ({flop / t[n] / 1e9:5.1f} GFLOP/s)" for n in t)
                    print(f"{label}  {rates}  (load {os.getloadavg()[0]:.1f})", flush=True)
                    ratios.append((label, t["gemm"] / t["route"], t.get("before", float("nan")) / t["route"]))
    print("\nratios (gemm / route: goal >= 0.9; before / route: speed-up over the float64 tiles)")
    for label, r_gemm, r_before in ratios:
        extra = f"   before/route {r_before:5.2f}" if r_before == r_before else ""
        print(f"  {label}  gemm/route {r_gemm:5.2f}{extra}")


if __name__ == "__main__":
    main()
