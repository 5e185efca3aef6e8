"""Backends: bytes under a name.

A backend is the only layer that touches the medium (a pool directory, an S3 bucket, a removable
disk, a tape). It never sees plaintext: everything above it is an encrypted envelope or a pack of
them. Retries, rate limits and fault injection are wrappers (``appliance.store.wrappers``) composed
once around a backend, never loops inside one; outer packages register their backends under the
``appliance.backends`` entry-point group (``appliance.store.registry``).

Contract (every implementation, checked by one conformance suite in
``tests/test_backend_conformance.py``):

* Names are validated by :func:`check_name` (slash-separated lowercase segments); a backend never
  interprets them beyond mapping ``/`` to its own hierarchy.
* ``put`` is atomic: a reader sees either no object or the whole object, never a prefix, even if the
  process dies mid-write. Putting an existing name replaces it; callers only do so with identical
  content, so a put repeated with the same bytes (a retry) is idempotent. ``options``
  (:class:`PutOptions`: storage class, retain-until) are hints a backend may honour or ignore; one
  that cannot store a class it was asked for stores the object in its default class.
* ``get`` of a missing name raises :class:`ObjectMissing` (never an empty result). Ranged reads:
  ``get(name, offset)`` returns the bytes from ``offset`` to the end, and ``b""`` when ``offset`` is
  the size; ``get(name, offset, length)`` returns exactly ``length`` bytes. An offset past the end,
  or a range reaching past the end, raises :class:`IntegrityError` (a truncated object is damage,
  not a short read). Offsets and lengths are never negative.
* ``stat`` of a missing name raises :class:`ObjectMissing`.
* ``delete`` of a missing name is not an error, so retried deletes are harmless.
* ``list`` yields every object whose name starts with ``prefix`` exactly once, in no particular
  order, and never yields temporary files of unfinished writes.
* Errors: running out of space raises :class:`StoreFull` and leaves no partial object behind; an
  archived (cold) object raises :class:`ObjectArchived` from ``get`` until warmed up; deleting or
  overwriting an immutable object raises :class:`ObjectLocked`; a location that is not there
  (missing root, unmounted disk, wrong identity) raises :class:`LocationUnavailable` from every
  operation, ``list`` included: an unavailable location never looks like an empty one. Failures
  that may pass by themselves raise :class:`TransientBackendError` (retryable); every other
  :class:`StoreError` is permanent and retrying it cannot help.
* Cold storage is two calls, as in restic: ``warm_up(names)`` asks for archived objects to be made
  readable and reports which already are; ``wait_warm(names, timeout)`` blocks until they all are.
  Both are no-ops for hot backends (every object is always ready).
* ``retain(name, until)`` extends an object's lock (a pack shared by a point kept longer than
  the one that first stored it); it never shortens one, and is a no-op for backends without
  immutable objects.
* ``capabilities`` says what the medium can do (:class:`BackendCapabilities`); callers choose copies
  and plan reads from it rather than from the backend's type.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat as stat_module
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, NoReturn, Protocol

from appliance.errors import (
    IntegrityError,
    InvalidName,
    LocationUnavailable,
    ObjectMissing,
    StoreError,
    StoreFull,
    TransientBackendError,
)
from appliance.store.staged import StagedObject

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


@dataclass(frozen=True)
class BackendCapabilities:
    """What a backend's medium can do; the defaults describe a hot, random-access store."""

    #: ``get`` with an offset and length costs about the range, not the whole object.
    ranged_reads: bool = True
    #: "expensive" when listing is billed or slow (a cold bucket, a tape): list rarely, cache it.
    listing_cost: Literal["cheap", "expensive"] = "cheap"
    #: Objects may be archived and need ``warm_up``/``wait_warm`` before ``get``.
    cold_objects: bool = False
    #: Objects can only be written and read in order (a tape); random reads are very slow.
    sequential_only: bool = False
    #: Objects can be locked against deletion until a retain-until date (``PutOptions``).
    immutable_objects: bool = False
    #: ``put`` refuses a pack (``data/``, ``meta/``) whose bytes do not hash to its name (a
    #: peer checks every pack it takes), so a copy need not hash a pack before sending it.
    checks_pack_names: bool = False
    #: At most this many ``put`` calls in flight help (None: no limit but the caller's). A peer
    #: takes one at a time: each of its puts ends in an fsync, and puts racing on one small
    #: box cost it more CPU than they overlap (a copy still reads the next packs meanwhile).
    puts_in_flight: int | None = None


#: The capabilities of a local disk or memory.
HOT_RANDOM_ACCESS = BackendCapabilities()


@dataclass(frozen=True)
class PutOptions:
    """Hints for ``put``; a backend may honour or ignore each (see the module contract)."""

    #: A backend-specific storage class ("STANDARD", "GLACIER", ...); None: the default class.
    storage_class: str | None = None
    #: Keep the object immutable until this instant (object lock); None: not locked.
    retain_until: datetime | None = None


