"""Schedules of protection policies: a pure decision function and the thread that acts on it.

A policy's schedule is a JSON document::

    {"entries": [{"cron": "0 * * * *", "mode": "incremental"},
                 {"cron": "0 3 * * 0", "mode": "full"},
                 {"cron": "0 5 * * *", "mode": "boot_test"}],
     "catch_up": "once"}

Each entry is a five-field cron expression (minute hour day-of-month month day-of-week, read by
croniter in the scheduler's time zone, UTC by default) with what it runs: a backup mode, or
``boot_test`` (scheduled boot verification of a VM asset: an isolated test boot of its newest
point, see ``image.failover``). An entry is known by its *key* (mode and cron expression), so
reordering entries keeps their history. Boot tests are a mode rather than a separate field
because everything else about an entry (its key, its state, the catch-up rule) is the same.

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
- Several backup entries of one policy due in the same tick make ONE job, of the strongest mode
  among them (full > differential > incremental): the weekly full at 03:00 on Sunday replaces
  that hour's incremental.
- Boot-test entries make their own ``boot_test`` job, independently of the backup entries: a
  backup and a boot test due in the same tick both run (the backup's job is created first; the
  job kinds' resources decide whether they overlap). Several boot-test entries due together
  make one boot test.
- An entry without state (a policy created while the scheduler was not looking) starts at
  ``now``: a schedule never fires for time before it existed.

The :class:`Scheduler` thread ticks every ``interval`` seconds (and once at start, which is when
catch-up happens), runs the store's verify schedule (:mod:`appliance.verify_schedule`), and
submits ``policy_backup`` jobs (:mod:`appliance.policies`) and
``boot_test`` jobs ``{asset, policy, trigger: "schedule"}`` through the job runner's catalog:
one job per asset of the policy (a boot test for each of its virtual machines), all created in
the transaction that records the slot. An asset whose previous scheduled run of the same action
by the same policy is still queued gets no second queued run: the slot is recorded as fired and
the queued job's log says it covers it. The backup part
and the boot-test part of a tick are two transactions: a crash between them leaves the boot
test's slot unfired, so it runs (as a catch-up) after the restart. When the ``boot_test`` job
kind is not registered (an engine used without the failover manager), a due boot test is
recorded as fired and the audit log says why it did not run.
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
from appliance.cron import check_cron
from appliance.engine import Appliance
from appliance.errors import ApplianceError, InvalidInput
from appliance.jobs import JOB_KINDS, JobRunner
from appliance.policies import POLICY_JOB_KIND, register_policy_jobs
from appliance.verify_schedule import verify_tick

__all__ = ["check_cron"]  # re-exported: the API's schemas check cron fields with it

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
MODES = ("full", "incremental", "differential")
#: The entry mode of a scheduled boot test, and the job kind it submits.
BOOT_TEST = "boot_test"
ENTRY_MODES = (*MODES, BOOT_TEST)
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

    @property
    def is_boot_test(self) -> bool:
        return self.mode == BOOT_TEST


@dataclass(frozen=True)
class Schedule:
    entries: tuple[ScheduleEntry, ...]
    catch_up: str = "once"

    def document(self) -> dict[str, Any]:
        return {
            "entries": [{"cron": e.cron, "mode": e.mode} for e in self.entries],
            "catch_up": self.catch_up,
        }


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
        if mode not in ENTRY_MODES:
            raise InvalidInput(f"schedule mode must be one of {', '.join(ENTRY_MODES)}")
        entry = ScheduleEntry(check_cron(raw.get("cron")), mode)
        if any(e.key == entry.key for e in entries):
            raise InvalidInput(f"schedule entry {entry.key!r} is listed twice")
        entries.append(entry)
    return Schedule(tuple(entries), catch_up)


def check_schedule_for_asset(schedule: Schedule, asset: str, asset_kind: str) -> None:
    """Refuse boot-test entries on an asset that is not a VM (only a VM can be test-booted)."""
    if asset_kind == "vm":
        return
    for index, entry in enumerate(schedule.entries):
        if entry.is_boot_test:
            raise InvalidInput(
                f"schedule entry '{entry.cron}' is a boot test, but {asset} is a folder asset; "
                "only virtual machines can be test-booted",
                entry=index,
                asset=asset,
            )


def check_schedule_for_assets(schedule: Schedule, kinds: Mapping[str, str]) -> None:
    """:func:`check_schedule_for_asset` for a policy of several assets (``{name: kind}``): a
    boot-test entry needs at least one virtual machine among them (it boots each of them)."""
    if any(kind == "vm" for kind in kinds.values()):
        return
    for name, kind in kinds.items():
        check_schedule_for_asset(schedule, name, kind)


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
        what = "boot test" if self.entry.is_boot_test else self.entry.mode
        return (
            f"entry '{self.entry.cron}' ({what}): slot {self.slot.isoformat()}, "
            f"{count} missed slot(s)"
        )


@dataclass(frozen=True)
class ScheduleDecision:
    policy: str
    #: The new last-fired time of every entry whose state moves (due or initialised).
    fired: dict[str, datetime]
    #: Mode of the one backup job to run now; None: no backup runs.
    run_mode: str | None
    due: tuple[DueEntry, ...]
    #: Due entries not run because of ``"catch_up": "skip"``.
    skipped: tuple[DueEntry, ...]
    catch_up: str = "once"
    #: Keys of the policy's boot-test entries (their state moves with the boot-test job).
    boot_test_keys: frozenset[str] = frozenset()

    @property
    def backup_due(self) -> tuple[DueEntry, ...]:
        return tuple(d for d in self.due if not d.entry.is_boot_test)

    @property
    def boot_test_due(self) -> tuple[DueEntry, ...]:
        return tuple(d for d in self.due if d.entry.is_boot_test)

    @property
    def run_boot_test(self) -> bool:
        """A boot test runs now (at least one boot-test entry is due and not skipped)."""
        return any(d not in self.skipped for d in self.boot_test_due)

    @property
    def missed(self) -> int:
        """Missed slots of the backup entries (the backup job's count)."""
        return sum(d.missed for d in self.backup_due)

    @property
    def boot_test_missed(self) -> int:
        return sum(d.missed for d in self.boot_test_due)

    def fired_part(self, boot_test: bool) -> dict[str, datetime]:
        """The part of :attr:`fired` that moves with the backup job, or with the boot test."""
        return {k: v for k, v in self.fired.items() if (k in self.boot_test_keys) == boot_test}

    def log_lines(self) -> list[tuple[str, str]]:
        """The backup job's account of why it runs and what it caught up on."""
        return self._lines(
            self.backup_due, f"scheduled run of policy {self.policy} ({self.run_mode})"
        )

    def boot_test_log_lines(self) -> list[tuple[str, str]]:
        """The boot-test job's account of why it runs and what it caught up on."""
        return self._lines(self.boot_test_due, f"scheduled boot test of policy {self.policy}")

    def _lines(self, due: tuple[DueEntry, ...], headline: str) -> list[tuple[str, str]]:
        lines = [("info", headline)]
        for d in due:
            if d not in self.skipped:
                lines.append(("info", d.describe()))
        missed = sum(d.missed for d in due)
        if missed:
            lines.append(
                (
                    "warning",
                    f"catch-up ({self.catch_up}): {missed} slot(s) were missed while the "
                    "appliance was not running; they are covered by this one run"
                    if self.catch_up == "once"
                    else f"catch-up (skip): {missed} missed slot(s) were skipped",
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
    backups = [d.entry.mode for d in due if d not in skipped and not d.entry.is_boot_test]
    run_mode = max(backups, key=lambda m: MODE_STRENGTH[m]) if backups else None
    return ScheduleDecision(
        policy=policy.name,
        fired=fired,
        run_mode=run_mode,
        due=tuple(due),
        skipped=skipped,
        catch_up=schedule.catch_up,
        boot_test_keys=frozenset(e.key for e in schedule.entries if e.is_boot_test),
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
        #: More periodic work of outer packages (a tiering run), called in every tick with the
        #: tick's time; each returns the IDs of the jobs it submitted.
        self.extra_ticks: list[Callable[[datetime], list[str]]] = []
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
            queued: dict[str, set[tuple[str, str]]] = {POLICY_JOB_KIND: set(), BOOT_TEST: set()}
            for job in catalog.list_jobs(state="queued", limit=1000):
                if job.kind in queued:
                    queued[job.kind].add(
                        (str(job.params.get("policy")), str(job.params.get("asset")))
                    )
            vms = {a.name for a in catalog.list_assets() if a.kind == "vm"}
            created: list[str] = []
            for policy in catalog.list_policies():
                try:
                    decision = due_runs(policy, states.get(policy.name, {}), now, tz=self.tz)
                except InvalidInput as exc:
                    log.warning("policy %s has an unusable schedule: %s", policy.name, exc)
                    continue
                if not decision.fired:
                    continue
                if decision.skipped:
                    catalog.audit(
                        "scheduler",
                        "schedule.skip",
                        policy.name,
                        {"skipped": [d.describe() for d in decision.skipped], "rule": "skip"},
                    )
                for boot_test in (False, True):
                    kind = BOOT_TEST if boot_test else POLICY_JOB_KIND
                    # A boot test runs for the policy's virtual machines only.
                    assets = [a for a in policy.assets if not boot_test or a in vms]
                    waiting = {a for a in assets if (policy.name, a) in queued[kind]}
                    try:
                        created += self._fire(policy, decision, boot_test, assets, waiting)
                    except ApplianceError as exc:  # e.g. the policy was deleted meanwhile
                        log.warning("policy %s: scheduled run not submitted: %s", policy.name, exc)
                        break
            try:
                created += verify_tick(self.app, self.runner, now, self.tz)
            except ApplianceError as exc:  # a bad verify schedule must not stop the policies'
                log.warning("scheduled verify not submitted: %s", exc)
            for extra in self.extra_ticks:
                try:
                    created += extra(now)
                except Exception:  # one bad plug-in must not stop the policies' schedules
                    log.exception("scheduled work of a plug-in failed")
            if created:
                self.runner.wake()
            return created

    def _fire(
        self,
        policy: PolicyRecord,
        decision: ScheduleDecision,
        boot_test: bool,
        assets: list[str],
        already_queued: set[str],
    ) -> list[str]:
        """Fire the backup part (``boot_test`` False) or the boot-test part of ``decision``: one
        job per asset of ``assets`` not in ``already_queued`` (whose queued job covers the slot
        too); returns the new jobs' IDs."""
        catalog = self.app.catalog
        fired = decision.fired_part(boot_test)
        if not fired:
            return []
        runs = decision.run_boot_test if boot_test else decision.run_mode is not None
        kind = BOOT_TEST if boot_test else POLICY_JOB_KIND
        due = decision.boot_test_due if boot_test else decision.backup_due
        if not runs or not assets:
            catalog.fire_schedule(policy.name, fired)
            return []
        if kind not in JOB_KINDS:
            # An engine used without the failover manager: say so, and do not retry the slot
            # every tick (it is recorded as fired, its slots named in the audit entry).
            catalog.fire_schedule(policy.name, fired)
            message = (
                f"scheduled boot test of {', '.join(assets)} (policy {policy.name}) did not run: "
                "the boot_test job kind is not registered (this appliance runs without the "
                "failover manager; start the service, or register_failover_jobs)"
            )
            log.warning(message)
            catalog.audit(
                "scheduler",
                "schedule.boot_test_unavailable",
                policy.name,
                {"message": message, "slots": [d.describe() for d in due]},
            )
            return []
        if already_queued:
            for job in catalog.list_jobs(state="queued", limit=1000):
                if (
                    job.kind == kind
                    and job.params.get("policy") == policy.name
                    and job.params.get("asset") in already_queued
                ):
                    catalog.append_job_log(
                        job.id,
                        "info",
                        "this queued run also covers the slot(s) "
                        + "; ".join(d.describe() for d in due),
                    )
        jobs = []
        for asset in assets:
            if asset in already_queued:
                continue
            params: dict[str, Any]
            if boot_test:
                # No point is named: the failover manager picks it when the job starts (the
                # newest verified image point, else the newest), so a backup that ends before
                # the boot test starts (its job was queued first) is the one tested.
                params = {
                    "asset": asset,
                    "policy": policy.name,
                    "trigger": "schedule",
                    "missed": decision.boot_test_missed,
                }
            else:
                params = {
                    "policy": policy.name,
                    "asset": asset,
                    "mode": decision.run_mode,
                    "trigger": "schedule",
                    "missed": decision.missed,
                    "apply_retention": True,
                }
            resources = JOB_KINDS[kind].resources(params)
            jobs.append((params, ",".join(name for name, _ in resources)))
        lines = decision.boot_test_log_lines() if boot_test else decision.log_lines()
        created = catalog.fire_schedule_jobs(
            policy.name, fired, job_kind=kind if jobs else None, jobs=jobs, log=lines
        )
        return [job.id for job in created]
