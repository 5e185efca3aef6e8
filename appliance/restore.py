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
- a disk (:func:`restore_disk`) is written to a file opened with ``O_NOFOLLOW`` (a symlink at the
  target is refused) or to a block device; the raw staging file of other formats is created with
  ``O_EXCL|O_NOFOLLOW``. Whether a device may be written is the caller's decision.

All-zero chunks of a disk become holes in a file target and zeros on a device.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import tarfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

from appliance.backup.disks import write_disk
from appliance.backup.images import read_table
from appliance.backup.tree import iter_tree
from appliance.errors import InvalidInput, UnsafeRestorePath
from appliance.restore_paths import (
    check_record,
    detached_hardlinks,
    hardlink_target,
    safe_relative_path,
    select_records,
)
from appliance.restore_target import ConflictMode
from appliance.restore_tree import restore_tree
from appliance.store import format as fmt
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
RESTORE_UNIT_CHUNKS = 64


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


def restore_disk(
    repo: Repository,
    disk: dict[str, Any],
    target: str,
    *,
    target_format: str = "raw",
    progress: ProgressCallback | None = None,
    threads: int = 2,
) -> int:
    """Write one disk of an image point to a raw/qcow2/... file or a block device.

    A symlink at ``target`` is refused, never followed; an existing file is truncated in place
    (it keeps its owner and mode) unless it has other hard links, which is refused; a block
    device is written in place, never created or truncated.
    """
    size = int(disk["size"])
    if target_format != "raw":
        if os.path.islink(target):
            raise UnsafeRestorePath(
                f"refusing restore target {target}: it is a symlink", path=target
            )
        tmp = f"{target}.raw-restore"
        fd = _create_staging(tmp)
        try:
            try:
                _write_raw(repo, disk, fd, tmp, False, progress, threads)
            finally:
                os.close(fd)
            write_disk(tmp, target, target_format)  # writes beside the target, renames over it
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return size
    table = read_table(repo, disk)
    fd, is_block = _open_disk_target(target)
    try:
        _write_raw(repo, disk, fd, target, is_block, progress, threads, table)
    finally:
        os.close(fd)
    return size


def _create_staging(path: str) -> int:
    """Create the raw staging file of a non-raw restore; what is at its name is removed first
    (a staging file of an interrupted restore, or a planted symlink: unlinked, not followed)."""
    for _ in range(3):
        try:
            return os.open(
                path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except FileExistsError:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise InvalidInput(f"cannot replace {path}: {exc.strerror}", path=path) from exc
        except OSError as exc:
            raise InvalidInput(f"cannot create {path}: {exc.strerror}", path=path) from exc
    raise UnsafeRestorePath(f"refusing {path}: an entry keeps reappearing at its name", path=path)


def _open_disk_target(target: str) -> tuple[int, bool]:
    """Open ``target`` for writing without following a symlink; returns (fd, is a block device).

    The checks are made on the opened descriptor, so nothing swapped in after them is written.
    """
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(3):
        try:
            return os.open(target, flags | os.O_CREAT | os.O_EXCL, 0o600), False
        except FileExistsError:
            pass
        except OSError as exc:
            raise InvalidInput(
                f"cannot open restore target {target}: {exc.strerror}", path=target
            ) from exc
        try:
            fd = os.open(target, flags | os.O_NONBLOCK)  # a FIFO must not block the open
        except FileNotFoundError:
            continue  # removed since: create it
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeRestorePath(
                    f"refusing restore target {target}: it is a symlink", path=target
                ) from None
            raise InvalidInput(
                f"cannot open restore target {target}: {exc.strerror}", path=target
            ) from exc
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink == 1):
            os.set_blocking(fd, True)
            if stat.S_ISREG(st.st_mode):
                os.ftruncate(fd, 0)
            return fd, stat.S_ISBLK(st.st_mode)
        os.close(fd)
        if stat.S_ISREG(st.st_mode):
            raise UnsafeRestorePath(
                f"refusing restore target {target}: it has other hard links", path=target
            )
        raise InvalidInput(f"{target} is neither a file nor a block device", path=target)
    raise UnsafeRestorePath(f"refusing {target}: it keeps changing under the restore", path=target)


def _write_raw(
    repo: Repository,
    disk: dict[str, Any],
    fd: int,
    target: str,
    is_block: bool,
    progress: ProgressCallback | None,
    threads: int,
    table: list[bytes] | None = None,
) -> None:
    size = int(disk["size"])
    chunk_size = int(disk["chunk_size"])
    if table is None:
        table = read_table(repo, disk)
    if is_block:
        device_size = os.lseek(fd, 0, os.SEEK_END)
        if device_size < size:
            raise InvalidInput(
                f"block device {target} holds {device_size} bytes; the disk needs {size}"
            )
    zero_chunk = bytes(chunk_size)
    local = threading.local()

    def unit(first: int) -> int:
        # Decrypt and decompress release the GIL: threads over runs of chunks scale.
        envelope = getattr(local, "envelope", None)
        if envelope is None:
            envelope = local.envelope = Envelope(repo.key)
        last = min(first + RESTORE_UNIT_CHUNKS, len(table))
        # One ranged read per pack run for the unit's chunks (they were written together).
        blobs = repo.read_blobs((t for t in table[first:last] if t != fmt.ZERO_ID), envelope)
        for i in range(first, last):
            offset = i * chunk_size
            blob_id = table[i]
            if blob_id == fmt.ZERO_ID:
                if is_block:  # a device keeps old contents where a file has holes
                    os.pwrite(fd, zero_chunk[: min(chunk_size, size - offset)], offset)
                continue
            os.pwrite(fd, blobs[blob_id], offset)
        return min(last * chunk_size, size)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for done in pool.map(unit, range(0, len(table), RESTORE_UNIT_CHUNKS)):
            if progress is not None:
                progress({"bytes_done": done, "bytes_total": size})
    if not is_block:
        os.ftruncate(fd, size)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
