"""End-to-end evaluation: a model emitting the gold outputs scores 1, one that answers at once scores 0."""

import pytest

from msa_cluster.model import protocol as P
from msa_cluster.model.tokenizer import ByteTokenizer
from msa_cluster.training.evaluate import evaluate_answers
from msa_cluster.training.render import render
from msa_cluster.training.tasks import make_example
from tests.model.helpers import make_model
from tests.training.test_train_serve_parity import Script

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def model():
    return make_model(seed=6, chunk=16, top_k=2)


def test_gold_outputs_score_one(model):
    """Scripted with its gold outputs, each example scores exact match 1 and citation recall 1; BM25 finds needles."""
    for task in ("niah_single", "two_hop"):
        ex = make_example(task, "eval", 1, 0, num_docs=6)
        gold = [i for turn in render(ex, TOK).turns for i, t in zip(turn.ids, turn.target) if t]
        scores = evaluate_answers(model, TOK, [ex], processor=Script(gold))
        assert scores[task].exact_match == 1.0 and scores[task].citation_recall == scores[task].citation_precision == 1.0
        assert scores["all"].finish == {"answered": 1} and 0.0 <= scores[task].router_recall <= 1.0
        assert scores[task].bm25_recall == (1.0 if task == "niah_single" else scores[task].bm25_recall)


def test_an_immediate_wrong_answer_scores_zero(model):
    """A model that says `nope<|im_end|>` at once: exact match 0, no citations, finish 'answered'."""
    exs = [make_example("niah_multikey", "eval", 1, i, num_docs=6) for i in range(2)]
    nope = TOK.encode("nope") + [TOK.token_id(P.IM_END)]
    scores = evaluate_answers(model, TOK, exs, processor=Script(nope))  # after the first example it forces <|im_end|>
    assert scores["all"].exact_match == 0.0 and scores["all"].citation_recall == 0.0
    assert scores["niah_multikey"].examples == 2 and scores["all"].finish == {"answered": 2}
