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
