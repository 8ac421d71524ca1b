"""Benchmark the kernels: reference vs dispatcher, with FLOP and byte formulas and the ratio of
what each achieves to this device's measured limits (a matmul and a copy, timed first).

On CUDA the dispatcher runs the Triton kernels. Without a GPU the dispatcher *is* the
reference, so only the reference is timed; the Triton CPU interpreter is a correctness tool
and is not benchmarked.

    python bench/bench_kernels.py                 # small sizes; < 1 minute on 2 CPU cores
    python bench/bench_kernels.py --size large    # model-scale sizes, meant for a GPU

Legend: B batch, T tokens, F features, P chunk size, C chunks, N documents, Tq queries,
S slots, H heads, Hkv kv heads, D head dim, K = Hkv * D (folded routing width).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from msa_cluster.kernels import attention, pooling, routing
from msa_cluster.kernels.routing_exact import route_top_k
from msa_cluster.types import RoutingSpec

SIZES = {  # small: quick on a CPU; large: MSA-4B shapes (Hkv 8, D 128, H 32, P 64)
    "small": dict(B=2, T=1024, P=64, Tq=64, prompt=64, docs=64, chunks_per_doc=8, Tr=16),
    "large": dict(B=8, T=8192, P=64, Tq=512, prompt=512, docs=16384, chunks_per_doc=16, Tr=64),
}
H, HKV, D = 32, 8, 128


@dataclass
class Limits:
    """Measured device limits: matmul FLOP/s per dtype and copy bandwidth in bytes/s."""

    flops: dict[torch.dtype, float]
    bandwidth: float


def x_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall seconds of fn() after one warm-up call (which also compiles Triton kernels)."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_limits(device: torch.device, dtypes: list[torch.dtype], repeats: int) -> Limits:
    """A square matmul per dtype (2 n^3 FLOP; fp32 with TF32 off, the kernels' fp32 mode) and a
    buffer copy (2 x bytes moved)."""
    n = 4096 if device.type == "cuda" else 512
    flops = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for dt in dtypes:
            a = torch.randn(n, n, device=device).to(dt)
            flops[dt] = 2 * n**3 / timed(lambda: a @ a, device, repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    numel = (1 << 28 if device.type == "cuda" else 1 << 24) // 4
    src, dst = torch.randn(numel, device=device), torch.empty(numel, device=device)
    bandwidth = 2 * 4 * numel / timed(lambda: dst.copy_(src), device, repeats)
    return Limits(flops, bandwidth)


def report(
    name: str, flop: float, nbytes: float, dtype: torch.dtype, t_ref: float, t_disp: float | None, lim: Limits
) -> None:
    """One line per op: times, speed-up, achieved rates and their ratios to the measured limits."""
    t = t_disp if t_disp is not None else t_ref
    peak = lim.flops.get(dtype, lim.flops[torch.float32])
    line = f"  {name:<26} ref {t_ref * 1e3:9.2f} ms"
    line += f" | dispatch {t_disp * 1e3:9.2f} ms ({t_ref / t_disp:6.1f}x)" if t_disp is not None else ""
    line += f" | {flop / t / 1e9:9.1f} GFLOP/s = {flop / t / peak:6.1%} of matmul"
    line += f" | {nbytes / t / 1e9:8.2f} GB/s = {nbytes / t / lim.bandwidth:6.1%} of copy"
    print(line)


def bench_pooling(s: dict, dtype: torch.dtype, dev: torch.device, gpu: bool, repeats: int, lim: Limits) -> None:
    B, T, P, F = s["B"], s["T"], s["P"], HKV * D
    C = pooling.num_chunks(T, P)
    print(f"chunk_mean  x [B={B}, T={T}, F={F}] {dtype}, P={P}")
    flop, nbytes = B * T * F + B * C * F, B * T * F * x_size(dtype) + B * C * F * 4
    print(f"    FLOP  = B*T*F (adds) + B*C*F (divides) = {flop:.3g}")
    print(f"    bytes = B*T*F*itemsize (read x) + B*C*F*4 (write fp32 means) = {nbytes:.3g}")
    x = torch.randn(B, T, F, device=dev).to(dtype)
    lengths = torch.randint(T // 2, T + 1, (B,), device=dev)
    t_ref = timed(lambda: pooling.chunk_mean_ref(x, lengths, P), dev, repeats)
    t_disp = timed(lambda: pooling.chunk_mean(x, lengths, P), dev, repeats) if gpu else None
    report("chunk_mean", flop, nbytes, dtype, t_ref, t_disp, lim)


def bench_attention(s: dict, dtype: torch.dtype, dev: torch.device, gpu: bool, repeats: int, lim: Limits) -> None:
    chunks = 16 * s["chunks_per_doc"]  # top-16 documents' chunks
    for label, Tq in (("prefill", s["prompt"]), ("decode", 1)):
        S = 3 + chunks + s["prompt"] + (1 if label == "decode" else 0)
        slots = torch.arange(S - Tq, S, device=dev)  # the prompt (or the new token) at the end
        pairs = int((slots + 1).clamp(max=S).sum())  # visible (query, slot) pairs
        flop = 4 * H * D * pairs
        nbytes = (2 * Tq * H * D + 2 * S * HKV * D) * x_size(dtype)
        print(f"gathered_attention {label}: q [Tq={Tq}, H={H}, D={D}], k/v [S={S}, Hkv={HKV}, D={D}] {dtype}")
        print(f"    FLOP  = 4*H*D*(visible pairs = sum_t min(slot_t + 1, S) = {pairs}) = {flop:.3g}")
        print(f"    bytes = (2*Tq*H*D (q, out) + 2*S*Hkv*D (k, v)) * itemsize = {nbytes:.3g}")
        q = torch.randn(Tq, H, D, device=dev).to(dtype)
        k, v = (torch.randn(S, HKV, D, device=dev).to(dtype) for _ in range(2))
        t_ref = timed(lambda: attention.gathered_attention_ref(q, k, v, slots, D**-0.5), dev, repeats)
        t_disp = timed(lambda: attention.gathered_attention(q, k, v, slots, D**-0.5), dev, repeats) if gpu else None
        report(f"gathered_attention {label}", flop, nbytes, dtype, t_ref, t_disp, lim)


def bench_routing(s: dict, dtype: torch.dtype, dev: torch.device, gpu: bool, repeats: int, lim: Limits) -> None:
    N, T, K = s["docs"], s["Tr"], HKV * D
    C = N * s["chunks_per_doc"]
    spec = RoutingSpec(num_heads=H, num_kv_heads=HKV)  # dot, head mean (folded), token max, chunk max
    query = routing.prepare_queries(
        torch.randn(1, T, H, D, device=dev), torch.ones(1, T, dtype=torch.bool, device=dev), spec, D**-0.5
    )
    keys = torch.randn(C, HKV, D, device=dev).to(dtype)
    offsets = torch.arange(0, C + 1, s["chunks_per_doc"])
    flop = 2 * T * C * K
    nbytes = C * K * x_size(dtype) + T * K * 4 + N * 4
    print(f"doc_scores  query [B=1, T={T}, K={K}] fp32, router keys [C={C}, K={K}] {dtype}, N={N} docs")
    print(f"    FLOP  = 2*B*T*C*K (folded inner products) = {flop:.3g}")
    print(f"    bytes = C*K*itemsize (keys) + B*T*K*4 (query) + B*N*4 (scores) = {nbytes:.3g}")
    print("    ('ref' column: route_top_k, the exact top-16 (fp32 first pass + float64 re-score); 'dispatch':")
    print("    doc_scores, the fp32 first pass alone (the Triton kernel on CUDA). The dense float64")
    print("    doc_scores_ref is a test reference, [B, T, C, K] in memory, and is not timed.)")
    ids = torch.arange(N)
    t_ref = timed(lambda: route_top_k(query, keys, offsets, ids, 16), dev, repeats)
    t_disp = timed(lambda: routing.doc_scores(query, keys, offsets), dev, repeats) if gpu else None
    report("route_top_k / doc_scores", flop, nbytes, torch.float32, t_ref, t_disp, lim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    args = parser.parse_args()
    gpu = torch.cuda.is_available() and pooling.HAS_TRITON
    dev = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32  # CPU bf16 matmuls are not representative
    torch.manual_seed(0)
    if gpu:
        print(f"device: {torch.cuda.get_device_name(dev)}; dispatcher = Triton kernels")
    else:
        print("device: CPU, NO GPU PRESENT (or triton missing): the dispatcher is the reference here,")
        print("so only reference timings are shown; no GPU number below was measured.")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, size {args.size!r}, {args.repeats} repeats")
    lim = measure_limits(dev, sorted({torch.float32, dtype}, key=str), args.repeats)
    for dt, f in lim.flops.items():
        print(f"measured matmul limit {dt}: {f / 1e9:.1f} GFLOP/s")
    print(f"measured copy bandwidth: {lim.bandwidth / 1e9:.2f} GB/s\n")
    size = SIZES[args.size]
    bench_pooling(size, dtype, dev, gpu, args.repeats, lim)
    bench_attention(size, dtype, dev, gpu, args.repeats, lim)
    bench_routing(size, dtype, dev, gpu, args.repeats, lim)


if __name__ == "__main__":
    main()
