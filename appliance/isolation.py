"""Running a job's work function in a clean child process.

Why: file backups and restores fork worker processes (``multiprocessing`` "fork"), and those
workers open SQLite (the index cache). Forking a process in which other threads may be inside
SQLite at that instant -- the service, whose request threads and job runner query the catalog
all the time -- copies SQLite's global mutexes in the locked state, and the workers then hang
forever on their first SQLite call (seen in the service's restart test). A child with a single
thread can fork safely. Children come from ``multiprocessing``'s fork server: a process started
by exec (so clean) that imports the engine once and forks each child from its single thread.

How: :func:`run_isolated` starts the child, which opens the appliance itself (same data
directory and catalog; the store is unlocked with its recovery key, passed through the process
pipe, so no key derivation is repeated) and runs the work function with a context that relays
progress, log lines, saved checkpoints and follow-up job submissions to the parent's job context (a
:class:`appliance.job_context.JobView`) over the pipe. The parent's cancel event is forwarded to a process-shared event the work function polls.
The result, the domain error, or a request to wait (:class:`appliance.errors.JobWaiting`,
re-raised in the parent) comes back the same way.

A child must not outlive its service: the fork server exits when the service dies, the child
asks the kernel for SIGTERM when its parent (the fork server) dies (``PR_SET_PDEATHSIG``), and
on SIGTERM kills its own process group -- itself and the workers it forked, which would
otherwise keep the store's locks.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import pickle
import signal
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, cast

from appliance.errors import ApplianceError, BackupCancelled, JobWaiting
from appliance.job_context import JobView, inherit_work

if TYPE_CHECKING:
    from appliance.engine import Appliance

PR_SET_PDEATHSIG = 1
POLL_SECONDS = 0.2
PRELOAD = ["appliance.policies", "appliance.restore", "appliance.backup.files"]


@dataclass(frozen=True)
class ApplianceOpener:
    """What a child needs to open the parent's appliance."""

    data_dir: str
    catalog_url: str
    recovery_key: str
    clock: Callable[[], datetime] | None

    @classmethod
    def of(cls, app: Appliance) -> ApplianceOpener:
        clock: Callable[[], datetime] | None = app.clock
        try:
            pickle.dumps(clock)
        except Exception:  # a test's closure: the child uses wall-clock time
            clock = None
        return cls(app.data_dir.path, app.catalog.url, app.repo.key.recovery_key(), clock)

    def open(self) -> Appliance:
        from appliance.engine import Appliance, utcnow

        return Appliance.open(
            self.data_dir,
            recovery_key=self.recovery_key,
            clock=self.clock or utcnow,
            catalog_url=self.catalog_url,
        )


class _ChildContext:
    """The work function's view of its job, inside the child (a :class:`JobView`)."""

    def __init__(
        self, conn: Connection, cancel: Any, job_id: str, checkpoint: dict[str, Any]
    ) -> None:
        self.job_id = job_id
        self.cancel = cancel
        self.interrupted = False
        self.latest: dict[str, Any] = {}
        self.checkpoint: dict[str, Any] = dict(checkpoint)
        self._conn = conn

    def save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.checkpoint = dict(checkpoint)
        self._conn.send(("checkpoint", dict(checkpoint)))
        reply = self._conn.recv()  # stored before the work goes on
        if reply[0] == "error":
            raise _rebuild_error(reply[1])

    def progress(self, info: dict[str, Any]) -> None:
        self.latest = dict(info)
        self._conn.send(("progress", dict(info)))

    def log(self, level: str, message: str) -> None:
        self._conn.send(("log", level, message))

    def submit(self, kind: str, params: dict[str, Any]) -> Any:
        self._conn.send(("submit", kind, params))
        reply = self._conn.recv()
        if reply[0] == "error":
            raise _rebuild_error(reply[1])
        return reply[1]


