"""Peak RSS of a router shard reloading every key in one bulk read (a restart, or a placement change),
with the arena adopting the bulk read as its storage (now) against copying it in with `append`
(before), each variant in a fresh process, alternated: adopt, append, adopt.

    python bench/bench_reload_peak.py                 # 2M tokens of MSA-4B-shape memory (a 3.4 GB store in /tmp)
    python bench/bench_reload_peak.py --tokens 8388608

Reported: the router keys held, and the process's peak RSS (ru_maxrss) above its peak just before
the reload; the difference between the variants is the copy the adopt saves.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_scale as scale  # noqa: E402

from msa_cluster.actors.router_shard import RouterShard  # noqa: E402
from msa_cluster.kernels.arena import RouterArena  # noqa: E402
from msa_cluster.storage_adapters import MemoryStore  # noqa: E402


def _append_instead(arena: RouterArena, keys, docs, *, version: int, epoch: int = 0) -> None:
    """The load before `adopt`: each document's slice of the bulk read copied into the arena."""
    pieces, start = [], 0
    for doc_id, count in docs:
        pieces.append((doc_id, keys[:, start : start + count]))
        start += count
    arena.append(pieces, version=version, epoch=epoch)


def child(url: str, variant: str) -> None:
    if variant == "append":
        RouterArena.adopt = _append_instead  # type: ignore[method-assign]
    shape = scale.msa4b_shape()
    store = MemoryStore.open(url, shape.fingerprint)
    shard = RouterShard(shard_id=0, routing_layers=shape.layers, store=store)
    version = store.latest_version()
    ids = store.snapshot(version).doc_ids(tenant=scale.TENANT)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    shard.converge(version, 0, ids)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    keys = sum(a.held_chunks * a.chunk_bytes for a in shard._arenas.values())
    print(f"  {variant:6s}: router keys {keys / 2**30:.2f} GiB | peak RSS above the start {(peak - before) / 2**20:.2f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2 * 2**20)
    ap.add_argument("--child", nargs=2, metavar=("URL", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    root = tempfile.mkdtemp(prefix="bench-reload-", dir="/tmp")
    try:
        url = f"file://{root}/store"
        writer = scale.Writer(MemoryStore.open(url, scale.msa4b_shape().fingerprint, create=True), scale.msa4b_shape(), 0)
        writer.grow(args.tokens)
        print(f"bench_reload_peak: {writer.tokens:,} tokens of MSA-4B-shape memory; one router shard reloads all of it")
        for variant in ("adopt", "append", "adopt"):
            subprocess.run([sys.executable, __file__, "--child", url, variant], check=True, timeout=900)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
