"""Schedules of protection policies: a pure decision function and the thread that acts on it.

A policy's schedule is a JSON document::

    {"entries": [{"cron": "0 * * * *", "mode": "incremental"},
                 {"cron": "0 3 * * 0", "mode": "full"}],
     "catch_up": "once"}

Each entry is a five-field cron expression (minute hour day-of-month month day-of-week, read by
croniter in the scheduler's time zone, UTC by default) with the backup mode it runs. An entry is
known by its *key* (mode and cron expression), so reordering entries keeps their history.

State: the catalog records, per policy and entry, the last slot that entry fired for
(``schedule_state``). Advancing that state and creating the job happen in one transaction
(:meth:`Catalog.fire_schedule`), so a crash or restart can neither run a slot twice nor lose one
silently.

Decisions are a pure function, :func:`due_runs` (policy, state, now) -> :class:`ScheduleDecision`,
tested with explicit timestamps. The rules:

- An entry fires when at least one of its slots lies in ``(last fired, now]``; its state moves
  to the newest such slot.
- Catch-up: after downtime an entry may have missed many slots. They are *never* run once per
  missed slot. With ``"catch_up": "once"`` (the default) the entry runs once, now, and the job's
  log says how many slots were missed; with ``"skip"`` it runs only if its newest slot is on
  time (no older than :data:`ON_TIME`), and the skip is recorded in the audit log. Either way
  the count of missed slots is stated.
- Several entries of one policy due in the same tick make ONE job, of the strongest mode among
  them (full > differential > incremental): the weekly full at 03:00 on Sunday replaces that
  hour's incremental.
- An entry without state (a policy created while the scheduler was not looking) starts at
  ``now``: a schedule never fires for time before it existed.

The :class:`Scheduler` thread ticks every ``interval`` seconds (and once at start, which is when
catch-up happens), and submits ``policy_backup`` jobs (:mod:`appliance.policies`) through the
job runner's catalog. A policy whose previous scheduled run is still queued gets no second
queued run: the slot is recorded as fired and the queued job's log says it covers it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from appliance.catalog.records import PolicyRecord
from appliance.engine import Appliance
from appliance.errors import ApplianceError, InvalidInput
from appliance.jobs import JOB_KINDS, JobRunner
from appliance.policies import POLICY_JOB_KIND, register_policy_jobs

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
MODES = ("full", "incremental", "differential")
CATCH_UP_RULES = ("once", "skip")
#: A slot run less than this after its time counts as on time, not as a catch-up.
ON_TIME = timedelta(minutes=5)
#: Counting missed slots stops here (a minutely entry after a month of downtime); the count is
#: then reported as "at least".
MAX_COUNTED = 10_000
MODE_STRENGTH = {"incremental": 0, "differential": 1, "full": 2}


@dataclass(frozen=True)
class ScheduleEntry:
    cron: str
    mode: str

    @property
    def key(self) -> str:
        return f"{self.mode} {self.cron}"


@dataclass(frozen=True)
class Schedule:
    entries: tuple[ScheduleEntry, ...]
    catch_up: str = "once"

    def document(self) -> dict[str, Any]:
        return {
            "entries": [{"cron": e.cron, "mode": e.mode} for e in self.entries],
            "catch_up": self.catch_up,
        }


def check_cron(expression: object) -> str:
    """``expression`` normalised (single spaces) if it is a five-field cron that ever fires."""
    if not isinstance(expression, str):
        raise InvalidInput("a cron expression must be a string")
    fields = expression.split()
    if len(fields) != 5:
        raise InvalidInput(
            f"cron expression {expression!r} needs five fields: minute hour day month weekday"
        )
    text = " ".join(fields)
    try:
        valid = croniter.is_valid(text)
        if valid:
            # An expression can be well-formed and still never fire (30 February).
            croniter(text, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except CroniterBadDateError:
        raise InvalidInput(f"cron expression {text!r} never fires") from None
    except Exception:  # croniter raises assorted errors on odd input; all mean "invalid"
        valid = False
    if not valid:
        raise InvalidInput(f"{expression!r} is not a valid cron expression")
    return text


def parse_schedule(document: object) -> Schedule:
    """Validate a policy's schedule document; :class:`InvalidInput` says what is wrong."""
    if not isinstance(document, Mapping):
        raise InvalidInput("a schedule must be an object with 'entries' and 'catch_up'")
    unknown = set(document) - {"entries", "catch_up"}
    if unknown:
        raise InvalidInput(f"unknown schedule field(s): {', '.join(sorted(unknown))}")
    raw_entries = document.get("entries", [])
    if not isinstance(raw_entries, list):
        raise InvalidInput("schedule entries must be a list")
    catch_up = document.get("catch_up", "once")
    if catch_up not in CATCH_UP_RULES:
        raise InvalidInput(f"catch_up must be one of {', '.join(CATCH_UP_RULES)}")
    entries: list[ScheduleEntry] = []
    for raw in raw_entries:
        if not isinstance(raw, Mapping) or set(raw) - {"cron", "mode"}:
            raise InvalidInput("a schedule entry is an object {'cron': ..., 'mode': ...}")
        mode = raw.get("mode", "incremental")
        if mode not in MODES:
            raise InvalidInput(f"schedule mode must be one of {', '.join(MODES)}")
        entry = ScheduleEntry(check_cron(raw.get("cron")), mode)
        if any(e.key == entry.key for e in entries):
            raise InvalidInput(f"schedule entry {entry.key!r} is listed twice")
        entries.append(entry)
    return Schedule(tuple(entries), catch_up)


