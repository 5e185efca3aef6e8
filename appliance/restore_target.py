"""The restore target's folders, reached only through directory descriptors.

The target is opened once (``O_DIRECTORY|O_NOFOLLOW``); every directory below it is reached from
that descriptor one component at a time (:class:`TargetDirectories`), and entries are created,
renamed, removed and given their metadata relative to their parent's descriptor, so a symlink
planted on the way is never followed. :class:`Conflicts` decides what happens to an entry
already at a name the point restores (``overwrite`` or ``keep_both``).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from appliance.backup.tree import Record
from appliance.errors import InvalidInput, UnsafeRestorePath

ConflictMode = Literal["overwrite", "keep_both"]
#: Directory descriptors one walk keeps open (per process); records come in walk order, so the
#: directories of the current branch stay open and a deep tree still fits any fd limit.
OPEN_DIRECTORIES = 64
#: How often an entry that reappears at a name being freed is removed again before giving up.
CREATE_ATTEMPTS = 8
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# --- descriptors of the target ----------------------------------------------------------------------


def open_target(target: str, expect: tuple[int, int] | None = None) -> int:
    """Open the restore target directory without following a symlink at its last component.

    ``expect`` is the (device, inode) the restore opened: a worker refuses a target that was
    replaced since.
    """
    try:
        fd = os.open(target, DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeRestorePath(
                f"restore target {target} is a symlink or not a directory", path=target
            ) from None
        raise InvalidInput(
            f"cannot open restore target {target}: {exc.strerror}", path=target
        ) from exc
    st = os.fstat(fd)
    if expect is not None and (st.st_dev, st.st_ino) != expect:
        os.close(fd)
        raise UnsafeRestorePath(
            f"restore target {target} was replaced during the restore", path=target
        )
    return fd


class TargetDirectories:
    """Descriptors of the target's directories, reached from its root without following links.

    Each directory is opened relative to its parent's descriptor with ``O_NOFOLLOW|O_DIRECTORY``,
    so a symlink swapped in for a directory at any time is refused, never followed. The last
    :data:`OPEN_DIRECTORIES` directories used stay open (records come in walk order: the current
    branch is reused, and evicting a directory never invalidates a descendant's descriptor).
    The root descriptor belongs to the caller.
    """

    def __init__(self, root: int, limit: int = OPEN_DIRECTORIES) -> None:
        self.root = root
        self._limit = max(2, limit)
        self._open: OrderedDict[str, int] = OrderedDict()

    def __enter__(self) -> TargetDirectories:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        while self._open:
            os.close(self._open.popitem()[1])

    def directory(self, rel: str, entry: str) -> int:
        """Descriptor of the target's directory ``rel`` ("" is the root), valid until the next
        call; ``entry`` is the manifest path being restored, which errors name."""
        if not rel:
            return self.root
        fd = self._open.get(rel)
        if fd is not None:
            self._open.move_to_end(rel)
            return fd
        start, fd = 0, self.root
        end = rel.rfind("/")
        while end > 0:  # the deepest ancestor still open
            cached = self._open.get(rel[:end])
            if cached is not None:
                self._open.move_to_end(rel[:end])
                start, fd = end + 1, cached
                break
            end = rel.rfind("/", 0, end)
        while True:
            slash = rel.find("/", start)
            stop = len(rel) if slash < 0 else slash
            fd = self._open_child(fd, rel[start:stop], rel[:stop], entry)
            if slash < 0:
                return fd
            start = slash + 1

    def parent(self, rel: str) -> tuple[int, str]:
        """(descriptor of the parent directory, last component) of the entry ``rel``."""
        head, _, name = rel.rpartition("/")
        return self.directory(head, rel), name

    def _open_child(self, parent: int, name: str, rel: str, entry: str) -> int:
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            # A point lists every directory before its contents; a missing one is a manifest
            # symlink (created only in pass 2) or no directory of the point.
            raise UnsafeRestorePath(
                f"refusing {entry!r}: {rel!r} is not a directory of this point in the target",
                path=entry,
            ) from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeRestorePath(
                    f"refusing {entry!r}: {rel!r} in the target is a symlink or not a directory",
                    path=entry,
                ) from None
            raise
        self._open[rel] = fd
        if len(self._open) > self._limit:
            os.close(self._open.popitem(last=False)[1])
        return fd


@dataclass(frozen=True)
class Conflicts:
    """What to do with an entry already at a name the point restores (see the module doc)."""

    mode: ConflictMode
    stamp: str  # YYYYmmddTHHMMSS of the restore, in the names of kept entries

    def make_room(self, parent: int, name: str, rel: str) -> int:
        """Free ``name`` in ``parent`` for the entry ``rel``; return 1 if an entry was kept."""
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return 0
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeRestorePath(
                f"refusing {rel!r}: a directory of that name is in the target", path=rel
            )
        try:
            if self.mode == "keep_both":
                aside = kept_name(parent, name, self.stamp)
                os.rename(name, aside, src_dir_fd=parent, dst_dir_fd=parent)
                return 1
            os.unlink(name, dir_fd=parent)
        except FileNotFoundError:
            pass
        except IsADirectoryError:  # swapped for a directory since the stat
            raise UnsafeRestorePath(
                f"refusing {rel!r}: a directory of that name is in the target", path=rel
            ) from None
        return 0


def keep_stamp(now: datetime | None = None) -> str:
    """The time in the names of kept entries (UTC)."""
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%S")


def kept_name(parent: int, name: str, stamp: str) -> str:
    """A free name in ``parent`` to keep ``name`` under: ``<name>.before-restore-<stamp>``, then
    ``-2``, ``-3``... (shortened to fit NAME_MAX)."""
    suffix = f".before-restore-{stamp}"
    raw = os.fsencode(name)
    room = 255 - len(suffix) - 8  # NAME_MAX, with room for "-<n>"
    base = (os.fsdecode(raw[:room]) if len(raw) > room else name) + suffix
    for n in range(1, 10_000):
        candidate = base if n == 1 else f"{base}-{n}"
        try:
            os.stat(candidate, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return candidate
    raise InvalidInput(f"no free name to keep {name!r} under", path=name)


def keep_aside(path: str, stamp: str) -> str:
    """Rename the entry at ``path`` (a disk image in the way of an in-place restore) to its kept
    name beside it; returns the new path. The entry itself is renamed, never a link's target."""
    folder, name = os.path.split(path)
    parent = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        aside = kept_name(parent, name, stamp)
        os.rename(name, aside, src_dir_fd=parent, dst_dir_fd=parent)
    finally:
        os.close(parent)
    return os.path.join(folder, aside)


def create_entry(
    make: Callable[[], Any], parent: int, name: str, rel: str, conflicts: Conflicts
) -> tuple[Any, int]:
    """Run ``make`` (an ``*at`` call creating ``name``), freeing the name when it is taken;
    returns (what make returned, entries kept)."""
    kept = 0
    for _ in range(CREATE_ATTEMPTS):
        try:
            return make(), kept
        except FileExistsError:
            kept += conflicts.make_room(parent, name, rel)
    raise UnsafeRestorePath(f"refusing {rel!r}: an entry keeps reappearing at its name", path=rel)


def apply_metadata(fd: int, record: Record) -> None:
    """Owner, xattrs, mode and times of a file or directory, through its descriptor."""
    if os.geteuid() == 0:
        with contextlib.suppress(OSError):
            os.fchown(fd, int(record.get("uid", -1)), int(record.get("gid", -1)))
    for name, value in (record.get("xattrs") or {}).items():
        with contextlib.suppress(OSError):
            os.setxattr(fd, name, base64.b64decode(value))
    os.fchmod(fd, int(record.get("mode", 0o644)) & 0o7777)  # after fchown, which clears setuid
    mtime = int(record.get("mtime_ns", 0))
    os.utime(fd, ns=(mtime, mtime))


def apply_symlink_metadata(parent: int, name: str, record: Record) -> None:
    """Owner, xattrs and times of the symlink ``name`` itself (a symlink has no mode)."""
    if os.geteuid() == 0:
        with contextlib.suppress(OSError):
            uid, gid = int(record.get("uid", -1)), int(record.get("gid", -1))
            os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
    # No *xattrat call exists: /proc/self/fd/N is the parent directory itself (not a path that
    # can be swapped), and the last component is not followed.
    for key, value in (record.get("xattrs") or {}).items():
        with contextlib.suppress(OSError):
            path = f"/proc/self/fd/{parent}/{name}"
            os.setxattr(path, key, base64.b64decode(value), follow_symlinks=False)
    mtime = int(record.get("mtime_ns", 0))
    os.utime(name, ns=(mtime, mtime), dir_fd=parent, follow_symlinks=False)
