"""Typed errors of the memory store. Every one names the file, version or value at fault.

`UnknownDocumentError`, `SnapshotGoneError` and `MemoryFullError` come from `msa_cluster.types`
and are reused here.
"""

from __future__ import annotations

from msa_cluster.types import DocumentExistsError as _DocumentExistsError
from msa_cluster.types import MemoryError_, SnapshotGoneError

__all__ = [
    "StoreError",
    "StoreNotFoundError",
    "CorruptStoreError",
    "FingerprintMismatchError",
    "CommitConflictError",
    "DocumentExistsError",
    "SnapshotExpiredError",
]


class StoreError(MemoryError_):
    """Base class of memory-store errors."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store (no manifest) under the given URL, and creation was not asked for."""


class CorruptStoreError(StoreError):
    """A file of the store fails its checksum, is truncated or does not parse.

    `paths` lists every file found bad (full URLs or paths), so an operator can restore them.
    """

    def __init__(self, message: str, paths: tuple[str, ...] = ()):
        super().__init__(message)
        self.paths = tuple(paths)


class FingerprintMismatchError(StoreError, ValueError):
    """The store was encoded by a different model (config hash, routing layers, dtype or shape)."""


class CommitConflictError(StoreError):
    """A commit kept losing the race to other writers and gave up after its retry budget."""


class DocumentExistsError(StoreError, _DocumentExistsError):
    """An insert names a document id that is live with different content, or a client id that is live
    under another id of the tenant, and replace was not asked."""


SnapshotExpiredError = SnapshotGoneError  # deprecated name: a pinned version that gc collected is SnapshotGoneError
