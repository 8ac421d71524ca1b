"""Training transcripts are exactly what inference prefills: a model scripted to emit the gold
outputs makes `answer_with_memory` prefill, round by round, the contexts `render` trains on."""

import pytest
import torch

from msa_cluster.model import InProcessMemory
from msa_cluster.model.interleave import InterleaveConfig, answer_with_memory
from msa_cluster.model.tokenizer import ByteTokenizer
from msa_cluster.training.render import render
from msa_cluster.training.tasks import make_example
from tests.model.helpers import make_model

TOK = ByteTokenizer()


class Script:
    """Forces the given token sequence, one token per generation step."""

    def __init__(self, tokens):
        self.tokens, self.i = tokens, 0

    def __call__(self, generated, logits):
        forced = torch.full_like(logits, -1e9)
        forced[self.tokens[min(self.i, len(self.tokens) - 1)]] = 0.0
        self.i += 1
        return forced


def _targets(turn):
    return [i for i, t in zip(turn.ids, turn.target) if t]


def _context(turn):
    n = turn.target.index(True)
    return turn.ids[:n], turn.routing[:n]


@pytest.mark.parametrize("task", ["two_hop", "niah_multivalue"])
def test_interleave_prefills_the_rendered_turns(task):
    """Round r's prompt and routing mask equal turn r's context; one-round mode feeds what one-round turns hold."""
    model = make_model(seed=5, chunk=16, top_k=3)
    ex = make_example(task, "train", 0, 2, num_docs=8)
    rendered = render(ex, TOK)
    memory = InProcessMemory.from_documents(model, rendered.documents, texts=[d.text for d in ex.documents])
    # The gold outputs in order: each hop's ids, then <End-of-Retrieve> and (after the fed question block) the answer.
    script = Script([t for turn in rendered.turns for t in _targets(turn)])
    res = answer_with_memory(model, TOK, memory, ex.question, InterleaveConfig(max_round_tokens=80, named_ids="free"), processor=script)
    assert res.finish_reason == "answered" and res.answer == ex.answer
    assert len(res.rounds) == len(rendered.turns)
    for rnd, turn in zip(res.rounds, rendered.turns):
        assert (rnd.prompt, rnd.routing_mask) == _context(turn)
    assert [c.doc_id for c in res.citations] == [d for hop in ex.hops for d in sorted(hop)]
    (one,) = render(ex, TOK, "one_round").turns
    res1 = answer_with_memory(model, TOK, memory, ex.question, InterleaveConfig(mode="one_round"), processor=Script(_targets(one)))
    assert res1.answer == ex.answer and res1.rounds[0].prompt == _context(one)[0][: len(res1.rounds[0].prompt)]
    assert res1.transcript == TOK.decode(one.ids[len(res1.rounds[0].prompt):])
