"""Backends: bytes under a name.

A backend is the only layer that touches the medium (a pool directory, an S3 bucket, a removable
disk). It never sees plaintext: everything above it is an encrypted envelope or a pack of them.

Contract (every implementation, checked by one conformance suite in ``tests/test_backend.py``):

* Names are validated by :func:`check_name` (slash-separated lowercase segments); a backend never
  interprets them beyond mapping ``/`` to its own hierarchy.
* ``put`` is atomic: a reader sees either no object or the whole object, never a prefix, even if the
  process dies mid-write. Putting an existing name replaces it (callers only do so with identical
  content, so retries are idempotent).
* ``get`` of a missing name raises :class:`ObjectMissing`; a range reaching past the end raises
  :class:`IntegrityError` (a truncated object is damage, not a short read).
* ``delete`` of a missing name is not an error, so retried deletes are harmless.
* ``list`` yields every object under a prefix exactly once, in no particular order, and never
  yields temporary files of unfinished writes.
* Running out of space raises :class:`StoreFull` and leaves no partial object behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from appliance.errors import IntegrityError, InvalidName, ObjectMissing, StoreError, StoreFull

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*(/[a-z0-9][a-z0-9_.-]*)*$")
_TMP_MARK = ".tmp-"


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid object name, else raise :class:`InvalidName`."""
    if not _NAME.match(name) or ".." in name or _TMP_MARK in name or len(name) > 512:
        raise InvalidName(f"invalid object name {name!r}", name=name)
    return name


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    mtime: float


class Backend(Protocol):
    """Bytes under a name; see the module docstring for the contract."""

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None: ...

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes: ...

    def stat(self, name: str) -> ObjectInfo: ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    def delete(self, name: str) -> None: ...

    def describe(self) -> str:
        """A human-readable location for messages ("pool /srv/pool/store", "bucket x")."""
        ...


def _full_disk(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class LocalDirectoryBackend:
    """A store in a directory of a local filesystem (a disk pool, a mounted USB disk).

    Writes go to a temporary name in the target directory, are fsynced, renamed into place and the
    directory is fsynced, so a crash leaves either the old state or the new one. Open file
    descriptors for ranged reads are cached (packs are read many times during a restore).
    """

    def __init__(self, root: str, *, fsync: bool = True, fd_cache: int = 64) -> None:
        self.root = os.path.abspath(root)
        self._fsync = fsync
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._fd_cache = fd_cache
        self._fd_lock = threading.Lock()
        self._pid = os.getpid()

    def describe(self) -> str:
        return f"directory {self.root}"

    def path(self, name: str) -> str:
        return os.path.join(self.root, *check_name(name).split("/"))

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        target = self.path(name)
        directory = os.path.dirname(target)
        tmp = f"{target}{_TMP_MARK}{secrets.token_hex(6)}"
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
            if self._fsync:
                self._fsync_dir(directory)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if _full_disk(exc):
                raise StoreFull(
                    f"no space left on {self.describe()} while writing {name}", name=name
                ) from exc
            raise StoreError(f"cannot write {name} to {self.describe()}: {exc}") from exc
        self._forget_fd(name)

    @staticmethod
    def _fsync_dir(directory: str) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _fd(self, name: str) -> int:
        with self._fd_lock:
            if os.getpid() != self._pid:  # forked: descriptors are shared with the parent
                self._fds.clear()
                self._pid = os.getpid()
            fd = self._fds.get(name)
            if fd is not None:
                self._fds.move_to_end(name)
                return fd
            try:
                fd = os.open(self.path(name), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise ObjectMissing(
                    f"{name} is missing from {self.describe()}", name=name
                ) from None
            self._fds[name] = fd
            while len(self._fds) > self._fd_cache:
                _, old = self._fds.popitem(last=False)
                os.close(old)
            return fd

    def _forget_fd(self, name: str) -> None:
        with self._fd_lock:
            fd = self._fds.pop(name, None)
            if fd is not None:
                os.close(fd)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        fd = self._fd(name)
        if length is None:
            length = os.fstat(fd).st_size - offset
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise IntegrityError(
                f"{name} on {self.describe()} is truncated: wanted {length} bytes at {offset}, "
                f"got {len(data)}",
                name=name,
            )
        return data

    def stat(self, name: str) -> ObjectInfo:
        try:
            st = os.stat(self.path(name))
        except FileNotFoundError:
            raise ObjectMissing(f"{name} is missing from {self.describe()}", name=name) from None
        return ObjectInfo(name, st.st_size, st.st_mtime)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self.path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not os.path.isdir(base):
            return
        for dirpath, _dirnames, filenames in os.walk(base):
            rel = os.path.relpath(dirpath, self.root)
            for filename in filenames:
                if _TMP_MARK in filename:
                    continue
                name = filename if rel == "." else f"{rel.replace(os.sep, '/')}/{filename}"
                try:
                    st = os.stat(os.path.join(dirpath, filename))
                except FileNotFoundError:
                    continue  # deleted while listing
                yield ObjectInfo(name, st.st_size, st.st_mtime)

    def delete(self, name: str) -> None:
        self._forget_fd(name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(name))

    def temporary_files(self, older_than: float) -> Iterator[str]:
        """Paths of leftovers of interrupted writes older than ``older_than`` (epoch seconds)."""
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for filename in filenames:
                if _TMP_MARK in filename:
                    path = os.path.join(dirpath, filename)
                    try:
                        if os.stat(path).st_mtime < older_than:
                            yield path
                    except FileNotFoundError:
                        continue

    def close(self) -> None:
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class MemoryBackend:
    """An in-process backend for tests and for staging; same contract as the others."""

    def __init__(self) -> None:
        self._objects: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    def describe(self) -> str:
        return "memory"

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        check_name(name)
        with self._lock:
            self._objects[name] = (bytes(data), time.time())

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        check_name(name)
        with self._lock:
            item = self._objects.get(name)
        if item is None:
            raise ObjectMissing(f"{name} is missing from memory", name=name)
        data = item[0]
        end = len(data) if length is None else offset + length
        if end > len(data):
            raise IntegrityError(f"{name} is truncated", name=name)
        return data[offset:end]

    def stat(self, name: str) -> ObjectInfo:
        check_name(name)
        with self._lock:
            item = self._objects.get(name)
        if item is None:
            raise ObjectMissing(f"{name} is missing from memory", name=name)
        return ObjectInfo(name, len(item[0]), item[1])

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._lock:
            items = [(n, len(d), t) for n, (d, t) in self._objects.items() if n.startswith(prefix)]
        for name, size, mtime in items:
            yield ObjectInfo(name, size, mtime)

    def delete(self, name: str) -> None:
        check_name(name)
        with self._lock:
            self._objects.pop(name, None)

    def close(self) -> None:
        pass
