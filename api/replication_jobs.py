"""Replicating to paired peers: the ``replicate`` job, the hook after backups, the catch-up tick.

A paired peer is a location of kind ``peer`` (:mod:`api.peer_backend`); a replicated point is a
copy there like any other. The ``replicate`` job (one peer: ``{"location": ID}``) copies every
complete point of this store that has no ``present`` copy at the peer, oldest first, each with
the engine's ``copy_point`` (dedup-aware: the peer is asked which packs it holds; each upload is
checked at the peer by its SHA-256; the manifest goes last and the copy is committed only then),
then sends the point's plaintext summary (asset, kind, created_at, bytes) for the peer's page.
The upload is held to the peer's ``bandwidth_mib_s`` (the ``RateLimit`` wrapper).

Faults:

- The peer does not answer (refused, reset, timed out, after the retry wrapper's tries): the job
  *waits* (``JobWaiting``, :data:`appliance.jobs.LOCATION_RETRY`) with the reason, holding
  nothing; the copy in flight stays ``copying``. Woken (by its time, by the tick below once the
  peer answers, or by "replicate now"), it starts again from the catalog: points already
  ``present`` are skipped and, within a point, packs the peer holds are not sent again.
- The peer's certificate changed, or it refuses the token: the job fails, loudly, with the words
  of :class:`~api.peer_backend.PeerCertificateChanged` / ``PeerTokenRefused``; the pin is never
  changed (re-pairing is the only way). The peer is full: the job fails with ``peer_full``.
- Anything else about one point (damage at the source): logged, the other points go on.

After every successful backup (``backup_files``, ``backup_image``, ``policy_backup``) a
``replicate`` job is submitted for every peer with ``replicate_new``, unless one is already
queued or waiting for that peer (it will take the new point too). The hook wraps the kinds' work
functions (:func:`replicate_after_backups`), so it runs where the backup ran (in the isolated
child, whose ``submit`` is relayed to the runner) and ``appliance`` knows nothing of peers.

A peer's ``window`` (:mod:`api.replication_window`) says when replication may run: a job that
starts outside it, or finds it closed between two points (it finishes the point it is copying
first), *waits* until the window opens (``wake_at``; checkpoint ``wait: "window"``). A job with
``ignore_window`` ("replicate now" asked so) runs at once.

The scheduler's :func:`replication_tick` catches up: every ``catch_up_minutes`` (a peer's option,
default :data:`DEFAULT_CATCH_UP_MINUTES`, 0: off) it submits a job for a peer with points still to
send, inside the peer's window only. On every tick it wakes a job waiting for its window once the
window is open (a window changed meanwhile counts), and a job waiting for its peer once the peer
answers. Every :data:`LINK_CHECK_INTERVAL` (and while a job waits for it) it checks the link with
the token (:func:`check_link`): whether the peer answers, takes the token, has the pinned
certificate; that, and the peer's clock read on the way (:mod:`api.peer_wire`), is what the
peers page shows between replications.

What the last replication did is kept in the location's details (``replication``: when, job,
outcome, error, bytes sent; and the link's last state: ``link_code``, ``link_error``,
``link_checked_at``, ``clock_skew_seconds``), which the peers page shows with the RPO at the peer.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from api.peer_backend import (
    STORE_ROUTES,
    PeerBackend,
    PeerCertificateChanged,
    PeerFull,
    PeerTokenRefused,
    PeerUnreachable,
    open_link,
    parse_address,
)
from api.peer_wire import PEER_CLOCKS, traffic
from api.pull_back import register_pull_back_job, waiting_pulls
from api.replication_window import (
    Window,
    local_timezone,
    parse_window,
    wait_words,
    window_state,
)
from appliance.catalog.records import LocationRecord, PointRecord, home_location_id
from appliance.engine import Appliance
from appliance.errors import (
    ApplianceError,
    BackupCancelled,
    InvalidInput,
    JobWaiting,
    LocationUnavailable,
    NotFound,
    TransientBackendError,
)
from appliance.job_context import JobView
from appliance.jobs import JOB_KINDS, LOCATION_RETRY, JobKind, JobRunner, register_job_kind
from appliance.locations.work import location_options

REPLICATE_KIND = "replicate"
PEER_KIND = "peer"
#: The job kinds after whose success new points go to the peers.
BACKUP_KINDS = ("backup_files", "backup_image", "backup_ssh", "backup_libvirt", "policy_backup")
#: Minutes between catch-up runs of a peer that has none set.
DEFAULT_CATCH_UP_MINUTES = 15
#: Job states in which a replicate job will still send what is pending.
_ACTIVE = ("queued", "running", "waiting")
MIB = 1 << 20
#: How often the tick checks each peer's link (token, certificate, clock) between replications.
LINK_CHECK_INTERVAL = timedelta(minutes=5)
#: What a waiting job waits for (its checkpoint's ``wait``).
WAIT_WINDOW = "window"
WAIT_PEER = "peer"

_STATE_LOCK = threading.Lock()


# --- what is pending ------------------------------------------------------------------------------


def peer_locations(app: Appliance) -> list[LocationRecord]:
    """This store's peers, oldest first."""
    return [loc for loc in app.catalog.list_locations(app.repo.store_id) if loc.kind == PEER_KIND]


