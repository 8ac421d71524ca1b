"""Task examples -> teacher-forced training examples, written with the protocol module only.

Interleave mode splits a retrieval chain into one turn per step (digest 2.8): turn r is the
transcript the interleave loop would prefill in round r (question, ids named so far, texts read,
routing on the question plus the newest texts), with the ids of hop r as its target and as the
routing loss's positives. Documents read in earlier rounds are left out of that turn's routing
loss: the routing query quotes their text, so ranking them below the next hop is not asked. The last
turn reads everything and targets `<End-of-Retrieve>` and the answer, with the question block
in between as context. One-round mode is the baseline: one turn that feeds `<End-of-Retrieve>`
and the question block straight after the prompt and targets the answer only.
"""

from __future__ import annotations

from typing import Literal

from msa_cluster.model import protocol as P
from msa_cluster.model.protocol import Codec
from msa_cluster.model.trainable import Example, Turn
from msa_cluster.training.tasks import TaskExample

__all__ = ["render", "Mode"]

Mode = Literal["interleave", "one_round"]


def _turn(tr: P.Transcript, targets: list[tuple[list[int], bool]], positives: tuple[int, ...], read: tuple[int, ...] = ()) -> Turn:
    """The transcript followed by target pieces (ids, is_target); the transcript itself is context."""
    ids, routing, target = list(tr.ids), list(tr.routing), [False] * len(tr)
    for piece, is_target in targets:
        ids += piece
        routing += [False] * len(piece)
        target += [is_target] * len(piece)
    return Turn(ids, routing, target, positives, ignored=tuple(d for d in read if d not in positives))


def render(example: TaskExample, codec: Codec, mode: Mode = "interleave", question_block_target: bool = False) -> Example:
    """The training example of `example`: its documents encoded, and one turn per retrieval step.

    `question_block_target` makes the question block a target too. Inference feeds it, so the model
    never has to write it; predicting it anyway (it repeats the question) is copying on every example.
    """
    docs = [P.encode_document(codec, d.doc_id, d.text) for d in example.documents]
    doc_ids = [d.doc_id for d in example.documents]
    texts = {d.doc_id: d.text for d in example.documents}
    tr = P.first_prompt(codec, example.question)
    question_mask = list(tr.routing)
    eor, block = P.end_of_retrieve(codec), P.question_block(codec, example.question)
    answer = P.answer_output(codec, example.answer)
    if mode == "one_round":
        turn = _turn(tr, [(eor, False), (block, question_block_target), (answer, True)], example.gold)
        return Example(docs, doc_ids, [turn])
    if mode != "interleave":
        raise ValueError(f"mode must be 'interleave' or 'one_round', got {mode!r}")
    turns: list[Turn] = []
    read: tuple[int, ...] = ()
    for hop in example.hops:
        named = P.retrieval_output(codec, hop)
        turns.append(_turn(tr, [(named, True)], hop, read))
        read += tuple(sorted(hop))
        tr.add(named)
        tr.routing = question_mask + [False] * (len(tr) - len(question_mask))
        for doc_id in sorted(hop):
            tr.add(P.read_text(codec, doc_id, texts[doc_id]), routing=True)
        tr.add([codec.token_id(P.DOC_END)])
    turns.append(_turn(tr, [(eor, True), (block, question_block_target), (answer, True)], example.hops[-1], read))
    return Example(docs, doc_ids, turns)
