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

import ctypes
import multiprocessing
import multiprocessing.context
import os
import signal

_PR_SET_PDEATHSIG = 1


def default_workers() -> int:
    """Worker processes of a backup or restore when not given: the cores, at most 8."""
    return max(1, min(os.cpu_count() or 1, 8))


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
    # Imported once in the fork server, so each worker starts without re-importing.
    ctx.set_forkserver_preload(["appliance.backup.files", "appliance.restore"])
    return ctx
