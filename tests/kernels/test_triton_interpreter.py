"""Runs test_triton_kernels.py in a fresh process under the Triton CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported (triton.language jits its own
helpers at import), and in a full test run other modules import triton first (transformers
does). A subprocess makes the kernel tests independent of test order and leaves this process,
and every other test, untouched.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from msa_cluster.kernels._common import HAS_TRITON
from tests.kernels.helpers import triton_mode

ROOT = Path(__file__).resolve().parents[2]
KERNEL_TESTS = Path(__file__).with_name("test_triton_kernels.py")
TIMEOUT_S = 600


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed; the references are tested without it")
@pytest.mark.skipif(triton_mode() is not None, reason="this process runs test_triton_kernels.py itself")
def test_triton_kernels_pass_under_the_cpu_interpreter():
    """Every Triton kernel test passes on CPU under TRITON_INTERPRET=1 in a fresh process."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", str(KERNEL_TESTS)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    output = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, f"kernel tests failed under the interpreter:\n{output}"
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) > 0, f"no kernel test ran under the interpreter:\n{output}"
