"""File trees that are not local folders of the appliance: walked through a small filesystem
interface, turned into the store's tree records (docs/format.md, "File trees").

Two sources use it: the backup client on a protected host (:class:`LocalFS` there, chunks sent
to the appliance) and SFTP pulls on the appliance (an SFTP filesystem, chunks written to the
store). Both yield the same records in canonical order, so their points restore, browse, copy
and verify like any other files point.

- The walk is depth-first pre-order with each directory's names sorted as Python strings: the
  canonical order, so records can be written to the tree as they come.
- A file whose size, mtime (and ctime and inode where the source has them) match the previous
  point's record reuses that record's chunk list without being read.
- Every other file is read once, cut by FastCDC with the store's parameters, and each chunk is
  handed to a :class:`ChunkSink`, which returns its ID (all-zero chunks are ``null``, never sent).
- A file that changes while it is read is stored as last read with a warning; entries that vanish
  or cannot be read are warnings, never a failed backup. A root that cannot be read fails.

This module imports only the standard library and pyfastcdc: the client's zipapp carries it.
"""

from __future__ import annotations

import fnmatch
import grp
import os
import pwd
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

import pyfastcdc

Record = dict[str, Any]
#: Files up to this size are read whole and cut in memory; larger ones are streamed.
WHOLE_READ = 8 * 1024 * 1024


@dataclass(frozen=True)
class EntryStat:
    """What a source knows of an entry; ``ctime_ns``, ``ino``, ``dev`` are None where the
    source cannot tell (SFTP)."""

    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int | None = None
    ino: int | None = None
    dev: int | None = None
    nlink: int = 1


class SourceFS(Protocol):
    """A read-only view of one tree; ``rel`` paths are relative to its root, ``""`` the root.

    Every method raises ``OSError`` for an entry that cannot be read (the walk makes it a
    warning) and never follows a symlink."""

    def lstat(self, rel: str) -> EntryStat: ...

    def listdir(self, rel: str) -> list[str]: ...

    def open_file(self, rel: str, expected: EntryStat) -> BinaryIO:
        """The file at ``rel``, which must still be the entry the walk listed."""
        ...

    def readlink(self, rel: str) -> str: ...

    def owner_names(self, uid: int, gid: int) -> tuple[str | None, str | None]: ...


class ChunkSink(Protocol):
    def put(self, data: bytes) -> str:
        """Store (or find) a non-zero chunk; its hex ID."""
        ...


