"""The project's lint configuration bans unpickling APIs (ruff's banned-api rule, run by CI)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _ruff() -> list[str]:
    exe = shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (it comes with the test extra)")
    return [exe]


@pytest.mark.parametrize(
    "source, rule",
    [
        ("import pickle\n", "TID251"),
        ("import torch\nx = torch.load('f.pt')\n", "TID251"),
        ("import numpy\nx = numpy.load('f.npy')\n", "TID251"),
    ],
)
def test_banned_deserialisers_are_refused_in_package_code(tmp_path, source, rule):
    """A package module that imports pickle or calls torch.load/numpy.load fails the project's ruff config."""
    bad = ROOT / "msa_cluster" / f"_lint_probe_{tmp_path.name}.py"
    bad.write_text(source)
    try:
        out = subprocess.run(
            _ruff() + ["check", "--no-cache", "--select", rule, str(bad)], cwd=ROOT, capture_output=True, text=True
        )
    finally:
        bad.unlink()
    assert out.returncode != 0 and rule in out.stdout, out.stdout + out.stderr


def test_package_passes_the_banned_api_rule():
    """The package itself uses none of the banned APIs."""
    out = subprocess.run(_ruff() + ["check", "--no-cache", "--select", "TID251,S301", "msa_cluster"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
