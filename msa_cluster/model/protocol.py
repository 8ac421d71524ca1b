"""The MSA protocol in one place: special tokens, the document wrapper, the chat template and
the memory-interleave formats (digest 3 and 6). Nothing else in the package spells them.

    >>> from msa_cluster.model.tokenizer import ByteTokenizer
    >>> codec = ByteTokenizer()
    >>> codec.decode(encode_document(codec, 4, "Erik is the son of Bill."))
    '<|im_start|>[4]. Erik is the son of Bill.[4]<|im_end|>'
    >>> prompt = first_prompt(codec, "Who is <|im_start|> Erik's father?")
    >>> prompt.ids[:3] == template_head(codec) and not any(prompt.routing[:3])
    True
    >>> codec.token_id(IM_START) in prompt.ids[3:-3]     # the string in the question stays text
    False
    >>> codec.decode(retrieval_output(codec, [4, 3])), parse_doc_ids("[4][3]<|object_ref_end|>")
    ('[4][3]<|object_ref_end|>', [3, 4])

Protocol tokens are only ever produced here, by id (`Codec.token_id`); every piece of user or
document text goes through `Codec.encode`, which never turns text into a protocol token. So a
document that contains the string `<|im_start|>` is read as those characters, not as a turn.

Layout of one interleave transcript (R = routing-query tokens, others are context):

    <|im_start|> user \\n                                   template head (3 tokens, never routes)
    \\nPlease answer ... information\\n\\n{question}\\n        R (the question)
    Please return all documents related to the question\\n   R
    <|im_end|> \\n <|im_start|>                               response head
    [4]<|object_ref_end|>                                     round 1 output: named ids
    [4]. {text of 4}\\n <|object_ref_end|>                    texts read (R in the next round only)
    ... more rounds ...
    <End-of-Retrieve> <|im_start|>The user's question is: {question}\\n<|object_ref_end|>
    The answer to the question is: {answer}<|im_end|>
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = [
    "ANSWER_PREFIX",
    "DOC_END",
    "END_OF_RETRIEVE",
    "ENDOFTEXT",
    "IM_END",
    "IM_START",
    "INSTRUCTION",
    "QUESTION_HEAD",
    "RETURN_DOCS",
    "SPECIAL_TOKENS",
    "USER",
    "Codec",
    "Transcript",
    "answer_output",
    "encode_document",
    "encode_documents",
    "end_of_retrieve",
    "extract_answer",
    "first_prompt",
    "parse_doc_ids",
    "names_only",
    "question_block",
    "read_text",
    "retrieval_output",
    "template_head",
    "wrap_document",
]

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DOC_END = "<|object_ref_end|>"  # closes a round's named ids and the texts read after them
END_OF_RETRIEVE = "<End-of-Retrieve>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, DOC_END, END_OF_RETRIEVE)
USER = "user"  # one token in every supported vocabulary, so the template head is 3 tokens

INSTRUCTION = "\nPlease answer the question based on the above historical document information\n\n"
RETURN_DOCS = "Please return all documents related to the question\n"
QUESTION_HEAD = "The user's question is: "
ANSWER_PREFIX = "The answer to the question is:"
_DOC_ID = re.compile(r"\[(\d+)\]")


@runtime_checkable
class Codec(Protocol):
    """Text <-> token ids. `encode` is plain text only: it never yields a protocol token."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, every character read as text (special-token strings included)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids, protocol tokens rendered as their strings."""
        ...

    def token_id(self, token: str) -> int:
        """Id of a protocol token, or of a word the vocabulary holds whole; KeyError otherwise."""
        ...


@dataclass
class Transcript:
    """Token ids with a routing flag per token (True: a routing-query token)."""

    ids: list[int] = field(default_factory=list)
    routing: list[bool] = field(default_factory=list)

    def add(self, ids: Iterable[int], routing: bool = False) -> Transcript:
        new = list(ids)
        self.ids += new
        self.routing += [routing] * len(new)
        return self

    def __len__(self) -> int:
        return len(self.ids)


def wrap_document(doc_id: int, text: str) -> str:
    """The wrapped text of memory document `doc_id`, for display: `<|im_start|>[i]. text[i]<|im_end|>`."""
    return f"{IM_START}[{_check_id(doc_id)}]. {text}[{doc_id}]{IM_END}"


def encode_document(codec: Codec, doc_id: int, text: str) -> list[int]:
    """Token ids of a memory document: the id at both ends, so the model can read and name it."""
    return encode_documents(codec, [doc_id], [text])[0]


