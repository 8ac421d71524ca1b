"""API keys: each maps to one tenant; the keys file holds only their SHA-256 hashes.

A key reads `msa-<key id>-<secret>`: the key id (public, shown by `msa keys list`) finds the
entry, then the hash of the whole key is compared in constant time. Keys are 256-bit random, so
a plain hash is enough (nothing to brute-force). `msa keys create` prints a key once; it cannot
be recovered from the file. `msa keys revoke KEY_ID` marks it revoked; serving replicas re-read
the file when it changes (within `auth.reload_s`).

File format (JSON, written atomically with mode 0600):
    {"format": 1, "keys": [{"id": "3f9a0c1d", "tenant": "acme", "sha256": "...", "created": 1.7e9,
                            "revoked": null, "name": ""}]}
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from msa_cluster.types import check_tenant

__all__ = ["ApiKey", "KeyRing", "KeysFileError", "create_key", "list_keys", "revoke_key"]

_PREFIX = "msa"


class KeysFileError(ValueError):
    """The keys file is unreadable or malformed, or names an unknown key id."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant: str
    sha256: str
    created: float
    revoked: float | None = None
    name: str = ""


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _read(path: Path) -> list[ApiKey]:
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != 1 or not isinstance(data.get("keys"), list):
            raise ValueError("expected {'format': 1, 'keys': [...]}")
        return [ApiKey(**k) for k in data["keys"]]
    except (ValueError, TypeError) as e:
        raise KeysFileError(f"keys file {path} is malformed: {e}") from None


def _write(path: Path, keys: list[ApiKey]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"format": 1, "keys": [asdict(k) for k in keys]}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise writers of one keys file (create and revoke read, change and rewrite it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def create_key(keys_file: str | os.PathLike[str], tenant: str, name: str = "") -> tuple[str, ApiKey]:
    """A new key for `tenant`: (the key, shown once, and its entry). Only the hash is stored."""
    check_tenant(tenant)
    path = Path(keys_file)
    with _locked(path):
        keys = _read(path)
        taken = {k.id for k in keys}
        key_id = secrets.token_hex(4)
        while key_id in taken:
            key_id = secrets.token_hex(4)
        key = f"{_PREFIX}-{key_id}-{secrets.token_urlsafe(32)}"
        entry = ApiKey(id=key_id, tenant=tenant, sha256=_hash(key), created=time.time(), name=name)
        _write(path, [*keys, entry])
    return key, entry


def revoke_key(keys_file: str | os.PathLike[str], key_id: str) -> ApiKey:
    """Mark key `key_id` revoked (KeysFileError if the file has no such key)."""
    path = Path(keys_file)
    with _locked(path):
        keys = _read(path)
        for i, k in enumerate(keys):
            if k.id == key_id:
                if k.revoked is None:
                    keys[i] = ApiKey(**{**asdict(k), "revoked": time.time()})
                    _write(path, keys)
                return keys[i]
    raise KeysFileError(f"keys file {path} has no key {key_id!r} (see `msa keys list`)")


def list_keys(keys_file: str | os.PathLike[str]) -> list[ApiKey]:
    return _read(Path(keys_file))


class KeyRing:
    """A serving replica's view of the keys file: `tenant_of(key)` -> tenant, or None for a bad key."""

    def __init__(self, keys_file: str | os.PathLike[str], reload_s: float = 2.0):
        self.path, self.reload_s = Path(keys_file), reload_s
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._by_id: dict[str, ApiKey] = {}
        self._load()

    def _load(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise KeysFileError(f"keys file {self.path} does not exist (create it with `msa keys create`)") from None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._by_id = {k.id: k for k in _read(self.path) if k.revoked is None}
            self._stamp = stamp

    def _refresh(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._checked >= self.reload_s:
                self._checked = now
                try:
                    self._load()
                except KeysFileError:  # a bad edit: keep serving the last good keys
                    pass

    def tenant_of(self, key: str | None) -> str | None:
        """The tenant of a valid, unrevoked key; None otherwise. The hash compare is constant-time."""
        self._refresh()
        presented = _hash(key or "")
        parts = (key or "").split("-", 2)
        entry = self._by_id.get(parts[1]) if len(parts) == 3 and parts[0] == _PREFIX else None
        expected = entry.sha256 if entry is not None else _hash("-")  # compare anyway: same work either way
        ok = hmac.compare_digest(presented, expected)
        return entry.tenant if ok and entry is not None else None

    def key_id_of(self, key: str) -> str:
        """The public id part of a key (for rate limits and logs), never the secret."""
        parts = key.split("-", 2)
        return parts[1] if len(parts) == 3 else "?"
