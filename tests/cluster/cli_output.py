"""What the CLI itself wrote to stderr, without the worker log lines Ray forwards into the same process."""

from __future__ import annotations

import re

# Ray prefixes each forwarded line with its source, e.g. "(ServeReplica:app:Deployment pid=1, ip=...)" or "(raylet, ip=...)", often colored.
_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)*\([^)]*\b(pid|ip)=[^)]*\)")


def cli_stderr(err: str) -> str:
    """`err` with every line Ray forwarded from a worker dropped; the CLI's own lines are kept in order."""
    return "".join(line for line in err.splitlines(keepends=True) if not _FORWARDED.match(line))
