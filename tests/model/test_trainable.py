"""Training path: losses as the paper defines them, gradients reach the router and the encoder,
the differentiable forward equals inference, and the routing loss learns a toy task."""

import math

import pytest
import torch

from msa_cluster.model import InProcessMemory
from msa_cluster.model.losses import MAIN, WARMUP, infonce_decouple, lm_loss, phase_weights, router_recall
from msa_cluster.model.trainable import Example, GraphMemory, Turn, training_forward
from tests.model.helpers import make_model

IM_START, IM_END, USER = 257, 258, 261  # ByteTokenizer ids


def _toy(seed: int, n_docs: int = 6) -> Example:
    """A haystack of random documents, each opening with a 4-token key; the question repeats one key."""
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randint(0, 256, (4,), generator=g).tolist() for _ in range(n_docs)]
    docs = [[IM_START, *k, *torch.randint(0, 256, (10,), generator=g).tolist(), IM_END] for k in keys]
    pos = int(torch.randint(0, n_docs, (1,), generator=g))
    ids = [IM_START, USER, 10, *keys[pos], IM_END, 10, IM_START, 91]
    routing = [False] * 3 + [True] * 4 + [False] * 4
    return Example(docs, list(range(n_docs)), [Turn(ids, routing, [False] * 10 + [True], (pos,))])


def test_infonce_decouple_matches_the_formula_and_positives_do_not_compete():
    """L = -mean_i log(e^{s_i/t} / (e^{s_i/t} + sum_neg e^{s_j/t})); a second positive leaves the first's term alone."""
    s = torch.tensor([0.3, -0.2, 0.5, 0.1])
    pos = torch.tensor([True, False, False, False])
    neg = sum(math.exp(x / 0.1) for x in (-0.2, 0.5, 0.1))
    want = -math.log(math.exp(3.0) / (math.exp(3.0) + neg))
    assert float(infonce_decouple(s, pos)) == pytest.approx(want, rel=1e-5)
    two = torch.tensor([True, False, False, True])
    neg2 = sum(math.exp(x / 0.1) for x in (-0.2, 0.5))
    want2 = 0.5 * (-math.log(math.exp(3.0) / (math.exp(3.0) + neg2)) - math.log(math.exp(1.0) / (math.exp(1.0) + neg2)))
    assert float(infonce_decouple(s, two)) == pytest.approx(want2, rel=1e-5)
    assert float(infonce_decouple(s, torch.zeros(4, dtype=torch.bool))) == 0.0
    with pytest.raises(ValueError, match="temperature"):
        infonce_decouple(s, pos, temperature=0.0)


def test_lm_loss_counts_targets_only_and_recall_normalises_by_min_p_k():
    """Only target tokens enter the LM loss; recall@k divides by min(|P|, k)."""
    logits = torch.randn(4, 7)
    ids = torch.tensor([1, 2, 3, 4])
    loss, n = lm_loss(logits, ids, torch.tensor([False, False, True, False]))
    assert n == 1 and float(loss) == pytest.approx(float(torch.nn.functional.cross_entropy(logits[1:2], ids[2:3])))
    with pytest.raises(ValueError, match="token 0"):
        lm_loss(logits, ids, torch.tensor([True, False, False, False]))
    rec = router_recall(torch.tensor([0.9, 0.8, 0.1, 0.7]), torch.tensor([False, True, True, False]), (1, 2, 4))
    assert rec == {1: 0.0, 2: 0.5, 4: 1.0}
    assert phase_weights(0, 2) == WARMUP and phase_weights(2, 2) == MAIN and WARMUP.aux > WARMUP.lm


def test_gradients_reach_router_attention_and_encoder():
    """Routing loss reaches both router projections; LM loss reaches attention and embeddings via encode and prefill."""
    model = make_model(seed=3, chunk=8, top_k=2, similarity="cosine").train()
    stats = training_forward(model, _toy(0))
    (stats.aux + stats.lm_sum).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in ("model.layers.2.self_attn.router_q_proj.0.weight", "model.layers.3.self_attn.router_k_proj.0.weight",
                 "model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight", "model.embed_tokens.weight"):
        assert grads[name] is not None and float(grads[name].abs().sum()) > 0, name


def test_training_forward_equals_inference():
    """run_prefill over a GraphMemory selects and scores like prefill over InProcessMemory of the same documents."""
    model = make_model(seed=4, chunk=8, top_k=2, similarity="cosine")
    ex = _toy(5)
    turn = ex.turns[0]
    ids, mask = torch.tensor([turn.ids]), torch.tensor([turn.routing])
    want = model.prefill(ids, InProcessMemory.from_documents(model, ex.documents), mask)
    graph = GraphMemory(model.encode_pooled(ex.documents), ex.doc_ids, model.routing_layers)
    got = model.run_prefill(ids, graph, mask)
    assert got.selected == want.selected
    for layer in want.scores:
        assert got.scores[layer] == pytest.approx(want.scores[layer], abs=1e-6)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    assert got.logits.requires_grad


def test_routing_loss_falls_on_a_toy_task():
    """Forty steps of routing-weighted training over eight key-lookup examples (seen five times each) cut the routing loss 10x."""
    torch.manual_seed(0)
    model = make_model(seed=0, chunk=8, top_k=2, similarity="cosine").train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        stats = training_forward(model, _toy(step % 8))
        loss = WARMUP.aux * stats.aux + WARMUP.lm * stats.lm_sum / max(stats.lm_count, 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(stats.aux.detach()))
    assert sum(losses[-8:]) / 8 < 0.1 * sum(losses[:8]) / 8


def test_ignored_documents_leave_the_routing_loss():
    """A document marked ignored (already read) is neither positive nor negative: the loss equals the loss without it."""
    model = make_model(seed=7, chunk=8, top_k=2, similarity="cosine", routing="3")  # one routing layer: scores do not depend on selections
    ex = _toy(9)
    turn = ex.turns[0]
    other = next(d for d in ex.doc_ids if d not in turn.positives)
    with_ignored = Example(ex.documents, ex.doc_ids, [Turn(turn.ids, turn.routing, turn.target, turn.positives, (other,))])
    keep = [i for i, d in enumerate(ex.doc_ids) if d != other]
    without = Example([ex.documents[i] for i in keep], [ex.doc_ids[i] for i in keep], [turn])
    with torch.no_grad():
        a, b = training_forward(model, with_ignored), training_forward(model, without)
    assert float(a.aux) == pytest.approx(float(b.aux), rel=1e-5)
