"""The bundled tiny checkpoint reproduces its stored golden outputs (refactors must not move numbers)."""

import json
from pathlib import Path

import pytest

from msa_cluster.model.golden import golden_outputs

TOL = 1e-5  # fp32, same device class


def test_tiny_checkpoint_matches_golden_outputs():
    """Selections exactly, scores, pooled keys and logits within fp32 tolerance of tests/model/data/golden_tiny.json."""
    want = json.loads((Path(__file__).parent / "data" / "golden_tiny.json").read_text())
    got = golden_outputs()
    assert got["selected"] == want["selected"] and got["argmax"] == want["argmax"]
    for key in ("pooled_key_sums", "last_logits_head"):
        assert got[key] == pytest.approx(want[key], abs=TOL, rel=TOL)
    for layer, scores in want["scores"].items():
        assert got["scores"][layer] == pytest.approx(scores, abs=TOL, rel=TOL)
    assert got["last_logits_sum"] == pytest.approx(want["last_logits_sum"], abs=1e-3, rel=TOL)
