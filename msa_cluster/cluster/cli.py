"""The `msa` command line. The CLI owns output and logging set-up."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib import resources
from pathlib import Path

__all__ = ["main"]


def _sample_corpus() -> list[dict]:
    text = (resources.files("msa_cluster") / "assets" / "sample_corpus.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _load_corpus(path: str | None) -> list[dict]:
    if path is None:
        return _sample_corpus()
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise SystemExit(f"{path}:{n}: each line must be a JSON object with a string 'text'")
        rows.append(row)
    return rows


def cmd_demo(args: argparse.Namespace) -> int:
    """Encode a corpus into in-process memory and answer a question, printing the routing."""
    import torch

    from msa_cluster.model import InProcessMemory, MSAForCausalLM
    from msa_cluster.model.interleave import InterleaveConfig, answer_with_memory
    from msa_cluster.model.protocol import encode_document
    from msa_cluster.model.tiny import TINY_RANDOM
    from msa_cluster.model.tokenizer import load_codec

    ckpt = args.model or TINY_RANDOM
    model = MSAForCausalLM.from_pretrained(ckpt)
    codec = load_codec(ckpt)
    rows = _load_corpus(args.corpus)
    ids = [int(r.get("id", i)) for i, r in enumerate(rows)]
    wrapped = [encode_document(codec, i, r["text"]) for i, r in zip(ids, rows)]
    memory = InProcessMemory.from_documents(model, wrapped, texts=[r["text"] for r in rows], doc_ids=ids)
    print(f"model: {ckpt}")
    print(f"memory: {len(memory)} documents, {sum(len(w) for w in wrapped)} tokens, version {memory.version}")
    cfg = InterleaveConfig(
        mode=args.mode, max_rounds=args.max_rounds, max_round_tokens=args.max_tokens, max_answer_tokens=args.max_tokens
    )
    torch.manual_seed(0)
    result = answer_with_memory(model, codec, memory, args.question, cfg)
    print(f"question: {args.question}")
    for trace in result.rounds:
        for layer, docs in sorted(trace.selected.items()):
            print(f"round {trace.round} layer {layer}: selected documents {docs}")
    print(f"answer ({result.finish_reason}): {result.answer!r}")
    print(f"citations: {[(c.doc_id, c.round, c.score) for c in result.citations]}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train an MSA model on the synthetic memory tasks from a YAML config."""
    from msa_cluster.training.config import load_config
    from msa_cluster.training.loop import train

    cfg = load_config(args.config, output_dir=args.output_dir, steps=args.steps, device=args.device)
    print(f"training {cfg.model.num_layers}x{cfg.model.hidden_size} (vocab {cfg.model.vocab_size}) for {cfg.steps} steps "
          f"on {cfg.device} into {cfg.output_dir}")  # fmt: skip

    def show(m: dict) -> None:
        recall = " ".join(f"{k}={m[k]:.2f}" for k in sorted(m) if "recall" in k)
        print(f"step {m['step']} [{m['phase']}] loss={m['loss']:.4f} lm={m['lm']:.4f} aux={m['aux']:.4f} {recall} "
              f"tokens/s={m['tokens_per_s']:.0f}", flush=True)  # fmt: skip

    result = train(cfg, resume=args.resume, on_metrics=show)
    print(f"checkpoint: {result.checkpoint} (step {result.step}); metrics: {Path(cfg.output_dir) / 'metrics.jsonl'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="msa", description="msa-cluster: long-term LLM memory with Memory Sparse Attention")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="encode a small corpus and answer a question with the bundled tiny model")
    demo.add_argument("--model", help="MSA checkpoint directory or bundled model name (default: msa-tiny-random)")
    demo.add_argument("--corpus", help="a .jsonl file with one {'id', 'text'} object per line (default: bundled sample)")
    demo.add_argument("--question", default="When was the father of the lighthouse logbook keeper born?")
    demo.add_argument("--max-rounds", type=int, default=2)
    demo.add_argument("--max-tokens", type=int, default=24)
    demo.add_argument("--mode", choices=["interleave", "one_round"], default="interleave",
                      help="one_round: route once and answer from routed memory without reading texts")
    demo.set_defaults(func=cmd_demo)
    tr = sub.add_parser("train", help="train an MSA model on synthetic memory tasks from a YAML config")
    tr.add_argument("--config", required=True, help="YAML training config (see examples/train/msa-tiny.yaml)")
    tr.add_argument("--output-dir", help="override the config's output_dir")
    tr.add_argument("--steps", type=int, help="override the config's steps")
    tr.add_argument("--device", choices=["cpu", "cuda"], help="override the config's device")
    tr.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint")
    tr.set_defaults(func=cmd_train)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"msa: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
