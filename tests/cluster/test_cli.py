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


def test_train_runs_from_a_yaml_config(tmp_path, capsys):
    """`msa train --config` trains a tiny config, prints loss and recall lines, and writes a loadable checkpoint."""
    import yaml

    from tests.training.conftest import TINY

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "steps": 4, "output_dir": str(tmp_path / "out")}))
    assert main(["train", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "step 4 [warmup] loss=" in out and "recall@1=" in out and "tokens/s=" in out
    assert (tmp_path / "out" / "checkpoint" / "model.safetensors").is_file()
    assert main(["demo", "--model", str(tmp_path / "out" / "checkpoint"), "--max-tokens", "2", "--max-rounds", "1"]) == 0


def test_train_config_errors_are_reported(tmp_path, capsys):
    """A config value out of bounds exits 2 with a message naming the field."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("steps: 0\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "steps" in capsys.readouterr().err


def test_example_config_is_valid():
    """The shipped examples/train/msa-tiny.yaml validates."""
    from pathlib import Path

    from msa_cluster.training.config import load_config

    cfg = load_config(Path(__file__).parents[2] / "examples" / "train" / "msa-tiny.yaml")
    assert cfg.model.vocab_size == 1024 and cfg.model.num_layers == 6 and cfg.data.num_docs == 16
