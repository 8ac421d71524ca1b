"""Text <-> token ids for the interleave loop and the CLI.

`Codec` is the small interface the model needs. `ByteTokenizer` is msa-tiny's tokenizer: UTF-8
bytes plus the few special tokens MSA's protocol uses, and the word `user` so that the template
head `<|im_start|>user\\n` is exactly 3 tokens as in MSA-4B. `HFCodec` wraps a transformers
tokenizer (MSA-4B ships Qwen3's), loaded from a local checkpoint directory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = ["Codec", "ByteTokenizer", "HFCodec", "load_codec", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_end|>",
    "<End-of-Retrieve>",
    "user",
    "assistant",
)


@runtime_checkable
class Codec(Protocol):
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings inside it become their ids."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids, special tokens kept as their strings."""
        ...

    def token_id(self, token: str) -> int:
        """Id of a single special token; KeyError if it is not one token."""
        ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; special tokens follow from 256. Lossless for any text."""

    FILE = "msa_tokenizer.json"

    def __init__(self, special_tokens: Sequence[str] = SPECIAL_TOKENS):
        self.special = {tok: 256 + i for i, tok in enumerate(special_tokens)}
        self.inverse = {i: tok for tok, i in self.special.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.special, key=len, reverse=True)) + ")")

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self.special:
                ids.append(self.special[part])
            elif part:
                ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if i not in self.inverse:
                raise ValueError(f"token id {i} is outside this tokenizer's vocabulary ({self.vocab_size})")
            out.append(self.inverse[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_id(self, token: str) -> int:
        return self.special[token]

    def save(self, directory: str | Path) -> None:
        Path(directory, self.FILE).write_text(json.dumps({"type": "bytes", "special_tokens": list(self.special)}, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> ByteTokenizer:
        data = json.loads(Path(directory, cls.FILE).read_text())
        if data.get("type") != "bytes":
            raise ValueError(f"{cls.FILE} in {directory} has type {data.get('type')!r}, expected 'bytes'")
        return cls(data["special_tokens"])


class HFCodec:
    """A transformers tokenizer behind the Codec interface."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        ids = self.encode(token)
        if len(ids) != 1:
            raise KeyError(f"{token!r} is not a single token in this tokenizer")
        return ids[0]


def load_codec(directory: str | Path) -> Codec:
    """The tokenizer stored beside a checkpoint: msa-tiny's byte tokenizer or a transformers one."""
    directory = Path(directory)
    if (directory / ByteTokenizer.FILE).exists():
        return ByteTokenizer.load(directory)
    from transformers import AutoTokenizer

    return HFCodec(AutoTokenizer.from_pretrained(str(directory)))