class LocalFS:
    """A folder of this machine. Files are opened with ``O_NOFOLLOW`` and must be the inode the
    walk listed, so an entry swapped for a symlink while the backup runs is not followed."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self._users: dict[int, str | None] = {}
        self._groups: dict[int, str | None] = {}

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def lstat(self, rel: str) -> EntryStat:
        st = os.lstat(self._path(rel)) if rel else os.stat(self.root)
        return EntryStat(
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_ino,
            st.st_dev,
            st.st_nlink,
        )

    def listdir(self, rel: str) -> list[str]:
        return os.listdir(self._path(rel))

    def open_file(self, rel: str, expected: EntryStat) -> BinaryIO:
        fd = os.open(self._path(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (expected.dev, expected.ino):
            os.close(fd)
            raise OSError(0, "changed while it was backed up")
        return os.fdopen(fd, "rb", buffering=0)

    def readlink(self, rel: str) -> str:
        return os.readlink(self._path(rel))

    def owner_names(self, uid: int, gid: int) -> tuple[str | None, str | None]:
        if uid not in self._users:
            try:
                self._users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._users[uid] = None
        if gid not in self._groups:
            try:
                self._groups[gid] = grp.getgrgid(gid).gr_name
            except KeyError:
                self._groups[gid] = None
        return self._users[uid], self._groups[gid]


@dataclass
class WalkStats:
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    files_read: int = 0
    files_reused: int = 0
    bytes_total: int = 0
    bytes_read: int = 0
    warnings: list[dict[str, str]] = field(default_factory=list)
    warning_count: int = 0

    def warn(self, path: str, message: str) -> None:
        self.warning_count += 1
        if len(self.warnings) < 1000:  # the manifest keeps a bounded list, the count is exact
            self.warnings.append({"path": path, "message": message})


def excluded(rel: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``rel`` matches an exclusion: a pattern with a ``/`` matches the path from the
    root (``var/cache/*``), one without matches any name (``*.tmp``, ``.cache``)."""
    if not rel:
        return False
    name = rel.rsplit("/", 1)[-1]
    for pattern in patterns:
        if "/" in pattern:
            if fnmatch.fnmatchcase(rel, pattern.strip("/")):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def walk(
    fs: SourceFS,
    stats: WalkStats,
    *,
    excludes: tuple[str, ...] = (),
    one_file_system: bool = False,
) -> Iterator[tuple[str, EntryStat]]:
    """Entries in canonical order. An unreadable root raises; anything below is a warning."""
    root = fs.lstat("")
    if not stat.S_ISDIR(root.mode):
        raise NotADirectoryError(f"{getattr(fs, 'root', 'the source')} is not a folder")
    yield "", root
    stack: list[tuple[str, Iterator[str]]] = [("", iter(sorted(fs.listdir(""))))]
    while stack:
        parent, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            continue
        rel = f"{parent}/{name}" if parent else name
        if excluded(rel, excludes):
            continue
        try:
            st = fs.lstat(rel)
        except OSError as exc:
            stats.warn(rel, f"cannot read: {exc.strerror or exc}")
            continue
        yield rel, st
        if not stat.S_ISDIR(st.mode):
            continue
        if one_file_system and st.dev is not None and st.dev != root.dev:
            stats.warn(rel, "another file system: kept as an empty folder (one file system)")
            continue
        try:
            stack.append((rel, iter(sorted(fs.listdir(rel)))))
        except OSError as exc:
            stats.warn(rel, f"cannot list: {exc.strerror or exc}")


def _unchanged(prev: Record | None, st: EntryStat) -> bool:
    return (
        prev is not None
        and prev.get("type") == "file"
        and "chunks" in prev
        and prev.get("size") == st.size
        and prev.get("mtime_ns") == st.mtime_ns
        and (st.ctime_ns is None or prev.get("ctime_ns") == st.ctime_ns)
        and (st.ino is None or prev.get("ino") == st.ino)
    )


def is_zero(data: bytes) -> bool:
    return not data or (data[0] == 0 and data[-1] == 0 and data.count(0) == len(data))


class _Limited:
    """A stream cut at ``limit`` bytes (a file that grows while it is read)."""

    def __init__(self, stream: BinaryIO, limit: int) -> None:
        self._stream = stream
        self._left = limit

    def readinto(self, buf: memoryview) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(buf)[: min(len(buf), self._left)]
        data = self._stream.read(len(view))
        view[: len(data)] = data
        self._left -= len(data)
        return len(data)