def _die_with_parent() -> None:
    os.setpgid(0, 0)  # a group of its own: this process and the workers it forks
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
    with contextlib.suppress(Exception):  # not Linux: the service's cgroup still covers it
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _child_main(
    conn: Connection,
    cancel: Any,
    opener: ApplianceOpener,
    work: Callable[..., dict[str, Any]],
    params: dict[str, Any],
    job_id: str,
    checkpoint: dict[str, Any],
    works: dict[str, bytes] | None = None,
) -> None:
    _die_with_parent()
    if os.getppid() == 1:  # the fork server died before the signal was armed
        os.killpg(0, signal.SIGKILL)
    if works:
        inherit_work(works)
    try:
        app = opener.open()
    except ApplianceError as exc:
        conn.send(("error", _error_dict(exc)))
        return
    try:
        result = work(app, params, _ChildContext(conn, cancel, job_id, checkpoint))
        conn.send(("result", result))
    except JobWaiting as wait:
        conn.send(("waiting", wait.reason, wait.wake_at, wait.checkpoint))
    except BackupCancelled as exc:
        conn.send(("cancelled", _error_dict(exc)))
    except ApplianceError as exc:
        conn.send(("error", _error_dict(exc)))
    except BaseException:
        conn.send(("crash", traceback.format_exc(limit=8)))
    finally:
        app.close()


def _error_dict(exc: ApplianceError) -> dict[str, Any]:
    return {"code": exc.code, "kind": exc.kind, "message": exc.message, "details": exc.details}


def _rebuild_error(data: dict[str, Any]) -> ApplianceError:
    error = ApplianceError(str(data.get("message")), **dict(data.get("details") or {}))
    error.code = str(data.get("code", ApplianceError.code))
    error.kind = str(data.get("kind", ApplianceError.kind))
    return error


class ChildDied(ApplianceError):
    """The job's worker process ended without a result."""

    code = "job_process_died"


def run_isolated(
    app: Appliance,
    work: Callable[..., dict[str, Any]],
    params: dict[str, Any],
    ctx: JobView,
    works: dict[str, bytes] | None = None,
) -> dict[str, Any]:
    """Run ``work(app, params, ctx)`` in a clean child; same result, errors and effects.
    ``works``: other kinds' work functions (pickled references) the child may need
    (:func:`appliance.job_context.inherit_work`)."""
    mp = multiprocessing.get_context("forkserver")
    # The fork server is started (by exec, so cleanly) on first use, imports these once, and
    # forks every child from its single thread: a child starts in milliseconds, not seconds.
    mp.set_forkserver_preload(PRELOAD)
    parent_conn, child_conn = mp.Pipe()
    cancel = mp.Event()
    process = mp.Process(
        target=_child_main,
        args=(
            child_conn,
            cancel,
            ApplianceOpener.of(app),
            work,
            params,
            ctx.job_id,
            dict(ctx.checkpoint),
            works,
        ),
        name=f"job-{ctx.job_id[:8]}",
    )
    process.start()
    child_conn.close()
    try:
        while True:
            if ctx.cancel.is_set() and not cancel.is_set():
                cancel.set()
            if not parent_conn.poll(POLL_SECONDS):
                if not process.is_alive() and not parent_conn.poll():
                    raise ChildDied(
                        f"the job's process ended without a result (exit code {process.exitcode})"
                    )
                continue
            try:
                message = parent_conn.recv()
            except EOFError:
                process.join(5)
                raise ChildDied(
                    f"the job's process ended without a result (exit code {process.exitcode})"
                ) from None
            kind = message[0]
            if kind == "progress":
                ctx.progress(message[1])
            elif kind == "log":
                ctx.log(message[1], message[2])
            elif kind == "submit":
                try:
                    parent_conn.send(("ok", ctx.submit(message[1], message[2])))
                except ApplianceError as exc:
                    parent_conn.send(("error", _error_dict(exc)))
            elif kind == "checkpoint":
                try:
                    ctx.save_checkpoint(message[1])
                    parent_conn.send(("ok", None))
                except ApplianceError as exc:
                    parent_conn.send(("error", _error_dict(exc)))
            elif kind == "waiting":
                raise JobWaiting(message[1], message[2], message[3])
            elif kind == "result":
                return cast(dict[str, Any], message[1])
            elif kind == "cancelled":
                raise BackupCancelled(str(message[1]["message"]))
            elif kind == "error":
                raise _rebuild_error(message[1])
            else:  # "crash": a bug in the work function
                raise RuntimeError(f"job process failed:\n{message[1]}")
    finally:
        parent_conn.close()
        process.join(30)
        if process.is_alive():  # it ignored the cancel: do not leave it holding locks
            process.kill()
            process.join(5)
        if process.pid is not None:
            # Workers the child forked outlive a child that was killed (OOM killer, SIGKILL)
            # and keep the store's locks; they are in the child's process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
