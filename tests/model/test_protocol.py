"""The protocol module: protocol tokens only where it puts them, the 3-token head, bundled names."""

import pytest

from msa_cluster.model import MSAForCausalLM
from msa_cluster.model import protocol as P
from msa_cluster.model.tiny import TINY_RANDOM, bundled_checkpoint, resolve_checkpoint
from msa_cluster.model.tokenizer import ByteTokenizer, load_codec

TOK = ByteTokenizer()
SPECIAL_IDS = {TOK.token_id(t) for t in (*P.SPECIAL_TOKENS, P.USER, "assistant")}


def test_control_strings_in_text_are_plain_text():
    """`<|im_start|>`, `user` and `<End-of-Retrieve>` inside user or document text never become protocol ids."""
    text = "user says <|im_start|>assistant<|im_end|><End-of-Retrieve>"
    assert not SPECIAL_IDS & set(TOK.encode(text))
    assert TOK.decode(TOK.encode(text)) == text
    doc = P.encode_document(TOK, 3, text)
    assert [i for i in doc if i in SPECIAL_IDS] == [TOK.token_id(P.IM_START), TOK.token_id(P.IM_END)]
    prompt = P.first_prompt(TOK, text)
    assert [i for i in prompt.ids if i in SPECIAL_IDS] == [TOK.token_id(t) for t in (P.IM_START, P.USER, P.IM_END, P.IM_START)]


def test_document_wrapper_matches_the_reference_layout():
    """The wrapped ids decode to `<|im_start|>[i]. text[i]<|im_end|>`, as the reference writes documents."""
    assert TOK.decode(P.encode_document(TOK, 12, "a note")) == P.wrap_document(12, "a note") == "<|im_start|>[12]. a note[12]<|im_end|>"
    with pytest.raises(ValueError, match="-1"):
        P.encode_document(TOK, -1, "x")


def test_batch_encoding_equals_one_at_a_time_on_the_bundled_bpe():
    """`encode_documents` (the BPE's parallel `encode_batch`) gives the ids that the codec's plain `encode`
    of each wrapped text gives, control strings in text included; a bad id among many is named."""
    bpe = load_codec("msa-tiny")
    texts = ["a note", "user says <|im_start|>assistant<|im_end|>", "Ünïcödé [7]. text", "x" * 300]
    ids = [0, 5, 123456, 9]
    for codec in (bpe, TOK):  # with encode_batch, and without (one encode per text)
        start, end = codec.token_id(P.IM_START), codec.token_id(P.IM_END)
        one_by_one = [[start, *codec.encode(f"[{i}]. {t}[{i}]"), end] for i, t in zip(ids, texts)]
        assert P.encode_documents(codec, ids, texts) == one_by_one
        assert [codec.decode(d) for d in one_by_one] == [P.wrap_document(i, t) for i, t in zip(ids, texts)]
    with pytest.raises(ValueError, match="-3"):
        P.encode_documents(bpe, [1, -3], ["a", "b"])


def test_template_head_is_three_tokens_and_prompt_routes_only_the_question():
    """Head `<|im_start|>user\\n` is 3 tokens; only the question span routes."""
    assert len(P.template_head(TOK)) == 3
    pr = P.first_prompt(TOK, "Where?")
    routed = TOK.decode([i for i, r in zip(pr.ids, pr.routing) if r])
    assert routed == P.INSTRUCTION + "Where?\n" + P.RETURN_DOCS
    assert TOK.decode(pr.ids).endswith("<|im_end|>\n<|im_start|>")
    with pytest.raises(ValueError, match="question"):
        P.first_prompt(TOK, " ")


def test_parse_and_extract():
    """Named ids are deduplicated and sorted; the answer is the text after the last prefix, up to <|im_end|>."""
    assert P.parse_doc_ids("[4][1][4]x[10]") == [1, 4, 10]
    assert P.extract_answer("blah The answer to the question is: May 5<|im_end|>junk") == "May 5"
    assert P.extract_answer("plain<|im_end|>") == "plain"


def test_bundled_model_resolves_by_name():
    """from_pretrained and load_codec accept the bundled model's name as well as its path."""
    assert resolve_checkpoint(TINY_RANDOM) == bundled_checkpoint()
    by_name, by_path = MSAForCausalLM.from_pretrained(TINY_RANDOM), MSAForCausalLM.from_pretrained(bundled_checkpoint())
    assert all((a == b).all() for a, b in zip(by_name.state_dict().values(), by_path.state_dict().values()))
    assert isinstance(load_codec(TINY_RANDOM), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        resolve_checkpoint("no-such-model")


def test_module_examples_run():
    """The protocol module's docstring examples run and print what they show."""
    import doctest

    result = doctest.testmod(P)
    assert result.attempted >= 6 and result.failed == 0
