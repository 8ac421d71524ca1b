"""GPU checks and benchmarks of issue 11, in one run (prepared on a CPU machine; run by `bench/gpu_check.sh`).

    python bench/bench_gpu.py                 # on a CUDA GPU, ~3 minutes
    TRITON_INTERPRET=1 python bench/bench_gpu.py --smoke --device cpu   # code-path smoke test on CPU

Numerics (bf16, MSA-4B attention shape H 32 / Hkv 8 x D 128):
- prefill: the Triton kernel on Tq = 512 prompt tokens over S = 3 + 2,048 chunks + 512 slots
  against the float32 reference of the same bf16 inputs (tolerance 1e-2);
- decode: one token over S = 3 + 4,096 + 512 slots, split-K chosen by the launcher, and forced
  to 1 split, against the reference;
- routing: route_top_k on the GPU (Triton fp32 first pass) and on the CPU (fused tiles) on the
  same bf16 keys must agree bit for bit (ids and scores), B = 4, T = 64, 128K tokens;
- model: the tiny test model in bf16 on the GPU (prefill, then a 3-token decode) against the dense
  fp32 reference of tests/model/helpers, and decode against the prefill of the longer prompt.
Benchmarks (medians of interleaved repeats, FLOP and byte formulas in each line):
- routing vs device copy bandwidth of the bf16 keys (bytes = C * K * 2), T = 1, 16, 64, 1M tokens;
- batching: one B = 32 call against 32 calls at B = 1 (throughput ratio, goal >= 8);
- attention per layer at MSA-4B shape: MSA (routing over L tokens + sparse prefill of a 512-token
  prompt over the top-16 documents' chunks) against full causal SDPA over L + 512 tokens.
Ratios printed last.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import interleaved  # noqa: E402  (bench/ is this script's directory)

from msa_cluster.kernels.attention import gathered_attention_ref, gathered_attention_triton  # noqa: E402
from msa_cluster.kernels.routing import prepare_queries  # noqa: E402
from msa_cluster.kernels.routing_exact import route_top_k  # noqa: E402
from msa_cluster.types import RoutingSpec  # noqa: E402

H, HKV, D, TOP_K, DOC_CHUNKS, TEMPLATE = 32, 8, 128, 16, 32, 3
K = HKV * D
LOWP_TOL = 1e-2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_case(Tq: int, chunks: int, prompt: int, dev: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    S = TEMPLATE + chunks + prompt
    q = torch.randn(Tq, H, D, generator=g).bfloat16()
    k, v = torch.randn(S, HKV, D, generator=g).bfloat16(), torch.randn(S, HKV, D, generator=g).bfloat16()
    slots = torch.cat([torch.arange(TEMPLATE), torch.arange(TEMPLATE + chunks, S)])[-Tq:] if Tq < S else torch.arange(S)
    return q.to(dev), k.to(dev), v.to(dev), slots.to(dev)


def numerics(dev: torch.device, smoke: bool) -> list[str]:
    lines = []
    for label, Tq, chunks, prompt, splits in (("prefill", 512, 2048, 512, None), ("decode", 1, 4096, 512, None),
                                              ("decode 1 split", 1, 4096, 512, 1)):
        if smoke:
            Tq, chunks, prompt = min(Tq, 8), 40, 8
        q, k, v, slots = attention_case(Tq, chunks, prompt, dev, Tq)
        got = gathered_attention_triton(q, k, v, slots, D**-0.5, num_splits=splits).float()
        want = gathered_attention_ref(q.float(), k.float(), v.float(), slots, D**-0.5)
        err = float((got - want).abs().max())
        ok = err <= LOWP_TOL * (1 + float(want.abs().max()))
        lines.append(f"bf16 attention {label:15s} Tq={Tq:>4} S={k.shape[0]:>5}: max |err| {err:.2e} -> {'PASS' if ok else 'FAIL'}")
    tokens, B, T = (4096, 2, 8) if smoke else (131072, 4, 64)
    query, keys, offsets, ids = routing_case(tokens, B, T, dev, seed=1)
    on_dev = route_top_k(query, keys, offsets, ids, TOP_K)
    cpu_query = type(query)(query.vectors.cpu(), query.mask.cpu(), query.spec, query.folded)
    on_cpu = route_top_k(cpu_query, keys.cpu(), offsets.cpu(), ids.cpu(), TOP_K)
    lines.append(f"routing {dev.type} vs cpu, {tokens} tokens, B={B}, T={T}: identical ids and scores -> "
                 f"{'PASS' if on_dev == on_cpu else 'FAIL'}")
    return lines


def model_numerics(dev: torch.device) -> list[str]:
    """The tiny test model in bf16 on `dev` (Triton pooling, exact routing, Triton attention and
    split-K decode) against the dense fp32 reference of tests/model/helpers on CPU."""
    from msa_cluster.model import InProcessMemory
    from tests.model.helpers import Dense, make_model, random_docs, random_prompt

    model = make_model(seed=21)
    docs = random_docs([40, 130, 7, 90, 66], model.config.vocab_size)
    ids, mask = random_prompt(model, 20)
    dense = Dense(model)
    logits, selections = dense.prefill(ids[0], mask[0], [dense.encode(d) for d in docs])
    lowp = make_model(seed=21).to(dev, torch.bfloat16)
    out = lowp.prefill(ids.to(dev), InProcessMemory.from_documents(lowp, docs), mask.to(dev), reserve=4)
    err = float((out.logits[0].float().cpu() - logits).abs().max())
    ok = err <= 0.1 * (1 + float(logits.abs().max()))  # bf16 through 4 layers: a loose bound, selections reported
    same = out.selected == selections
    extra = torch.tensor([[5, 77, 130]], device=dev)
    step = lowp.decode(out.context, extra)
    longer = lowp.prefill(torch.cat([ids.to(dev), extra], 1), InProcessMemory.from_documents(lowp, docs),
                          torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)], 1).to(dev))
    dec_err = float((step.float() - longer.logits[:, -3:].float()).abs().max())
    return [f"tiny model bf16 on {dev.type} vs dense fp32 reference: prefill logits max |err| {err:.3f}, "
            f"selections {'equal' if same else 'DIFFER (bf16 scores)'} -> {'PASS' if ok else 'FAIL'}",
            f"tiny model bf16 decode of 3 tokens vs prefill of the longer prompt: max |err| {dec_err:.3f} -> "
            f"{'PASS' if dec_err <= 0.1 * (1 + float(longer.logits.abs().max())) else 'FAIL'}"]


def routing_case(tokens: int, B: int, T: int, dev: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    C = max(tokens // 64, DOC_CHUNKS)
    keys = (torch.randn(C, HKV, D, generator=g) * 0.5).bfloat16().to(dev)
    offsets = torch.arange(0, C + 1, DOC_CHUNKS)
    query = prepare_queries(torch.randn(B, T, H, D, generator=g).to(dev), torch.ones(B, T, dtype=torch.bool, device=dev),
                            RoutingSpec(num_heads=H, num_kv_heads=HKV), D**-0.5)
    return query, keys, offsets, torch.arange(offsets.numel() - 1)


def benchmarks(dev: torch.device, smoke: bool, reps: int) -> list[str]:
    ratios = []
    tokens = 8192 if smoke else 1 << 20
    C = tokens // 64
    for T in (1, 16, 64):
        query, keys, offsets, ids = routing_case(tokens, 1, T, dev)
        dst = torch.empty_like(keys)
        t = interleaved({"copy": lambda: dst.copy_(keys), "route": lambda: route_top_k(query, keys, offsets, ids, TOP_K)},
                        reps, lambda: sync(dev))
        nbytes = C * K * 2
        print(f"routing T={T:>2} C={C}: route {t['route'] * 1e3:7.3f} ms ({nbytes / t['route'] / 1e9:7.1f} GB/s of keys, "
              f"{2 * T * K * C / t['route'] / 1e12:6.2f} TFLOP/s) | copy {t['copy'] * 1e3:7.3f} ms "
              f"({2 * nbytes / t['copy'] / 1e9:7.1f} GB/s read+write)", flush=True)
        ratios.append(f"  routing T={T:>2}: key bytes / route time over copy bandwidth = "
                      f"{(nbytes / t['route']) / (2 * nbytes / t['copy']):.2f} (goal >= 0.8 for T <= 64)")
    batch, lone = routing_case(tokens, 32, 64, dev, 2), routing_case(tokens, 1, 64, dev, 2)
    t = interleaved({"B=32": lambda: route_top_k(batch[0], batch[1], batch[2], batch[3], TOP_K),
                     "32 x B=1": lambda: [route_top_k(lone[0], lone[1], lone[2], lone[3], TOP_K) for _ in range(32)]},
                    max(3, reps // 2), lambda: sync(dev))
    print(f"batching C={C}: one B=32 call {t['B=32'] * 1e3:.2f} ms, 32 calls at B=1 {t['32 x B=1'] * 1e3:.2f} ms", flush=True)
    ratios.append(f"  batching: 32 x B=1 / one B=32 = {t['32 x B=1'] / t['B=32']:.2f}x (goal >= 8)")
    prompt = 64 if smoke else 512
    for L in ((8192,) if smoke else (32768, 131072)):
        query, keys, offsets, ids = routing_case(L, 1, 64, dev, 3)
        q, k, v, slots = attention_case(prompt, TOP_K * DOC_CHUNKS, prompt, dev, 4)
        fq = torch.randn(1, H, L + prompt, D, device=dev, dtype=torch.bfloat16)
        fk = torch.randn(1, HKV, L + prompt, D, device=dev, dtype=torch.bfloat16)

        def msa() -> None:
            route_top_k(query, keys, offsets, ids, TOP_K)
            gathered_attention_triton(q, k, v, slots, D**-0.5)

        def full() -> None:
            F.scaled_dot_product_attention(fq, fk, fk, is_causal=True, enable_gqa=True)

        t = interleaved({"msa": msa, "full": full}, reps, lambda: sync(dev))
        print(f"attention per layer, L={L} + prompt {prompt}: msa (route + sparse prefill) {t['msa'] * 1e3:.2f} ms | "
              f"full causal SDPA {t['full'] * 1e3:.2f} ms", flush=True)
        ratios.append(f"  per-layer attention L={L}: full / msa = {t['full'] / t['msa']:.1f}x (MLPs excluded)")
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code paths, not the numbers")
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"bench_gpu  {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  device {name}  torch {torch.__version__}")
    checks = numerics(dev, args.smoke) + model_numerics(dev)
    print("\n".join(checks), flush=True)
    ratios = benchmarks(dev, args.smoke, 3 if args.smoke else args.reps)
    print("\nratios")
    print("\n".join(ratios))
    if any("FAIL" in c for c in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
