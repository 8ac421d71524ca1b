"""Benchmark of the ingest goal (issue 12): the encode step against the model's plain forward, and `msa ingest`.

Model: the bundled msa-tiny (6 layers, hidden 192, routing layers 3,4,5), float32, on CPU. Corpus:
GENERATED text (random words), --docs documents of 100 to 600 tokens (--max-tokens), the same
documents for every variant and for `msa ingest`.
Goal: encode throughput >= 0.9 x the plain forward's over the same tokens.

Variants, each timed INSIDE one EncoderActor (num_cpus 1: Ray gives it OMP_NUM_THREADS=1, so every
variant runs on the same single torch thread), medians of repeats in rotating order:
    forward      the model's plain forward over the documents: embeddings, every decoder layer
                 (causal attention over the whole document), final norm, logits; no memory, no
                 pooling. Same padded batches as the encode step (documents sorted by length,
                 greedy batches under the same padded-token budget), under inference_mode.
    encode       model.encode_documents(token ids) (the encode step: stops after the last routing
                 layer's projections; pools K, V and router K per chunk; builds EncodedDocuments)
    encode rows  Encoder.encode(rows): the actor's own entry point, tokenising and wrapping included
    encode call  EncoderActor.encode.remote(rows) timed from the driver: rows in, EncodedDocuments
                 back through Ray (what the ingestion job waits for)
End to end: `msa ingest CORPUS.jsonl --store file://... --no-cluster` (the CLI's own code, run in this
process on this Ray session, a fresh store each run): tokens per second by its summary (tokens over
its elapsed time, from the start of the run, source reading included, to the last commit) and by wall
time (the encoder actor's start and model load included); then reading the source alone, for scale.

    python bench/bench_ingest.py              # ~6 min on 2 shared cores
    python bench/bench_ingest.py --docs 40 --reps 1 --ingest-runs 1   # a smoke run (~40 s)
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
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import ray  # noqa: E402
import ray.data  # noqa: E402, F401  (imported before its logger is quieted: it configures logging on import)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import ROOT  # noqa: E402

from msa_cluster.actors.model_actors import EncoderActor  # noqa: E402
from msa_cluster.cluster.cli import main as msa_main  # noqa: E402
from msa_cluster.cluster.ingest import IngestOptions, read_source  # noqa: E402
from msa_cluster.model.protocol import encode_document  # noqa: E402
from msa_cluster.model.tokenizer import load_codec  # noqa: E402

MODEL = str(ROOT / "msa_cluster" / "assets" / "msa-tiny")
BATCH_TOKENS = 8192  # the Encoder's default padded-token budget per batch
TIMEOUT_S = 600.0
WORDS = ("harbour ferry lighthouse pier keeper logbook storm tide island bell rope anchor gull net sail "
         "north morning evening wrote counted saw heard the a of in on by with after before").split()


def corpus(n: int, max_tokens: int, seed: int) -> list[dict[str, Any]]:
    """n rows {"id", "text"} of random words, 100 to `max_tokens` tokens each (about 2.7 characters a token)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        target = int(2.7 * rng.randint(100, max_tokens))
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < target:
            words.append(rng.choice(WORDS))
        rows.append({"id": i, "text": " ".join(words)})
    return rows


# ---------------------------------------------------------------------------------------------- inside the encoder actor


def length_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices sorted by length, cut greedily so that batch size x longest length <= budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[i] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.inference_mode()
def plain_forward(model: Any, docs: Sequence[Sequence[int]], budget: int) -> int:
    """The model as a plain causal LM over each document (right-padded batches); returns the tokens run."""
    inner = model.model
    for batch in length_batches([len(d) for d in docs], budget):
        B, T = len(batch), max(len(docs[i]) for i in batch)
        ids = torch.zeros(B, T, dtype=torch.long)  # [B, T]
        for b, i in enumerate(batch):
            ids[b, : len(docs[i])] = torch.tensor(docs[i])
        x = inner.embed_tokens(ids)  # [B, T, M]
        cos, sin = inner.rotary_emb(x, torch.arange(T).expand(B, T))
        for layer in inner.layers:
            attn = layer.self_attn
            q, k, v = attn.qkv(layer.input_layernorm(x), cos, sin)  # [B, T, H or Hkv, D]
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                               scale=attn.scaling, enable_gqa=True)  # [B, H, T, D]
            x = layer.finish(x, o.transpose(1, 2))
        model.lm_head(inner.norm(x))  # [B, T, V]
    return sum(len(d) for d in docs)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _forward_s(enc: Any, docs: list[list[int]]) -> float:
    return _timed(lambda: plain_forward(enc.model, docs, enc.batch_tokens))


def _encode_s(enc: Any, docs: list[list[int]]) -> float:
    return _timed(lambda: enc.model.encode_documents(docs, batch_tokens=enc.batch_tokens))


def _encode_rows_s(enc: Any, rows: list[dict[str, Any]]) -> float:
    return _timed(lambda: enc.encode(rows))


def _threads(_enc: Any) -> tuple[str | None, int]:
    return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()


# ---------------------------------------------------------------------------------------------- driver


