"""Worker processes over the chunks of one disk: image backup and restore on every core.

Disk work was done on threads, since hashing, zstd and AES release the GIL. That scaled on two
cores and stopped there: each 64 KiB chunk also costs tens of microseconds of Python (the
zero test, the index lookup, the pack append, the table slot) under the GIL. Eight threads
were 1.1x as fast as two on a 16-core machine. Processes share nothing, so each one runs its own
share of the chunks on its own core. The coordinator hands out units of consecutive chunks and
puts the answers together. Each answer is a slice of the chunk table or a count of bytes
written, so its work does not grow with the worker count.

A worker does not reopen the disk by its path, which might have been swapped for a link to
something else since it was checked. It opens the coordinator's own descriptor through
``/proc/<pid>/fd/<n>`` and checks that the device and inode are those the coordinator opened.
A store that cannot be reopened in another process (``Repository.worker_spec`` is None), or a
disk only a plug-in can read, keeps the threads.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any, TypeVar

from appliance.errors import SourceError
from appliance.store.repository import Repository
from appliance.workers import worker_context

T = TypeVar("T")

#: Where a worker finds the coordinator's descriptor: (pid, fd, (st_dev, st_ino)).
SharedFd = tuple[int, int, tuple[int, int]]

#: Units in flight per worker: enough to keep each busy while the coordinator takes answers,
#: few enough that queued tasks and answers stay small whatever the disk's size.
UNITS_PER_WORKER = 4


def share_fd(fd: int) -> SharedFd:
    st = os.fstat(fd)
    return os.getpid(), fd, (st.st_dev, st.st_ino)


def reopen_fd(shared: SharedFd, flags: int) -> int:
    """Open the file behind another process's descriptor; refuse anything else."""
    pid, fd, identity = shared
    try:
        mine = os.open(f"/proc/{pid}/fd/{fd}", flags | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceError(f"a worker cannot open the disk: {exc.strerror}") from exc
    st = os.fstat(mine)
    if (st.st_dev, st.st_ino) != identity:
        os.close(mine)
        raise SourceError("a worker opened a different file than the disk")
    return mine


def can_share_fds() -> bool:
    return os.path.isdir(f"/proc/{os.getpid()}/fd")


def process_pool(
    repo: Repository, workers: int, initializer: Callable[..., None], *initargs: Any
) -> ProcessPoolExecutor | None:
    """A pool whose workers open ``repo`` themselves, or None when they cannot (use threads)."""
    spec = repo.worker_spec()
    if spec is None or not can_share_fds():
        return None
    return ProcessPoolExecutor(
        max_workers=max(1, workers),
        mp_context=worker_context(True),
        initializer=initializer,
        initargs=(spec, *initargs),
    )


def in_order(
    pool: Executor,
    work: Callable[..., T],
    tasks: Iterable[tuple[Any, ...]],
    workers: int,
) -> Iterator[T]:
    """``work(*task)`` on the pool for each task, answers in task order, at most
    ``UNITS_PER_WORKER`` per worker in flight (``Executor.map`` would queue every task first)."""
    pending: deque[Future[T]] = deque()
    limit = max(1, workers) * UNITS_PER_WORKER
    try:
        for task in tasks:
            pending.append(pool.submit(work, *task))
            if len(pending) >= limit:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def each_worker(
    pool: ProcessPoolExecutor, work: Callable[[int], tuple[T, int]], pids: set[int]
) -> Iterator[T]:
    """Run ``work`` on every worker in ``pids`` (it returns (answer, pid)) and yield every
    answer. Which worker takes a task is not up to us: tasks are sent until each has answered,
    so a worker may run it twice and must take no harm from it."""
    left = set(pids)
    while left:
        for answer, pid in pool.map(work, range(len(left))):
            left.discard(pid)
            yield answer
