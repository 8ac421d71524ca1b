"""Memory interleave: ids parsed, raw texts appended, re-routing on question + newest texts, limits."""

import pytest
import torch

from msa_cluster.model import InProcessMemory
from msa_cluster.model import protocol as P
from msa_cluster.model.interleave import InterleaveConfig, answer_with_memory
from msa_cluster.model.tokenizer import ByteTokenizer
from tests.model.helpers import make_model

TOK = ByteTokenizer()
FREE = InterleaveConfig(named_ids="free")  # scripted ids that routing may not have selected
TEXTS = ["alpha facts", "bravo facts", "charlie facts", "delta facts", "echo facts"]


IDS = lambda *ids: P.retrieval_output(TOK, list(ids))  # noqa: E731
EOR = [TOK.token_id(P.END_OF_RETRIEVE)]
ANS = lambda a: P.answer_output(TOK, a)  # noqa: E731


class Script:
    """Forces a fixed token sequence, one token per generation step (a scripted model)."""

    def __init__(self, *parts: list[int]):
        self.tokens = [t for part in parts for t in part]
        self.i = 0

    def __call__(self, generated, logits):
        forced = torch.full_like(logits, -1e9)
        forced[self.tokens[min(self.i, len(self.tokens) - 1)]] = 0.0
        self.i += 1
        return forced


class Recorder:
    """Wraps a snapshot and records the routing masks of every retrieve call."""

    def __init__(self, snap):
        self.snap, self.version, self.tenant, self.masks = snap, snap.version, snap.tenant, []

    def retrieve(self, layer, query, top_k):
        self.masks.append(query.mask.clone())
        return self.snap.retrieve(layer, query, top_k)

    def texts(self, ids):
        return self.snap.texts(ids)

    def close(self):
        pass


@pytest.fixture(scope="module")
def model():
    return make_model(seed=41, chunk=64)


@pytest.fixture(scope="module")
def memory(model):
    docs = [P.encode_document(TOK, i, t) for i, t in enumerate(TEXTS)]
    return InProcessMemory.from_documents(model, docs, texts=TEXTS, tenants=["a", "a", "a", "b", "a"])


def test_two_hop_protocol(model, memory):
    """Round 1 names [2], round 2 names [0], then the answer: texts appended, routing on the newest texts."""
    script = Script(IDS(2), IDS(0), EOR, ANS("42"))
    rec = Recorder(memory.snapshot("a"))
    res = answer_with_memory(model, TOK, rec, "what is it?", InterleaveConfig(max_round_tokens=32, named_ids="routed"), processor=script)
    assert res.answer == "42" and res.finish_reason == "answered"
    assert [(c.doc_id, c.round) for c in res.citations] == [(2, 1), (0, 2)]
    assert [r.read for r in res.rounds] == [[2], [0], []]
    assert "[2]. charlie facts\n<|object_ref_end|>[0]<|object_ref_end|>[0]. alpha facts\n<|object_ref_end|>" in res.transcript
    assert "<|im_start|>The user's question is: what is it?\n<|object_ref_end|>The answer to the question is: 42" in res.transcript
    assert [r.routing_mask for r in res.rounds] == [m[0].tolist() for m in rec.masks[::2]]  # the trace is what routed
    assert res.rounds[1].prompt[: len(res.rounds[0].prompt)] == res.rounds[0].prompt
    # 3 prefills x 2 routing layers; round 2 routes on the question plus exactly the appended text of doc 2.
    assert len(rec.masks) == 6
    first, second, third = rec.masks[0][0], rec.masks[2][0], rec.masks[4][0]
    question_len = int(first.sum())
    assert int(second.sum()) == question_len + len(TOK.encode("[2]. charlie facts\n"))
    assert int(third.sum()) == question_len + len(TOK.encode("[0]. alpha facts\n"))
    assert torch.equal(second[: first.numel()] & first, first)  # the question stays routed


def test_other_tenant_and_unknown_ids_are_not_appended(model, memory):
    """Ids of another tenant's document (3) or of no document (99) are never appended or cited."""
    script = Script(IDS(3, 99, 1), EOR, ANS("x"))
    res = answer_with_memory(model, TOK, memory, "q", FREE, processor=script, tenant="a")  # free: a model may name any id
    assert res.rounds[0].named == [1, 3, 99] and res.rounds[0].read == [1]
    assert [c.doc_id for c in res.citations] == [1] and "delta" not in res.transcript


