"""The `msa` CLI: the README's demo command runs end to end; bad input is a clear error."""

import json

from msa_cluster.cluster.cli import main


def test_demo_runs_and_prints_selections(capsys):
    """`msa demo` encodes the bundled corpus, routes, and prints selected documents per layer."""
    assert main(["demo", "--max-tokens", "3", "--max-rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "memory: 6 documents" in out
    assert "round 1 layer 2: selected documents [" in out and "round 1 layer 3: selected documents [" in out


def test_demo_with_a_user_corpus(tmp_path, capsys):
    """A user's jsonl corpus is used instead of the sample."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": i, "text": f"note {i}"}) for i in (10, 11)))
    assert main(["demo", "--corpus", str(corpus), "--max-tokens", "2", "--max-rounds", "1"]) == 0
    assert "memory: 2 documents" in capsys.readouterr().out


def test_bad_corpus_line_is_reported(tmp_path, capsys):
    """A corpus line without a text field exits with a message naming the line."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": 1}\n')
    try:
        main(["demo", "--corpus", str(corpus)])
    except SystemExit as e:
        assert "c.jsonl:1" in str(e)
    else:
        raise AssertionError("expected SystemExit")
