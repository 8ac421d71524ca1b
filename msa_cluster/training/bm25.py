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

__all__ = ["BM25", "terms"]

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
