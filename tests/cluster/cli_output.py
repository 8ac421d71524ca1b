"""What the CLI itself wrote, without the worker log lines Ray forwards into the same process."""

from __future__ import annotations

import re

# Ray prefixes each forwarded line with its source, often colored: "(ServeReplica:app:Deployment pid=1, ip=...)",
# "(pid=1)", "(raylet)", "(raylet, ip=...)".
_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)*\(((raylet|gcs_server|autoscaler|monitor)\b[^)]*|[^)]*\b(pid|ip)=[^)]*)\)")


def own_lines(text: str) -> str:
    """`text` (captured stdout or stderr) without the lines Ray forwarded from workers; the CLI's own lines, in order."""
    return "".join(line for line in text.splitlines(keepends=True) if not _FORWARDED.match(line))
