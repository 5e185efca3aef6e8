"""Restore of a files point (or one path of it) into a directory of this host.

The service runs as root and a restore target may hold folders that local users can write to, so
no path is ever resolved twice. The target is opened once (``O_DIRECTORY|O_NOFOLLOW``); every
directory below it is reached from that descriptor one component at a time with
``openat(O_NOFOLLOW|O_DIRECTORY)`` (:class:`TargetDirectories`), and every entry is created, renamed,
removed and given its metadata relative to its parent's descriptor (``mkdirat``, ``openat`` with
``O_CREAT|O_EXCL|O_NOFOLLOW``, ``symlinkat``, ``linkat``, ``renameat``, ``fchown``, ``fchmod``,
``futimens``, ``fsetxattr``). A symlink planted anywhere on the way, before or during the restore,
is never followed: a symlink or non-directory where a directory of the point is expected raises
:class:`UnsafeRestorePath` naming the entry. Worker processes open the target by path and check
that it is still the directory the restore opened (device and inode) before descending.

A manifest is untrusted input (it may come from a damaged or hostile medium). Every path is
checked by :func:`safe_relative_path` before use: absolute paths, ``..``, empty or ``.``
components, NUL bytes and device/FIFO/socket entries are refused before anything is written.

Passes, each with fresh descriptors: (1) directories are created owner-only (``0o700``, so no
other user can write into them) and file contents are written by worker processes over batches
of files (decrypt and decompress release the GIL, per-file work does not; all-zero chunks become
holes); (2) symlinks and hardlinks of the manifest, only now, so a manifest cannot plant a
symlink and write through it; (3) directory metadata, after their contents are complete.

What is already at a path the point restores (``on_conflict``):

- ``overwrite``: a file, symlink or hardlink there is removed and the restored entry created in
  its place (a new inode: a hardlink planted in the target is never written through).
- ``keep_both``: it is renamed beside itself to ``<name>.before-restore-<YYYYmmddTHHMMSS>``
  (``-2``, ``-3``... if taken) and counted in ``kept``.

In both modes an existing directory is merged into, never replaced; a directory where the point
has a file or link is refused. The target folder itself keeps its owner, mode and times when it
existed before the restore; only a target the restore created takes the point's root record.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from typing import Any

from appliance.backup.tree import Record, iter_tree
from appliance.errors import BackupCancelled, InvalidInput, UnsafeRestorePath
from appliance.restore_paths import (
    detached_hardlinks,
    hardlink_target,
    select_records,
)
from appliance.restore_target import (
    CREATE_ATTEMPTS,
    ConflictMode,
    Conflicts,
    TargetDirectories,
    apply_metadata,
    apply_symlink_metadata,
    create_entry,
    keep_stamp,
    open_target,
)
from appliance.store.crypto import Envelope
from appliance.store.repository import Repository
from appliance.workers import CpuMeter, WorkerCpu, die_with_parent, worker_context, worker_cpu

ProgressCallback = Callable[[dict[str, Any]], None]
CONFLICT_MODES: tuple[ConflictMode, ...] = ("overwrite", "keep_both")
RESTORE_BATCH_BYTES = 32 * 1024 * 1024
#: Bytes of chunks fetched by one grouped read: a batch of small files together, or a window of
#: a large file (what memory a worker holds for reads).
READ_WINDOW = 32 * 1024 * 1024
RESTORE_BATCH_FILES = 256
#: Directories and links a restore keeps in memory for its later passes; past this, it reads
#: the tree again (a record is a few hundred bytes).
KEPT_RECORDS = 200_000

_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


# --- worker side -------------------------------------------------------------------------------------

_repo: Repository | None = None
_envelope: Envelope | None = None


def _init_restore_worker(repo_or_spec: Any) -> None:
    die_with_parent()
    global _repo, _envelope
    repo = (
        repo_or_spec
        if isinstance(repo_or_spec, Repository)
        else Repository.from_worker_spec(repo_or_spec)
    )
    _repo = repo
    _envelope = Envelope(repo.key)


def _windows(chunks: list[list[Any]]) -> Iterator[list[list[Any]]]:
    """The chunk list in runs of at most READ_WINDOW bytes (memory stays bounded)."""
    window: list[list[Any]] = []
    size = 0
    for chunk in chunks:
        window.append(chunk)
        size += int(chunk[1])
        if size >= READ_WINDOW:
            yield window
            window, size = [], 0
    if window:
        yield window


def write_file_contents(
    repo: Repository,
    envelope: Envelope,
    fd: int,
    chunks: list[list[Any]],
    blobs: dict[bytes, bytes] | None = None,
) -> int:
    """Write a file's chunks at their offsets (holes stay holes). ``blobs``: chunks already
    read (a batch of small files fetched together); else they are read window by window, each
    window's packs once (:meth:`Repository.read_blobs`)."""
    if blobs is None and len(chunks) > 1:
        offset = 0
        for window in _windows(chunks):
            ids = [bytes.fromhex(h) for h, _ in window if h is not None]
            fetched = repo.read_blobs(ids, envelope)
            offset = _write_chunks(repo, envelope, fd, window, fetched, offset)
        os.ftruncate(fd, offset)
        return offset
    offset = _write_chunks(repo, envelope, fd, chunks, blobs or {}, 0)
    os.ftruncate(fd, offset)
    return offset