def find_peer(app: Appliance, name: str) -> LocationRecord:
    """A peer of this store by location id, id prefix or label (NotFound otherwise)."""
    location = app.find_location(name)
    if location.kind != PEER_KIND:
        raise NotFound(f"location {location.label} is not a peer", location=location.id)
    return location


def peer_options(location: LocationRecord) -> dict[str, Any]:
    options = location.details.get("options", {})
    return dict(options) if isinstance(options, dict) else {}


def bandwidth_of(location: LocationRecord) -> float | None:
    """The peer's upload limit in bytes per second (None: unlimited)."""
    limit = peer_options(location).get("bandwidth_mib_s")
    return float(limit) * MIB if limit else None


def pending_points(app: Appliance, location_id: str) -> list[PointRecord]:
    """Complete points of this store whose home pool holds them and which have no ``present``
    copy at ``location_id``, oldest first."""
    home = {
        c.point_id for c in app.catalog.copies_at(home_location_id(app.repo.store_id), "present")
    }
    there = {c.point_id for c in app.catalog.copies_at(location_id, "present")}
    return [
        point
        for point in app.catalog.list_points(store_id=app.repo.store_id)
        if point.status == "complete" and point.id in home and point.id not in there
    ]


def active_jobs(app: Appliance, location_id: str) -> list[Any]:
    """The replicate jobs of one peer that are queued, running or waiting."""
    return [
        job
        for state in _ACTIVE
        for job in app.catalog.list_jobs(state=state, limit=1000)
        if job.kind == REPLICATE_KIND and job.params.get("location") == location_id
    ]


def replication_state(location: LocationRecord) -> dict[str, Any]:
    state = location.details.get("replication", {})
    return dict(state) if isinstance(state, dict) else {}


def record_state(app: Appliance, location_id: str, **fields: Any) -> None:
    """Merge ``fields`` into the peer's ``replication`` details (read-modify-write, locked)."""
    with _STATE_LOCK:
        location = app.catalog.get_location(location_id)
        app.catalog.update_location(
            location_id, details={"replication": {**replication_state(location), **fields}}
        )


def link_fields(error: ApplianceError | None, now: datetime) -> dict[str, Any]:
    """The link state to record after an exchange with the peer: ``error`` None when it went
    well, else what the peer did (its code says which: refused token, changed certificate...)."""
    return {
        "link_code": error.code if error is not None else "ok",
        "link_error": error.message if error is not None else None,
        "link_checked_at": now.isoformat(),
    }


def window_of(location: LocationRecord) -> Window | None:
    """The peer's replication window (None: any time; an unreadable one counts as none, and
    is refused where it is set)."""
    try:
        return parse_window(peer_options(location).get("window"))
    except InvalidInput:
        return None