def timezone_named(name: str) -> tzinfo:
    if name in ("UTC", "Z", ""):
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(f"unknown time zone {name!r}") from None


# --- the pure decision ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DueEntry:
    """An entry with at least one slot in ``(last fired, now]``."""

    entry: ScheduleEntry
    slot: datetime  # the newest slot at or before now (UTC)
    occurrences: int  # slots since the entry last fired (>= 1; capped at MAX_COUNTED)
    on_time: bool  # the newest slot is no older than ON_TIME

    @property
    def missed(self) -> int:
        """Slots that did not run at their time."""
        return self.occurrences - 1 if self.on_time else self.occurrences

    def describe(self) -> str:
        count = f"at least {self.missed}" if self.occurrences >= MAX_COUNTED else str(self.missed)
        return (
            f"entry '{self.entry.cron}' ({self.entry.mode}): slot {self.slot.isoformat()}, "
            f"{count} missed slot(s)"
        )


@dataclass(frozen=True)
class ScheduleDecision:
    policy: str
    #: The new last-fired time of every entry whose state moves (due or initialised).
    fired: dict[str, datetime]
    #: Mode of the one job to run now; None: nothing runs.
    run_mode: str | None
    due: tuple[DueEntry, ...]
    #: Due entries not run because of ``"catch_up": "skip"``.
    skipped: tuple[DueEntry, ...]
    catch_up: str = "once"

    @property
    def missed(self) -> int:
        return sum(d.missed for d in self.due)

    def log_lines(self) -> list[tuple[str, str]]:
        """The job log's account of why it runs and what it caught up on."""
        run = [d for d in self.due if d not in self.skipped]
        lines = [("info", f"scheduled run of policy {self.policy} ({self.run_mode})")]
        for d in run:
            lines.append(("info", d.describe()))
        if self.missed:
            lines.append(
                (
                    "warning",
                    f"catch-up ({self.catch_up}): {self.missed} slot(s) were missed while the "
                    "appliance was not running; they are covered by this one run"
                    if self.catch_up == "once"
                    else f"catch-up (skip): {self.missed} missed slot(s) were skipped",
                )
            )
        return lines


def _slots_since(
    entry: ScheduleEntry, last: datetime, now: datetime, tz: tzinfo
) -> tuple[int, datetime | None]:
    """(slots in ``(last, now]`` capped at MAX_COUNTED, newest such slot in UTC or None)."""
    try:
        iterator = croniter(entry.cron, last.astimezone(tz))
        count = 0
        newest: datetime | None = None
        while count < MAX_COUNTED:
            slot = iterator.get_next(datetime)
            if slot > now:
                return count, newest
            count += 1
            newest = slot.astimezone(UTC)
        # Too many to count: the newest slot is found backwards from now (the microsecond
        # makes a slot exactly at ``now`` count).
        prev = croniter(entry.cron, now.astimezone(tz) + timedelta(microseconds=1))
        return count, prev.get_prev(datetime).astimezone(UTC)
    except CroniterBadDateError:
        return 0, None  # an expression that never fires again


