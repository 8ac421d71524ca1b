"""MSA prefill against full attention on the same model and the same tokens, with peak memory;
and the attention kernel at MSA-4B shape before and after blocking.

    python bench/bench_prefill.py                       # 32K and 128K (full and MSA), 1M (MSA only)
    python bench/bench_prefill.py --tokens 32768 --msa-only 0

Model: the bundled `msa-tiny-random` (4 layers, hidden 64, H 4 / Hkv 2 x D 16, routing layers 2-3,
top-4 documents, 64-token chunks), float32, 1 torch thread. Tokens: synthetic documents of 2,048
byte tokens each (memory), and one prompt of 64 tokens (3-token template head + 61 routing tokens).
- full:   one causal pass of the same model over [template head, every document's tokens, prompt]
          at positions 0..L-1 (SDPA, causal, GQA): what a long-context model does with that text.
- encode: MSA's one-off document encoding (each document alone), kept in an InProcessMemory.
- msa:    MSA's prefill of the prompt over that memory: routing at layers 2-3, attention over
          [template, the top-4 documents' chunks, prompt]. The query-time cost.
FLOP of full attention ~ 2 * 2 * L^2 / 2 * H * D per layer (causal QK^T and PV).
Peak memory: the process's resident high-water mark during the call (reset through
/proc/self/clear_refs before each call) minus the resident size before it.
Kernel section: `gathered_attention_ref` as it was (dense [H, Tq, S] logits and K/V repeated per
group, commit cd4fe2d, from git history) against the blocked one, at MSA-4B attention shape
(H 32 / Hkv 8 x D 128, fp32), Tq prompt tokens over S = 3 + 4,096 chunks + Tq slots.
Ratios printed last: full / msa (goal >= 10 at 128K), full / (encode + msa), old / new kernel time and memory.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import module_from_git  # noqa: E402  (bench/ is this script's directory)

from msa_cluster.kernels.attention import gathered_attention_ref  # noqa: E402
from msa_cluster.model import InProcessMemory, MSAForCausalLM  # noqa: E402

DOC_TOKENS, PROMPT, TEMPLATE = 2048, 64, 3
OLD_COMMIT = "cd4fe2d"
_LIBC = ctypes.CDLL("libc.so.6")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measured(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(seconds, peak extra resident MiB, result) of one call."""
    gc.collect()
    _LIBC.malloc_trim(0)  # hand freed heap back to the OS, so that new allocations show in the resident size
    Path("/proc/self/clear_refs").write_text("5")  # reset the resident high-water mark (VmHWM)
    before = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return seconds, (_rss_kib("VmHWM") - before) / 1024, out


