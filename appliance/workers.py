"""Worker processes of the engine (backup readers, restore writers).

Workers start from a fork server, not by forking the caller: the caller may be a service with
other threads inside SQLite or malloc, and a fork copies their locks held, which deadlocked
workers (seen in the service). A fork-server child is forked from a clean single-threaded process
and opens the repository itself from :meth:`Repository.worker_spec`. Only a backend that cannot
be reopened (the in-memory one) falls back to forking the caller.

Workers are forked and inherit the store and asset lock descriptors. If their parent is killed
(SIGKILL, the OOM killer), orphaned workers would keep those locks and block every later backup;
``die_with_parent`` makes the kernel kill them with their parent.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.context
import os
import signal
import threading
import time

_PR_SET_PDEATHSIG = 1

#: A worker's pid and the CPU seconds (user + system) its process has used so far.
WorkerCpu = tuple[int, float]


def default_workers() -> int:
    """Worker processes of a backup or restore when not given: one per core this process may
    run on (its affinity mask, so a container's or a cgroup's cpuset is honoured)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores)


def worker_cpu() -> WorkerCpu:
    """What a worker reports with each result (see :class:`CpuMeter`)."""
    return os.getpid(), time.process_time()


class CpuMeter:
    """The CPU seconds an operation costs: its coordinating process, and its workers.

    The figures say how the engine will scale before it runs on a big machine: the coordinator's
    share of the total is the serial part of the work (Amdahl's law). Worker processes report
    their cumulative process CPU with each answer, and the meter keeps the latest per pid.
    Worker threads add the thread CPU of each unit they run. The coordinator is the CPU of this
    process since the meter was made (its own thread, and the threads that pickle tasks and
    answers for the workers), less what worker threads in it reported. Operations run in a
    process of their own (the CLI, a job's child), so nothing else is counted.
    """

    def __init__(self) -> None:
        self._started = time.process_time()
        self._processes: dict[int, float] = {}
        self._threads = 0.0
        self._lock = threading.Lock()

    def process(self, cpu: WorkerCpu) -> None:
        pid, seconds = cpu
        if seconds > self._processes.get(pid, 0.0):
            self._processes[pid] = seconds

    def thread(self, seconds: float) -> None:
        with self._lock:
            self._threads += seconds

    def to_dict(self) -> dict[str, float | int]:
        workers = sum(self._processes.values()) + self._threads
        return {
            "coordinator_s": round(
                max(0.0, time.process_time() - self._started - self._threads), 3
            ),
            "workers_s": round(workers, 3),
            "worker_processes": len(self._processes),
        }


def die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: workers then end when their task queue closes


def worker_context(has_spec: bool) -> multiprocessing.context.BaseContext:
    if not has_spec:
        return multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context("forkserver")
    # Imported once in the fork server, so each worker starts without re-importing
    # (appliance.restore brings restore_disk and restore_tree).
    ctx.set_forkserver_preload(
        ["appliance.backup.files", "appliance.backup.images", "appliance.restore"]
    )
    return ctx


def start_early() -> None:
    """Start the fork server now, for a command about to back up or restore: it imports the
    engine while this process derives the key and opens the catalog (on the next core), instead
    of after, when the first worker is asked for (measured: 0.15 s of every command)."""
    from multiprocessing import forkserver

    worker_context(True)
    # When it cannot start, the first worker will try again and say why.
    with contextlib.suppress(OSError):
        forkserver.ensure_running()