def due_runs(
    policy: PolicyRecord,
    state: Mapping[str, datetime],
    now: datetime,
    *,
    tz: tzinfo = UTC,
    on_time: timedelta = ON_TIME,
) -> ScheduleDecision:
    """What the scheduler does for ``policy`` at ``now`` given when its entries last fired."""
    if now.tzinfo is None:
        raise InvalidInput("the scheduler's time must be timezone-aware")
    now = now.astimezone(UTC)
    schedule = parse_schedule(policy.schedule)
    fired: dict[str, datetime] = {}
    due: list[DueEntry] = []
    for entry in schedule.entries:
        last = state.get(entry.key)
        if last is None:
            fired[entry.key] = now
            continue
        count, newest = _slots_since(entry, last, now, tz)
        if count == 0 or newest is None:
            continue
        fired[entry.key] = newest
        due.append(DueEntry(entry, newest, count, now - newest <= on_time))
    skipped = tuple(d for d in due if not d.on_time) if schedule.catch_up == "skip" else ()
    run = [d for d in due if d not in skipped]
    run_mode = max((d.entry.mode for d in run), key=lambda m: MODE_STRENGTH[m]) if run else None
    return ScheduleDecision(
        policy=policy.name,
        fired=fired,
        run_mode=run_mode,
        due=tuple(due),
        skipped=skipped,
        catch_up=schedule.catch_up,
    )


def next_slot(entry: ScheduleEntry, after: datetime, tz: tzinfo = UTC) -> datetime | None:
    """The first slot of ``entry`` strictly after ``after`` (UTC), or None if there is none."""
    try:
        return croniter(entry.cron, after.astimezone(tz)).get_next(datetime).astimezone(UTC)
    except CroniterBadDateError:
        return None


# --- the thread ---------------------------------------------------------------------------------------


class Scheduler:
    """Ticks every ``interval`` seconds and submits the policies' due runs as jobs."""

    def __init__(
        self,
        app: Appliance,
        runner: JobRunner,
        *,
        interval: float = 30.0,
        clock: Clock | None = None,
        tz: tzinfo = UTC,
    ) -> None:
        register_policy_jobs()  # the runner must know the kind before it dispatches one
        self.app = app
        self.runner = runner
        self.interval = interval
        self.clock: Clock = clock or app.clock
        self.tz = tz
        self.paused = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick_lock = threading.Lock()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        # The first tick runs at once: that is when slots missed during downtime catch up.
        while True:
            try:
                self.tick()
            except Exception:  # a bad tick must not end scheduling for good
                log.exception("scheduler tick failed")
            if self._stop.wait(self.interval):
                return

    def tick(self, now: datetime | None = None) -> list[str]:
        """Fire every due entry at ``now`` (default: the clock); returns the new jobs' IDs."""
        with self._tick_lock:
            if self.paused:
                return []
            now = now or self.clock()
            catalog = self.app.catalog
            states = catalog.schedule_state()
            queued = {
                str(job.params.get("policy"))
                for job in catalog.list_jobs(state="queued", limit=1000)
                if job.kind == POLICY_JOB_KIND
            }
            created: list[str] = []
            for policy in catalog.list_policies():
                try:
                    decision = due_runs(policy, states.get(policy.name, {}), now, tz=self.tz)
                except InvalidInput as exc:
                    log.warning("policy %s has an unusable schedule: %s", policy.name, exc)
                    continue
                if not decision.fired:
                    continue
                try:
                    job_id = self._fire(policy, decision, policy.name in queued)
                except ApplianceError as exc:  # e.g. the policy was deleted meanwhile
                    log.warning("policy %s: scheduled run not submitted: %s", policy.name, exc)
                    continue
                if job_id is not None:
                    created.append(job_id)
            if created:
                self.runner.wake()
            return created

    def _fire(
        self,
        policy: PolicyRecord,
        decision: ScheduleDecision,
        already_queued: bool,
    ) -> str | None:
        catalog = self.app.catalog
        if decision.skipped:
            catalog.audit(
                "scheduler",
                "schedule.skip",
                policy.name,
                {"skipped": [d.describe() for d in decision.skipped], "rule": "skip"},
            )
        if decision.run_mode is None:
            catalog.fire_schedule(policy.name, decision.fired)
            return None
        if already_queued:
            catalog.fire_schedule(policy.name, decision.fired)
            for job in catalog.list_jobs(state="queued", limit=1000):
                if job.kind == POLICY_JOB_KIND and job.params.get("policy") == policy.name:
                    catalog.append_job_log(
                        job.id,
                        "info",
                        "this queued run also covers the slot(s) "
                        + "; ".join(d.describe() for d in decision.due),
                    )
                    break
            return None
        params = {
            "policy": policy.name,
            "asset": policy.asset,
            "mode": decision.run_mode,
            "trigger": "schedule",
            "missed": decision.missed,
            "apply_retention": True,
        }
        resources = JOB_KINDS[POLICY_JOB_KIND].resources(params)
        created = catalog.fire_schedule(
            policy.name,
            decision.fired,
            job_kind=POLICY_JOB_KIND,
            job_params=params,
            job_resource=",".join(name for name, _ in resources),
            log=decision.log_lines(),
        )
        return None if created is None else created.id
