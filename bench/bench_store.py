"""Benchmark of the memory store on local disk, printed as ratios measured in one run.

  write ratio  = store write throughput / raw sequential write throughput (same disk, both fsynced)
  read ratio   = store read throughput / raw sequential read throughput (same files evicted from
                 the page cache first with posix_fadvise(DONTNEED) for the cold numbers)
  overhead     = bytes on disk / theoretical - 1, where
                 theoretical = sum over documents of ceil(tokens / 64) * chunk_bytes + UTF-8 text bytes
                 chunk_bytes = 3 tensors (K, V, router K) * 18 layers * 8 kv heads * 128 dim * 2 B = 110,592 B

Writes and warm reads are the best of --reps runs, store and raw alternated; a tiny warm-up
store pays first-call costs before timing. Cold reads evict the files first, every rep.
Byte counts: the store writes and reads the tensor bytes (plus its Arrow and manifest overhead);
throughput is tensor-and-text bytes per second, so the ratios compare useful bytes moved.
The store checksums everything it writes and reads (CRC32C from format 3, zlib CRC32 before), and
by default reads each written file back to check it (StoreConfig.verify_writes); both are reported.
  one-layer cold read = read_kv(doc, layer=L) of every document after eviction: bytes the process
                 read from the disk (/proc/self/io read_bytes) against that layer's K/V bytes.
  fresh read     = raw sequential read into freshly allocated memory that is kept (page faults and
                 zeroing included), unchecked: the ceiling of any read that hands its bytes over.
  K/V tier cold read = the same through a fresh TieredKVReader's gather(L, every id), the path a KV
                 shard serves: it too should read only that layer's bytes.

Before/after in one session: run this script against the code before the change
(PYTHONPATH=<a checkout of it>) and after, alternately; it prints the store's format first.

Usage: python bench/bench_store.py [--tokens 131072] [--dir /tmp] [--doc-tokens 1500] [--reps 3]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import tempfile
import time
import zlib

import torch

from msa_cluster.storage_adapters import ALL_TENANTS, MemoryStore, StoreConfig, TieredKVReader
from msa_cluster.storage_adapters._format import FORMAT_VERSION
from msa_cluster.types import EncodedDocument, ModelFingerprint

LAYERS = tuple(range(18, 36))
HKV, D, CHUNK = 8, 128, 64
CHUNK_BYTES = 3 * len(LAYERS) * HKV * D * 2  # 110,592 B
FP = ModelFingerprint("msa-4b-shape", LAYERS, "bfloat16", num_kv_heads=HKV, head_dim=D, chunk_size=CHUNK)


def make_docs(total_tokens: int, mean_tokens: int, seed: int) -> list[EncodedDocument]:
    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < total_tokens:
        lengths.append(max(1, min(int(rng.expovariate(1 / mean_tokens)), 8 * mean_tokens)))
    per_chunk = len(LAYERS) * HKV * D  # elements of one tensor per chunk
    g = torch.Generator().manual_seed(seed)
    pool = torch.randint(-32768, 32767, (3 * per_chunk * (max(lengths) // CHUNK + 1) * 4,), dtype=torch.int16, generator=g)
    docs = []
    for i, n in enumerate(lengths):
        c = math.ceil(n / CHUNK)
        off = rng.randrange(0, pool.numel() - 3 * c * per_chunk)
        k, v, rk = (pool[off + j * c * per_chunk : off + (j + 1) * c * per_chunk].view(torch.bfloat16) for j in range(3))
        shape = (len(LAYERS), c, HKV, D)
        text = "".join(rng.choices("abcdefghij klmnopqrstuvwxyz", k=4 * n))
        docs.append(EncodedDocument(i, k.view(shape), v.view(shape), rk.view(shape), n, LAYERS, text=text, source=f"bench://{i}"))
    return docs


def evict(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def store_files(root: str) -> list[str]:
    return [os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs]


def raw_write(path: str, payload: list[bytes]) -> float:
    t = time.perf_counter()
    with open(path, "wb") as f:
        for b in payload:
            f.write(b)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t


def raw_read_fresh(path: str) -> float:
    """raw_read, but into fresh memory that is kept (what a read handing over its bytes must do)."""
    t = time.perf_counter()
    kept = []
    with open(path, "rb", buffering=0) as f:
        while True:
            buf = torch.empty(8 << 20, dtype=torch.uint8)
            n = f.readinto(buf.numpy())
            if not n:
                break
            kept.append(buf)
    return time.perf_counter() - t


def raw_read(path: str) -> float:
    buf = bytearray(8 << 20)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


def store_write(root: str, docs, verify: bool) -> float:
    store = MemoryStore.open(root, FP, create=True, config=StoreConfig(verify_writes=verify))
    assert store.allocate_ids("default", count=len(docs)) == [d.doc_id for d in docs]  # ids 0..N-1, untimed
    t = time.perf_counter()
    store.insert(docs)
    return time.perf_counter() - t


def store_read(root: str) -> float:
    """A fresh handle loads every router key in bulk, then every document's K/V and text."""
    t = time.perf_counter()
    snap = MemoryStore.open(root, FP).snapshot()
    snap.router_keys(tenant=ALL_TENANTS)
    ids = snap.doc_ids(ALL_TENANTS)
    for i in ids:
        snap.read_kv(i, ALL_TENANTS)
    snap.texts(ids, ALL_TENANTS)
    return time.perf_counter() - t