def full_attention(model: MSAForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Last-token logits of one dense causal pass over ids [1, L] at positions 0..L-1."""
    with torch.inference_mode():
        L = ids.shape[1]
        x = model.model.embed_tokens(ids)
        cos, sin = model._rope(x, torch.arange(L).unsqueeze(0))
        for layer in model.model.layers:
            attn = layer.self_attn
            q, k, v = attn.qkv(layer.input_layernorm(x), cos, sin)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, scale=attn.scaling, enable_gqa=True)
            x = layer.finish(x, o.transpose(1, 2))
        return model._logits(x[:, -1:])


def tokens_for(total: int, seed: int = 0) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """Documents of DOC_TOKENS byte tokens adding up to `total`, a prompt [1, 64] and its routing mask."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 256, (DOC_TOKENS,), generator=g).tolist() for _ in range(total // DOC_TOKENS)]
    prompt = torch.randint(0, 256, (1, PROMPT), generator=g)
    mask = torch.zeros(1, PROMPT, dtype=torch.bool)
    mask[0, TEMPLATE:] = True
    return docs, prompt, mask


def prefill_section(model: MSAForCausalLM, sizes: list[int], msa_only: set[int], reps: int) -> list[str]:
    ratios = []
    for total in sizes:
        docs, prompt, mask = tokens_for(total)
        t_enc, m_enc, memory = measured(lambda: InProcessMemory.from_documents(model, docs))
        assert isinstance(memory, InProcessMemory)
        msa_runs = [measured(lambda: model.prefill(prompt, memory, mask, last_logits_only=True)) for _ in range(reps)]
        t_msa, m_msa = statistics.median(r[0] for r in msa_runs), max(r[1] for r in msa_runs)
        line = (f"{total // 1024:>6}K tokens ({len(docs)} docs): encode {t_enc:8.2f} s ({m_enc:7.1f} MiB) | "
                f"msa prefill {t_msa * 1e3:8.1f} ms ({m_msa:6.1f} MiB)")
        if total in msa_only:
            print(line + " | full attention not run (time)", flush=True)
            continue
        ids = torch.cat([prompt[:, :TEMPLATE], torch.tensor([[t for d in docs for t in d]]), prompt[:, TEMPLATE:]], dim=1)
        full_runs = [measured(lambda: full_attention(model, ids)) for _ in range(1 if total > 65536 else reps)]
        t_full, m_full = statistics.median(r[0] for r in full_runs), max(r[1] for r in full_runs)
        cfg = model.config
        flop = 4 * ids.shape[1] ** 2 / 2 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
        print(f"{line} | full {t_full:8.2f} s ({m_full:7.1f} MiB, attention {flop / t_full / 1e9:.1f} GFLOP/s)", flush=True)
        ratios.append(f"  {total // 1024:>6}K: full / msa prefill {t_full / t_msa:10.1f}x   full / (encode + msa) "
                      f"{t_full / (t_enc + t_msa):6.2f}x   peak memory full {m_full:.1f} MiB, msa prefill {m_msa:.1f} MiB")
    return ratios


def old_attention_ref() -> Callable[..., torch.Tensor]:
    fn: Callable[..., torch.Tensor] = module_from_git(OLD_COMMIT, "msa_cluster/kernels/attention.py", "old_attention").gathered_attention_ref
    return fn


def kernel_section(prompts: list[int]) -> list[str]:
    H, Hkv, D, chunks = 32, 8, 128, 4096
    old = old_attention_ref()
    ratios = []
    for Tq in prompts:
        g = torch.Generator().manual_seed(Tq)
        S = TEMPLATE + chunks + Tq
        q = torch.randn(Tq, H, D, generator=g)
        k, v = torch.randn(S, Hkv, D, generator=g), torch.randn(S, Hkv, D, generator=g)
        slots = torch.cat([torch.arange(TEMPLATE), torch.arange(TEMPLATE + chunks, S)])[:Tq]
        runs: dict[str, list[tuple[float, float, object]]] = {"old": [], "new": []}
        for _ in range(3):  # interleaved
            runs["old"].append(measured(lambda: old(q, k, v, slots, D**-0.5)))
            runs["new"].append(measured(lambda: gathered_attention_ref(q, k, v, slots, D**-0.5)))
        assert torch.allclose(runs["old"][0][2], runs["new"][0][2], atol=1e-4)  # type: ignore[arg-type]
        t = {n: statistics.median(r[0] for r in rs) for n, rs in runs.items()}
        m = {n: max(r[1] for r in rs) for n, rs in runs.items()}
        flop = 4 * Tq * (chunks + TEMPLATE + Tq / 2) * H * D
        print(f"attention MSA-4B shape, Tq={Tq:>5} S={S:>5}: old {t['old'] * 1e3:8.1f} ms ({m['old']:7.1f} MiB) | "
              f"new {t['new'] * 1e3:8.1f} ms ({m['new']:7.1f} MiB) | {flop / t['new'] / 1e9:.1f} GFLOP/s", flush=True)
        ratios.append(f"  kernel Tq={Tq:>5}: old / new time {t['old'] / t['new']:5.2f}x, memory {m['old']:.0f} -> {m['new']:.0f} MiB")
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="32768,131072,1048576")
    ap.add_argument("--msa-only", default="1048576", help="sizes where full attention is not run")
    ap.add_argument("--prompts", default="512,2048", help="Tq of the kernel section")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"bench_prefill  {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  nproc {os.cpu_count()}  "
          f"torch {torch.__version__} (1 thread)  load {os.getloadavg()[0]:.2f}")
    model = MSAForCausalLM.from_pretrained("msa-tiny-random").eval()
    sizes = [int(t) for t in args.tokens.split(",")]
    msa_only = {int(t) for t in args.msa_only.split(",") if t}
    ratios = prefill_section(model, sizes, msa_only, args.reps)
    ratios += kernel_section([int(t) for t in args.prompts.split(",") if t])
    print("\nratios")
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
