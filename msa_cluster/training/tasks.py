"""Synthetic memory tasks: RULER-style needles in haystacks, and two-hop questions.

Every example is a haystack of distinct documents with ids 0..N-1 (as a store allocates them),
a question, its answer, and the retrieval chain `hops`: the ids the model must name in each
round. Tasks:

- `niah_single`: one needle "The special magic number for {key} is: {value}." (number or UUID
  value) among distractors; asked for that key.
- `niah_multikey`: several needles with different keys; asked for one of them.
- `niah_multivalue`: one key with several values in different documents; asked for all of them.
- `niah_multiquery`: several needles; asked for two or three keys at once.
- `two_hop`: "{person} works at {company}." and "{company} is located in {city}.": asked where the
  company {person} works for is located. The question never names the company, so the second
  document can only be found after reading the first: what memory interleave is for.

A training aid, not an evaluation task (`TRAINING_TASKS`):
- `quote`: asked to quote the document that mentions a person; the answer is that document's
  whole text. Every answer token is a copy from the text read in the round before, so it trains
  the copying that the needle tasks need, about ten times more densely than they do.

Document ids: by default 0..N-1, as a fresh store allocates them. With `id_digits` = d > 0 each
document gets a distinct random id of 1 to d digits (the digit count drawn uniformly, then the
value), as in a large memory, so that a model trained on them has to read an id from memory
rather than count to N.

Determinism: an example depends only on (task, split, seed, index), never on a global RNG.
Train and evaluation never share an entity or a value: every drawn key, name, company, city,
number and UUID falls in its split's hash bucket (`in_split`), and is redrawn otherwise.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["TASKS", "TRAINING_TASKS", "SPLITS", "Document", "TaskExample", "make_example", "in_split", "filler_texts"]

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "two_hop")  # what `msa eval` measures
TRAINING_TASKS = (*TASKS, "quote")  # what `msa train` can mix
SPLITS = ("train", "eval")
EVAL_BUCKETS = 2  # of 10 hash buckets; the other 8 are training's

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "x", "nd")
_COMPANY_TAILS = ("Works", "Labs", "Group", "Foundry", "Mills", "Systems", "Trading")
_THINGS = ("lantern", "bridge", "orchard", "library", "harbour", "tower", "garden", "market", "clock", "mill")
_ADJS = ("old", "quiet", "narrow", "bright", "crooked", "tall", "hidden", "painted", "wooden", "stone")
_COLORS = ("red", "green", "blue", "grey", "yellow", "white", "amber", "violet")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_FILLERS = (
    "{person} planted {n} {adj} trees beside the {thing} in {year}.",
    "The {adj} {thing} near {city} was painted {color} by {person}.",
    "{person} wrote a letter about the {adj} {thing} to {person2}.",
    "Every {day}, {person} walks {n} kilometres to the {thing} of {city}.",
    "In {year} the {thing} of {city} was rebuilt with {color} stone.",
    "{person} keeps {n} {color} notebooks about the {thing}.",
    "The {thing} at {city} opens at {hour} o'clock on {day}s.",
)


@dataclass(frozen=True)
class Document:
    doc_id: int
    text: str


@dataclass(frozen=True)
class TaskExample:
    """A haystack, a question and its answer. hops[r]: the ids to name in round r + 1."""

    task: str
    split: str
    documents: tuple[Document, ...]
    question: str
    answer: str
    hops: tuple[tuple[int, ...], ...]

    @property
    def gold(self) -> tuple[int, ...]:
        return tuple(sorted({d for hop in self.hops for d in hop}))


def in_split(value: str, split: str) -> bool:
    """Whether `value` belongs to `split`: a fixed hash bucket, so the splits can never share it."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    bucket = hashlib.sha256(value.encode()).digest()[0] % 10
    return (bucket < EVAL_BUCKETS) == (split == "eval")


class _Drawer:
    """Draws split-respecting, never-repeated values for one example."""

    def __init__(self, rng: random.Random, split: str):
        self.rng, self.split, self.used = rng, split, set[str]()

    def draw(self, make: Callable[[random.Random], str]) -> str:
        for _ in range(1000):
            value = make(self.rng)
            if value not in self.used and in_split(value, self.split):
                self.used.add(value)
                return value
        raise RuntimeError("could not draw a fresh value in 1000 tries")  # pragma: no cover - pools are huge

    def word(self) -> str:
        return self.draw(_word)

    def person(self) -> str:
        return f"{self.word()} {self.word()}"  # each word in the split, so no name part is shared

    def company(self) -> str:
        return f"{self.word()} {self.rng.choice(_COMPANY_TAILS)}"

    def value(self, kind: str) -> str:
        if kind == "number":
            return self.draw(lambda r: str(r.randrange(1_000_000, 10_000_000)))
        return self.draw(_uuid)


def _word(rng: random.Random) -> str:
    syllables = rng.randint(2, 3)
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


def _uuid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:]}"


def _filler(d: _Drawer, person: str | None = None) -> str:
    """A filler sentence; with `person`, one that mentions that person."""
    r = d.rng
    templates = _FILLERS if person is None else [f for f in _FILLERS if f.startswith("{person}") or " by {person}" in f]
    return r.choice(templates).format(
        person=person or d.person(), person2=d.person(), city=d.word(), n=r.randint(2, 99), hour=r.randint(1, 12), adj=r.choice(_ADJS),
        thing=r.choice(_THINGS), color=r.choice(_COLORS), day=r.choice(_DAYS), year=r.randint(1800, 2020),
    )  # fmt: skip