def disk_read_bytes() -> int:
    """Bytes this process has made the kernel fetch from storage (Linux /proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes:")).split()[1])


def store_read_layer(root: str, layer: int) -> tuple[float, int]:
    """One routing layer of every document through a fresh handle: (seconds, bytes read from disk)."""
    before = disk_read_bytes()
    t = time.perf_counter()
    snap = MemoryStore.open(root, FP).snapshot()
    for i in snap.doc_ids(ALL_TENANTS):
        snap.read_kv(i, ALL_TENANTS, layer=layer)
    return time.perf_counter() - t, disk_read_bytes() - before


def tier_read_layer(root: str, layer: int) -> tuple[float, int]:
    """gather(layer, every id) through a fresh K/V tier: (seconds, bytes read from disk)."""
    before = disk_read_bytes()
    t = time.perf_counter()
    snap = MemoryStore.open(root, FP).snapshot()
    TieredKVReader(snap, 1 << 30, ALL_TENANTS).gather(layer, snap.doc_ids(ALL_TENANTS))
    return time.perf_counter() - t, disk_read_bytes() - before


def machine() -> str:
    """CPU model and core count (Linux), for the report."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    except OSError:
        model = "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def checksum_speeds(blob: bytes) -> str:
    out = []
    for name, fn in (("zlib.crc32", zlib.crc32), ("crc32c", _crc32c())):
        if fn is None:
            continue
        t = time.perf_counter()
        fn(blob)
        out.append(f"{name} {len(blob) / (time.perf_counter() - t) / 1e9:.2f} GB/s")
    return ", ".join(out)


