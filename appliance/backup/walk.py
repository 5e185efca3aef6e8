"""Descriptor-relative walking of a source tree.

The backup runs as root over folders that local users own. A path names whatever its components
name *at the moment* it is resolved, so a user who swaps a folder for a symlink (to ``/etc``) while
a backup runs would have root read through it. Nothing here resolves a path of more than one
component below the source root:

- The source root is opened once by its path (``O_DIRECTORY | O_NOFOLLOW``). Every directory below
  it is opened relative to its parent's descriptor, one name at a time, with the same flags: a
  component that became a symlink or a non-directory fails the open (``ELOOP`` / ``ENOTDIR``)
  instead of redirecting it, and a directory opened is checked against the ``(st_dev, st_ino)``
  it was listed with. Either becomes :class:`ChangedError`, never a silent detour.
- Entries are listed from a directory descriptor and stat'ed with ``fstatat`` relative to it.

:class:`DirChain` holds the descriptors of one path (root to the directory last asked for).
Callers go in walk order, so consecutive calls share most of their path and a directory is opened
once per visit, not once per entry. A chain holds at most ``limit`` descriptors: the deepest ones.
A shallower directory needed again (a deep tree, on the way back up) is re-opened from the nearest
open ancestor and checked against the identity it had when first opened; a tree of any depth costs
a bounded number of descriptors.
"""

from __future__ import annotations

import base64
import errno
import os
import stat
from collections.abc import Iterator
from typing import Protocol

from appliance.errors import SourceError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Directory descriptors one chain holds at most (besides its root).
OPEN_DIRS = 64

CHANGED_DIR = "changed while it was backed up: not the directory that was listed"
CHANGED_FILE = "changed while it was backed up: not the file that was listed"

Identity = tuple[int, int]


class WarningSink(Protocol):
    def add(self, path: str, message: str) -> None: ...


class ChangedError(Exception):
    """A directory on the path is not the one that was listed: swapped, or now a symlink or a
    non-directory. The message says so in the words of a backup warning."""

    def __init__(self, message: str = CHANGED_DIR) -> None:
        super().__init__(message)


def identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino)


def parts_of(rel: str) -> tuple[str, ...]:
    """Components of a relative path ('' is the root)."""
    return tuple(rel.split("/")) if rel else ()


def canonical_root(path: str) -> str:
    """The source path with the symlinks of its parent folders resolved, its last name kept: a
    source that is itself a symlink is refused (it is not a directory), as it always was."""
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(head), tail)


def open_root(path: str, expected: Identity | None = None) -> int:
    """Open the source root by its (canonical, absolute) path, each component with O_NOFOLLOW:
    a folder on the way that became a symlink after :func:`canonical_root` fails the open instead
    of redirecting it. ``expected``: the identity the root must have."""
    fd = os.open("/", DIR_FLAGS)
    try:
        for name in os.path.abspath(path).split("/"):
            if name:
                parent, fd = fd, -1
                try:
                    fd = os.open(name, DIR_FLAGS, dir_fd=parent)
                finally:
                    os.close(parent)
    except OSError:
        if fd >= 0:
            os.close(fd)
        raise
    if expected is not None:
        try:
            same = identity(os.fstat(fd)) == expected
        except OSError:
            os.close(fd)
            raise
        if not same:
            os.close(fd)
            raise ChangedError()
    return fd


