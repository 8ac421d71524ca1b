"""BM25 baseline: the textbook formula, and it finds single-hop needles but not two-hop second documents."""

import math

import pytest

from msa_cluster.training.bm25 import BM25
from msa_cluster.training.tasks import make_example


def test_bm25_matches_the_formula():
    """A hand-computed score on a 3-document corpus; absent terms score 0; ties go to the lower index."""
    docs = ["red fox red", "blue fox", "green owl"]
    bm = BM25(docs, k1=1.2, b=0.75)
    avgdl = 7 / 3
    idf_red = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))
    want = idf_red * 2 * 2.2 / (2 + 1.2 * (1 - 0.75 + 0.75 * 3 / avgdl))
    assert bm.scores("red")[0] == pytest.approx(want) and bm.scores("red")[1:] == [0.0, 0.0]
    assert bm.top_k("purple", 2) == [0, 1]
    with pytest.raises(ValueError, match="k must be"):
        bm.top_k("red", 0)


def test_bm25_finds_needles_but_not_the_second_hop():
    """On eval haystacks BM25 ranks the niah_single needle first, while the two-hop second document is not findable from the question."""
    hits_single = hits_second = 0
    for i in range(20):
        ex = make_example("niah_single", "eval", 0, i)
        hits_single += BM25([d.text for d in ex.documents]).top_k(ex.question, 1) == [ex.hops[0][0]]
        ex = make_example("two_hop", "eval", 0, i)
        hits_second += BM25([d.text for d in ex.documents]).top_k(ex.question, 1) == [ex.hops[1][0]]
    assert hits_single == 20 and hits_second == 0


def test_inverted_bm25_equals_bm25_through_adds_and_removes():
    """The posting-list index gives BM25's scores and top-k on the live documents after any adds and removes."""
    from msa_cluster.training.bm25 import InvertedBM25
    from msa_cluster.training.tasks import filler_texts

    texts = [t for t, _ in zip(filler_texts(0, "eval"), range(60))]
    ex = make_example("niah_multikey", "eval", 0, 3)
    inv = InvertedBM25()
    for i, t in enumerate(texts):
        inv.add(i, t)
    for d in ex.documents:
        inv.add(1000 + d.doc_id, d.text)
    for i in range(0, 60, 3):
        inv.remove(i)
    live = sorted(inv.lengths)
    ref = BM25([texts[i] if i < 1000 else ex.documents[i - 1000].text for i in live])
    want = {live[j]: s for j, s in enumerate(ref.scores(ex.question)) if s > 0}
    got = inv.scores(ex.question)
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k]) for k in want)
    assert inv.top_k(ex.question, 5) == [live[j] for j in ref.top_k(ex.question, 5)]
    assert inv.top_k(ex.question, 5)[0] == 1000 + ex.hops[0][0]
    with pytest.raises(ValueError, match="already"):
        inv.add(1, "again")
    with pytest.raises(KeyError, match="0"):
        inv.remove(0)