def test_routed_ids_only_lets_a_round_name_what_it_routed(model, memory):
    """named_ids='routed': a round can write only ids its routing layers selected: a model pushing for 99 and 3
    (no document, another tenant's) names routed documents instead, and closes the round after a whole id."""
    res = answer_with_memory(model, TOK, memory, "q", InterleaveConfig(max_rounds=1, named_ids="routed"),
                             processor=Script(IDS(99, 3), EOR, ANS("x")), tenant="a")  # fmt: skip
    first = res.rounds[0]
    routed = {d for ids in first.selected.values() for d in ids}
    assert first.named and set(first.named) <= routed and 3 not in first.named and 99 not in first.named
    assert first.generated.endswith("]" + P.DOC_END) and set(first.read) == set(first.named)
    assert P.names_only("[12][3", {"12", "34"}) and not P.names_only("[12][5", {"12", "34"}) and not P.names_only("[12]x", {"12"})
    assert not P.names_only("[12][12]", {"12", "34"}) and not P.names_only("[12][1", {"12", "34"})  # no id twice
    with pytest.raises(ValueError, match="named_ids"):
        InterleaveConfig(named_ids="any")  # type: ignore[arg-type]


class Eager:
    """A scripted model that opens `rounds` retrieval rounds, pushing for id 99 in each (the grammar decides
    what it can write), then answers "x"."""

    def __init__(self, rounds: int):
        self.rounds, self.done, self.tail = rounds, 0, EOR + ANS("x")

    def __call__(self, generated, logits):
        text = TOK.decode(list(generated))
        if self.done < self.rounds:
            want = TOK.token_id(P.DOC_END) if text.endswith("]") else TOK.encode("[" if not text else "9")[0]
            self.done += want == TOK.token_id(P.DOC_END)
        else:
            want = self.tail.pop(0) if self.tail else TOK.token_id(P.IM_END)
        forced = torch.full_like(logits, -1e9)
        forced[want] = 0.0
        return forced


def test_best_named_ids_reads_each_layers_best_unread_documents(model, memory):
    """named_ids='best': a round can name only each routing layer's best document not read before, so a
    model pushing for 99 reads the router's first choices, then the next best ones in the next round."""
    res = answer_with_memory(model, TOK, memory, "q", InterleaveConfig(max_rounds=2, named_ids="best"), processor=Eager(2), tenant="a")
    first, second = res.rounds[0], res.rounds[1]
    assert res.answer == "x" and first.read and set(first.read) <= {ids[0] for ids in first.selected.values()}
    unread = {next(d for d in ids if d not in first.read) for ids in second.selected.values()}
    assert second.read and set(second.read) <= unread and not set(second.read) & set(first.read)
    two = answer_with_memory(model, TOK, memory, "q", InterleaveConfig(max_rounds=1, named_ids="best", best_per_layer=2),
                             processor=Eager(1), tenant="a")  # fmt: skip
    assert two.rounds[0].read and set(two.rounds[0].read) <= {d for ids in two.rounds[0].selected.values() for d in ids[:2]}
    with pytest.raises(ValueError, match="best_per_layer"):
        InterleaveConfig(named_ids="best", best_per_layer=0)


def test_max_rounds_is_enforced(model, memory):
    """A model that names documents for ever is stopped after max_rounds and made to answer."""
    script = Script(*[IDS(1)] * 10)
    res = answer_with_memory(model, TOK, memory, "q", InterleaveConfig(max_rounds=2, max_answer_tokens=3), processor=script, tenant="a")
    assert res.finish_reason == "token_limit" and len(res.rounds) == 3  # the forced answer ran out of tokens
    assert [c.round for c in res.citations] == [1, 2]
    assert "<End-of-Retrieve><|im_start|>The user's question is: q" in res.transcript
    script = Script(*[IDS(1)] * 3, ANS("z"))
    res = answer_with_memory(model, TOK, memory, "q", InterleaveConfig(max_rounds=2), processor=script, tenant="a")
    assert res.finish_reason == "round_limit" and res.answer == "z"


def test_context_budget_is_enforced(model, memory):
    """Texts that would push the transcript past max_context_tokens are not appended."""
    script = Script(IDS(0, 1), EOR, ANS("x"))
    prompt_len = len(P.first_prompt(TOK, "q"))
    generated = len(IDS(0, 1))
    budget = prompt_len + generated + len(TOK.encode("[0]. alpha facts\n")) + 1  # room for doc 0 only
    res = answer_with_memory(model, TOK, memory, "q", InterleaveConfig(max_context_tokens=budget, named_ids="routed"), processor=script, tenant="a")
    assert res.rounds[0].read == [0]
    with pytest.raises(ValueError, match="max_context_tokens"):
        answer_with_memory(model, TOK, memory, "q", InterleaveConfig(max_context_tokens=10), processor=script)