class DirChain:
    """Descriptors of the directories on one path below an open source root (see the module).

    ``verify``: fstat each directory opened and keep its identity, so that a re-open is checked
    against it. Readers that check the identity of the file they open at the end can skip it.
    The chain owns ``root_fd`` and closes it with :meth:`close`.
    """

    def __init__(self, root_fd: int, *, verify: bool = True, limit: int | None = None) -> None:
        self.root_fd = root_fd
        self._verify = verify
        self._limit = max(1, OPEN_DIRS if limit is None else limit)
        self._names: list[str] = []
        self._fds: list[int | None] = []  # None: closed to stay within the limit
        self._idents: list[Identity | None] = []
        self._first_open = 0  # the open descriptors are always _fds[_first_open:]
        self._key: tuple[str, ...] | None = ()  # the path of the last successful call
        self._parent: tuple[str, tuple[str, ...]] = ("", ())

    def fd(self, parts: tuple[str, ...], expected: Identity | None = None) -> int:
        """Descriptor of the directory ``root/parts`` (``()``: the root itself).

        ``expected``: the identity that directory must have. Raises :class:`ChangedError` when a
        component is not the directory that was listed, ``FileNotFoundError`` when one vanished,
        another ``OSError`` when one cannot be opened. The descriptor stays owned by the chain
        and is valid until the next call.
        """
        if parts is self._key and expected is None:
            return self._fds[-1] if self._fds else self.root_fd  # type: ignore[return-value]
        common = 0
        limit = min(len(parts), len(self._names))
        while common < limit and parts[common] == self._names[common]:
            common += 1
        self._key = None
        self._truncate(common)
        if common and self._fds[common - 1] is None:
            self._reopen()
        base = self._fds[-1] if self._fds else self.root_fd
        assert base is not None
        for i in range(common, len(parts)):
            base = self._open(base, parts[i], expected if i == len(parts) - 1 else None)
        if parts and expected is not None and common == len(parts):
            self._check_held(expected)
        self._key = parts
        return base

    @property
    def depth(self) -> int:
        """Components of the path held now; after a failed :meth:`fd`, the ones that could be
        opened (the next one is the one that failed)."""
        return len(self._names)

    def parent(self, rel: str) -> tuple[int, str]:
        """(descriptor of the directory holding ``rel``, ``rel``'s last name)."""
        parent, _, name = rel.rpartition("/")
        if parent != self._parent[0]:
            self._parent = (parent, parts_of(parent))
        return self.fd(self._parent[1]), name

    def close(self) -> None:
        self._truncate(0)
        os.close(self.root_fd)

    def __enter__(self) -> DirChain:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------------------

    def _truncate(self, length: int) -> None:
        for fd in self._fds[length:]:
            if fd is not None:
                os.close(fd)
        del self._names[length:], self._fds[length:], self._idents[length:]
        self._first_open = min(self._first_open, length)

    def _open(self, base: int, name: str, expected: Identity | None) -> int:
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=base)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise ChangedError() from exc
            raise
        ident: Identity | None = None
        if self._verify or expected is not None:
            try:
                ident = identity(os.fstat(fd))
            except OSError:
                os.close(fd)
                raise
            if expected is not None and ident != expected:
                os.close(fd)
                raise ChangedError()
        self._names.append(name)
        self._fds.append(fd)
        self._idents.append(ident)
        self._enforce_limit()
        return fd

    def _enforce_limit(self) -> None:
        while len(self._fds) - self._first_open > self._limit:
            fd = self._fds[self._first_open]
            assert fd is not None
            os.close(fd)
            self._fds[self._first_open] = None
            self._first_open += 1

    def _reopen(self) -> None:
        """Re-open the closed components (a prefix of the path) from the root down, each checked
        against its recorded identity; the deepest ones stay open."""
        names, idents = self._names[: self._first_open], self._idents[: self._first_open]
        self._truncate(0)  # every component of the path is closed: start over from the root
        base = self.root_fd
        for name, ident in zip(names, idents, strict=True):
            base = self._open(base, name, ident)

    def _check_held(self, expected: Identity) -> None:
        ident = self._idents[-1]
        fd = self._fds[-1]
        assert fd is not None
        if ident is None:
            ident = identity(os.fstat(fd))
            self._idents[-1] = ident
        if ident != expected:
            raise ChangedError()


def walk(root: str, warnings: WarningSink) -> Iterator[tuple[str, os.stat_result]]:
    """Yield (relative path, lstat) in canonical order; the root itself is ''.

    Directories are opened relative to their parent's descriptor and checked against the lstat
    they were listed with; entries are stat'ed relative to their directory's descriptor.
    """
    try:
        root_fd = open_root(root)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise SourceError(f"the source {root} is not a directory", path=root) from exc
        raise SourceError(f"cannot read the source {root}: {exc.strerror}", path=root) from exc
    with DirChain(root_fd) as chain:
        root_st = os.fstat(root_fd)
        yield "", root_st
        # A frame: (the directory's components, its relative path, its names left to yield).
        stack: list[_Frame] = []
        _push(chain, (), "", identity(root_st), stack, warnings)
        while stack:
            parts, rel, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                continue
            child = f"{rel}/{name}" if rel else name
            try:
                dir_fd = chain.fd(parts)
            except (ChangedError, OSError) as exc:
                # Re-opening this directory (deep trees) failed: skip what is left of it.
                _abandon(chain, parts, exc, stack, warnings)
                continue
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                warnings.add(child, "vanished during the backup")
                continue
            except OSError as exc:
                warnings.add(child, f"cannot stat: {exc.strerror}")
                continue
            yield child, st
            if stat.S_ISDIR(st.st_mode):
                _push(chain, (*parts, name), child, identity(st), stack, warnings)
        if not os.path.isdir(root) or os.fstat(root_fd).st_nlink == 0:
            raise SourceError(f"the source {root} disappeared during the backup", path=root)