@dataclass(frozen=True)
class WarmUpStatus:
    """The answer of ``warm_up``: which objects can be read now and which are still thawing."""

    ready: frozenset[str] = field(default_factory=frozenset)
    pending: frozenset[str] = field(default_factory=frozenset)

    @property
    def done(self) -> bool:
        return not self.pending


class Backend(Protocol):
    """Bytes under a name; see the module docstring for the contract."""

    @property
    def capabilities(self) -> BackendCapabilities:
        """What the medium can do (constant for the life of the backend)."""
        ...

    def put(
        self, name: str, data: bytes | bytearray | memoryview, options: PutOptions | None = None
    ) -> None:
        """Store ``data`` under ``name`` atomically; idempotent for the same bytes."""
        ...

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """The object's bytes, or a range of them; :class:`ObjectMissing` when there is none."""
        ...

    def stat(self, name: str) -> ObjectInfo:
        """Size and modification time; :class:`ObjectMissing` when there is no such object."""
        ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose name starts with ``prefix``, once each, in no particular order."""
        ...

    def delete(self, name: str) -> None:
        """Remove the object; a missing one is not an error. :class:`ObjectLocked` if immutable."""
        ...

    def warm_up(self, names: Iterable[str]) -> WarmUpStatus:
        """Ask for archived objects to become readable; returns at once with what is ready."""
        ...

    def wait_warm(self, names: Iterable[str], timeout: float) -> None:
        """Block until every named object is readable; :class:`ObjectArchived` after ``timeout``
        seconds if some still are not."""
        ...

    def retain(self, name: str, until: datetime) -> None:
        """Keep the object immutable until at least ``until``: a shorter lock is extended, a
        longer one left alone (never shortened). A no-op where objects cannot be locked;
        :class:`ObjectMissing` when there is no such object."""
        ...

    def describe(self) -> str:
        """A human-readable location for messages ("pool /srv/pool/store", "bucket x")."""
        ...

    def close(self) -> None:
        """Release descriptors and connections; the backend is not used afterwards."""
        ...


def hot_warm_up(names: Iterable[str]) -> WarmUpStatus:
    """``warm_up`` of a backend without cold objects: everything is ready."""
    return WarmUpStatus(ready=frozenset(check_name(n) for n in names))


#: errno values that say the location itself went away (a yanked disk, a dead network mount).
_GONE = frozenset(
    getattr(errno, n)
    for n in ("ENODEV", "ENXIO", "ENOTCONN", "ENOMEDIUM", "ESHUTDOWN")
    if hasattr(errno, n)
)
#: errno values worth a retry: the same call may succeed in a moment.
_TRANSIENT = frozenset(
    getattr(errno, n)
    for n in (
        "EIO",
        "ETIMEDOUT",
        "EAGAIN",
        "EINTR",
        "EBUSY",
        "ESTALE",
        "ECONNRESET",
        "ECONNABORTED",
        "ECONNREFUSED",
        "EHOSTUNREACH",
        "EHOSTDOWN",
        "ENETDOWN",
        "ENETUNREACH",
        "ENETRESET",
        "ENOBUFS",
        "ENOMEM",
    )
    if hasattr(errno, n)
)


def store_error_from_os_error(exc: OSError, *, action: str, name: str, where: str) -> StoreError:
    """The domain error for an ``OSError`` raised while doing ``action`` on ``name``.

    ENOSPC and EDQUOT are :class:`StoreFull`; errors that say the device or mount went away are
    :class:`LocationUnavailable`; I/O errors, timeouts and network hiccups are
    :class:`TransientBackendError`; anything else (permissions, a read-only filesystem) is a
    permanent :class:`StoreError`.
    """
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"no space left on {where} while writing {name}", name=name)
    message = f"cannot {action} {name} on {where}: {exc}"
    if exc.errno in _GONE:
        return LocationUnavailable(message, name=name, location=where)
    if exc.errno in _TRANSIENT:
        return TransientBackendError(message, name=name, errno=exc.errno)
    return StoreError(message, name=name, errno=exc.errno)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class LocalDirectoryBackend:
    """A store in a directory of a local filesystem (a disk pool, a mounted USB disk).

    Writes go to a temporary name in the target directory, are fsynced, renamed into place and the
    directory is fsynced, so a crash leaves either the old state or the new one. Open file
    descriptors for ranged reads are cached (packs are read many times during a restore).

    Two ways to treat the root directory:

    * by default (the appliance's own pool store, which ``Appliance.init`` creates), a missing root
      is created by the first ``put`` and reads as an empty store;
    * with ``require_root`` (a location: a pool directory, a removable disk), the root must already
      exist, and with ``require_mount`` it must also be a mountpoint. Otherwise every operation
      raises :class:`LocationUnavailable`, ``list`` included. ``put`` creates folders only below the
      root, relative to a descriptor of the checked root, so an unmounted disk never gets a stray
      ``data/`` written into its bare mountpoint (the root's descriptor also keeps a plain
      ``umount`` from pulling the filesystem away mid-write). The mountpoint test compares the root
      with its parent (device and inode, like ``os.path.ismount``), so a bind mount within one
      filesystem does not count.
    """

    capabilities = HOT_RANDOM_ACCESS

    def __init__(
        self,
        root: str,
        *,
        fsync: bool = True,
        fd_cache: int = 64,
        require_root: bool = False,
        require_mount: bool = False,
    ) -> None:
        self.root = os.path.abspath(root)
        self.require_root = require_root or require_mount
        self.require_mount = require_mount
        self._fsync = fsync
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._fd_cache = fd_cache
        self._fd_lock = threading.Lock()
        self._pid = os.getpid()

    def describe(self) -> str:
        return f"directory {self.root}"

    def path(self, name: str) -> str:
        return os.path.join(self.root, *check_name(name).split("/"))

    # --- availability -----------------------------------------------------------------------------

    def _unavailable(self, reason: str) -> NoReturn:
        raise LocationUnavailable(
            f"{self.describe()} is not available: {reason}", location=self.root, reason=reason
        )

    def _open_root(self) -> int:
        """A descriptor of the root, checked to be available; the caller closes it."""
        try:
            fd = os.open(self.root, _DIR_FLAGS)
        except FileNotFoundError:
            self._unavailable("the directory does not exist")
        except NotADirectoryError:
            self._unavailable("it is not a directory")
        except OSError as exc:
            self._unavailable(str(exc))
        if self.require_mount:
            try:
                here = os.fstat(fd)
                parent = os.stat("..", dir_fd=fd)
            except OSError as exc:
                os.close(fd)
                self._unavailable(str(exc))
            if here.st_dev == parent.st_dev and here.st_ino != parent.st_ino:
                os.close(fd)
                self._unavailable("nothing is mounted there")
        return fd

    def check_available(self) -> None:
        """Raise :class:`LocationUnavailable` unless the root is there (and mounted if required).

        Always passes for a backend without ``require_root``.
        """
        if self.require_root:
            os.close(self._open_root())

    def _failure(self, exc: OSError, action: str, name: str) -> StoreError:
        # An error caused by the location vanishing mid-operation is reported as that.
        self.check_available()
        return store_error_from_os_error(exc, action=action, name=name, where=self.describe())

    def _missing(self, name: str) -> ObjectMissing:
        # A name that is not found because the disk went away is not a missing object.
        self.check_available()
        return ObjectMissing(f"{name} is missing from {self.describe()}", name=name)

    # --- writes -----------------------------------------------------------------------------------

    def put(
        self, name: str, data: bytes | bytearray | memoryview, options: PutOptions | None = None
    ) -> None:
        """See :class:`Backend`; ``options`` are ignored (one class, no object lock)."""
        with self.stage(name) as staged:
            staged.write(data)
            staged.publish()

    def stage(self, name: str) -> StagedObject:
        """``name`` to be written in pieces and published at once (:mod:`.staged`); the
        folders below the root are made now."""
        parts = check_name(name).split("/")
        if not self.require_root:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise self._failure(exc, "write", name) from exc
        root_fd = self._open_root()
        try:
            dir_fd = self._make_dirs(root_fd, parts[:-1])
        except OSError as exc:
            os.close(root_fd)
            raise self._failure(exc, "write", name) from exc
        if dir_fd == root_fd:
            dir_fd = os.dup(root_fd)
        os.close(root_fd)
        return StagedObject(
            dir_fd,
            f"{parts[-1]}{_TMP_MARK}{secrets.token_hex(6)}",
            parts[-1],
            fsync=self._fsync,
            on_error=lambda exc: self._failure(exc, "write", name),
            on_published=lambda: self._forget_fd(name),
        )

    def _make_dirs(self, root_fd: int, segments: list[str]) -> int:
        """A descriptor of the folder ``segments`` below the root, created as needed.

        Every step is relative to the descriptor of the step above, so nothing is ever created
        above or instead of the checked root. Returns ``root_fd`` itself for no segments.
        """
        current = root_fd
        try:
            for segment in segments:
                try:
                    os.mkdir(segment, 0o777, dir_fd=current)  # umask applies, as with makedirs
                    created = True
                except FileExistsError:
                    created = False
                if created and self._fsync:
                    os.fsync(current)  # the new folder's entry survives a crash
                below = os.open(segment, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=current)
                if current != root_fd:
                    os.close(current)
                current = below
        except BaseException:
            if current != root_fd:
                os.close(current)
            raise
        return current

    def delete(self, name: str) -> None:
        check_name(name)
        self.check_available()
        self._forget_fd(name)
        try:
            os.unlink(self.path(name))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            pass  # no such object (a folder is not one)
        except OSError as exc:
            raise self._failure(exc, "delete", name) from exc

    # --- reads ------------------------------------------------------------------------------------

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
            except (FileNotFoundError, NotADirectoryError):
                raise self._missing(name) from None
            except OSError as exc:
                raise self._failure(exc, "read", name) from exc
            if stat_module.S_ISDIR(os.fstat(fd).st_mode):  # a folder is not an object
                os.close(fd)
                raise self._missing(name)
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
        check_name(name)
        self.check_available()
        fd = self._fd(name)
        try:
            if length is None or length == 0:
                size = os.fstat(fd).st_size
                if offset > size:
                    raise IntegrityError(
                        f"{name} on {self.describe()} is truncated: offset {offset} is past its "
                        f"end ({size} bytes)",
                        name=name,
                    )
                if length is None:
                    length = size - offset
            data = os.pread(fd, length, offset)
        except OSError as exc:
            self._forget_fd(name)
            raise self._failure(exc, "read", name) from exc
        if len(data) != length:
            raise IntegrityError(
                f"{name} on {self.describe()} is truncated: wanted {length} bytes at {offset}, "
                f"got {len(data)}",
                name=name,
            )
        return data

    def stat(self, name: str) -> ObjectInfo:
        check_name(name)
        self.check_available()
        try:
            st = os.stat(self.path(name))
        except (FileNotFoundError, NotADirectoryError):
            raise self._missing(name) from None
        except OSError as exc:
            raise self._failure(exc, "stat", name) from exc
        if stat_module.S_ISDIR(st.st_mode):
            raise self._missing(name)
        return ObjectInfo(name, st.st_size, st.st_mtime)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self.check_available()
        folder = prefix.rpartition("/")[0]
        base = self.path(folder) if folder else self.root
        if os.path.isdir(base):
            yield from self._walk(base, prefix)
        # The walk reads a vanished root as empty folders: say so instead of ending quietly.
        self.check_available()

    def _walk(self, base: str, prefix: str) -> Iterator[ObjectInfo]:
        def failed(exc: OSError) -> None:
            if not isinstance(exc, FileNotFoundError):  # a folder removed while listing is fine
                raise self._failure(exc, "list", prefix or "objects") from exc

        for dirpath, _dirnames, filenames in os.walk(base, onerror=failed):
            rel = os.path.relpath(dirpath, self.root)
            for filename in filenames:
                if _TMP_MARK in filename:
                    continue
                name = filename if rel == "." else f"{rel.replace(os.sep, '/')}/{filename}"
                if not name.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, filename))
                except FileNotFoundError:
                    continue  # deleted while listing
                except OSError as exc:
                    raise self._failure(exc, "list", name) from exc
                yield ObjectInfo(name, st.st_size, st.st_mtime)

    # --- cold storage: none -----------------------------------------------------------------------

    def warm_up(self, names: Iterable[str]) -> WarmUpStatus:
        return hot_warm_up(names)

    def wait_warm(self, names: Iterable[str], timeout: float) -> None:
        for name in names:
            check_name(name)

    def retain(self, name: str, until: datetime) -> None:
        self.stat(name)  # objects here cannot be locked; a missing one is still missing

    # --- maintenance ------------------------------------------------------------------------------

    def temporary_files(self, older_than: float) -> Iterator[str]:
        """Paths of leftovers of interrupted writes older than ``older_than`` (epoch seconds)."""
        self.check_available()
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


def open_pool_directory(
    address: str, *, require_mount: bool = False, fsync: bool = True
) -> LocalDirectoryBackend:
    """The ``pool_dir`` backend of the registry: a location whose root must already exist."""
    return LocalDirectoryBackend(
        address, fsync=fsync, require_root=True, require_mount=require_mount
    )


class MemoryBackend:
    """An in-process backend for tests and for staging; same contract as the others."""

    capabilities = HOT_RANDOM_ACCESS

    def __init__(self) -> None:
        self._objects: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    def describe(self) -> str:
        return "memory"

    def put(
        self, name: str, data: bytes | bytearray | memoryview, options: PutOptions | None = None
    ) -> None:
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
        if offset > len(data) or end > len(data):
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

    def warm_up(self, names: Iterable[str]) -> WarmUpStatus:
        return hot_warm_up(names)

    def wait_warm(self, names: Iterable[str], timeout: float) -> None:
        for name in names:
            check_name(name)

    def retain(self, name: str, until: datetime) -> None:
        self.stat(name)  # objects here cannot be locked; a missing one is still missing

    def close(self) -> None:
        pass
