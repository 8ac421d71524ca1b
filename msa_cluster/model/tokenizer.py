"""Text <-> token ids: the codecs behind `protocol.Codec`.

Every codec's `encode` reads its input as plain text: protocol tokens come only from
`protocol`, by id. `ByteTokenizer` is the random tiny model's tokenizer: UTF-8 bytes plus the
protocol tokens and the word `user` (so the template head `<|im_start|>user\\n` is 3 tokens, as
in MSA-4B). `BPECodec` wraps a byte-level BPE trained by this project (`tokenizer.json`, see
`msa_cluster.training.bpe`). `HFCodec` wraps a transformers tokenizer (MSA-4B ships Qwen3's).
`load_codec` picks the one stored beside a checkpoint, found by path or by bundled name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from msa_cluster.model.protocol import SPECIAL_TOKENS as PROTOCOL_TOKENS
from msa_cluster.model.protocol import USER, Codec

__all__ = ["Codec", "ByteTokenizer", "BPECodec", "HFCodec", "load_codec", "SPECIAL_TOKENS"]

# The byte tokenizer's vocabulary after the 256 bytes; this order fixes the bundled checkpoint's ids.
SPECIAL_TOKENS = (*PROTOCOL_TOKENS, USER, "assistant")


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; the protocol tokens and words follow from 256. Lossless."""

    FILE = "msa_tokenizer.json"

    def __init__(self, special_tokens: Sequence[str] = SPECIAL_TOKENS):
        self.special = {tok: 256 + i for i, tok in enumerate(special_tokens)}
        self.inverse = {i: tok for tok, i in self.special.items()}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            if i not in self.inverse:
                raise ValueError(f"token id {i} is outside this tokenizer's vocabulary [0, {self.vocab_size})")
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
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


class BPECodec:
    """A `tokenizers` byte-level BPE (`tokenizer.json`) with the protocol tokens added as specials."""

    FILE = "tokenizer.json"

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.tok.encode_special_tokens = True  # special-token strings inside text stay text
        missing = [t for t in (*PROTOCOL_TOKENS, USER) if self.tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"the BPE vocabulary lacks the protocol tokens {missing}")

    @property
    def vocab_size(self) -> int:
        return int(self.tok.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, tokenized in parallel by the library's own threads."""
        return [list(e.ids) for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode([int(i) for i in ids], skip_special_tokens=False))

    def token_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise KeyError(f"{token!r} is not a single token in this vocabulary")
        return int(i)

    def save(self, directory: str | Path) -> None:
        self.tok.save(str(Path(directory, self.FILE)))

    @classmethod
    def load(cls, directory: str | Path) -> BPECodec:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(Path(directory, cls.FILE))))


class HFCodec:
    """A transformers tokenizer behind the Codec interface."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=False))

    def token_id(self, token: str) -> int:
        ids = list(self.tok.encode(token, add_special_tokens=False))
        if len(ids) != 1:
            raise KeyError(f"{token!r} is not a single token in this tokenizer")
        return int(ids[0])


def load_codec(name_or_path: str | Path) -> Codec:
    """The tokenizer stored beside a checkpoint (a directory, or the name of a bundled model)."""
    from msa_cluster.model.tiny import resolve_checkpoint

    directory = resolve_checkpoint(name_or_path)
    if (directory / ByteTokenizer.FILE).exists():
        return ByteTokenizer.load(directory)
    if (directory / BPECodec.FILE).exists() and not (directory / "tokenizer_config.json").exists():
        return BPECodec.load(directory)
    from transformers import AutoTokenizer

    return HFCodec(AutoTokenizer.from_pretrained(str(directory)))
