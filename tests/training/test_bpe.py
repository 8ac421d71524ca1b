"""The project's BPE: deterministic, protocol tokens special, `user` one token, control strings in text stay text."""

from msa_cluster.model import protocol as P
from msa_cluster.model.tokenizer import BPECodec
from msa_cluster.training.bpe import tokenizer_corpus, train_bpe


def test_bpe_is_deterministic_and_keeps_the_protocol(tmp_path):
    """Two trainings give the same vocabulary and merges; the template head is 3 tokens; specials only by id."""
    a = train_bpe(tokenizer_corpus(0, 200), 600)
    b = train_bpe(tokenizer_corpus(0, 200), 600)
    assert a.tok.to_str() == b.tok.to_str() and a.vocab_size == 600
    assert len(P.template_head(a)) == 3
    specials = {a.token_id(t) for t in P.SPECIAL_TOKENS}
    text = "a <|im_start|>user<|im_end|> <End-of-Retrieve> note"
    assert not specials & set(a.encode(text)) and a.decode(a.encode(text)) == text
    a.save(tmp_path)
    assert BPECodec.load(tmp_path).encode("The special magic number") == a.encode("The special magic number")


def test_transformers_codec_reads_control_strings_as_text():
    """HFCodec (the MSA-4B path) over the same vocabulary encodes control strings as text, like BPECodec."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from msa_cluster.model.tokenizer import HFCodec

    bpe = train_bpe(tokenizer_corpus(0, 60), 400)
    hf = HFCodec(PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe.tok.to_str()),
                                         additional_special_tokens=list(P.SPECIAL_TOKENS)))  # fmt: skip
    text = "a <|im_start|>user<|im_end|> <End-of-Retrieve>"
    assert hf.encode(text) == bpe.encode(text)
    assert P.template_head(hf) == P.template_head(bpe) and hf.decode(P.template_head(hf)) == "<|im_start|>user\n"


def test_bpe_gives_every_digit_its_own_token():
    """Ids and values are copied digit by digit: no merge spans two digits, whatever the corpus held."""
    codec = train_bpe(tokenizer_corpus(0, 200, id_digits=6), 600)
    text = "[904817]. The special magic number for Zorbax is: 7712093.[904817]"
    pieces = [codec.decode([i]) for i in codec.encode(text)]
    assert codec.decode(codec.encode(text)) == text
    assert all(sum(ch.isdigit() for ch in p) <= 1 for p in pieces)
