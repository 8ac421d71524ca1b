"""Benchmark of the memory store on local disk, printed as ratios measured in one run.

  write ratio  = store write throughput / raw sequential write throughput (same disk, both fsynced)
  read ratio   = store read throughput / raw sequential read throughput (same files evicted from
                 the page cache first with posix_fadvise(DONTNEED) for the cold numbers)
  overhead     = bytes on disk / theoretical - 1, where
                 theoretical = sum over documents of ceil(tokens / 64) * chunk_bytes + UTF-8 text bytes
                 chunk_bytes = 3 tensors (K, V, router K) * 18 layers * 8 kv heads * 128 dim * 2 B = 110,592 B

Writes and warm reads are the best of two runs; a tiny warm-up store pays first-call costs before timing.
Byte counts: the store writes and reads the tensor bytes (plus its Arrow and manifest overhead);
throughput is tensor-and-text bytes per second, so the ratios compare useful bytes moved.
The store checksums everything it writes and reads (CRC32), and by default reads each written
file back to check it (StoreConfig.verify_writes); both are reported.

Usage: python bench/bench_store.py [--tokens 131072] [--dir /tmp] [--doc-tokens 1500]
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

from msa_cluster.storage_adapters import ALL_TENANTS, MemoryStore, StoreConfig
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=131072, help="total memory tokens to write")
    ap.add_argument("--doc-tokens", type=int, default=1500, help="mean document length in tokens")
    ap.add_argument("--dir", default=None, help="directory on the disk to measure (default: system temp)")
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

    work = tempfile.mkdtemp(prefix="bench_store_", dir=args.dir)
    try:
        warm = make_docs(4 * CHUNK, CHUNK, args.seed + 1)  # first-call costs stay out of the timings
        store_write(os.path.join(work, "warmup"), warm, verify=True)
        store_read(os.path.join(work, "warmup"))
        raw = os.path.join(work, "raw.bin")
        t_raw_w, t_store_w, t_store_w_nv = [], [], []
        for rep in range(2):  # alternated and best of two: a shared disk is noisy
            t_raw_w.append(raw_write(raw, payload))
            t_store_w.append(store_write(os.path.join(work, f"store{rep}"), docs, verify=True))
            t_store_w_nv.append(store_write(os.path.join(work, f"store_noverify{rep}"), docs, verify=False))
        t_raw_w, t_store_w, t_store_w_nv = min(t_raw_w), min(t_store_w), min(t_store_w_nv)
        shutil.rmtree(os.path.join(work, "store1"))
        os.rename(os.path.join(work, "store0"), os.path.join(work, "store"))
        files = store_files(os.path.join(work, "store"))
        on_disk = sum(os.path.getsize(f) for f in files)

        t_raw_r_warm = min(raw_read(raw) for _ in range(2))
        t_store_r_warm = min(store_read(os.path.join(work, "store")) for _ in range(2))
        evict([raw])
        t_raw_r_cold = raw_read(raw)
        evict(files)
        t_store_r_cold = store_read(os.path.join(work, "store"))

        blob = payload[0] * max(1, (64 << 20) // len(payload[0]))
        t = time.perf_counter()
        zlib.crc32(blob)
        crc_gbs = len(blob) / (time.perf_counter() - t) / 1e9
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def gbs(seconds: float) -> str:
        return f"{useful / seconds / 1e9:.3f} GB/s"

    print(f"bench_store: MSA-4B shape ({len(LAYERS)} routing layers, {HKV} kv heads x {D}, bf16, chunk {CHUNK}):")
    print(f"  {len(docs)} documents, {tokens} tokens, {chunks} chunks, {useful / 1e6:.1f} MB of tensors + text")
    print(f"  (context: zlib.crc32 runs at {crc_gbs:.2f} GB/s on this machine)")
    print(f"write  raw {gbs(t_raw_w)} | store {gbs(t_store_w)} -> ratio {t_raw_w / t_store_w:.2f}")
    print(f"       store with verify_writes=False: {gbs(t_store_w_nv)} -> ratio {t_raw_w / t_store_w_nv:.2f}")
    for name, raw_t, store_t in (("warm", t_raw_r_warm, t_store_r_warm), ("cold", t_raw_r_cold, t_store_r_cold)):
        print(f"read   {name}: raw {gbs(raw_t)} | store {gbs(store_t)} -> ratio {raw_t / store_t:.2f}")
    print(f"bytes  on disk {on_disk} B ({len(files)} files) vs theoretical {theoretical} B")
    print(f"       (= {chunks} chunks x {CHUNK_BYTES} B + {text_bytes} B text) -> overhead {100 * (on_disk / theoretical - 1):.3f}% (goal < 5%)")

if __name__ == "__main__":
    main()