def _write_chunks(
    repo: Repository,
    envelope: Envelope,
    fd: int,
    chunks: list[list[Any]],
    blobs: dict[bytes, bytes],
    offset: int,
) -> int:
    for hex_id, length in chunks:
        if hex_id is None:
            offset += length  # a hole: ftruncate extends the file sparsely
            continue
        blob_id = bytes.fromhex(hex_id)
        data = blobs.get(blob_id)
        if data is None:
            data = repo.read_blob(blob_id, envelope)
        if len(data) != length:
            raise UnsafeRestorePath(
                f"chunk {hex_id[:16]} has {len(data)} bytes, manifest says {length}"
            )
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written
    return offset


def _restore_file(
    dirs: TargetDirectories,
    rel: str,
    record: Record,
    conflicts: Conflicts,
    blobs: dict[bytes, bytes] | None = None,
) -> tuple[int, int]:
    assert _repo is not None and _envelope is not None
    parent, name = dirs.parent(rel)
    fd, kept = create_entry(
        lambda: os.open(name, _FILE_FLAGS, 0o600, dir_fd=parent), parent, name, rel, conflicts
    )
    try:
        size = write_file_contents(_repo, _envelope, fd, record.get("chunks", []), blobs)
        apply_metadata(fd, record)
    finally:
        os.close(fd)
    return size, kept


def _restore_batch(
    target: str, root_id: tuple[int, int], items: list[tuple[str, Record]], conflicts: Conflicts
) -> tuple[int, int, WorkerCpu]:
    """Write a batch of files; returns (bytes written, existing entries kept, the worker)."""
    assert _repo is not None and _envelope is not None
    # Small files of a batch are fetched together: one ranged read per run of their packs.
    batch_bytes = sum(int(record.get("size", 0)) for _, record in items)
    blobs = None
    if len(items) > 1 and batch_bytes <= READ_WINDOW:
        ids = [bytes.fromhex(h) for _, r in items for h, _ in r.get("chunks", []) if h is not None]
        blobs = _repo.read_blobs(ids, _envelope)
    root = open_target(target, root_id)
    size = kept = 0
    try:
        with TargetDirectories(root) as dirs:
            for rel, record in items:
                written, renamed = _restore_file(dirs, rel, record, conflicts, blobs)
                size += written
                kept += renamed
    finally:
        os.close(root)
    return size, kept, worker_cpu()


# --- main side ------------------------------------------------------------------------------------------


def _make_target(target: str) -> bool:
    """Create the target folder if needed; True if this restore created it."""
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.mkdir(target)
    except FileExistsError:
        return False
    except OSError as exc:
        raise InvalidInput(
            f"cannot create restore target {target}: {exc.strerror}", path=target
        ) from exc
    return True


def _restore_directory(
    dirs: TargetDirectories, rel: str, conflicts: Conflicts, counts: dict[str, int]
) -> None:
    parent, name = dirs.parent(rel)
    for _ in range(CREATE_ATTEMPTS):
        try:
            os.mkdir(name, 0o700, dir_fd=parent)  # owner-only until pass 3
            break
        except FileExistsError:
            if conflicts.mode != "keep_both":
                break  # an existing directory is merged into; anything else is refused below
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                break
            counts["kept"] += conflicts.make_room(parent, name, rel)
    dirs.directory(rel, rel)  # refuses a symlink or non-directory of that name


