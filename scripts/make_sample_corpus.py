"""Write the demo's sample corpus and questions (msa_cluster/assets/sample_*.jsonl) in the tasks' form.

Held-out (eval split) examples, so that no fact of the demo was seen in training, each in a
tenant of its own (a separate memory), as in training and `msa eval`, where every memory holds one
example's documents among fillers: msa-tiny's router ranks any "special magic" needle first, so a
needle in the same memory as a two-hop chain draws every round away from the chain (EVALUATION.md).

- tenant 'demo': one `niah_single` needle among fillers;
- tenant 'demo-chains': one `two_hop` chain with its distractor pairs among fillers.

    python scripts/make_sample_corpus.py                # the committed files, byte for byte
    python scripts/make_sample_corpus.py --search 40    # try seeds from 2026 with the bundled msa-tiny

`--search N --mixed` asks the same over one memory holding both tenants' documents (how the
needle draws the two-hop question away), and writes nothing.

`--search N` answers each seed's questions in process (the demo's settings: greedy, 3 rounds) and
writes the first seed whose answers are all right, after printing how many of the N seeds were.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path
from typing import Any

from msa_cluster.training.tasks import filler_texts, make_example

SEED = 2026  # --search 20: msa-tiny answers 4 of 20 seeds fully (every needle, 4 of 20 chains); 2026 is the first
FILLERS = 20  # per tenant
PICKS = (("demo", "niah_single"), ("demo-chains", "two_hop"))
ASSETS = Path(__file__).resolve().parent.parent / "msa_cluster" / "assets"


def build(seed: int = SEED) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    questions = []
    fillers = filler_texts(seed, "eval")
    for tenant, task in PICKS:
        ex = make_example(task, "eval", seed, 0, num_docs=16)
        # every fact of the example: its needle, or the whole two-hop chain with its distractor pairs
        facts = [d.text for d in ex.documents if d.text.startswith("The special magic") or " works at " in d.text or " is located in " in d.text]
        texts = list(dict.fromkeys(facts + list(itertools.islice(fillers, FILLERS))))
        random.Random(f"{seed}/{tenant}").shuffle(texts)
        rows += [{"id": len(rows) + i, "client_id": f"sample-{len(rows) + i}", "tenant": tenant, "text": t} for i, t in enumerate(texts)]
        questions.append({"task": task, "tenant": tenant, "question": ex.question, "answer": ex.answer})
    return rows, questions


def answered(rows: list[dict[str, Any]], questions: list[dict[str, Any]], mixed: bool = False) -> list[bool]:
    """Whether the bundled msa-tiny answers each question over its tenant's documents (in process),
    or over every tenant's documents in one memory with `mixed`."""
    import torch

    from msa_cluster.model import InProcessMemory, MSAForCausalLM
    from msa_cluster.model import protocol as P
    from msa_cluster.model.interleave import InterleaveConfig, answer_with_memory
    from msa_cluster.model.tokenizer import load_codec

    model, codec = MSAForCausalLM.from_pretrained("msa-tiny", dtype=torch.float32), load_codec("msa-tiny")
    out = []
    for q in questions:
        mine = rows if mixed else [r for r in rows if r["tenant"] == q["tenant"]]
        memory = InProcessMemory.from_documents(model, [P.encode_document(codec, r["id"], r["text"]) for r in mine],
                                                texts=[r["text"] for r in mine], doc_ids=[r["id"] for r in mine])  # fmt: skip
        result = answer_with_memory(model, codec, memory, q["question"], InterleaveConfig(max_rounds=3, max_answer_tokens=64))
        out.append(q["answer"].lower() in result.answer.lower())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--search", type=int, default=0, help="try this many seeds from 2026 and write the first fully answered one")
    ap.add_argument("--mixed", action="store_true",
                    help="with --search: answer over one memory that holds every tenant's documents (writes nothing)")
    args = ap.parse_args()
    seed = SEED
    if args.search:
        tally = {s: answered(*build(s), mixed=args.mixed) for s in range(2026, 2026 + args.search)}
        for s, ok in tally.items():
            print(s, ok)
        full = [s for s, ok in tally.items() if all(ok)]
        print(f"{len(full)} of {args.search} seeds answered fully; per question: {[sum(ok[i] for ok in tally.values()) for i in range(len(PICKS))]}")
        if args.mixed:
            return
        if not full:
            raise SystemExit("no seed answered fully")
        seed = full[0]
    rows, questions = build(seed)
    (ASSETS / "sample_corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ASSETS / "sample_questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    print(f"seed {seed}: {len(rows)} documents, {len(questions)} questions")


if __name__ == "__main__":
    main()