def test_citations_carry_routing_scores():
    """A named document that routing selected cites its best score over layers; one it did not select cites None."""
    model = make_model(seed=41, chunk=64, top_k=1)
    docs = [P.encode_document(TOK, i, t) for i, t in enumerate(TEXTS)]
    memory = InProcessMemory.from_documents(model, docs, texts=TEXTS, tenants=["a", "a", "a", "b", "a"])
    probe = answer_with_memory(model, TOK, memory, "charlie?", processor=Script(IDS(0), EOR, ANS("y")), tenant="a")
    trace = probe.rounds[0]
    selected = {d for ids in trace.selected.values() for d in ids}
    tenant_a = {0, 1, 2, 4}
    assert selected and tenant_a - selected, "the fixture must select some of tenant a's documents and not others"
    hit, miss = min(selected), min(tenant_a - selected)
    best = max(s for layer, ids in trace.selected.items() for d, s in zip(ids, trace.scores[layer]) if d == hit)
    res = answer_with_memory(model, TOK, memory, "charlie?", FREE, processor=Script(IDS(hit, miss), EOR, ANS("y")), tenant="a")
    cited = {c.doc_id: c.score for c in res.citations}
    assert cited[hit] == best and cited[miss] is None


def test_plain_answer_without_retrieval(model, memory):
    """A model that answers straight away (EOS) returns its text as the answer."""
    res = answer_with_memory(model, TOK, memory, "q", processor=Script(TOK.encode("hello"), [TOK.token_id(P.IM_END)]))
    assert res.answer == "hello" and res.finish_reason == "answered" and res.citations == []


def test_token_limit_gives_no_answer(model, memory):
    """A round that runs out of tokens without ids or an answer ends with token_limit and an empty answer."""
    res = answer_with_memory(model, TOK, memory, "q", InterleaveConfig(max_round_tokens=4), processor=Script(TOK.encode("abcdefgh")))
    assert res.finish_reason == "token_limit" and res.answer == "" and res.rounds[0].generated == "abcd"


def test_one_round_mode_routes_once_and_reads_nothing(model, memory):
    """one_round: a single prefill, no text read, the answer generated straight from routed memory."""
    rec = Recorder(memory.snapshot("a"))
    res = answer_with_memory(model, TOK, rec, "q", InterleaveConfig(mode="one_round"), processor=Script(ANS("7")))
    assert res.answer == "7" and res.finish_reason == "answered" and len(res.rounds) == 1
    assert len(rec.masks) == len(model.config.routing_layers) and res.rounds[0].read == []
    assert res.transcript.startswith("<End-of-Retrieve><|im_start|>The user's question is: q\n<|object_ref_end|>")
    routed = {d for ids in res.rounds[0].selected.values() for d in ids}
    assert {c.doc_id for c in res.citations} == routed


def test_bad_settings(model, memory):
    """Empty questions and non-positive limits are rejected."""
    with pytest.raises(ValueError, match="empty"):
        answer_with_memory(model, TOK, memory, "  ")
    with pytest.raises(ValueError, match="max_rounds"):
        InterleaveConfig(max_rounds=0)
    with pytest.raises(ValueError, match="mode"):
        InterleaveConfig(mode="twice")


def test_answer_hook_streams_tokens_and_can_stop_early(model, memory):
    """on_answer sees the answer's tokens growing one at a time; returning True ends the answer there."""
    seen: list[list[int]] = []

    def hook(toks):
        seen.append(list(toks))
        return len(toks) >= 5

    res = answer_with_memory(model, TOK, memory, "q", processor=Script(IDS(0), EOR, ANS("hello world")), tenant="a",
                             on_answer=hook)
    assert [len(s) for s in seen] == [1, 2, 3, 4, 5] and all(a == b[: len(a)] for a, b in zip(seen, seen[1:]))
    assert res.finish_reason == "answered" and res.generated_tokens == len(IDS(0)) + len(EOR) + 5


def test_answer_sampling_is_seeded_and_retrieval_stays_greedy(model, memory):
    """The answer samples with a seed (reproducible, and different from greedy for some seed); rounds stay greedy."""
    from msa_cluster.model.interleave import AnswerSampling

    cfg = InterleaveConfig(mode="one_round", max_answer_tokens=12)
    greedy = answer_with_memory(model, TOK, memory, "q", cfg, tenant="a")
    runs = {seed: answer_with_memory(model, TOK, memory, "q", cfg, tenant="a", sampling=AnswerSampling(temperature=5.0, seed=seed))
            for seed in range(4)}
    again = answer_with_memory(model, TOK, memory, "q", cfg, tenant="a", sampling=AnswerSampling(temperature=5.0, seed=2))
    assert again.transcript == runs[2].transcript
    assert any(r.transcript != greedy.transcript for r in runs.values())
    assert all(r.rounds[0].selected == greedy.rounds[0].selected for r in runs.values())
    with pytest.raises(ValueError, match="top_p"):
        AnswerSampling(top_p=0)
