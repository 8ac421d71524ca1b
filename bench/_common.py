"""What the benchmarks share: interleaved timing, loading a module from git history, dropping files from the page cache."""

from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def interleaved(fns: dict[str, Callable[[], object]], reps: int, sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds of each fn after one warm-up call each; the variants run in rotating order
    inside each repeat, so machine noise hits them alike. `sync` waits for the device."""
    for fn in fns.values():
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def module_from_git(commit: str, path: str, name: str) -> ModuleType:
    """The file `path` as it was at `commit`, imported as module `name` (for before/after runs)."""
    src = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(src)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while a class is built
    spec.loader.exec_module(module)
    return module


def evict_files(root: str) -> int:
    """Drop every file under `root` from the page cache (posix_fadvise DONTNEED); returns the file count."""
    n = 0
    for folder, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            n += 1
    return n