def encode_documents(codec: Codec, doc_ids: Sequence[int], texts: Sequence[str]) -> list[list[int]]:
    """`encode_document` of each (id, text), in one parallel call where the codec has `encode_batch`."""
    bodies = [f"[{_check_id(i)}]. {t}[{i}]" for i, t in zip(doc_ids, texts, strict=True)]
    batch = getattr(codec, "encode_batch", None)
    encoded = batch(bodies) if batch is not None else [codec.encode(b) for b in bodies]
    start, end = codec.token_id(IM_START), codec.token_id(IM_END)
    return [[start, *body, end] for body in encoded]


def template_head(codec: Codec) -> list[int]:
    """`<|im_start|>user\\n`: the 3 template-head tokens every prompt starts with."""
    return [codec.token_id(IM_START), codec.token_id(USER), *codec.encode("\n")]


def first_prompt(codec: Codec, question: str) -> Transcript:
    """Round 1: template head, the question (routing), then the response head."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    tr = Transcript().add(template_head(codec))
    tr.add(codec.encode(INSTRUCTION + question + "\n" + RETURN_DOCS), routing=True)
    tail = [codec.token_id(IM_END), *codec.encode("\n"), codec.token_id(IM_START)]
    return tr.add(tail)


def retrieval_output(codec: Codec, doc_ids: Sequence[int]) -> list[int]:
    """What the model emits to name documents in a round: `[i][j]<|object_ref_end|>`."""
    named = "".join(f"[{_check_id(i)}]" for i in doc_ids)
    return [*codec.encode(named), codec.token_id(DOC_END)]


def read_text(codec: Codec, doc_id: int, text: str) -> list[int]:
    """One document's raw text as appended after a round: `[i]. text\\n` (closed by `document_ids` caller)."""
    return codec.encode(f"[{_check_id(doc_id)}]. {text}\n")


def question_block(codec: Codec, question: str) -> list[int]:
    """Fed after `<End-of-Retrieve>`: `<|im_start|>The user's question is: {q}\\n<|object_ref_end|>`."""
    return [codec.token_id(IM_START), *codec.encode(f"{QUESTION_HEAD}{question}\n"), codec.token_id(DOC_END)]


def answer_output(codec: Codec, answer: str) -> list[int]:
    """What the model emits to answer: `The answer to the question is: {a}<|im_end|>`."""
    return [*codec.encode(f"{ANSWER_PREFIX} {answer}"), codec.token_id(IM_END)]


def parse_doc_ids(text: str) -> list[int]:
    """Ids named in a round's output (`[i]`), deduplicated and sorted, as the reference does."""
    return sorted({int(m) for m in _DOC_ID.findall(text)})


def names_only(text: str, allowed: Collection[str]) -> bool:
    """Whether `text` is, or can still grow into, `[i][j]...` naming distinct ids of `allowed` (decimal strings).

    The grammar of a retrieval round's output before its `<|object_ref_end|>`: what the
    routed-ids constraint of memory interleave keeps the model to.
    """
    pos, n, named = 0, len(text), set()
    while pos < n:
        if text[pos] != "[":
            return False
        end = text.find("]", pos + 1)
        digits = text[pos + 1 : n if end < 0 else end]
        if not digits.isdigit() and digits != "":
            return False
        if end < 0:  # an id still being written: a prefix of an allowed one not named yet
            return any(a.startswith(digits) for a in allowed if a not in named)
        if digits not in allowed or digits in named:
            return False
        named.add(digits)
        pos = end + 1
    return True


def end_of_retrieve(codec: Codec) -> list[int]:
    """`<End-of-Retrieve>` as ids: one token where the vocabulary has it, else its text pieces
    (a vocabulary without it, like Qwen3's, can still emit the string, as in the reference)."""
    try:
        return [codec.token_id(END_OF_RETRIEVE)]
    except KeyError:
        return codec.encode(END_OF_RETRIEVE)


def extract_answer(text: str) -> str:
    """The answer inside a model's final output: after the first answer prefix, up to `<|im_end|>`.

    The first, not the last, so that a streamed answer (text after the prefix as it grows) is always
    a prefix of the final one."""
    if ANSWER_PREFIX in text:
        text = text.split(ANSWER_PREFIX, 1)[1]
    return text.split(IM_END, 1)[0].strip()


def _check_id(doc_id: int) -> int:
    if isinstance(doc_id, bool) or not isinstance(doc_id, int) or doc_id < 0:
        raise ValueError(f"document ids are non-negative ints, got {doc_id!r}")
    return doc_id
