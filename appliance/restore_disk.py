"""Restore of a disk of an image point to a raw/qcow2/... file or a block device.

A disk is written to a file opened with ``O_NOFOLLOW`` (a symlink at the target is refused) or
to a block device; the raw staging file of other formats is created with ``O_EXCL|O_NOFOLLOW``.
All-zero chunks become holes in a file target and zeros on a device.

The chunks are decoded and written in units of ``RESTORE_UNIT_CHUNKS`` by worker processes
that write through the coordinator's own descriptor (``appliance.disk_workers``: reopened by
``/proc/<pid>/fd``, never by the target's path, which a local user might swap), or by threads
when the point is read from a store another process cannot open (a bucket, a tape) or the
disk holds less than ``PROCESS_MIN_BYTES`` of data.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from appliance.backup.disks import write_disk
from appliance.backup.images import read_table
from appliance.disk_workers import (
    SharedFd,
    each_worker,
    in_order,
    process_pool,
    reopen_fd,
    share_fd,
)
from appliance.errors import InvalidInput, UnsafeRestorePath
from appliance.store import format as fmt
from appliance.store.crypto import Envelope
from appliance.store.repository import Repository
from appliance.workers import CpuMeter, WorkerCpu, die_with_parent, worker_cpu

ProgressCallback = Callable[[dict[str, Any]], None]
RESTORE_UNIT_CHUNKS = 64
#: Bytes of chunks from which a disk is written by worker processes rather than threads.
PROCESS_MIN_BYTES = 64 << 20

#: Where workers write: (the target's descriptor, chunk size, disk size, is a block device).
Target = tuple[SharedFd, int, int, bool]


def restore_disk(
    repo: Repository,
    disk: dict[str, Any],
    target: str,
    *,
    target_format: str = "raw",
    progress: ProgressCallback | None = None,
    threads: int = 2,
    cpu: CpuMeter | None = None,
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
                _write_raw(repo, disk, fd, tmp, False, progress, threads, cpu=cpu)
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
        _write_raw(repo, disk, fd, target, is_block, progress, threads, table, cpu)
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
    cpu: CpuMeter | None = None,
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
    cpu = cpu or CpuMeter()
    workers = max(1, threads)
    units = (
        (i, b"".join(table[i : i + RESTORE_UNIT_CHUNKS]))
        for i in range(0, len(table), RESTORE_UNIT_CHUNKS)
    )
    data_bytes = sum(1 for t in table if t != fmt.ZERO_ID) * chunk_size
    pool = process_pool(repo, workers, _init_worker) if data_bytes >= PROCESS_MIN_BYTES else None
    where: Target = (share_fd(fd), chunk_size, size, is_block)
    if pool is not None:
        with pool:
            _report(_process_units(pool, workers, where, units, cpu), size, progress)
    else:
        _report(_thread_units(repo, fd, workers, where, units, cpu), size, progress)
    if not is_block:
        os.ftruncate(fd, size)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise


def _report(done: Iterator[int], size: int, progress: ProgressCallback | None) -> None:
    for end in done:
        if progress is not None:
            progress({"bytes_done": end, "bytes_total": size})


@functools.lru_cache(maxsize=4)
def _zeros(size: int) -> bytes:
    """One chunk of zeros, made once (a device restore writes it for every zero chunk)."""
    return bytes(size)


def write_unit(
    repo: Repository, envelope: Envelope, fd: int, where: Target, first: int, ids: bytes
) -> int:
    """Decode and write one unit of chunks (their IDs, in order); return the offset it ends at."""
    _, chunk_size, size, is_block = where
    table = [ids[k : k + fmt.ID_SIZE] for k in range(0, len(ids), fmt.ID_SIZE)]
    # One ranged read per pack run for the unit's chunks (they were written together).
    blobs = repo.read_blobs((t for t in table if t != fmt.ZERO_ID), envelope)
    for k, blob_id in enumerate(table):
        offset = (first + k) * chunk_size
        if blob_id == fmt.ZERO_ID:
            if is_block:  # a device keeps old contents where a file has holes
                os.pwrite(fd, _zeros(chunk_size)[: size - offset], offset)
            continue
        os.pwrite(fd, blobs[blob_id], offset)
    end = min((first + len(table)) * chunk_size, size)
    # Start writing the unit back now, so that the final fsync waits for the last units only
    # and not for the whole disk (measured: a 0.4 s fsync after 1 s of decoding a 1 GiB disk).
    # The pages it drops once written were never going to be read by the restore again.
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, first * chunk_size, end - first * chunk_size, os.POSIX_FADV_DONTNEED)
    return end


def _thread_units(
    repo: Repository,
    fd: int,
    workers: int,
    where: Target,
    units: Iterator[tuple[int, bytes]],
    cpu: CpuMeter,
) -> Iterator[int]:
    local = threading.local()

    def run(first: int, ids: bytes) -> int:
        # Decrypt and decompress release the GIL; the rest of a unit's work holds it.
        started = time.thread_time()
        try:
            envelope = getattr(local, "envelope", None)
            if envelope is None:
                envelope = local.envelope = Envelope(repo.key)
            return write_unit(repo, envelope, fd, where, first, ids)
        finally:
            cpu.thread(time.thread_time() - started)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from in_order(pool, run, units, workers)


def _process_units(
    pool: ProcessPoolExecutor,
    workers: int,
    where: Target,
    units: Iterator[tuple[int, bytes]],
    cpu: CpuMeter,
) -> Iterator[int]:
    pids: set[int] = set()
    for end, used in in_order(pool, _worker_unit, ((where, *unit) for unit in units), workers):
        pids.add(used[0])
        cpu.process(used)
        yield end
    # Each worker closes its descriptor of the target before the coordinator syncs it.
    for used in each_worker(pool, _worker_done, pids):
        cpu.process(used)


# --- worker process side -----------------------------------------------------------------------

_repo: Repository | None = None
_envelope: Envelope | None = None
_target: tuple[SharedFd, int] | None = None


def _init_worker(spec: Any) -> None:
    die_with_parent()
    global _repo, _envelope
    _repo = Repository.from_worker_spec(spec)
    _envelope = Envelope(_repo.key)


def _worker_unit(where: Target, first: int, ids: bytes) -> tuple[int, WorkerCpu]:
    global _target
    assert _repo is not None and _envelope is not None
    if _target is None or _target[0] != where[0]:
        _close_target()
        _target = (where[0], reopen_fd(where[0], os.O_WRONLY))
    end = write_unit(_repo, _envelope, _target[1], where, first, ids)
    return end, worker_cpu()


def _close_target() -> None:
    global _target
    if _target is not None:
        os.close(_target[1])
        _target = None


def _worker_done(_: int) -> tuple[WorkerCpu, int]:
    _close_target()
    time.sleep(0.02)  # linger, so that an idle sibling takes the next task
    return worker_cpu(), os.getpid()