def _restore_link(
    dirs: TargetDirectories,
    rel: str,
    record: Record,
    source: str | None,
    conflicts: Conflicts,
    counts: dict[str, int],
) -> None:
    """A symlink of the manifest (``source`` None) or a hardlink to the entry ``source``."""
    if source is None:
        parent, name = dirs.parent(rel)
        _, kept = create_entry(
            lambda: os.symlink(record["target"], name, dir_fd=parent), parent, name, rel, conflicts
        )
        apply_symlink_metadata(parent, name, record)
        counts["symlinks"] += 1
        counts["kept"] += kept
        return
    source_parent, source_name = dirs.parent(source)
    source_parent = os.dup(source_parent)  # opening the link's parent may evict it
    try:
        try:
            st = os.stat(source_name, dir_fd=source_parent, follow_symlinks=False)
        except FileNotFoundError:
            raise UnsafeRestorePath(
                f"refusing hardlink {rel!r}: {source!r} is not in the target", path=rel
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeRestorePath(
                f"refusing hardlink {rel!r}: {source!r} is a symlink or not a file", path=rel
            )
        parent, name = dirs.parent(rel)
        _, kept = create_entry(
            lambda: os.link(
                source_name,
                name,
                src_dir_fd=source_parent,
                dst_dir_fd=parent,
                follow_symlinks=False,
            ),
            parent,
            name,
            rel,
            conflicts,
        )
    finally:
        os.close(source_parent)
    counts["hardlinks"] += 1
    counts["kept"] += kept


def restore_tree(
    repo: Repository,
    manifest: dict[str, Any],
    target: str,
    *,
    subpath: str | None = None,
    on_conflict: ConflictMode = "overwrite",
    keep_root_metadata: bool = False,
    now: datetime | None = None,
    workers: int = 2,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    cpu: CpuMeter | None = None,
) -> dict[str, int]:
    """Restore a files point (or one path of it) into ``target``; return counts.

    ``on_conflict`` says what happens to an entry already at a restored path (see the module
    doc; ``kept`` counts the entries renamed by ``keep_both``, stamped with ``now``, UTC by
    default). A target folder that existed keeps its owner, mode and times; one the restore
    created takes the point's root record, unless ``keep_root_metadata``.
    """
    if on_conflict not in CONFLICT_MODES:
        raise InvalidInput(f"unknown conflict choice {on_conflict!r}")
    conflicts = Conflicts(on_conflict, keep_stamp(now))
    target = os.path.realpath(target)
    created = _make_target(target)
    root = open_target(target)
    try:
        st = os.fstat(root)
        counts = _restore_into(
            repo,
            manifest,
            target,
            root,
            (st.st_dev, st.st_ino),
            subpath=subpath,
            conflicts=conflicts,
            root_metadata=created and not keep_root_metadata,
            workers=workers,
            progress=progress,
            cancel=cancel,
            cpu=cpu,
        )
    finally:
        os.close(root)
    return counts


def _restore_into(
    repo: Repository,
    manifest: dict[str, Any],
    target: str,
    root: int,
    root_id: tuple[int, int],
    *,
    subpath: str | None,
    conflicts: Conflicts,
    root_metadata: bool,
    workers: int,
    progress: ProgressCallback | None,
    cancel: threading.Event | None,
    cpu: CpuMeter | None = None,
) -> dict[str, int]:
    counts = {"files": 0, "directories": 0, "symlinks": 0, "hardlinks": 0, "bytes": 0, "kept": 0}
    firsts, stand_ins = detached_hardlinks(repo, manifest, subpath)
    spec = repo.worker_spec()
    ctx = worker_context(spec is not None)
    pending = []
    batch: list[tuple[str, Record]] = []
    batch_bytes = 0
    # Directories and links, kept for passes 2 and 3 so that the coordinator, whose work does
    # not spread over the workers, decodes the tree once instead of three times.
    later: list[tuple[str, Record]] | None = []
    with (
        ProcessPoolExecutor(
            max_workers=max(1, workers),
            mp_context=ctx,
            initializer=_init_restore_worker,
            initargs=(spec or repo,),
        ) as pool,
        TargetDirectories(root) as dirs,
    ):

        def collect(result: tuple[int, int, WorkerCpu]) -> None:
            counts["bytes"] += result[0]
            counts["kept"] += result[1]
            if cpu is not None:
                cpu.process(result[2])

        def flush() -> None:
            nonlocal batch, batch_bytes
            if batch:
                pending.append(pool.submit(_restore_batch, target, root_id, batch, conflicts))
                batch, batch_bytes = [], 0
            while len(pending) > workers * 3:
                collect(pending.pop(0).result())
                if progress is not None:
                    progress({"files": counts["files"], "bytes_done": counts["bytes"]})

        # Pass 1: directories (owner-only until pass 3) and file contents.
        for rel, record in select_records(iter_tree(repo, manifest), subpath):
            if cancel is not None and cancel.is_set():
                raise BackupCancelled("the restore was cancelled")
            kind = record["type"]
            if not rel and kind != "dir":
                raise UnsafeRestorePath(f"refusing a root entry of type {kind!r}", path=rel)
            if later is not None and kind != "file":
                later.append((rel, record))
                if len(later) > KEPT_RECORDS:
                    later = None
            if kind == "dir":
                if rel:
                    _restore_directory(dirs, rel, conflicts, counts)
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
            collect(future.result())

    def again(kinds: tuple[str, ...]) -> Iterator[tuple[str, Record]]:
        # The records pass 1 kept, or the tree read again when there were too many to keep.
        if later is not None:
            return (item for item in later if item[1]["type"] in kinds)
        return select_records(iter_tree(repo, manifest), subpath)

    # Pass 2: links. Fresh descriptors: nothing opened before the workers ran is trusted.
    with TargetDirectories(root) as dirs:
        for rel, record in again(("symlink", "hardlink")):
            kind = record["type"]
            if kind == "symlink":
                _restore_link(dirs, rel, record, None, conflicts, counts)
            elif kind == "hardlink":
                source = hardlink_target(rel, record, subpath, firsts)
                if source is not None:  # else restored as a file in pass 1
                    _restore_link(dirs, rel, record, source, conflicts, counts)
    # Pass 3: directory metadata, after their contents are complete.
    with TargetDirectories(root) as dirs:
        for rel, record in again(("dir",)):
            if record["type"] != "dir":
                continue
            if rel:
                apply_metadata(dirs.directory(rel, rel), record)
            elif root_metadata:
                apply_metadata(root, record)
    if progress is not None:
        progress({"files": counts["files"], "bytes_done": counts["bytes"]})
    return counts
