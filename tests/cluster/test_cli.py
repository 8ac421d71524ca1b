"""The `msa` CLI: the README's demo command runs end to end; bad input is a clear error."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from msa_cluster.cluster.cli import main
from msa_cluster.cluster.demo import sample_questions
from tests.cluster.cli_output import own_lines


def _msa(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the `msa` command as a user would: a fresh process (its own embedded Ray for `demo`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    return subprocess.run([sys.executable, "-m", "msa_cluster.cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_demo_runs_over_http_and_prints_answers_with_citations():
    """`msa demo`: local Ray, a store, the memory cluster and the Serve app; questions over HTTP with citations,
    each asked with the key of the tenant that holds its documents."""
    run = _msa("demo")
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "model: msa-tiny (msa-tiny)" in out and "serving http://127.0.0.1:" in out
    assert "49 documents: 21 of tenant 'demo', 28 of tenant 'demo-chains'" in out
    questions = sample_questions()
    assert out.count("\nQ: ") == len(questions) == 2 and out.count("\nA (") == 2 and "streamed" in out
    for q in questions:  # each answer is shown beside the expected one, marked correct or WRONG
        assert re.search(rf"Q: {re.escape(q['question'])}  \[tenant {re.escape(repr(q['tenant']))}\]\nA \(.*\n"
                         rf"  expected: {re.escape(repr(q['answer']))} \((correct|WRONG)\)", out), out  # fmt: skip
    # the needle's router margin is wide (0.97 against 0.15), so this answer holds on any CPU
    assert f"expected: {questions[0]['answer']!r} (correct)" in out
    assert re.search(r"\[\d+\] sample-\d+ r1 (routed\+)?read score=", out)  # interleave read what it named in round 1
    assert "search 'What is the special magic" in out and "added document 49" in out and "demo finished in" in out


def test_demo_with_a_user_corpus_and_question(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"client_id": f"note-{i}", "text": f"note {i} about boats"}) for i in (10, 11)))
    run = _msa("demo", "--corpus", str(corpus), "--question", "What about boats?", "--max-tokens", "2", "--max-rounds", "1",
               "--mode", "one_round")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 documents of tenant 'demo'" in run.stdout and "Q: What about boats?" in run.stdout and "note-1" in run.stdout


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


def test_keys_commands(tmp_path, capsys):
    keys = str(tmp_path / "k.json")
    assert main(["keys", "--keys-file", keys, "create", "--tenant", "acme", "--name", "laptop"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("msa-") and key not in (tmp_path / "k.json").read_text()
    assert main(["keys", "--keys-file", keys, "list"]) == 0
    line = capsys.readouterr().out.strip()
    key_id = line.split()[0]
    assert line.split()[1:] == ["acme", "active", "laptop"] and key_id == key.split("-")[1]
    assert main(["keys", "--keys-file", keys, "revoke", key_id]) == 0
    assert main(["keys", "--keys-file", keys, "list"]) == 0 and "revoked" in capsys.readouterr().out
    assert main(["keys", "--keys-file", keys, "revoke", "nope"]) == 2
    assert capsys.readouterr().err.startswith("msa: error: keys file")
    assert main(["keys", "create", "--tenant", "x"]) == 2
    assert "which keys file" in capsys.readouterr().err


def test_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "app.yaml"
    bad.write_text("store: file:///x\nauth: {keys_file: /k}\nlimits: {max_tokenz: 3}\n")
    assert main(["serve", "--config", str(bad)]) == 2
    err = own_lines(capsys.readouterr().err)
    assert err.startswith("msa: error: invalid config: limits.max_tokenz") and err.count("\n") == 1
    assert main(["query", "q", "--url", "http://127.0.0.1:9", "--api-key", "k", "--timeout", "2"]) == 1
    err = own_lines(capsys.readouterr().err)
    assert err.startswith("msa: error: ") and err.count("\n") == 1 and "Traceback" not in err
    os.environ.pop("MSA_API_KEY", None)
    assert main(["search", "q", "--url", "http://127.0.0.1:9"]) == 2
    assert "an API key is needed" in capsys.readouterr().err


def test_every_command_has_help(capsys):
    for cmd in ("demo", "serve", "query", "search", "keys", "train"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0 and len(capsys.readouterr().out) > 200


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


def test_example_configs_are_valid_and_each_stage_continues_the_last():
    """The shipped examples/train configs validate; each stage resumes the last one's run (same model, seed,
    directory and ids) to a later step, and the shipped model's record names the four stages in order."""
    from pathlib import Path

    from msa_cluster.training.config import load_config

    folder = Path(__file__).parents[2] / "examples" / "train"
    names = ["msa-tiny.yaml", "msa-tiny-copy.yaml", "msa-tiny-quote.yaml", "msa-tiny-mix.yaml"]
    stages = [load_config(folder / n) for n in names]
    one = stages[0]
    assert one.model.vocab_size == 1024 and one.model.num_layers == 6 and one.data.num_docs == 16
    for before, after in zip(stages, stages[1:]):
        assert (after.model, after.seed, after.output_dir, after.data.id_digits) == (before.model, before.seed, before.output_dir, before.data.id_digits)
        assert after.steps > before.steps
    assert "quote" not in one.data.tasks and set(stages[2].data.tasks) == {"quote"}
    assert stages[3].lr_decay == "cosine" and stages[3].decay_from == stages[2].steps and stages[3].data.question_block_target
    record = json.loads((Path(__file__).parents[2] / "msa_cluster" / "assets" / "msa-tiny" / "training.json").read_text())
    assert [s["config"] for s in record["stages"]] == [f"examples/train/{n}" for n in names]
    assert [s["until_step"] for s in record["stages"]] == [s.steps for s in stages] and record["steps"] == stages[-1].steps


