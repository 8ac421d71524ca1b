"""The few filesystem operations the store needs, over fsspec, with atomic create-if-absent.

Atomic create-if-absent (the manifest's compare-and-swap) per protocol:
  local    write a temp file, fsync, then `os.link` it to the final name: link fails if the name
           exists, and a crash before the link leaves only a temp file.
  s3       one PutObject with `If-None-Match: *` (s3fs `pipe_file(mode="create")`): S3 answers 412
           if the key exists; a single-object PUT is all-or-nothing.
  memory   the memory filesystem lives in this process: a process-wide lock around
           check-then-write makes it atomic between threads.
  other    `pipe_file(mode="create")`; whether that is atomic is up to the fsspec implementation,
           so a warning is logged once per protocol.
"""

from __future__ import annotations

import datetime as _dt
import logging
import mmap
import os
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa

__all__ = ["StoreFS", "FileStat"]

log = logging.getLogger(__name__)

_MEMORY_LOCK = threading.Lock()
_WARNED_PROTOCOLS: set[str] = set()


@dataclass(frozen=True)
class FileStat:
    name: str  # relative to the listed directory
    size: int
    mtime: float  # seconds since the epoch


def _as_epoch(value: Any) -> float:
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return value.timestamp()
    return float(value)


class StoreFS:
    """A store root on one fsspec filesystem; every path argument is relative to the root."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        if not isinstance(url, str) or not url:
            raise ValueError(f"store url must be a non-empty string, got {url!r}")
        options = dict(storage_options or {})
        if url.startswith(("s3://", "s3a://")):
            # s3fs answers whole-file reads from a cached listing if it has one, which would hide
            # manifest versions other writers created since: never cache listings
            options.setdefault("use_listings_cache", False)
        fs, root = fsspec.core.url_to_fs(url, **options)
        self.fs = fs
        self.url = url
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        if "file" in protocols or "local" in protocols:
            self.kind = "local"
            root = os.path.abspath(root)
        elif "memory" in protocols:
            self.kind = "memory"
        elif "s3" in protocols or "s3a" in protocols:
            self.kind = "s3"
        else:
            self.kind = "other"
            if protocols[0] not in _WARNED_PROTOCOLS:
                _WARNED_PROTOCOLS.add(protocols[0])
                log.warning(
                    "protocol %r: manifest commits rely on pipe_file(mode='create') being atomic there; "
                    "concurrent writers are only safe if it is",
                    protocols[0],
                )
        self.root = root.rstrip("/") or "/"

    # ---------------------------------------------------------------- paths
    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def display(self, rel: str) -> str:
        """The file's full URL, for error messages."""
        base = self.url.rstrip("/")
        return f"{base}/{rel}" if rel else base

    # ---------------------------------------------------------------- reads
    def read(self, rel: str) -> bytes:
        if self.kind == "local":
            with open(self.path(rel), "rb") as f:
                return f.read()
        if self.kind == "s3":
            return self._s3_read(rel)
        return self.fs.cat_file(self.path(rel))

    def _s3_read(self, rel: str) -> bytes:
        # an open-ended range is one GET; a plain cat_file first asks for the size (a HEAD)
        try:
            return self.fs.cat_file(self.path(rel), start=0)
        except OSError as e:
            if isinstance(e, FileNotFoundError):
                raise
            return self.fs.cat_file(self.path(rel))  # an empty object has no byte 0 to range over

    def read_range(self, rel: str, start: int, length: int) -> bytearray:
        """Bytes [start, start + length) as a private writable buffer (short if the file is)."""
        if length <= 0:
            return bytearray()
        if self.kind == "local":
            buf = bytearray(length)
            with open(self.path(rel), "rb") as f:
                n = os.preadv(f.fileno(), [buf], start)
            del buf[n:]
            return buf
        try:
            return bytearray(self.fs.cat_file(self.path(rel), start=start, end=start + length))
        except OSError:
            # S3 answers 416 to a range past the end: report it as the short read it is
            size = self.size(rel)
            if size >= start + length:
                raise
            return bytearray(self.fs.cat_file(self.path(rel), start=start, end=size)) if size > start else bytearray()

    def read_into(self, rel: str, ranges: Sequence[tuple[int, Any]]) -> list[int]:
        """Read file bytes [offset, offset + len(buf)) into each preallocated writable `buf`;
        returns the bytes read into each (fewer where the file is short). Only these bytes are
        asked for: locally one pread each, elsewhere one ranged GET each (concurrent on S3)."""
        views = [memoryview(b).cast("B") for _, b in ranges]
        if self.kind == "local":
            with open(self.path(rel), "rb") as f:
                return [os.preadv(f.fileno(), [v], off) if v.nbytes else 0 for (off, _), v in zip(ranges, views)]
        full = self.path(rel)
        parts = self.fs.cat_ranges(
            [full] * len(ranges), [off for off, _ in ranges], [off + v.nbytes for (off, _), v in zip(ranges, views)],
            on_error="return",
        )  # fmt: skip
        got = []
        for (off, _), part, v in zip(ranges, parts, views):
            # an error (S3 answers 416 to a range past the end) is retried alone, which raises or reads short
            data = part if isinstance(part, bytes | bytearray) else self.read_range(rel, off, v.nbytes)
            n = min(len(data), v.nbytes)
            v[:n] = data[:n]
            got.append(n)
        return got

    def map(self, rel: str, whole: bool = False) -> Any:
        """The whole file as a writable buffer: a private copy-on-write mmap for local files.

        whole: the caller will read all of it (a bulk scan), so ask the kernel to read ahead.
        The mmap is never closed explicitly: tensors made with `torch.frombuffer` keep a reference
        to it but no buffer export, so closing it would leave them dangling. GC unmaps it.
        """
        if self.kind == "local":
            with open(self.path(rel), "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    return bytearray()
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            if whole and hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_WILLNEED)
            return mm
        return bytearray(self.read(rel))

    def checksum(self, rel: str, fn: Any, block: int = 4 << 20) -> tuple[int, int]:
        """(size, checksum) of a file as storage returns it now. Locally read in `block`-byte
        preads into one reused buffer (each block checksummed while in the CPU cache, no mmap
        faults); elsewhere downloaded whole."""
        if self.kind != "local":
            data = self.read(rel)
            return len(data), fn(data, 0)
        buf = bytearray(block)
        view = memoryview(buf)
        value = size = 0
        with open(self.path(rel), "rb", buffering=0) as f:
            while n := f.readinto(buf):
                value = fn(view[:n], value)
                size += n
        return size, value

    def size(self, rel: str) -> int:
        if self.kind == "local":
            return os.stat(self.path(rel)).st_size
        return int(self.fs.info(self.path(rel))["size"])

    def exists(self, rel: str) -> bool:
        if self.kind == "local":
            return os.path.exists(self.path(rel))
        return bool(self.fs.exists(self.path(rel)))

    def list(self, rel_dir: str) -> list[FileStat]:
        """Files directly under `rel_dir` (an absent directory is empty), fresh, not cached."""
        full = self.path(rel_dir)
        if self.kind == "local":
            try:
                entries = list(os.scandir(full))
            except FileNotFoundError:
                return []
            out = []
            for e in entries:
                try:
                    if e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        out.append(FileStat(e.name, st.st_size, st.st_mtime))
                except FileNotFoundError:  # removed since the scan (a commit's temp file)
                    continue
            return out
        self.fs.invalidate_cache(full)
        try:
            infos = self.fs.ls(full, detail=True)
        except FileNotFoundError:
            return []
        finally:
            self.fs.invalidate_cache(full)
        out = []
        for info in infos:
            if info.get("type") != "file":
                continue
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            out.append(FileStat(name, int(info.get("size") or 0), self._mtime(info)))
        return out

    def _mtime(self, info: dict) -> float:
        for key in ("mtime", "LastModified", "last_modified", "created", "updated"):
            if info.get(key) is not None:
                return _as_epoch(info[key])
        return _as_epoch(self.fs.modified(info["name"]))

    # ---------------------------------------------------------------- writes
    def write(self, rel: str, data: Any) -> None:
        """Write a whole file; on local disk it is fsynced before this returns."""
        full = self.path(rel)
        if self.kind == "local":
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return
        # bytes: the memory fs keeps the object (never alias a caller's buffer), and botocore
        # accepts only bytes, bytearray or files as a body
        self.fs.pipe_file(full, bytes(data) if not isinstance(data, bytes) else data)

    def write_views(self, rel: str, views: Sequence[Any]) -> None:
        """Write a whole file as the concatenation of buffers, in order; fsynced locally.

        Locally the buffers go to the kernel as they are (writev, no joined copy); elsewhere they
        are joined into the one body a PUT needs.
        """
        full = self.path(rel)
        if self.kind != "local":
            self.fs.pipe_file(full, b"".join(views))
            return
        os.makedirs(os.path.dirname(full), exist_ok=True)
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _writev_all(fd, [m for m in (memoryview(v).cast("B") for v in views) if m.nbytes])
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_ipc(self, rel: str, batch: pa.RecordBatch) -> Any:
        """Write a one-batch Arrow IPC file; returns its bytes as stored.

        Locally the file is written straight from the batch's buffers (no in-memory copy),
        fsynced, and mapped back; elsewhere it is serialized in memory and uploaded in one PUT
        (or a multipart upload for big files).
        """
        if self.kind == "local":
            full = self.path(rel)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with pa.OSFile(full, "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
                writer.write_batch(batch)
            fd = os.open(full, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return self.map(rel)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
        data = sink.getvalue()
        self.write(rel, data)
        return data

    def sync_dir(self, rel_dir: str) -> None:
        """Make new names in a local directory durable; a no-op elsewhere."""
        if self.kind != "local":
            return
        fd = os.open(self.path(rel_dir), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create the file with `data` only if it does not exist; False if it did. Atomic."""
        full = self.path(rel)
        if self.kind == "local":
            return self._create_exclusive_local(rel, full, data)
        if self.kind == "memory":
            with _MEMORY_LOCK:
                if self.fs.exists(full):
                    return False
                self.fs.pipe_file(full, bytes(data))
                return True
        try:
            self.fs.pipe_file(full, data, mode="create")
        except FileExistsError:
            return False
        return True

    def _create_exclusive_local(self, rel: str, full: str, data: bytes) -> bool:
        directory = os.path.dirname(full)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, full)
            except FileExistsError:
                return False
        finally:
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass
        self.sync_dir(os.path.dirname(rel))
        return True

    def delete(self, rel: str) -> bool:
        """Delete a file; False if it was already gone."""
        try:
            if self.kind == "local":
                os.remove(self.path(rel))
            else:
                self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            return False
        return True


_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16


def _writev_all(fd: int, views: list[memoryview]) -> None:
    """writev every byte of `views`, in batches of at most IOV_MAX buffers, resuming short writes."""
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i : i + _IOV_MAX])
        while i < len(views) and n >= views[i].nbytes:
            n -= views[i].nbytes
            i += 1
        if n:  # a short write ended inside views[i]
            views[i] = views[i][n:]
