"""Write the demo's sample corpus and questions (msa_cluster/assets/sample_*.jsonl) in the tasks' form.

Held-out (eval split) examples, so that no fact of the demo was seen in training: one
`niah_single` needle, one `niah_multikey` set of needles (one of them asked) and one `two_hop` chain with its
distractor pairs, among filler documents, in a seeded order. The same command writes the same
files byte for byte:

    python scripts/make_sample_corpus.py
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

from msa_cluster.training.tasks import filler_texts, make_example

SEED = 2026
FILLERS = 30
PICKS = (("niah_single", 0), ("niah_multikey", 0), ("two_hop", 0))
ASSETS = Path(__file__).resolve().parent.parent / "msa_cluster" / "assets"


def build() -> tuple[list[dict], list[dict]]:
    facts: list[str] = []
    questions = []
    for task, index in PICKS:
        ex = make_example(task, "eval", SEED, index, num_docs=16)
        # every fact of the example: all its needles, or the whole two-hop chain with its distractor pairs
        facts += [d.text for d in ex.documents if d.text.startswith("The special magic") or " works at " in d.text or " is located in " in d.text]
        questions.append({"task": task, "question": ex.question, "answer": ex.answer})
    texts = facts + list(itertools.islice(filler_texts(SEED, "eval"), FILLERS))
    texts = list(dict.fromkeys(texts))
    random.Random(SEED).shuffle(texts)
    rows = [{"id": i, "client_id": f"sample-{i}", "text": t} for i, t in enumerate(texts)]
    return rows, questions


def main() -> None:
    rows, questions = build()
    (ASSETS / "sample_corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ASSETS / "sample_questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    print(f"{len(rows)} documents, {len(questions)} questions")


if __name__ == "__main__":
    main()
