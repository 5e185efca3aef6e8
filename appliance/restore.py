"""Restore of recovery points: file trees to a directory or a tar stream, disks to images.

A manifest is untrusted input (it may come from a damaged or hostile medium): every path is
checked by :func:`safe_relative_path` before use, and absolute paths, ``..``, empty or ``.``
components, NUL bytes and device/FIFO/socket entries are refused with :class:`UnsafeRestorePath`.

The service runs as root and targets may lie in folders local users can write to, so nothing is
written through a path that could have been swapped since it was checked:

- a tree restored into a directory (:func:`restore_tree`, in :mod:`appliance.restore_tree`) is
  written relative to directory descriptors: the target is opened once, every directory below
  it reached one component at a time with ``O_NOFOLLOW``, every entry created, renamed and given
  its metadata relative to its parent's descriptor. ``on_conflict`` says what becomes of an
  entry already at a restored path: ``overwrite`` replaces it, ``keep_both`` renames it to
  ``<name>.before-restore-<YYYYmmddTHHMMSS>``. A target folder that existed keeps its owner and
  mode;
- a tar stream (:func:`restore_tar`) writes nothing on this host;
- a disk (:func:`restore_disk`, in :mod:`appliance.restore_disk`) is written to a file opened with ``O_NOFOLLOW`` (a symlink at the
  target is refused) or to a block device; the raw staging file of other formats is created with
  ``O_EXCL|O_NOFOLLOW``. Whether a device may be written is the caller's decision.

All-zero chunks of a disk become holes in a file target and zeros on a device.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from typing import IO, Any

from appliance.backup.tree import iter_tree
from appliance.restore_disk import restore_disk
from appliance.restore_paths import (
    check_record,
    detached_hardlinks,
    hardlink_target,
    safe_relative_path,
    select_records,
)
from appliance.restore_target import ConflictMode
from appliance.restore_tree import restore_tree
from appliance.store.crypto import Envelope
from appliance.store.repository import Repository

__all__ = [
    "ConflictMode",
    "check_record",
    "restore_disk",
    "restore_tar",
    "restore_tree",
    "safe_relative_path",
]

ProgressCallback = Callable[[dict[str, Any]], None]


def restore_tar(
    repo: Repository, manifest: dict[str, Any], out: IO[bytes], *, subpath: str | None = None
) -> int:
    """Stream a files point (or one path of it) as a POSIX tar; return the number of entries."""
    envelope = repo.envelope
    count = 0
    firsts, stand_ins = detached_hardlinks(repo, manifest, subpath)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for rel, record in select_records(iter_tree(repo, manifest), subpath):
            info = tarfile.TarInfo(rel or ".")
            info.mode = int(record.get("mode", 0o644)) & 0o7777
            info.uid, info.gid = int(record.get("uid", 0)), int(record.get("gid", 0))
            info.uname, info.gname = record.get("user", ""), record.get("group", "")
            info.mtime = int(record.get("mtime_ns", 0)) / 1e9
            kind = record["type"]
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = record["target"]
                tar.addfile(info)
            elif kind == "hardlink" and rel not in stand_ins:
                link_target = hardlink_target(rel, record, subpath, firsts)
                if link_target is None:
                    continue  # its first name lies outside and could not be found
                info.type = tarfile.LNKTYPE
                info.linkname = link_target
                tar.addfile(info)
            else:
                contents = stand_ins.get(rel, record)  # a detached hardlink carries the file
                info.size = int(contents.get("size", 0))
                tar.addfile(info, _ChunkStream(repo, envelope, contents.get("chunks", [])))
            count += 1
    return count


class _ChunkStream(io.RawIOBase):
    """A file's contents as a readable stream, decoded chunk by chunk."""

    def __init__(self, repo: Repository, envelope: Envelope, chunks: list[list[Any]]) -> None:
        self._repo, self._envelope = repo, envelope
        self._chunks = iter(chunks)
        self._buffer = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        while not self._buffer:
            item = next(self._chunks, None)
            if item is None:
                return 0
            hex_id, length = item
            data = (
                bytes(length)
                if hex_id is None
                else self._repo.read_blob(bytes.fromhex(hex_id), self._envelope)
            )
            self._buffer = memoryview(data)
        n = min(len(buf), len(self._buffer))
        buf[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(1 << 20), b""))
        # tarfile expects full reads until the end of the member.
        buf = bytearray(size)
        view = memoryview(buf)
        filled = 0
        while filled < size:
            n = self.readinto(view[filled:])
            if n == 0:
                break
            filled += n
        return bytes(buf[:filled])