def rotated(fns: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Each fn returns its own seconds; one warm-up each, then `reps` rounds in rotating order."""
    for fn in fns.values():
        fn()
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in fns}
    for r in range(reps):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            out[n].append(fns[n]())
    return out


def encode_step(rows: list[dict[str, Any]], reps: int) -> dict[str, Any]:
    codec = load_codec(MODEL)
    docs = [encode_document(codec, r["id"], r["text"]) for r in rows]
    tokens = sum(len(d) for d in docs)
    actor = EncoderActor.options(num_cpus=1).remote(checkpoint=MODEL)  # type: ignore[attr-defined]
    try:
        omp, nt = ray.get(actor.__ray_call__.remote(_threads), timeout=TIMEOUT_S)

        def inside(fn: Callable[..., float], arg: Any) -> Callable[[], float]:
            return lambda: float(ray.get(actor.__ray_call__.remote(fn, arg), timeout=TIMEOUT_S))

        def call() -> float:
            start = time.perf_counter()
            ray.get(actor.encode.remote(rows), timeout=TIMEOUT_S)
            return time.perf_counter() - start

        times = rotated({"forward": inside(_forward_s, docs), "encode": inside(_encode_s, docs),
                         "encode rows": inside(_encode_rows_s, rows), "encode call": call}, reps)  # fmt: skip
    finally:
        ray.kill(actor)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"  encoder actor: OMP_NUM_THREADS={omp}, torch threads {nt}; {len(docs)} documents, {tokens:,} tokens (wrapped)")
    for k, v in med.items():
        print(f"  {k:<12} {v * 1e3:9.1f} ms  {tokens / v:10,.0f} tokens/s   (runs: {', '.join(f'{x * 1e3:.0f}' for x in times[k])})")
    return {"tokens": tokens, "docs": len(docs), "threads": nt, "median_s": med, "runs_s": times}


def end_to_end(rows: list[dict[str, Any]], runs: int, tmp: str) -> list[dict[str, Any]]:
    """`msa ingest` of the corpus as jsonl into a fresh store, `runs` times."""
    src = os.path.join(tmp, "corpus.jsonl")
    with open(src, "w") as f:
        for r in rows:
            f.write(json.dumps({"id": f"doc-{r['id']}", "text": r["text"]}) + "\n")
    out = []
    for n in range(runs):
        store = os.path.join(tmp, f"store{n}")
        printed = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(printed):
            rc = msa_main(["ingest", src, "--store", f"file://{store}", "--model", MODEL, "--tenant", "bench", "--no-cluster", "--json"])
        wall = time.perf_counter() - start
        if rc != 0:
            raise RuntimeError(f"msa ingest exited {rc}: {printed.getvalue()[-500:]}")
        summary = json.loads(printed.getvalue().strip().splitlines()[-1])
        row = {"tokens": summary["tokens"], "inserted": summary["inserted"], "commits": summary["commits"],
               "elapsed_s": summary["elapsed_s"], "wall_s": wall}
        print(f"  msa ingest run {n + 1}: {row['inserted']} documents, {row['tokens']:,} tokens, {row['commits']} commits; "
              f"{row['tokens'] / row['elapsed_s']:,.0f} tokens/s by its summary ({row['elapsed_s']:.2f} s), "
              f"{row['tokens'] / wall:,.0f} tokens/s by wall time ({wall:.2f} s)", flush=True)  # fmt: skip
        shutil.rmtree(store, ignore_errors=True)
        out.append(row)
    start = time.perf_counter()  # what reading the source costs in those runs: Ray Data alone, no model
    rows_read, _ = read_source(src, IngestOptions(tenant="bench"))
    n = sum(1 for _ in rows_read)
    out.append({"source_read_s": time.perf_counter() - start})
    print(f"  reading the source alone (read_source, Ray Data): {n} rows in {out[-1]['source_read_s']:.2f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=300, help="documents in the generated corpus")
    ap.add_argument("--max-tokens", type=int, default=600, help="longest generated document, about (tokens)")
    ap.add_argument("--reps", type=int, default=3, help="rotated repeats of the encode-step variants")
    ap.add_argument("--ingest-runs", type=int, default=2, help="end-to-end `msa ingest` runs of each corpus")
    ap.add_argument("--ingest-docs", default=None, help="comma-separated corpus sizes for `msa ingest` (default --docs; "
                    "a larger corpus starts with the same documents)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    t_start = time.perf_counter()
    print(f"bench_ingest {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; nproc {len(os.sched_getaffinity(0))}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; torch {torch.__version__}, ray {ray.__version__}; model {MODEL}")  # fmt: skip
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-dataset progress lines between ours
    rows = corpus(args.docs, args.max_tokens, seed=0)
    tmp = tempfile.mkdtemp(prefix="bench-ingest-")
    ray.init(address="local", num_cpus=4, object_store_memory=1 << 30, include_dashboard=False, logging_level=logging.ERROR,
             namespace="msa-bench")
    try:
        print("\n[1] the encode step against the plain forward, inside one encoder actor (median of rotated repeats)")
        step = encode_step(rows, args.reps)
        print("\n[2] end to end: msa ingest of the same corpus (jsonl)")
        e2e = [run for n in (args.ingest_docs or str(args.docs)).split(",")
               for run in end_to_end(corpus(int(n), args.max_tokens, seed=0), args.ingest_runs, tmp)]
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"step": step, "e2e": e2e}, f, indent=1)
    med, tokens = step["median_s"], step["tokens"]
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; total {time.perf_counter() - t_start:.0f} s")
    print("\n[3] ratios (throughput over the plain forward's, same tokens, same thread; goal: encode >= 0.9)")
    for k in ("encode", "encode rows", "encode call"):
        print(f"  {k:<12} {med['forward'] / med[k]:.2f}")
    for r in (r for r in e2e if "tokens" in r):
        print(f"  msa ingest, {r['inserted']} documents: {(r['tokens'] / r['elapsed_s']) / (tokens / med['forward']):.2f} by its summary, "
              f"{(r['tokens'] / r['wall_s']) / (tokens / med['forward']):.2f} by wall time")


if __name__ == "__main__":
    main()
