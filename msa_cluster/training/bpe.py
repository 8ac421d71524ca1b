"""The project's tokenizer: a small byte-level BPE trained with `tokenizers` on the training split.

The protocol's tokens are added as special tokens; `user` must come out as one ordinary token so
that the template head `<|im_start|>user\\n` is exactly 3 tokens, so the corpus carries the
template's words and a check refuses a vocabulary without it. Training uses one thread and a
fixed corpus order: the same arguments give the same vocabulary and merges.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence

from msa_cluster.model import protocol as P
from msa_cluster.model.tokenizer import BPECodec
from msa_cluster.training.tasks import TASKS, make_example

__all__ = ["tokenizer_corpus", "train_bpe"]

log = logging.getLogger(__name__)


def tokenizer_corpus(seed: int, num_examples: int, num_docs: int = 16, tasks: Sequence[str] = TASKS,
                     id_digits: int = 0) -> Iterator[str]:  # fmt: skip
    """Texts of training-split examples (documents, questions, answers) and the protocol's plain words."""
    # `user` heads every prompt; weighted so that its merges come first at any vocabulary size.
    protocol_text = [P.USER + "\n"] * 20 + [P.INSTRUCTION, P.RETURN_DOCS, P.QUESTION_HEAD, P.ANSWER_PREFIX + " ", "[0]. [1][2]"]
    for i in range(num_examples):
        ex = make_example(tasks[i % len(tasks)], "train", seed, i, num_docs, id_digits)
        yield from (f"[{d.doc_id}]. {d.text}[{d.doc_id}]" for d in ex.documents)
        yield ex.question
        yield ex.answer
        yield from protocol_text


def train_bpe(texts: Iterator[str] | Sequence[str], vocab_size: int) -> BPECodec:
    """Train a byte-level BPE of `vocab_size` tokens (specials included) on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(P.SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be at least {256 + len(P.SPECIAL_TOKENS) + 1} (bytes + specials + 'user'), got {vocab_size}")
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one thread: merges tie-break the same way every run
    tok = Tokenizer(models.BPE())
    # One token per digit: ids and values are copied digit by digit, whatever their length.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(P.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    if tok.token_to_id(P.USER) is None:
        raise ValueError(f"a BPE of {vocab_size} tokens did not learn {P.USER!r} as one token; use a larger vocabulary")
    codec = BPECodec(tok)
    log.info("trained a BPE of %d tokens", codec.vocab_size)
    return codec
