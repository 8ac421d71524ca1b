"""Synthetic memory tasks: seeded, distinct haystacks, gold documents that hold the answer,
two-hop chains that need the first document, and train/eval splits that share no value."""

import re

import pytest

from msa_cluster.model import protocol as P
from msa_cluster.model.tokenizer import ByteTokenizer
from msa_cluster.training.render import render
from msa_cluster.training.tasks import TASKS, TRAINING_TASKS, in_split, make_example

TOK = ByteTokenizer()


@pytest.mark.parametrize("task", TRAINING_TASKS)
def test_examples_are_seeded_distinct_and_answerable(task):
    """Same (task, split, seed, index) -> same example; ids 0..N-1; no repeated document; gold docs hold the answer."""
    for i in range(20):
        ex = make_example(task, "train", 7, i, num_docs=12)
        assert ex == make_example(task, "train", 7, i, num_docs=12)
        assert [d.doc_id for d in ex.documents] == list(range(12))
        assert len({d.text for d in ex.documents}) == 12
        gold_text = " ".join(ex.documents[d].text for d in ex.gold)
        assert all(part in gold_text for part in ex.answer.split(", "))
    assert make_example(task, "train", 7, 0) != make_example(task, "train", 8, 0)


@pytest.mark.parametrize("task", TRAINING_TASKS)
def test_random_ids_are_distinct_ascending_and_keep_the_gold_documents(task):
    """id_digits=d: distinct ids of 1..d digits, ascending, short and long ones; the hops name the documents that hold the answer."""
    lengths = set()
    for i in range(20):
        ex = make_example(task, "train", 3, i, num_docs=16, id_digits=6)
        assert ex == make_example(task, "train", 3, i, num_docs=16, id_digits=6)
        ids = [d.doc_id for d in ex.documents]
        assert ids == sorted(set(ids)) and len(ids) == 16 and all(0 <= d < 10**6 for d in ids)
        lengths.update(len(str(d)) for d in ids)
        texts = {d.doc_id: d.text for d in ex.documents}
        assert all(part in " ".join(texts[d] for d in ex.gold) for part in ex.answer.split(", "))
        plain = make_example(task, "train", 3, i, num_docs=16)
        assert [d.text for d in ex.documents] == [d.text for d in plain.documents]  # same haystack, other ids
    assert lengths == {1, 2, 3, 4, 5, 6}
    with pytest.raises(ValueError, match="id_digits"):
        make_example(task, "train", 0, 0, num_docs=64, id_digits=1)
    with pytest.raises(ValueError, match="id_digits"):
        make_example(task, "train", 0, 0, id_digits=-1)


def test_quote_answers_with_the_whole_text_of_the_one_document_naming_the_person():
    """`quote`: one hop to the only document that mentions the asked person; the answer is its whole text."""
    for i in range(30):
        ex = make_example("quote", "eval", 5, i, num_docs=16, id_digits=6)
        person = re.fullmatch(r"Quote the document that mentions (\w+ \w+)\.", ex.question).group(1)
        holders = [d.doc_id for d in ex.documents if person in d.text]
        assert ex.hops == ((holders[0],),) and len(holders) == 1
        assert ex.answer == next(d.text for d in ex.documents if d.doc_id == holders[0])
    assert "quote" not in TASKS  # a training aid: `msa eval` measures the RULER tasks and two_hop only


def test_two_hop_second_document_is_only_reachable_through_the_first():
    """The question names the person only; the first hop names the company, which the second hop's document holds."""
    for i in range(20):
        ex = make_example("two_hop", "train", 0, i)
        (first,), (second,) = ex.hops
        company = re.match(r".* works at (.*)\.$", ex.documents[first].text).group(1)
        assert company not in ex.question and ex.documents[second].text == f"{company} is located in {ex.answer}."


def _values(ex):
    words = set()
    for d in ex.documents:
        words.update(re.findall(r"[A-Z][a-z]+|[0-9a-f-]{36}|\d{7}", d.text))
    return words | {ex.answer}


def test_train_and_eval_never_share_entities_or_values():
    """Names, keys, numbers and UUIDs of eval examples never appear in training examples, and sit in their bucket."""
    train = set().union(*(_values(make_example(t, "train", 0, i)) for t in TASKS for i in range(30)))
    evals = [make_example(t, "eval", 0, i) for t in TASKS for i in range(30)]
    for ex in evals:
        assert in_split(ex.answer.split(", ")[0], "eval")
    common = train & set().union(*(_values(ex) for ex in evals))
    stop = {"The", "In", "Every", "Mondays", "Tuesdays", "Wednesdays", "Thursdays", "Fridays", "Saturdays", "Sundays",
            "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "Works", "Labs", "Group",
            "Foundry", "Mills", "Systems", "Trading"}  # fmt: skip
    assert common <= stop


def test_bad_arguments_are_value_errors():
    """Unknown tasks and splits, and too few documents, name the bad value."""
    with pytest.raises(ValueError, match="niah_x"):
        make_example("niah_x", "train", 0, 0)
    with pytest.raises(ValueError, match="dev"):
        make_example("niah_single", "dev", 0, 0)
    with pytest.raises(ValueError, match="num_docs"):
        make_example("two_hop", "train", 0, 0, num_docs=2)


def test_rendered_turns_follow_the_interleave_protocol():
    """Turn r targets hop r's ids; the last targets <End-of-Retrieve> and the answer; one-round targets the answer only."""
    ex = make_example("two_hop", "train", 0, 1)
    turns = render(ex, TOK).turns
    assert len(turns) == 3
    targets = [TOK.decode([i for i, t in zip(tr.ids, tr.target) if t]) for tr in turns]
    assert targets == [f"[{ex.hops[0][0]}]<|object_ref_end|>", f"[{ex.hops[1][0]}]<|object_ref_end|>",
                       f"<End-of-Retrieve>The answer to the question is: {ex.answer}<|im_end|>"]  # fmt: skip
    routed = TOK.decode([i for i, r in zip(turns[1].ids, turns[1].routing) if r])
    assert routed.endswith(f"[{ex.hops[0][0]}]. {ex.documents[ex.hops[0][0]].text}\n")
    assert turns[0].positives == ex.hops[0] and turns[2].positives == ex.hops[1]
    assert [t.ignored for t in turns] == [(), ex.hops[0], ex.hops[0]]  # the read first hop is quoted, not a negative
    (one,) = render(ex, TOK, "one_round").turns
    assert TOK.decode([i for i, t in zip(one.ids, one.target) if t]) == f"The answer to the question is: {ex.answer}<|im_end|>"
    assert TOK.decode(one.ids).endswith(TOK.decode(P.question_block(TOK, ex.question) + P.answer_output(TOK, ex.answer)))


def test_question_block_target_adds_the_fed_question_block_to_the_targets():
    """With question_block_target the block inference feeds after <End-of-Retrieve> becomes a target, in both
    modes; the ids, the routing flags and the other targets are unchanged."""
    ex = make_example("niah_single", "train", 0, 3)
    block = TOK.decode(P.question_block(TOK, ex.question))
    for mode in ("interleave", "one_round"):
        plain, copy = render(ex, TOK, mode).turns, render(ex, TOK, mode, question_block_target=True).turns
        assert [t.ids for t in plain] == [t.ids for t in copy] and [t.routing for t in plain] == [t.routing for t in copy]
        assert [t.target for t in plain[:-1]] == [t.target for t in copy[:-1]]
        added = [i for i, a, b in zip(copy[-1].ids, plain[-1].target, copy[-1].target) if b and not a]
        assert TOK.decode(added) == block and block.startswith("<|im_start|>The user's question is:")