class TreeReader:
    """Turns a walk into records; reads each changed file through ``fs`` into ``sink``."""

    def __init__(
        self,
        fs: SourceFS,
        sink: ChunkSink,
        chunk_params: dict[str, int],
        *,
        excludes: tuple[str, ...] = (),
        one_file_system: bool = False,
        cancel: threading.Event | None = None,
        read_progress: Callable[[int], None] | None = None,
    ) -> None:
        self.fs = fs
        self.sink = sink
        self.chunker = pyfastcdc.FastCDC(
            avg_size=chunk_params["avg"],
            min_size=chunk_params["min"],
            max_size=chunk_params["max"],
        )
        self.min_chunk = chunk_params["min"]
        self.excludes = excludes
        self.one_file_system = one_file_system
        self.cancel = cancel
        self.read_progress = read_progress
        self.stats = WalkStats()

    def records(self, previous: Iterator[Record] | None = None) -> Iterator[Record]:
        prev_iter = previous if previous is not None else iter(())
        prev = next(prev_iter, None)
        hardlinks: dict[tuple[int, int], str] = {}
        stats = self.stats
        for rel, st in walk(
            self.fs, stats, excludes=self.excludes, one_file_system=self.one_file_system
        ):
            if self.cancel is not None and self.cancel.is_set():
                raise InterruptedError("the backup was cancelled")
            record: Record = {
                "path": rel,
                "mode": stat.S_IMODE(st.mode),
                "uid": st.uid,
                "gid": st.gid,
                "mtime_ns": st.mtime_ns,
            }
            user, group = self.fs.owner_names(st.uid, st.gid)
            if user:
                record["user"] = user
            if group:
                record["group"] = group
            if stat.S_ISDIR(st.mode):
                record["type"] = "dir"
                stats.directories += 1
            elif stat.S_ISLNK(st.mode):
                try:
                    record.update(type="symlink", target=self.fs.readlink(rel))
                except OSError as exc:
                    stats.warn(rel, f"cannot read symlink: {exc.strerror or exc}")
                    continue
                stats.symlinks += 1
            elif stat.S_ISREG(st.mode):
                key = (st.dev, st.ino) if st.dev is not None and st.ino is not None else None
                if key is not None and st.nlink > 1:
                    if key in hardlinks:
                        record.update(type="hardlink", target=hardlinks[key])
                        stats.hardlinks += 1
                        yield record
                        continue
                    hardlinks[key] = rel
                while prev is not None and _key(prev["path"]) < _key(rel):
                    prev = next(prev_iter, None)
                match = prev if prev is not None and prev["path"] == rel else None
                record.update(type="file", size=st.size, ctime_ns=st.ctime_ns or 0, ino=st.ino or 0)
                if _unchanged(match, st):
                    assert match is not None
                    record["chunks"] = match["chunks"]
                    stats.files_reused += 1
                else:
                    content = self._read(rel, st)
                    if content is None:
                        continue
                    record["chunks"], record["size"] = content
                    stats.files_read += 1
                    stats.bytes_read += record["size"]
                stats.files += 1
                stats.bytes_total += record["size"]
            else:
                stats.warn(rel, f"special file ({_kind(st.mode)}) not backed up")
                continue
            yield record

    def _read(self, rel: str, st: EntryStat) -> tuple[list[list[Any]], int] | None:
        chunks: list[list[Any]] = []
        try:
            with self.fs.open_file(rel, st) as stream:
                read = 0
                if st.size <= WHOLE_READ:
                    data = stream.read(st.size + 1)[: st.size] if st.size else b""
                    pieces: Iterator[Any] = (
                        iter([data])
                        if len(data) <= self.min_chunk
                        else (p.data for p in self.chunker.cut_buf(data))
                    )
                else:
                    pieces = (p.data for p in self.chunker.cut_stream(_Limited(stream, st.size)))
                for piece in pieces:
                    if not piece:
                        continue
                    data_bytes = bytes(piece)
                    read += len(data_bytes)
                    if self.read_progress is not None:
                        self.read_progress(len(data_bytes))
                    if is_zero(data_bytes):
                        chunks.append([None, len(data_bytes)])
                    else:
                        chunks.append([self.sink.put(data_bytes), len(data_bytes)])
            after = self.fs.lstat(rel)
        except OSError as exc:
            self.stats.warn(rel, f"read failed: {exc.strerror or exc}")
            return None
        if read != st.size or (after.size, after.mtime_ns) != (st.size, st.mtime_ns):
            self.stats.warn(rel, "changed while being read; stored as last read")
        return chunks, read


def _key(path: str) -> tuple[str, ...]:
    return tuple(path.split("/")) if path else ()


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    return "unknown type"