_Frame = tuple[tuple[str, ...], str, Iterator[str]]


def _push(
    chain: DirChain,
    parts: tuple[str, ...],
    rel: str,
    expected: Identity,
    stack: list[_Frame],
    warnings: WarningSink,
) -> None:
    """Open and list a directory that was just yielded; push its frame."""
    try:
        names = sorted(os.listdir(chain.fd(parts, expected)))
    except (ChangedError, OSError) as exc:
        _abandon(chain, parts, exc, stack, warnings)
        return
    stack.append((parts, rel, iter(names)))


def _abandon(
    chain: DirChain,
    parts: tuple[str, ...],
    exc: ChangedError | OSError,
    stack: list[_Frame],
    warnings: WarningSink,
) -> None:
    """A directory on ``parts`` cannot be opened (any more): warn once, naming it, and drop the
    frames at and below it. The directories above it are still as listed."""
    failed = parts[: chain.depth + 1]
    warnings.add("/".join(failed) or ".", _dir_failure(exc))
    while stack and len(stack[-1][0]) >= len(failed):
        stack.pop()


def _dir_failure(exc: ChangedError | OSError) -> str:
    if isinstance(exc, ChangedError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return "directory vanished during the backup"
    return f"cannot list directory: {exc.strerror}"


# --- reading what the walk listed ---------------------------------------------------------------------


def open_for_read(name: str, dir_fd: int) -> int:
    # O_NONBLOCK: a file replaced by a FIFO after the walk would otherwise block the open until
    # a writer appears (forever); the fstat below then refuses it. Regular files ignore the flag.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        return os.open(name, flags | os.O_NOATIME, dir_fd=dir_fd)
    except PermissionError:
        return os.open(name, flags, dir_fd=dir_fd)  # O_NOATIME needs ownership (or root)


def open_listed(dirs: DirChain, rel: str, expected: Identity) -> tuple[int, os.stat_result]:
    """Open the regular file the walk listed as ``rel`` with identity ``expected``, relative to
    its directory's descriptor; return (descriptor, fstat).

    Raises :class:`ChangedError` when what the path now names is not that file (another inode, a
    symlink, a non-regular file) or a directory on the way is not the one listed, and
    ``FileNotFoundError`` when it vanished.
    """
    dir_fd, name = dirs.parent(rel)
    try:
        fd = open_for_read(name, dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW: the file became a symlink
            raise ChangedError(CHANGED_FILE) from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ChangedError("replaced by a non-regular file while being backed up")
        if identity(st) != expected:
            raise ChangedError(CHANGED_FILE)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_xattrs(target: int | str) -> dict[str, str] | None:
    """Extended attributes of an open file (descriptor) or of a path's last component (not
    followed), base64-encoded; None when there are none or they cannot be read."""
    try:
        if isinstance(target, int):
            names = os.listxattr(target)
        else:
            names = os.listxattr(target, follow_symlinks=False)
    except OSError:
        return None
    out = {}
    for name in sorted(names):
        try:
            if isinstance(target, int):
                value = os.getxattr(target, name)
            else:
                value = os.getxattr(target, name, follow_symlinks=False)
        except OSError:
            continue
        out[name] = base64.b64encode(value).decode()
    return out or None


def dir_xattrs(dirs: DirChain, rel: str, st: os.stat_result) -> dict[str, str] | None:
    """Extended attributes of the directory the walk listed as ``rel`` with lstat ``st``."""
    try:
        fd = dirs.fd(parts_of(rel), identity(st))
    except (OSError, ChangedError):
        return None  # the walk itself reports a directory that it cannot open as listed
    return read_xattrs(fd)


def read_symlink(dirs: DirChain, rel: str) -> tuple[str, dict[str, str] | None]:
    """A symlink's target and extended attributes, read relative to its directory's descriptor.

    A symlink cannot be opened, so its attributes are read through the procfs name of that
    descriptor: the kernel resolves ``/proc/self/fd/N`` to the directory itself, and the last
    name is not followed.
    """
    dir_fd, name = dirs.parent(rel)
    target = os.readlink(name, dir_fd=dir_fd)
    return target, read_xattrs(f"/proc/self/fd/{dir_fd}/{name}")