def _window_closed(
    app: Appliance, location_id: str, checkpoint: dict[str, Any]
) -> JobWaiting | None:
    """The wait for the peer's window when it is closed now (None while open)."""
    location = app.catalog.get_location(location_id)  # read again: it may have changed
    window = window_of(location)
    tz = local_timezone(app)
    state = window_state(app.clock(), window, tz)
    if state.open or window is None or state.next_open is None:
        return None
    return JobWaiting(
        wait_words(window, state.next_open, tz),
        wake_at=state.next_open,
        checkpoint={**checkpoint, "wait": WAIT_WINDOW},
    )


# --- the job --------------------------------------------------------------------------------------


def replicate(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    """The ``replicate`` job: see the module docstring."""
    location = find_peer(app, p["location"])
    address = parse_address(location.address)[0]
    bandwidth = bandwidth_of(location)
    todo = pending_points(app, location.id)
    done = [str(x) for x in ctx.checkpoint.get("replicated", [])]
    limit = f" at most {bandwidth / MIB:g} MiB/s" if bandwidth else ""
    if ctx.checkpoint:
        ctx.log(
            "info",
            f"resuming the replication to {location.label}: {len(done)} point(s) were sent "
            f"before it waited; {len(todo)} to go (packs the peer holds are not sent again)",
        )
    else:
        ctx.log("info", f"replicating {len(todo)} point(s) to {location.label}{limit}")
    ignore_window = bool(p.get("ignore_window"))
    before = traffic(address)
    totals = {"packs_copied": 0, "bytes_copied": 0, "packs_present": 0}
    failed: list[str] = []
    replicated: list[str] = []
    with contextlib.closing(
        PeerBackend(open_link(location.address, **location_options(app, location)))
    ) as peer:
        for number, point in enumerate(todo, 1):
            if ctx.cancel.is_set():
                raise BackupCancelled("the replication was cancelled")
            # Asked before each point: a window that closes mid-point lets that point finish.
            closed = (
                None
                if ignore_window
                else _window_closed(app, location.id, {"replicated": done + replicated})
            )
            if closed is not None:
                if replicated:
                    ctx.log("info", f"{closed.reason}; {len(replicated)} point(s) sent so far")
                raise closed

            def progress(
                info: dict[str, Any], number: int = number, point_id: str = point.id
            ) -> None:
                ctx.progress(
                    {**info, "point": point_id, "points_done": number - 1, "points": len(todo)}
                )

            try:
                result = app.copy_point(
                    point.id, location.id, progress=progress, cancel=ctx.cancel, bandwidth=bandwidth
                )
            except (PeerCertificateChanged, PeerTokenRefused, PeerFull) as exc:
                if isinstance(exc, LocationUnavailable):
                    app.catalog.update_location(location.id, online=False)
                record_state(
                    app,
                    location.id,
                    last_job=ctx.job_id,
                    last_outcome="failed",
                    last_error=exc.message,
                    **link_fields(exc, app.clock()),
                )
                raise
            except LocationUnavailable as exc:
                # It answered when the copy opened it; it stopped answering since.
                app.catalog.update_location(location.id, online=False)
                record_state(
                    app,
                    location.id,
                    last_job=ctx.job_id,
                    last_outcome="waiting",
                    last_error=exc.message,
                    **link_fields(exc, app.clock()),
                )
                raise JobWaiting(
                    f"the peer {location.label} is unreachable ({exc.message}); the replication "
                    "goes on when it answers",
                    wake_at=app.clock() + LOCATION_RETRY,
                    checkpoint={"replicated": done + replicated, "wait": WAIT_PEER},
                ) from exc
            except (BackupCancelled, TransientBackendError):
                raise  # a transient failure: the job runs again after a backoff
            except ApplianceError as exc:
                ctx.log("error", f"point {point.id} was not replicated: {exc.message}")
                failed.append(point.id)
                continue
            for key in totals:
                totals[key] += int(result.get(key, 0))
            ctx.log(
                "info",
                f"point {point.id} ({point.asset}) is at {location.label}: "
                f"{result['packs_copied']} pack(s), {result['bytes_copied']} bytes sent, "
                f"{result['packs_present']} already there",
            )
            _send_summary(peer, point, ctx)
            replicated.append(point.id)
            ctx.save_checkpoint({"replicated": done + replicated})
    after = traffic(address)
    sent = after.sent - before.sent
    reading = PEER_CLOCKS.get(address)
    record_state(
        app,
        location.id,
        last_job=ctx.job_id,
        last_outcome="failed" if failed else "succeeded",
        last_error=f"{len(failed)} point(s) not replicated" if failed else None,
        last_at=app.clock().isoformat(),
        last_points=len(replicated),
        last_bytes_sent=sent,
        **link_fields(None, app.clock()),
        **({"clock_skew_seconds": reading.skew_seconds} if reading is not None else {}),
    )
    if failed:
        ctx.log("warning", f"{len(failed)} point(s) failed; the next replication tries again")
    return {
        "location": location.id,
        "label": location.label,
        "replicated": replicated,
        "failed": failed,
        "bytes_sent": sent,
        "bytes_received": after.received - before.received,
        "requests": after.requests - before.requests,
        **totals,
    }


def _send_summary(peer: PeerBackend, point: PointRecord, ctx: JobView) -> None:
    """The point's summary for the peer's page; a failure is logged (the copy stands)."""
    summary = {
        "asset": point.asset,
        "kind": point.kind,
        "created_at": point.created_at.isoformat(),
        "bytes": point.logical_bytes,
    }
    try:
        peer.post_point(point.id, summary)
    except ApplianceError as exc:
        ctx.log("warning", f"the peer did not take the summary of point {point.id}: {exc.message}")


def _resources(p: dict[str, Any]) -> list[tuple[str, bool]]:
    # The store shared (GC must not free packs mid-copy), the peer exclusively: one
    # replication per peer at a time.
    if not isinstance(p.get("location"), str):
        raise InvalidInput("a replicate job names its peer's location id")
    return [("store", False), (f"location:{p['location']}", True)]


# --- after backups --------------------------------------------------------------------------------


def submit_replication(
    app: Appliance,
    submit: Callable[[str, dict[str, Any]], Any],
    *,
    trigger: str,
    only_new: bool = True,
) -> list[str]:
    """Submit a ``replicate`` job for every peer (with ``replicate_new`` when ``only_new``)
    that has none queued or waiting; returns the new jobs' ids."""
    submitted = []
    for location in peer_locations(app):
        if only_new and not peer_options(location).get("replicate_new", True):
            continue
        if any(job.state in ("queued", "waiting") for job in active_jobs(app, location.id)):
            continue  # that one sends the new point too
        job = submit(REPLICATE_KIND, {"location": location.id, "trigger": trigger})
        submitted.append(str(job.id))
    return submitted


def _then_replicate(
    work: Callable[..., dict[str, Any]],
    app: Appliance,
    p: dict[str, Any],
    ctx: JobView,
) -> dict[str, Any]:
    """A backup kind's work, then replication of its point to the peers (see the module doc)."""
    result = work(app, p, ctx)
    try:
        jobs = submit_replication(app, ctx.submit, trigger=f"backup {ctx.job_id}")
    except ApplianceError as exc:  # the backup stands; the catch-up tick sends it later
        ctx.log("warning", f"replication of the new point was not queued: {exc.message}")
        return result
    if jobs:
        ctx.log("info", f"replication to {len(jobs)} peer(s) queued: {', '.join(jobs)}")
        result = {**result, "replication_jobs": jobs}
    return result


def _replicates(kind: JobKind) -> bool:
    return isinstance(kind.work, functools.partial) and kind.work.func is _then_replicate


def replicate_after_backups() -> None:
    """Wrap the backup kinds' work so that a success queues replication (idempotent: a kind
    already wrapped is left alone). The wrapper is picklable, so an isolated kind still runs in
    its child, where ``ctx.submit`` reaches the runner."""
    for name in BACKUP_KINDS:
        kind = JOB_KINDS.get(name)
        if kind is None or _replicates(kind):
            continue
        wrapped = functools.partial(_then_replicate, kind.work)
        register_job_kind(
            name,
            JobKind(
                wrapped,
                kind.resources,
                kind.retry_after_interrupt,
                kind.describe,
                isolated=kind.isolated,
                max_attempts=kind.max_attempts,
                backoff=kind.backoff,
            ),
        )


# --- the catch-up tick ----------------------------------------------------------------------------


def check_link(app: Appliance, location: LocationRecord, now: datetime) -> bool:
    """Ask the peer an empty presence question with the token over the pinned link, and record
    what it did (:func:`link_fields`, its clock, online or not). Returns whether it answered
    (a changed certificate or a refused token count as answering: a job then fails loudly
    instead of waiting for ever)."""
    address = parse_address(location.address)[0]
    error: ApplianceError | None = None
    try:
        with contextlib.closing(
            open_link(location.address, **location_options(app, location))
        ) as link:
            link.post_json(f"{STORE_ROUTES}present", {"names": []}, what="a link check")
    except ApplianceError as exc:
        error = exc
    answered = not isinstance(error, PeerUnreachable)
    if answered != location.online:
        app.catalog.update_location(location.id, online=answered)
    reading = PEER_CLOCKS.get(address)
    record_state(
        app,
        location.id,
        **link_fields(error, now),
        **({"clock_skew_seconds": reading.skew_seconds} if reading is not None else {}),
    )
    return answered


def _link_check_due(location: LocationRecord, now: datetime) -> bool:
    last = replication_state(location).get("link_checked_at")
    try:
        return last is None or now - datetime.fromisoformat(last) >= LINK_CHECK_INTERVAL
    except (TypeError, ValueError):
        return True


def replication_tick(app: Appliance, runner: JobRunner) -> Callable[[datetime], list[str]]:
    """The scheduler's hook: wake waiting replications whose window opened or whose peer answers
    again, check the links now and then, and submit a catch-up replication for a peer whose
    ``catch_up_minutes`` passed with points to send, inside its window."""

    def tick(now: datetime) -> list[str]:
        created: list[str] = []
        tz = local_timezone(app)
        for location in peer_locations(app):
            active = active_jobs(app, location.id)
            window_open = window_state(now, window_of(location), tz).open
            waiting = [job for job in active if job.state == "waiting"]
            for_window = [job for job in waiting if job.checkpoint.get("wait") == WAIT_WINDOW]
            for_peer = [job for job in waiting if job not in for_window]
            for_peer += waiting_pulls(app, location.id)  # a failback's pull waits for the peer too
            if window_open:
                for job in for_window:
                    runner.wake(job.id)
            checked = for_peer or _link_check_due(location, now)
            if checked and check_link(app, location, now):
                for job in for_peer:
                    runner.wake(job.id)
            minutes = peer_options(location).get("catch_up_minutes", DEFAULT_CATCH_UP_MINUTES)
            if not minutes or not window_open:
                continue  # outside the window, the catch-up runs once it opens
            last = replication_state(location).get("last_catch_up")
            if last is not None and now - datetime.fromisoformat(last) < timedelta(
                minutes=float(minutes)
            ):
                continue
            record_state(app, location.id, last_catch_up=now.isoformat())
            if active or not pending_points(app, location.id):
                continue
            job = runner.submit(REPLICATE_KIND, {"location": location.id, "trigger": "schedule"})
            created.append(job.id)
        return created

    return tick


def register_replication_jobs() -> None:
    """Register the ``replicate`` kind and hook replication onto the backup kinds (call at
    service start, after the policy kinds are registered)."""
    register_job_kind(
        REPLICATE_KIND,
        JobKind(
            replicate,
            _resources,
            True,  # resumable: points already present are skipped, packs there not sent
            lambda p: f"replication to peer {str(p.get('location', ''))[:8]}",
            max_attempts=5,
            backoff=60.0,
        ),
    )
    register_pull_back_job()  # failback: the points made on a peer come home (api.pull_back)
    replicate_after_backups()
