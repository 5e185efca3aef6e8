"""Restore of recovery points: file trees to a directory or a tar stream, disks to images.

A manifest is untrusted input (it may come from a damaged or hostile medium). Every path is
checked by :func:`safe_relative_path` before use: absolute paths, ``..``, empty or ``.``
components, NUL bytes and device/FIFO/socket entries are refused with :class:`UnsafeRestorePath`
before anything is written. Files are created with ``O_NOFOLLOW`` and their parent directories are
resolved and checked to lie inside the target; symlinks and hardlinks from the manifest are
created only after every file, so a manifest cannot plant a symlink and then write through it.

File contents are restored by worker processes over batches of files (decrypt and decompress
release the GIL, but per-file work does not); all-zero chunks become holes.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import io
import os
import stat
import tarfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import IO, Any

from appliance.backup.disks import write_disk
from appliance.backup.images import read_table
from appliance.backup.tree import Record, iter_tree
from appliance.errors import BackupCancelled, InvalidInput, NotFound, UnsafeRestorePath
from appliance.store import format as fmt
from appliance.store.crypto import Envelope
from appliance.store.repository import Repository
from appliance.workers import die_with_parent, worker_context

ProgressCallback = Callable[[dict[str, Any]], None]
RESTORE_BATCH_BYTES = 32 * 1024 * 1024
RESTORE_BATCH_FILES = 256
RESTORE_UNIT_CHUNKS = 64
ALLOWED_TYPES = frozenset({"file", "dir", "symlink", "hardlink"})


def safe_relative_path(path: object) -> str:
    """Return ``path`` if it is a safe relative path of a manifest, else raise."""
    if not isinstance(path, str):
        raise UnsafeRestorePath(f"manifest path {path!r} is not a string")
    if path == "":
        return path
    if "\x00" in path or path.startswith("/"):
        raise UnsafeRestorePath(f"refusing absolute or NUL path {path!r}", path=path)
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise UnsafeRestorePath(f"refusing path {path!r} (empty, . or .. component)", path=path)
    return path


def check_record(record: Record) -> Record:
    safe_relative_path(record.get("path"))
    kind = record.get("type")
    if kind not in ALLOWED_TYPES:
        raise UnsafeRestorePath(
            f"refusing entry {record.get('path')!r} of type {kind!r} (only files, directories "
            "and links are restored)",
            path=record.get("path"),
        )
    if kind == "hardlink":
        safe_relative_path(record.get("target"))
    return record


def _select(records: Iterator[Record], subpath: str | None) -> Iterator[tuple[str, Record]]:
    """Records under ``subpath`` with their path relative to the restore target."""
    if not subpath:
        for record in records:
            yield check_record(record)["path"], record
        return
    prefix = safe_relative_path(subpath.strip("/"))
    parent = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
    found = False
    for record in records:
        check_record(record)
        path = record["path"]
        if path == prefix or path.startswith(prefix + "/"):
            found = True
            yield (path[len(parent) + 1 :] if parent else path), record
    if not found:
        raise NotFound(f"{subpath} is not in this recovery point", path=subpath)


def _relocate(path: str, subpath: str | None) -> str | None:
    """``path`` relative to the restore target, or None if it lies outside ``subpath``."""
    if not subpath:
        return path
    prefix = safe_relative_path(subpath.strip("/"))
    if not (path == prefix or path.startswith(prefix + "/")):
        return None
    parent = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
    return path[len(parent) + 1 :] if parent else path


def _detached_hardlinks(
    repo: Repository, manifest: dict[str, Any], subpath: str | None
) -> tuple[dict[str, str], dict[str, Record]]:
    """Hardlinks of a restored subtree whose first name (the file record) lies outside it.

    Returns ``firsts`` (first name -> target-relative path of the first link to it within the
    subtree) and ``stand_ins`` (that path -> the first name's record): that link is restored as
    the file itself and the other links to the same first name point at it, so no name of the
    subtree is lost.
    """
    firsts: dict[str, str] = {}
    if not subpath:
        return firsts, {}
    for rel, record in _select(iter_tree(repo, manifest), subpath):
        if record["type"] == "hardlink" and _relocate(record["target"], subpath) is None:
            firsts.setdefault(record["target"], rel)
    stand_ins: dict[str, Record] = {}
    if firsts:
        for record in iter_tree(repo, manifest):
            if record.get("path") in firsts and check_record(record)["type"] == "file":
                stand_ins[firsts[record["path"]]] = record
    return firsts, stand_ins


def _hardlink_target(
    rel: str, record: Record, subpath: str | None, firsts: dict[str, str]
) -> str | None:
    """Target-relative path a hardlink points at; None if it is restored as a file or lost."""
    relocated = _relocate(record["target"], subpath)
    if relocated is not None:
        return relocated
    first = firsts.get(record["target"])
    return None if first is None or first == rel else first


_checked_parents: dict[str, bool] = {}


def _inside(target: str, path: str, *, cache: bool = True) -> str:
    full = os.path.join(target, path)
    directory = os.path.dirname(full)
    if not cache or directory not in _checked_parents:
        # Directories come from pass 1 and manifest symlinks only from pass 2, so a parent that
        # resolved inside the target stays inside for the rest of pass 1; the cache saves a
        # realpath (one lstat per component) for every file.
        parent = os.path.realpath(directory)
        if parent != target and not parent.startswith(target + os.sep):
            raise UnsafeRestorePath(f"refusing {path!r}: it resolves outside the target", path=path)
        if not os.path.isdir(parent):
            # A point lists every directory before its contents; a parent that is missing here
            # is a manifest symlink (created only in pass 2) or no directory of the point.
            raise UnsafeRestorePath(
                f"refusing {path!r}: its parent is not a directory of this point", path=path
            )
        if cache:
            if len(_checked_parents) > 100_000:
                _checked_parents.clear()
            _checked_parents[directory] = True
    return full


# --- worker side -------------------------------------------------------------------------------------

_repo: Repository | None = None
_envelope: Envelope | None = None


def _init_restore_worker(repo_or_spec: Any) -> None:
    die_with_parent()
    global _repo, _envelope
    _checked_parents.clear()  # a cache of a previous restore must not carry over
    repo = (
        repo_or_spec
        if isinstance(repo_or_spec, Repository)
        else Repository.from_worker_spec(repo_or_spec)
    )
    _repo = repo
    _envelope = Envelope(repo.key)


def write_file_contents(
    repo: Repository, envelope: Envelope, fd: int, chunks: list[list[Any]]
) -> int:
    offset = 0
    for hex_id, length in chunks:
        if hex_id is None:
            offset += length  # a hole: ftruncate below extends the file sparsely
            continue
        data = repo.read_blob(bytes.fromhex(hex_id), envelope)
        if len(data) != length:
            raise UnsafeRestorePath(
                f"chunk {hex_id[:16]} has {len(data)} bytes, manifest says {length}"
            )
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written
    os.ftruncate(fd, offset)
    return offset


def _restore_file(target: str, rel: str, record: Record, numeric_owner: bool) -> int:
    assert _repo is not None and _envelope is not None
    full = _inside(target, rel)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISLNK(os.lstat(full).st_mode):
            os.unlink(full)  # never write through a symlink that was there before
    fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        size = write_file_contents(_repo, _envelope, fd, record.get("chunks", []))
        apply_metadata(full, record, fd=fd, numeric_owner=numeric_owner)
    finally:
        os.close(fd)
    return size


def _remove_for_link(full: str, rel: str) -> None:
    """Remove what a link of the point replaces; a directory is refused, never emptied."""
    try:
        os.unlink(full)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise UnsafeRestorePath(
            f"refusing link {rel!r}: a directory of that name is in the target", path=rel
        ) from None


def _restore_batch(target: str, items: list[tuple[str, Record]], numeric_owner: bool) -> int:
    return sum(_restore_file(target, rel, record, numeric_owner) for rel, record in items)


def apply_metadata(
    path: str, record: Record, *, fd: int | None = None, numeric_owner: bool = True
) -> None:
    if os.geteuid() == 0:
        uid, gid = int(record.get("uid", -1)), int(record.get("gid", -1))
        with contextlib.suppress(OSError):
            if fd is not None:
                os.fchown(fd, uid, gid)
            else:
                os.chown(path, uid, gid, follow_symlinks=False)
    for name, value in (record.get("xattrs") or {}).items():
        with contextlib.suppress(OSError):
            os.setxattr(path, name, base64.b64decode(value), follow_symlinks=False)
    if record.get("type") != "symlink":
        mode = int(record.get("mode", 0o644)) & 0o7777
        if fd is not None:
            os.fchmod(fd, mode)
        else:
            os.chmod(path, mode)
    mtime = int(record.get("mtime_ns", 0))
    if fd is not None:
        os.utime(fd, ns=(mtime, mtime))
    else:
        os.utime(path, ns=(mtime, mtime), follow_symlinks=False)


# --- main side ------------------------------------------------------------------------------------------


def restore_tree(
    repo: Repository,
    manifest: dict[str, Any],
    target: str,
    *,
    subpath: str | None = None,
    workers: int = 2,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, int]:
    """Restore a files point (or one path of it) into ``target``; return counts."""
    _checked_parents.clear()
    target = os.path.realpath(target)
    os.makedirs(target, exist_ok=True)
    counts = {"files": 0, "directories": 0, "symlinks": 0, "hardlinks": 0, "bytes": 0}
    firsts, stand_ins = _detached_hardlinks(repo, manifest, subpath)
    spec = repo.worker_spec()
    ctx = worker_context(spec is not None)
    pending = []
    batch: list[tuple[str, Record]] = []
    batch_bytes = 0
    with ProcessPoolExecutor(
        max_workers=max(1, workers),
        mp_context=ctx,
        initializer=_init_restore_worker,
        initargs=(spec or repo,),
    ) as pool:

        def flush() -> None:
            nonlocal batch, batch_bytes
            if batch:
                pending.append(pool.submit(_restore_batch, target, batch, True))
                batch, batch_bytes = [], 0
            while len(pending) > workers * 3:
                counts["bytes"] += pending.pop(0).result()
                if progress is not None:
                    progress({"files": counts["files"], "bytes_done": counts["bytes"]})

        # Pass 1: directories (owner-writable until pass 2) and file contents.
        for rel, record in _select(iter_tree(repo, manifest), subpath):
            if cancel is not None and cancel.is_set():
                raise BackupCancelled("the restore was cancelled")
            kind = record["type"]
            if kind == "dir":
                full = _inside(target, rel) if rel else target
                if rel:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(full, 0o700)
                    if os.path.islink(full) or not os.path.isdir(full):
                        raise UnsafeRestorePath(
                            f"{rel!r} exists in the target and is not a directory"
                        )
                counts["directories"] += 1
            elif kind == "file":
                batch.append((rel, record))
                batch_bytes += int(record.get("size", 0))
                counts["files"] += 1
                if batch_bytes >= RESTORE_BATCH_BYTES or len(batch) >= RESTORE_BATCH_FILES:
                    flush()
        for rel, record in stand_ins.items():
            batch.append((rel, record))
            counts["files"] += 1
        flush()
        for future in pending:
            counts["bytes"] += future.result()
    # Pass 2: links, then directory metadata (after their contents are complete).
    for rel, record in _select(iter_tree(repo, manifest), subpath):
        kind = record["type"]
        if kind == "symlink":
            full = _inside(target, rel, cache=False)
            _remove_for_link(full, rel)
            os.symlink(record["target"], full)
            apply_metadata(full, record)
            counts["symlinks"] += 1
        elif kind == "hardlink":
            full = _inside(target, rel, cache=False)
            link_target = _hardlink_target(rel, record, subpath, firsts)
            if link_target is None:
                continue  # restored as a file in pass 1 (its first name lies outside)
            source = _inside(target, link_target, cache=False)
            if os.path.islink(source):
                raise UnsafeRestorePath(f"hardlink {rel!r} points at a symlink")
            _remove_for_link(full, rel)
            os.link(source, full, follow_symlinks=False)
            counts["hardlinks"] += 1
    for rel, record in _select(iter_tree(repo, manifest), subpath):
        if record["type"] == "dir":
            apply_metadata(_inside(target, rel, cache=False) if rel else target, record)
    if progress is not None:
        progress({"files": counts["files"], "bytes_done": counts["bytes"]})
    return counts


def restore_tar(
    repo: Repository, manifest: dict[str, Any], out: IO[bytes], *, subpath: str | None = None
) -> int:
    """Stream a files point (or one path of it) as a POSIX tar; return the number of entries."""
    envelope = repo.envelope
    count = 0
    firsts, stand_ins = _detached_hardlinks(repo, manifest, subpath)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for rel, record in _select(iter_tree(repo, manifest), subpath):
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
                link_target = _hardlink_target(rel, record, subpath, firsts)
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
    """Write one disk of an image point to a raw/qcow2/... file or a block device."""
    if target_format != "raw":
        tmp = f"{target}.raw-restore"
        try:
            restore_disk(repo, disk, tmp, progress=progress, threads=threads)
            write_disk(tmp, target, target_format)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return int(disk["size"])
    size = int(disk["size"])
    chunk_size = int(disk["chunk_size"])
    table = read_table(repo, disk)
    is_block = os.path.exists(target) and stat.S_ISBLK(os.stat(target).st_mode)
    flags = os.O_WRONLY | os.O_CLOEXEC | (0 if is_block else os.O_CREAT | os.O_TRUNC)
    try:
        fd = os.open(target, flags, 0o600)
    except OSError as exc:
        raise InvalidInput(f"cannot open restore target {target}: {exc.strerror}") from exc
    try:
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
            for i in range(first, last):
                offset = i * chunk_size
                blob_id = table[i]
                if blob_id == fmt.ZERO_ID:
                    if is_block:  # a device keeps old contents where a file has holes
                        os.pwrite(fd, zero_chunk[: min(chunk_size, size - offset)], offset)
                    continue
                os.pwrite(fd, repo.read_blob(blob_id, envelope), offset)
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
    finally:
        os.close(fd)
    return size