def test_eval_writes_scores_and_names_bad_sizes(tmp_path, capsys):
    """`msa eval` answers held-out examples over a memory of the asked size and writes every score and record."""
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "msa-tiny-random", "--sizes", "1500", "--examples", "1", "--tasks", "niah_single,two_hop",
                 "--max-answer-tokens", "4", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "| 1500 (" in printed and "niah_single string match at 1500:" in printed
    data = json.loads(out.read_text())
    (size,) = data["sizes"]
    assert data["model"] == "msa-tiny-random" and size["tokens"] >= 1500 and len(size["records"]) == 3
    assert set(size["scores"]) == {"niah_single", "two_hop", "two_hop_one_round", "all"}
    assert main(["eval", "--sizes", "12Q"]) == 2 and "12Q" in capsys.readouterr().err
    assert main(["eval", "--tasks", "niah_x"]) == 2 and "niah_x" in capsys.readouterr().err
    assert main(["eval", "--device", "gpu0"]) == 2 and "gpu0" in capsys.readouterr().err
    assert main(["eval", "--device", "cuda", "--backend", "ray"]) == 2 and "--device cuda" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["eval", "--device", "cuda"]) == 2 and "no CUDA device" in capsys.readouterr().err


def test_a_dead_recorded_ray_address_is_told_apart_from_a_live_one(monkeypatch):
    """`msa ingest`/`serve` start a local Ray instead of waiting on the address a dead cluster left behind."""
    import socket

    import ray._private.services as services

    from msa_cluster.cluster.cli import recorded_ray_alive

    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        port = live.getsockname()[1]
        monkeypatch.setattr(services, "get_ray_address_from_environment", lambda *a: f"127.0.0.1:{port}")
        assert recorded_ray_alive() is True
    monkeypatch.setattr(services, "get_ray_address_from_environment", lambda *a: f"127.0.0.1:{port}")
    assert recorded_ray_alive(timeout_s=0.5) is False  # closed now
    monkeypatch.setattr(services, "get_ray_address_from_environment", lambda *a: None)
    assert recorded_ray_alive() is None
