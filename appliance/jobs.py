"""Jobs: every long operation runs as a job with stored state, progress, log and result.

A job is submitted (``queued``), started by the dispatcher when the resources it needs are free
(``running``), and ends ``succeeded``, ``failed`` or ``cancelled``. Resources are names held shared
or exclusive: a backup holds its asset exclusively and the store shared; prune, GC and catalog
rebuild hold the store exclusively. A queued job that must wait says why in its progress
(``waiting``), so the page can show it.

A job can also *wait* without holding anything: its work function raises
:class:`appliance.errors.JobWaiting` (reason, ``wake_at``, checkpoint) -- a bucket thawing, a
USB disk or a tape to be inserted. The job becomes ``waiting`` in the catalog, its resources and
worker slot are freed and its thread ends. The dispatcher queues it again when ``wake_at``
passes (by the runner's clock), or an outside event does with :meth:`JobRunner.wake` /
:meth:`JobRunner.wake_matching`; the work function then finds the checkpoint in
``ctx.checkpoint``. A work function may also :meth:`JobContext.save_checkpoint` as it goes, so a
run interrupted by a crash or a restart resumes from there. Waiting jobs stay ``waiting`` across
restarts. A kind with ``max_attempts`` retries a :class:`TransientBackendError` the same way:
the job waits out a backoff and runs again, until its attempts are used up.

State lives in the catalog, so the page and the API read it from there and it survives restarts.
When the service stops gracefully, running jobs are cancelled *as interrupted*; after a crash
they are still ``running`` in the catalog and :meth:`JobRunner.start` marks them ``interrupted``.
Either way, start re-queues interrupted jobs of kinds that are safe to run again (backups,
verify, ...). A retried backup re-reads the source but stores only what the interrupted run had
not already committed, so it resumes rather than starting over.

Work functions take the engine, the job's parameters and a :class:`JobContext` (progress, log,
cancel event); they know nothing of HTTP and are the same functions the CLI calls. The built-in
kinds' functions live in :mod:`appliance.job_kinds`; outer packages register theirs.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from appliance import job_kinds as kinds
from appliance.catalog.records import JobRecord
from appliance.engine import Appliance
from appliance.errors import (
    ApplianceError,
    BackupCancelled,
    InvalidInput,
    JobWaiting,
    TransientBackendError,
)
from appliance.isolation import run_isolated
from appliance.job_context import inherited_work
from appliance.job_kinds import LOCATION_RETRY

log = logging.getLogger(__name__)

__all__ = ["JOB_KINDS", "LOCATION_RETRY", "JobContext", "JobKind", "JobRunner", "register_job_kind"]

PROGRESS_INTERVAL = 0.5


class JobContext:
    def __init__(
        self, runner: JobRunner, job_id: str, checkpoint: dict[str, Any] | None = None
    ) -> None:
        self.job_id = job_id
        #: The checkpoint this run resumes from (empty on a first run).
        self.checkpoint: dict[str, Any] = dict(checkpoint or {})
        self.cancel = threading.Event()
        self.interrupted = False  # set on service shutdown: the job ends "interrupted"
        self._runner = runner
        self._last = 0.0
        self._started = time.monotonic()
        self.latest: dict[str, Any] = {}

    def progress(self, info: dict[str, Any]) -> None:
        now = time.monotonic()
        elapsed = max(now - self._started, 1e-6)
        done = info.get("bytes_done", 0)
        info = {**info, "elapsed": round(elapsed, 2), "rate": int(done / elapsed)}
        total = info.get("bytes_total")
        if total and done:
            info["percent"] = round(min(100.0, 100.0 * done / total), 1)
            info["eta"] = round(max(0.0, (total - done) / max(info["rate"], 1)), 1)
        self.latest = info
        if now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            self._runner.catalog.update_job(self.job_id, progress=info)

    def log(self, level: str, message: str) -> None:
        self._runner.catalog.append_job_log(self.job_id, level, message)

    def submit(self, kind: str, params: dict[str, Any]) -> JobRecord:
        """Queue a follow-up job (e.g. a policy's prune after its backup succeeded)."""
        return self._runner.submit(kind, params)

    def save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store a JSON checkpoint now: a run interrupted after this resumes from it."""
        self._runner.catalog.save_checkpoint(self.job_id, checkpoint)
        self.checkpoint = dict(checkpoint)


WorkFunction = Callable[[Appliance, dict[str, Any], JobContext], dict[str, Any]]
ResourceFunction = Callable[[dict[str, Any]], list[tuple[str, bool]]]


@dataclass(frozen=True)
class JobKind:
    work: WorkFunction
    resources: ResourceFunction
    retry_after_interrupt: bool = True
    describe: Callable[[dict[str, Any]], str] = field(default=lambda p: "")
    #: The work forks worker processes: a runner with ``isolate`` runs it in a clean child
    #: (see :mod:`appliance.isolation`), because forking a multi-threaded service is unsafe.
    isolated: bool = False
    #: How many runs a :class:`TransientBackendError` may use up before the job fails (1: no
    #: retry). Between runs the job waits ``backoff``: seconds, doubled after each attempt, or
    #: a function of the attempt number (1, 2, ...) that returns the seconds.
    max_attempts: int = 1
    backoff: float | Callable[[int], float] = 60.0

    def retry_delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based)."""
        if callable(self.backoff):
            return float(self.backoff(attempt))
        return float(self.backoff) * 2 ** max(0, attempt - 1)


JOB_KINDS: dict[str, JobKind] = {
    "backup_files": JobKind(
        kinds.backup_files,
        kinds.asset_backup,
        True,
        lambda p: f"backup of {p['asset']}",
        isolated=True,
    ),
    "backup_image": JobKind(
        kinds.backup_image, kinds.asset_backup, True, lambda p: f"backup of {p['asset']}"
    ),
    "restore": JobKind(
        kinds.restore,
        kinds.store_shared,
        False,
        lambda p: f"restore of {p['point']}",
        isolated=True,
    ),
    "verify": JobKind(kinds.verify, kinds.store_shared, True, lambda p: "verify"),
    # Resumable: a copy interrupted by a crash runs again and skips the packs already there.
    "copy": JobKind(
        kinds.copy, kinds.copy_resources, True, lambda p: f"copy of {p['point']} to {p['location']}"
    ),
    # Resumable: a recall asked again finds the restores already under way.
    "recall": JobKind(
        kinds.recall, kinds.store_shared, True, lambda p: f"recall of {p.get('point')}"
    ),
    "verify_copy": JobKind(
        kinds.verify_copy,
        kinds.copy_resources,
        True,
        lambda p: f"verify of {p['point']} at {p['location']}",
    ),
    "prune": JobKind(kinds.prune, kinds.store_exclusive, True, lambda p: f"prune of {p['asset']}"),
    "gc": JobKind(kinds.gc, kinds.store_exclusive, True, lambda p: "garbage collection"),
    "rebuild_catalog": JobKind(
        kinds.rebuild, kinds.store_exclusive, True, lambda p: "catalog rebuild"
    ),
}


def register_job_kind(name: str, kind: JobKind) -> None:
    """Outer packages (tiering, failover) add their own job kinds at start-up."""
    JOB_KINDS[name] = kind


def work_of(kind: str) -> WorkFunction:
    """The work function of a job kind, in the service or in an isolated job's process."""
    if kind in JOB_KINDS:
        return JOB_KINDS[kind].work
    reference = inherited_work(kind)
    if reference is None:
        raise KeyError(f"no job kind {kind!r} is registered in this process")
    work: WorkFunction = pickle.loads(reference)  # a reference from our own parent
    return work


def shareable_works() -> dict[str, bytes]:
    """The work functions of the registered kinds that a child can import by name, pickled (a
    reference, unpickled only when used, so a child imports no package it does not run). The
    fork server started before the service registered the outer packages' kinds (SSH, libvirt,
    ...): a job that runs another kind's work inside the child (a policy's backup) finds it.
    Pickled afresh at each start (well under a millisecond): a cache keyed by the functions'
    ids would hand over another function once an id is reused."""
    works = {}
    for name, kind in JOB_KINDS.items():
        try:
            works[name] = pickle.dumps(kind.work)
        except Exception:  # a closure over the service's state: only the parent runs it
            continue
    return works


# --- the runner ---------------------------------------------------------------------------------------


class JobRunner:
    """Dispatches queued jobs onto threads when their resources are free."""

    def __init__(
        self,
        app: Appliance,
        *,
        max_parallel: int = 2,
        isolate: bool = False,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """``isolate``: run kinds marked ``isolated`` in a clean child process. A service
        (many threads) must; a single-threaded caller such as the CLI need not. ``clock``
        (default: the appliance's) decides when a waiting job's ``wake_at`` has passed."""
        self.app = app
        self.clock: Callable[[], datetime] = clock or app.clock
        self.isolate = isolate
        self.catalog = app.catalog
        self.max_parallel = max_parallel
        self._lock = threading.Condition()
        self._held: dict[str, tuple[bool, set[str]]] = {}  # resource -> (exclusive, job ids)
        self._running: dict[str, JobContext] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._stopping = False
        self._dispatcher: threading.Thread | None = None
        self._waiting_reason: dict[str, str] = {}
        self._finished = 0
        #: Called with the record of every job that ends (alerts listen here); a listener's
        #: error is logged and never reaches the job.
        self.end_listeners: list[Callable[[JobRecord], None]] = []

    @property
    def finished_count(self) -> int:
        """Grows whenever a job ends: answers cached by a reader (the service's
        job and points lists) are keyed on it, so an ending job shows at once."""
        return self._finished

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> list[str]:
        """Mark jobs a crash left running as interrupted, re-queue retryable ones, dispatch."""
        self.catalog.mark_running_jobs_interrupted()
        requeued = []
        for job in reversed(self.catalog.list_jobs(state="interrupted", limit=1000)):
            kind = JOB_KINDS.get(job.kind)
            if kind is not None and kind.retry_after_interrupt:
                self.catalog.update_job(job.id, state="queued", progress={"waiting": "resuming"})
                self.catalog.append_job_log(job.id, "info", "re-queued after the interruption")
                requeued.append(job.id)
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="job-dispatcher", daemon=True
        )
        self._dispatcher.start()
        with self._lock:
            self._lock.notify_all()
        return requeued

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop dispatching; running jobs end as ``interrupted`` and resume on the next start."""
        with self._lock:
            self._stopping = True
            for ctx in self._running.values():
                ctx.interrupted = True
                ctx.cancel.set()
            self._lock.notify_all()
            threads = list(self._threads.values())
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._dispatcher is not None:
            self._dispatcher.join(max(0.0, deadline - time.monotonic()))

    # --- requests ---------------------------------------------------------------------------------

    def submit(self, kind: str, params: dict[str, Any]) -> JobRecord:
        spec = JOB_KINDS.get(kind)
        if spec is None:
            raise InvalidInput(f"unknown job kind {kind!r}")
        resources = spec.resources(params)  # validates the parameters it needs
        job = self.catalog.create_job(kind, params, resource=",".join(r for r, _ in resources))
        with self._lock:
            self._lock.notify_all()
        return job

    def wake(self, job_id: str | None = None) -> JobRecord | None:
        """Queue the waiting job ``job_id`` again now (an outside event: a disk inserted, a thaw
        done); returns it, or None when it was not waiting. Without a job ID: look for queued
        jobs now (after a job was created in the catalog directly)."""
        with self._lock:
            job = None
            if job_id is not None:
                job = self.catalog.wake_job(job_id)
                if job is not None:
                    self.catalog.append_job_log(job_id, "info", "woken: queued again")
            self._lock.notify_all()
            return job

    def wake_matching(self, match: str | Callable[[JobRecord], bool]) -> list[str]:
        """Wake every waiting job that ``match`` selects: a predicate on the job record, or a
        key -- a resource name the job holds (``location:ID``, ``asset:NAME``) or its exact
        wait reason. Returns the IDs of the jobs woken."""
        if callable(match):
            selects = match
        else:

            def selects(job: JobRecord) -> bool:
                names = (job.resource or "").split(",")
                return match in names or job.wait_reason == match

        woken = []
        for job in self.catalog.list_jobs(state="waiting", limit=1000):
            if selects(job) and self.wake(job.id) is not None:
                woken.append(job.id)
        return woken

    def cancel(self, job_id: str) -> JobRecord:
        job = self.catalog.get_job(job_id)
        with self._lock:
            ctx = self._running.get(job_id)
            if ctx is not None:
                ctx.cancel.set()
                return job
            if job.state in ("queued", "interrupted", "waiting"):
                job = self.catalog.update_job(job_id, state="cancelled")
                self.catalog.append_job_log(job_id, "info", "cancelled before it ran")
            return job

    def retry(self, job_id: str) -> JobRecord:
        job = self.catalog.get_job(job_id)
        if job.state in ("queued", "running"):
            return job
        if job.state == "waiting":
            return self.wake(job_id) or self.catalog.get_job(job_id)
        if job.state == "interrupted":
            job = self.catalog.update_job(job_id, state="queued")
            with self._lock:
                self._lock.notify_all()
            return job
        new = self.submit(job.kind, dict(job.params))
        self.catalog.append_job_log(new.id, "info", f"retry of job {job_id}")
        return new

    def wait(self, job_id: str, timeout: float = 600.0) -> JobRecord:
        deadline = time.monotonic() + timeout
        while True:
            job = self.catalog.get_job(job_id)
            if job.state in ("succeeded", "failed", "cancelled") or (
                job.state == "interrupted" and self._stopping
            ):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state}")
            time.sleep(0.05)

    def live_progress(self, job_id: str) -> dict[str, Any] | None:
        ctx = self._running.get(job_id)
        return dict(ctx.latest) if ctx is not None else None

    # --- dispatching ------------------------------------------------------------------------------

    def _can_take(self, resources: list[tuple[str, bool]]) -> str | None:
        for name, exclusive in resources:
            held = self._held.get(name)
            if held is None or not held[1]:
                continue
            if exclusive or held[0]:
                other = next(iter(held[1]))
                return f"waiting for job {other[:8]} ({name} is busy)"
        return None

    def _dispatch(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                self._wake_due()
                started = self._start_ready()
                if not started:
                    self._lock.wait(timeout=1.0)

    def _wake_due(self) -> None:
        """Queue again the waiting jobs whose ``wake_at`` has passed (called under the lock)."""
        for job in self.catalog.due_waiting(self.clock()):
            if self.catalog.wake_job(job.id) is not None:
                self.catalog.append_job_log(job.id, "info", "wake time reached: queued again")

    def _start_ready(self) -> bool:
        started = False
        queued = sorted(
            self.catalog.list_jobs(state="queued", limit=1000), key=lambda j: j.created_at
        )
        for job in queued:
            if len(self._running) >= self.max_parallel:
                self._note_waiting(job, "waiting for a free job slot")
                continue
            spec = JOB_KINDS.get(job.kind)
            if spec is None:
                self.catalog.update_job(
                    job.id,
                    state="failed",
                    error={"code": "invalid_input", "message": f"unknown job kind {job.kind}"},
                )
                continue
            resources = spec.resources(job.params)
            reason = self._can_take(resources)
            if reason is not None:
                self._note_waiting(job, reason)
                continue
            for name, exclusive in resources:
                held = self._held.setdefault(name, (exclusive, set()))
                self._held[name] = (exclusive or held[0], held[1] | {job.id})
            self._waiting_reason.pop(job.id, None)
            job = self.catalog.update_job(job.id, state="running", progress={})
            ctx = JobContext(self, job.id, job.checkpoint)
            self._running[job.id] = ctx
            thread = threading.Thread(
                target=self._run,
                args=(job, spec, ctx, resources),
                name=f"job-{job.id[:8]}",
                daemon=True,
            )
            self._threads[job.id] = thread
            thread.start()
            started = True
        return started

    def _note_waiting(self, job: JobRecord, reason: str) -> None:
        if self._waiting_reason.get(job.id) != reason:
            self._waiting_reason[job.id] = reason
            self.catalog.update_job(job.id, progress={"waiting": reason})

    @staticmethod
    def _retryable(exc: ApplianceError) -> bool:
        # An isolated job's error comes back as a plain ApplianceError with the same code.
        return isinstance(exc, TransientBackendError) or exc.code == TransientBackendError.code

    def _record_wait(
        self,
        job_id: str,
        reason: str,
        wake_at: datetime | None,
        checkpoint: dict[str, Any] | None,
    ) -> None:
        with self._lock:
            self._finished += 1
        when = f" until {wake_at.isoformat()}" if wake_at is not None else ""
        self.catalog.append_job_log(job_id, "info", f"waiting{when}: {reason}")
        self.catalog.set_waiting(job_id, reason, wake_at, checkpoint)
        with self._lock:
            self._finished += 1

    def _record_end(self, job_id: str, level: str, message: str, **fields: Any) -> None:
        # The last log line goes first: whoever sees the job ended sees its whole log. Counted
        # before and after the write: a reader that caches what it read between the two does
        # so under a count that is already out of date when the write is visible.
        with self._lock:
            self._finished += 1
        self.catalog.append_job_log(job_id, level, message)
        ended = self.catalog.update_job(job_id, **fields)
        with self._lock:
            self._finished += 1
        for listener in list(self.end_listeners):
            try:
                listener(ended)
            except Exception:
                log.exception("a job-end listener failed for job %s", job_id)

    def _run(
        self, job: JobRecord, spec: JobKind, ctx: JobContext, resources: list[tuple[str, bool]]
    ) -> None:
        try:
            if self.isolate and spec.isolated:
                result = run_isolated(self.app, spec.work, dict(job.params), ctx, shareable_works())
            else:
                result = spec.work(self.app, dict(job.params), ctx)
            self._record_end(
                job.id, "info", "finished", state="succeeded", result=result, progress=ctx.latest
            )
        except JobWaiting as wait:
            self._record_wait(job.id, wait.reason, wait.wake_at, wait.checkpoint)
        except BackupCancelled:
            state = "interrupted" if ctx.interrupted else "cancelled"
            self._record_end(
                job.id,
                "warning",
                "interrupted by the service stopping; it resumes on the next start"
                if ctx.interrupted
                else "cancelled",
                state=state,
                progress=ctx.latest,
            )
        except ApplianceError as exc:
            if self._retryable(exc) and job.attempts < spec.max_attempts:
                delay = spec.retry_delay(job.attempts)
                self._record_wait(
                    job.id,
                    f"retrying after a transient error (attempt {job.attempts} of "
                    f"{spec.max_attempts}): {exc.message}",
                    self.clock() + timedelta(seconds=delay),
                    None,  # the checkpoint saved so far stays
                )
                return
            self._record_end(
                job.id,
                "error",
                exc.message,
                state="failed",
                error=exc.to_dict(),
                progress=ctx.latest,
            )
        except Exception as exc:  # a bug must fail the job, not kill the dispatcher
            self._record_end(
                job.id,
                "error",
                traceback.format_exc(limit=5),
                state="failed",
                error={"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"},
            )
        finally:
            with self._lock:
                for name, _exclusive in resources:
                    exclusive_flag, holders = self._held.get(name, (False, set()))
                    holders = holders - {job.id}
                    if holders:
                        self._held[name] = (exclusive_flag, holders)
                    else:
                        self._held.pop(name, None)
                self._running.pop(job.id, None)
                self._threads.pop(job.id, None)
                self._lock.notify_all()
