"""Peak RSS of a router arena taking MSA-4B-shape router keys commit by commit through `append`:
the arena of blocks (after) against the one-tensor arena that grew by a quarter with a copy
(before, `arena.py` at --before), each variant in a fresh process, alternated: after, before, after.

    python bench/bench_arena_growth.py                    # 2M tokens: 1.12 GiB of keys, ~2.5 GiB peak
    python bench/bench_arena_growth.py --tokens 8388608 --commit-docs 512

Data is SYNTHETIC: random bf16 router keys of the MSA-4B shape (R = 18 routing layers, Hkv 8 x
D 128, 64-token chunks: 36,864 B a chunk, 576 B a token), 2,048-token documents (32 chunks),
appended in commits of --commit-docs documents (default 144: bench_scale's 512 MB store commit of
router keys + K + V). One commit buffer is made before the start and refilled with new random
values for every commit, so the peak is the arena's own.

Reported per process: router keys held (held_chunks x chunk_bytes), VmHWM at the end minus VmRSS
at the start ("peak RSS above the start"), and VmRSS at the end minus the start; then the median
time of one B=1 query's `score` at one routing layer (T = 64 routing tokens x 32 heads folded,
top-k 16). Each "after" process also times its arena against the before arena adopting a copy
of the same keys (same process, interleaved repeats, results checked equal): the score ratio
that machine load cannot skew. Ratios come last.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_scale as scale  # noqa: E402
import torch  # noqa: E402
from _common import interleaved, module_from_git  # noqa: E402

from msa_cluster.kernels import arena as arena_after  # noqa: E402

BEFORE = "9991429"  # the last commit whose RouterArena is one tensor grown by a quarter
REPS = 7  # score repeats per process (and per variant of the in-process comparison)


def _fill(buf: torch.Tensor, g: torch.Generator) -> None:
    """New standard-normal values in `buf` (bf16), made in float32 blocks of 16M at most."""
    flat = buf.view(-1)
    for s in range(0, flat.numel(), 1 << 24):
        flat[s : s + (1 << 24)] = torch.randn(min(1 << 24, flat.numel() - s), generator=g)


def child(variant: str, tokens: int, commit_docs: int, before: str) -> dict[str, float]:
    mod = module_from_git(before, "msa_cluster/kernels/arena.py", "arena_before") if variant == "before" else arena_after
    shape = scale.msa4b_shape()
    fp, C = shape.fingerprint, shape.doc_chunks
    docs = math.ceil(tokens / scale.DOC_TOKENS)
    buf = torch.empty(len(fp.routing_layers), commit_docs * C, fp.num_kv_heads, fp.head_dim, dtype=shape.dtype)  # [R, C, Hkv, D]
    g = torch.Generator().manual_seed(0)
    _fill(buf, g)
    arena = mod.RouterArena(shape.layers)
    start = scale.proc_memory()["rss"]
    version = 0
    for first in range(0, docs, commit_docs):
        n = min(commit_docs, docs - first)
        if version:
            _fill(buf, g)
        version += 1
        arena.append([(first + i, buf[:, i * C : (i + 1) * C]) for i in range(n)], version=version)
    mem = scale.proc_memory()
    out = {"keys": arena.held_chunks * arena.chunk_bytes, "peak": mem["hwm"] - start, "rss": mem["rss"] - start,
           "blocks": len(arena._blocks.tensors) if variant == "after" else 1}
    del buf
    query, layer, pin = scale.make_query(shape, 1), shape.layers[0], [mod.Pin(version)]
    times = []
    for _ in range(REPS + 1):
        t0 = time.perf_counter()
        arena.score(layer, query, shape.top_k, pin)
        times.append(time.perf_counter() - t0)
    out["score"] = statistics.median(times[1:])
    if variant == "after":
        out.update(_against_one_tensor(arena, shape, query, layer, version, before))
    return out


def _against_one_tensor(arena, shape, query, layer: int, version: int, before: str) -> dict[str, float]:
    """Interleaved score times of `arena` and of the before arena adopting one copy of its keys."""
    old = module_from_git(before, "msa_cluster/kernels/arena.py", "arena_before")
    spans = arena._spans()
    keys = torch.cat([arena._blocks.tensors[s.block][:, : s.chunks] for s in spans], dim=1)  # [R, C, Hkv, D]
    counts = torch.cat([s.offsets.diff() for s in spans]).tolist()
    ids = torch.cat([s.ids for s in spans]).tolist()
    one = old.RouterArena(shape.layers)
    one.adopt(keys, list(zip(ids, counts)), version=version)
    fns = {"blocks": lambda: arena.score(layer, query, shape.top_k, [arena_after.Pin(version)]),
           "one tensor": lambda: one.score(layer, query, shape.top_k, [old.Pin(version)])}
    if fns["blocks"]() != fns["one tensor"]():
        raise AssertionError("the arena of blocks and the one-tensor arena disagree")
    t = interleaved(fns, REPS)
    return {"score_blocks": t["blocks"], "score_one": t["one tensor"]}


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2 * 2**20)
    ap.add_argument("--commit-docs", type=int, default=144, help="documents per append (a store commit)")
    ap.add_argument("--before", default=BEFORE, help="commit whose arena.py is the 'before' variant")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.commit_docs, args.before)))
        return
    shape = scale.msa4b_shape()
    docs = math.ceil(args.tokens / scale.DOC_TOKENS)
    print(f"bench_arena_growth: {docs * scale.DOC_TOKENS:,} tokens of {shape.describe()}")
    print(f"  {docs:,} documents of {scale.DOC_TOKENS:,} tokens appended in commits of {args.commit_docs}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; before = arena.py at {args.before}")
    runs: list[tuple[str, dict[str, float]]] = []
    for variant in ("after", "before", "after"):
        cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(args.tokens), "--commit-docs", str(args.commit_docs),
               "--before", args.before]
        res = json.loads(subprocess.run(cmd, check=True, timeout=1800, capture_output=True, text=True).stdout.splitlines()[-1])
        runs.append((variant, res))
        print(f"  {variant:6s}: router keys {gib(res['keys'])} in {res['blocks']:.0f} block(s) | peak RSS above the start "
              f"{gib(res['peak'])} ({res['peak'] / res['keys']:.2f}x the keys) | RSS after {gib(res['rss'])} | "
              f"score one query {res['score'] * 1e3:.0f} ms")
    before = runs[1][1]
    afters = [r for v, r in runs if v == "after"]
    for r in afters:
        print(f"  in the after process, interleaved: blocks {r['score_blocks'] * 1e3:.0f} ms, before arena on the same keys "
              f"{r['score_one'] * 1e3:.0f} ms")
    print("ratios (after / before):")
    print(f"  peak RSS above the start: {_ratios([r['peak'] / before['peak'] for r in afters])}")
    print(f"  score, separate processes: {_ratios([r['score'] / before['score'] for r in afters])}")
    print(f"  score, same process interleaved: {_ratios([r['score_blocks'] / r['score_one'] for r in afters])}")


def _ratios(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)

if __name__ == "__main__":
    main()