def _crc32c():
    try:
        from crc32c import crc32c
    except ImportError:
        return None
    return crc32c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=131072, help="total memory tokens to write")
    ap.add_argument("--doc-tokens", type=int, default=1500, help="mean document length in tokens")
    ap.add_argument("--dir", default=None, help="directory on the disk to measure (default: system temp)")
    ap.add_argument("--reps", type=int, default=3, help="alternated repetitions; the best of each is kept")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    docs = make_docs(args.tokens, args.doc_tokens, args.seed)
    tokens = sum(d.num_tokens for d in docs)
    chunks = sum(d.num_chunks for d in docs)
    text_bytes = sum(len(d.text.encode()) for d in docs)
    theoretical = chunks * CHUNK_BYTES + text_bytes
    payload = [t.contiguous().view(torch.uint8).numpy().tobytes() for d in docs for t in (d.keys, d.values, d.router_keys)]
    payload += [d.text.encode() for d in docs]
    useful = sum(len(b) for b in payload)
    assert useful == theoretical
    layer_bytes = 2 * chunks * HKV * D * 2  # K and V of one routing layer, every document

    load_start = os.getloadavg()[0]
    work = tempfile.mkdtemp(prefix="bench_store_", dir=args.dir)
    try:
        warm = make_docs(4 * CHUNK, CHUNK, args.seed + 1)  # first-call costs stay out of the timings
        store_write(os.path.join(work, "warmup"), warm, verify=True)
        store_read(os.path.join(work, "warmup"))
        raw, root = os.path.join(work, "raw.bin"), os.path.join(work, "store")
        t_raw_w, t_store_w, t_store_w_nv = [], [], []
        for rep in range(args.reps):  # alternated, best of reps: a shared disk is noisy
            for path in (root, root + "_nv"):
                shutil.rmtree(path, ignore_errors=True)
            t_raw_w.append(raw_write(raw, payload))
            t_store_w.append(store_write(root, docs, verify=True))
            t_store_w_nv.append(store_write(root + "_nv", docs, verify=False))
        shutil.rmtree(root + "_nv")
        files = store_files(root)
        on_disk = sum(os.path.getsize(f) for f in files)

        t_fresh = [raw_read_fresh(raw) for _ in range(args.reps)]
        t_rw, t_sw, t_rc, t_sc, t_layer, layer_disk, t_tier, tier_disk = [], [], [], [], [], [], [], []
        for _ in range(args.reps):
            t_rw.append(raw_read(raw))
            t_sw.append(store_read(root))
            evict([raw])
            t_rc.append(raw_read(raw))
            evict(files)
            t_sc.append(store_read(root))
            if FORMAT_VERSION >= 3:
                evict(files)
                t, n = store_read_layer(root, LAYERS[len(LAYERS) // 2])
                t_layer.append(t)
                layer_disk.append(n)
            evict(files)
            t, n = tier_read_layer(root, LAYERS[len(LAYERS) // 2])
            t_tier.append(t)
            tier_disk.append(n)
        speeds = checksum_speeds(payload[0] * max(1, (64 << 20) // len(payload[0])))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def gbs(seconds: float) -> str:
        return f"{useful / seconds / 1e9:.3f} GB/s"

    t_raw_w, t_store_w, t_store_w_nv = min(t_raw_w), min(t_store_w), min(t_store_w_nv)
    rows = [
        ("write (verify_writes=True)", t_raw_w, t_store_w),
        ("write (verify_writes=False)", t_raw_w, t_store_w_nv),
        ("read, warm page cache", min(t_rw), min(t_sw)),
        ("read, cold (posix_fadvise DONTNEED)", min(t_rc), min(t_sc)),
    ]
    print(f"bench_store: store format {FORMAT_VERSION}; MSA-4B shape ({len(LAYERS)} routing layers, {HKV} kv heads x {D}, bf16, chunk {CHUNK}):")
    print(f"  {len(docs)} documents, {tokens} tokens, {chunks} chunks, {useful / 1e6:.1f} MB of tensors + text; best of {args.reps}")
    print(f"  (context: {machine()}; {speeds}; load average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end)")
    print(f"bytes  on disk {on_disk} B ({len(files)} files) vs theoretical {theoretical} B")
    print(f"       (= {chunks} chunks x {CHUNK_BYTES} B + {text_bytes} B text) -> overhead {100 * (on_disk / theoretical - 1):.3f}% (goal < 5%)")
    if t_layer:
        print(
            f"layer  cold read of one layer of every document: {min(t_layer) * 1e3:.0f} ms, {min(layer_disk)} B read from disk "
            f"for {layer_bytes} B of that layer's K/V ({100 * min(layer_disk) / layer_bytes:.0f}%; the whole K/V is {len(LAYERS)}x that)"
        )
    print(
        f"tier   cold gather of that layer through a fresh K/V tier: {min(t_tier) * 1e3:.0f} ms, {min(tier_disk)} B read "
        f"from disk ({100 * min(tier_disk) / layer_bytes:.0f}% of that layer's K/V)"
    )
    print(
        f"fresh  raw read into fresh memory, warm: {gbs(min(t_fresh))} ({min(t_rw) / min(t_fresh):.2f} of raw): "
        f"what handing over the bytes costs before any checksum"
    )
    print("ratios (store / raw sequential file I/O on the same disk; goal >= 0.8):")
    for name, raw_t, store_t in rows:
        print(f"  {name:38s} raw {gbs(raw_t)} | store {gbs(store_t)} -> ratio {raw_t / store_t:.2f}")


if __name__ == "__main__":
    main()
