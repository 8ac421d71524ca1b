"""BM25 (Okapi), the lexical retrieval baseline that MSA's router is compared with.

score(q, d) = sum over query terms t in d of idf(t) * f(t, d) * (k1 + 1) / (f(t, d) + k1 * (1 - b + b * |d| / avgdl)),
idf(t) = ln(1 + (N - n(t) + 0.5) / (n(t) + 0.5)). Terms are lower-cased words and numbers; a
query term counts once. Top-k orders by (score desc, index asc), like the router's selection.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

__all__ = ["BM25", "InvertedBM25", "terms"]

_TERM = re.compile(r"[0-9a-z]+(?:-[0-9a-z]+)*")


def terms(text: str) -> list[str]:
    """Lower-cased words, numbers and hyphenated ids (UUIDs stay whole)."""
    return _TERM.findall(text.lower())


class BM25:
    """An index over `docs` (document i has index i)."""

    def __init__(self, docs: Sequence[str], k1: float = 1.5, b: float = 0.75):
        if k1 < 0 or not 0 <= b <= 1:
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.k1, self.b = k1, b
        self.freqs = [Counter(terms(d)) for d in docs]
        self.lengths = [sum(f.values()) for f in self.freqs]
        self.avgdl = sum(self.lengths) / max(len(docs), 1)
        df = Counter(t for f in self.freqs for t in f)
        n = len(docs)
        self.idf = {t: math.log(1 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}

    def scores(self, query: str) -> list[float]:
        """BM25 score of every document for `query`."""
        q = set(terms(query))
        out = []
        for f, length in zip(self.freqs, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / max(self.avgdl, 1e-9))
            out.append(sum(self.idf[t] * f[t] * (self.k1 + 1) / (f[t] + norm) for t in q if t in f))
        return out

    def top_k(self, query: str, k: int) -> list[int]:
        """Indices of the k best documents, best first, ties to the lower index."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        s = self.scores(query)
        return sorted(range(len(s)), key=lambda i: (-s[i], i))[:k]


class InvertedBM25:
    """BM25 over a changing set of documents keyed by id, with the same formula and tie order as `BM25`.

    Postings per term, so a query costs the postings of its terms, not a pass over every document:
    what a memory of millions of documents needs. `add` and `remove` keep the statistics exact.
    """

    def __init__(self, k1: float = 1.5, b: float = 0.75):
        if k1 < 0 or not 0 <= b <= 1:
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.k1, self.b = k1, b
        self.postings: dict[str, dict[int, int]] = {}
        self.lengths: dict[int, int] = {}
        self.doc_terms: dict[int, tuple[str, ...]] = {}
        self.total = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def add(self, key: int, text: str) -> None:
        if key in self.lengths:
            raise ValueError(f"document {key} is already indexed")
        f = Counter(terms(text))
        for t, c in f.items():
            self.postings.setdefault(t, {})[key] = c
        self.lengths[key] = n = sum(f.values())
        self.doc_terms[key] = tuple(f)
        self.total += n

    def remove(self, key: int) -> None:
        if key not in self.lengths:
            raise KeyError(f"document {key} is not indexed")
        self.total -= self.lengths.pop(key)
        for t in self.doc_terms.pop(key):
            posting = self.postings[t]
            del posting[key]
            if not posting:
                del self.postings[t]

    def scores(self, query: str) -> dict[int, float]:
        """Scores of the documents that hold a query term (every other document scores 0)."""
        n = len(self.lengths)
        avgdl = self.total / max(n, 1)
        out: dict[int, float] = {}
        for t in set(terms(query)):
            posting = self.postings.get(t)
            if not posting:
                continue
            idf = math.log(1 + (n - len(posting) + 0.5) / (len(posting) + 0.5))
            for key, c in posting.items():
                norm = self.k1 * (1 - self.b + self.b * self.lengths[key] / max(avgdl, 1e-9))
                out[key] = out.get(key, 0.0) + idf * c * (self.k1 + 1) / (c + norm)
        return out

    def top_k(self, query: str, k: int) -> list[int]:
        """Keys of the k best documents, best first, ties to the lower key (documents without a query term last)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        s = self.scores(query)
        best = sorted(s, key=lambda i: (-s[i], i))[:k]
        if len(best) < k:
            best += sorted(i for i in self.lengths if i not in s)[: k - len(best)]
        return best