def filler_texts(seed: int, split: str) -> Iterator[str]:
    """An endless stream of distinct filler documents of `split` (a background haystack), seeded."""
    d = _Drawer(random.Random(f"haystack/{split}/{seed}"), split)
    seen: set[str] = set()
    while True:
        text = _filler(d)
        if text not in seen:
            seen.add(text)
            yield text
        if len(d.used) > 4_000_000:  # keep the drawer's memory bounded; texts stay distinct through `seen`
            d.used.clear()


def _needle(key: str, value: str, kind: str) -> str:
    return f"The special magic {'number' if kind == 'number' else 'uuid'} for {key} is: {value}."


def _doc_ids(rng: random.Random, num_docs: int, id_digits: int) -> list[int]:
    """Ids 0..N-1, or N distinct random ids of 1..id_digits digits (see the module docstring), ascending."""
    if id_digits == 0:
        return list(range(num_docs))
    if 10**id_digits < 2 * num_docs:
        raise ValueError(f"id_digits={id_digits} is too few for {num_docs} documents")
    ids: set[int] = set()
    while len(ids) < num_docs:
        digits = rng.randint(1, id_digits)
        ids.add(rng.randrange(0 if digits == 1 else 10 ** (digits - 1), 10**digits))
    return sorted(ids)


def _assemble(d: _Drawer, task: str, facts: list[str], num_docs: int, id_digits: int) -> tuple[tuple[Document, ...], list[int]]:
    """Place the fact documents at random slots among distinct fillers; returns docs and the facts' ids."""
    if num_docs < len(facts):
        raise ValueError(f"{task} needs at least {len(facts)} documents, got num_docs={num_docs}")
    texts = set(facts)
    fillers: list[str] = []
    while len(fillers) < num_docs - len(facts):
        t = _filler(d)
        if t not in texts:
            texts.add(t)
            fillers.append(t)
    slots = d.rng.sample(range(num_docs), len(facts))
    body: list[str | None] = [None] * num_docs
    for slot, fact in zip(slots, facts):
        body[slot] = fact
    it = iter(fillers)
    ids = _doc_ids(d.rng, num_docs, id_digits)
    docs = tuple(Document(ids[i], t if t is not None else next(it)) for i, t in enumerate(body))
    return docs, [ids[s] for s in slots]


def make_example(task: str, split: str, seed: int, index: int, num_docs: int = 16, id_digits: int = 0) -> TaskExample:
    """The example `index` of `task` in `split` for `seed`; the same arguments give the same example."""
    if task not in TRAINING_TASKS:
        raise ValueError(f"task must be one of {TRAINING_TASKS}, got {task!r}")
    if not 0 <= id_digits <= 12:
        raise ValueError(f"id_digits must be in [0, 12], got {id_digits}")
    rng = random.Random(f"{task}/{split}/{seed}/{index}")
    d = _Drawer(rng, split)
    if task == "two_hop":
        return _two_hop(d, split, num_docs, id_digits)
    if task == "quote":
        person = d.person()
        fact = _filler(d, person)
        docs, ids = _assemble(d, task, [fact], num_docs, id_digits)
        return TaskExample(task, split, docs, f"Quote the document that mentions {person}.", fact, ((ids[0],),))
    kind = rng.choice(("number", "uuid"))
    noun = "number" if kind == "number" else "uuid"
    if task == "niah_multivalue":
        key, values = d.word(), [d.value(kind) for _ in range(rng.randint(2, 3))]
        docs, ids = _assemble(d, task, [_needle(key, v, kind) for v in values], num_docs, id_digits)
        ordered = [v for _, v in sorted(zip(ids, values))]
        q = f"What are all the special magic {noun}s for {key}?"
        return TaskExample(task, split, docs, q, ", ".join(ordered), (tuple(sorted(ids)),))
    n_keys = 1 if task == "niah_single" else rng.randint(2, 4)
    keys, values = [d.word() for _ in range(n_keys)], [d.value(kind) for _ in range(n_keys)]
    docs, ids = _assemble(d, task, [_needle(k, v, kind) for k, v in zip(keys, values)], num_docs, id_digits)
    asked = list(range(min(n_keys, rng.randint(2, 3)))) if task == "niah_multiquery" else [0]
    q = f"What is the special magic {noun} for {' and '.join(keys[i] for i in asked)}?"
    answer = ", ".join(values[i] for i in asked)
    return TaskExample(task, split, docs, q, answer, (tuple(sorted(ids[i] for i in asked)),))


def _two_hop(d: _Drawer, split: str, num_docs: int, id_digits: int) -> TaskExample:
    """Person -> company -> city, with distractor pairs so that neither hop is guessable."""
    pairs = max(1, min(3, (num_docs - 2) // 4))
    people = [d.person() for _ in range(pairs + 1)]
    companies = [d.company() for _ in range(pairs + 1)]
    cities = [d.word() for _ in range(pairs + 1)]
    facts = [f"{p} works at {c}." for p, c in zip(people, companies)]
    facts += [f"{c} is located in {city}." for c, city in zip(companies, cities)]
    docs, ids = _assemble(d, "two_hop", facts, num_docs, id_digits)
    first, second = ids[0], ids[pairs + 1]
    q = f"In which city is the company that {people[0]} works for located?"
    return TaskExample("two_hop", split, docs, q, cities[0], ((first,), (second,)))
