"""Alert decisions, pure: rules and suppression, missed schedules, RPO, copies, pools, USB,
certificates and the summary, all with explicit times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from appliance.alerts.evaluate import (
    Expiring,
    OverdueMedium,
    PoolSnapshot,
    copy_legs_lost,
    expiring,
    missed_backups,
    pool_events,
    rpo_misses,
    to_resolve,
    usb_overdue,
)
from appliance.alerts.events import (
    EVENT_KINDS,
    SEVERITIES,
    AlertEvent,
    job_event,
    ransomware_warning,
)
from appliance.alerts.records import AlertRecord
from appliance.alerts.rules import (
    RETRY_DELAYS,
    OpenAlert,
    Rule,
    channels_for,
    default_rule,
    effective_rules,
    next_retry,
    parse_rule,
    should_send,
)
from appliance.alerts.summary import SummarySettings, parse_summary, summary_due, summary_text
from appliance.catalog.records import (
    CopyRecord,
    JobRecord,
    LocationRecord,
    PointRecord,
    PolicyRecord,
)
from appliance.errors import InvalidInput

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # a Monday
HOUR = timedelta(hours=1)


def policy(name: str = "docs-daily", cron: str = "0 22 * * *", rpo: int = 0) -> PolicyRecord:
    return PolicyRecord(
        name=name,
        assets=["docs"],
        schedule={"entries": [{"cron": cron, "mode": "incremental"}]},
        mode="incremental",
        retention={},
        rpo_seconds=rpo,
    )


def job(
    kind: str = "policy_backup",
    state: str = "succeeded",
    started: datetime | None = None,
    finished: datetime | None = None,
    **params: Any,
) -> JobRecord:
    return JobRecord(
        id=f"job-{kind}-{state}",
        kind=kind,
        state=state,
        params=params,
        progress={},
        result=None,
        error={"code": "source_error", "message": "source folder is gone"}
        if state == "failed"
        else None,
        created_at=started or T0,
        started_at=started,
        finished_at=finished,
        resource=None,
    )


# --- kinds and severities ----------------------------------------------------------------------


def test_every_kind_has_a_known_default_severity() -> None:
    required = {
        "backup_failed",
        "verify_failed",
        "backup_missed",
        "rpo_missed",
        "copy_leg_lost",
        "boot_test_failed",
        "pool_degraded",
        "pool_filling",
        "usb_overdue",
        "certificate_expiring",
        "credentials_expiring",
        "ransomware_warning",
        "test",
    }
    assert required <= set(EVENT_KINDS)
    assert all(k.severity in SEVERITIES for k in EVENT_KINDS.values())
    assert EVENT_KINDS["backup_failed"].severity == "critical"
    assert EVENT_KINDS["backup_missed"].severity == "warning"
    assert EVENT_KINDS["test"].severity == "info"


def test_an_event_needs_a_known_kind_a_subject_and_an_aware_time() -> None:
    with pytest.raises(InvalidInput):
        AlertEvent("no_such_kind", "docs", "x", T0)
    with pytest.raises(InvalidInput):
        AlertEvent("backup_failed", "", "x", T0)
    with pytest.raises(InvalidInput):
        AlertEvent("backup_failed", "docs", "x", T0.replace(tzinfo=None))


def test_a_failed_backup_job_raises_and_a_good_one_resolves() -> None:
    failed = job_event(job(state="failed", asset="docs", policy="p"), T0)
    assert failed is not None and failed.kind == "backup_failed" and failed.subject == "docs"
    assert "source folder is gone" in failed.message and not failed.resolved
    good = job_event(job(state="succeeded", asset="docs"), T0)
    assert good is not None and good.resolved and good.key == failed.key
    verify = job_event(job("verify", "failed", asset="docs"), T0)
    assert verify is not None and verify.kind == "verify_failed"
    assert job_event(job("gc", "failed"), T0) is None
    assert job_event(job(state="cancelled", asset="docs"), T0) is None


def test_a_failed_boot_test_job_raises_and_a_proven_one_resolves() -> None:
    failed = job_event(job("boot_test", "failed", asset="web"), T0)
    assert failed is not None and failed.kind == "boot_test_failed" and failed.subject == "web"
    assert failed.default_severity == "critical" and "source folder is gone" in failed.message
    proven = job_event(job("boot_test", "succeeded", asset="web"), T0)
    assert proven is not None and proven.resolved and proven.key == failed.key


def test_ransomware_warning_names_the_point_and_reason() -> None:
    event = ransomware_warning("docs", "p123", "83% of files renamed to .locked", T0)
    assert event.kind == "ransomware_warning" and event.subject == "docs"
    assert event.details == {"point": "p123", "reason": "83% of files renamed to .locked"}
    assert event.default_severity == "critical"


# --- rules and suppression -------------------------------------------------------------------------


def test_a_new_event_is_sent_and_a_repeat_waits_for_the_interval() -> None:
    rule = Rule("backup_failed", True, "critical", repeat_seconds=3600)
    assert should_send(rule, None, T0)
    sent = OpenAlert(last_sent_at=T0)
    assert not should_send(rule, sent, T0 + timedelta(minutes=59))
    assert should_send(rule, sent, T0 + HOUR)
    # Never sent (e.g. no channel yet): the next raise sends it.
    assert should_send(rule, OpenAlert(last_sent_at=None), T0)


def test_acknowledged_or_zero_interval_never_repeats_and_disabled_never_sends() -> None:
    rule = Rule("backup_failed", True, "critical", repeat_seconds=60)
    assert not should_send(rule, OpenAlert(T0, acknowledged=True), T0 + timedelta(days=3))
    once = Rule("backup_failed", True, "critical", repeat_seconds=0)
    assert not should_send(once, OpenAlert(T0), T0 + timedelta(days=30))
    off = Rule("backup_failed", False, "critical")
    assert not should_send(off, None, T0)


def test_rules_parse_with_defaults_and_refuse_nonsense() -> None:
    rules = effective_rules({"pool_filling": {"severity": "critical", "repeat_seconds": 600}})
    assert rules["pool_filling"].severity == "critical"
    assert rules["pool_filling"].repeat_seconds == 600
    assert rules["backup_failed"] == default_rule("backup_failed")
    for bad in ({"severity": "loud"}, {"repeat_seconds": -1}, {"channels": "all"}, {"x": 1}):
        with pytest.raises(InvalidInput):
            parse_rule("backup_failed", bad)
    with pytest.raises(InvalidInput):
        parse_rule("nope", {})


def test_channels_for_a_rule() -> None:
    assert channels_for(Rule("test", True, "info"), ["a", "b"]) == ["a", "b"]
    assert channels_for(Rule("test", True, "info", channels=("b", "gone")), ["a", "b"]) == ["b"]


def test_retry_backoff_grows_then_gives_up() -> None:
    assert next_retry(1, T0) == T0 + RETRY_DELAYS[0]
    assert next_retry(2, T0) == T0 + RETRY_DELAYS[1]
    assert RETRY_DELAYS[0] < RETRY_DELAYS[-1]
    assert next_retry(len(RETRY_DELAYS) + 1, T0) is None


# --- missed schedules ------------------------------------------------------------------------------


def test_a_slot_with_nothing_run_is_missed_after_the_grace() -> None:
    p = policy(cron="0 22 * * *")
    last_fired = datetime(2026, 3, 1, 22, 0, tzinfo=UTC)
    states = {p.name: {"incremental 0 22 * * *": last_fired}}
    ran = job(started=last_fired, finished=last_fired + timedelta(minutes=5), policy=p.name)
    slot = datetime(2026, 3, 2, 22, 0, tzinfo=UTC)
    # Within the grace: not yet.
    assert missed_backups([p], states, [ran], slot + timedelta(minutes=29)) == []
    events = missed_backups([p], states, [ran], slot + timedelta(minutes=30))
    assert [e.kind for e in events] == ["backup_missed"]
    assert events[0].subject == p.name and "2026-03-02 22:00" in events[0].message
    assert events[0].details["slot"] == slot.isoformat()


def test_a_backup_started_after_the_slot_is_not_a_miss() -> None:
    p = policy(cron="0 * * * *")
    states = {p.name: {"incremental 0 * * * *": T0}}
    slot = T0 + HOUR
    late = job(started=slot + timedelta(minutes=40), policy=p.name)
    assert missed_backups([p], states, [late], slot + 2 * HOUR) == []
    manual = job("backup_files", started=slot + timedelta(minutes=1), asset="docs")
    assert missed_backups([p], states, [manual], slot + 2 * HOUR) == []
    other_asset = job("backup_files", started=slot + timedelta(minutes=1), asset="mail")
    assert len(missed_backups([p], states, [other_asset], slot + 2 * HOUR)) == 1


def test_a_backup_still_running_at_the_slot_counts_as_running() -> None:
    p = policy(cron="0 * * * *")
    states = {p.name: {"incremental 0 * * * *": T0}}
    long = job(state="running", started=T0 - timedelta(minutes=5), policy=p.name)
    assert missed_backups([p], states, [long], T0 + 3 * HOUR) == []


def test_a_policy_the_scheduler_never_saw_is_not_judged_and_boot_tests_are_ignored() -> None:
    p = policy(cron="0 * * * *")
    assert missed_backups([p], {}, [], T0 + 10 * HOUR) == []
    boot = PolicyRecord(
        "vm", ["vm1"], {"entries": [{"cron": "0 * * * *", "mode": "boot_test"}]}, "full", {}, 0
    )
    assert missed_backups([boot], {"vm": {"boot_test 0 * * * *": T0}}, [], T0 + 9 * HOUR) == []


def test_missed_slot_times_follow_the_schedule_time_zone() -> None:
    p = policy(cron="0 22 * * *")
    berlin = ZoneInfo("Europe/Berlin")
    fired = datetime(2026, 3, 1, 21, 0, tzinfo=UTC)  # 22:00 in Berlin
    states = {p.name: {"incremental 0 22 * * *": fired}}
    slot = datetime(2026, 3, 2, 21, 0, tzinfo=UTC)
    assert missed_backups([p], states, [], slot + timedelta(minutes=20), tz=berlin) == []
    events = missed_backups([p], states, [], slot + timedelta(minutes=31), tz=berlin)
    assert len(events) == 1 and "22:00" in events[0].message


# --- RPO, copies, pools, USB, certificates -----------------------------------------------------------


def point(point_id: str, created: datetime, **fields: Any) -> PointRecord:
    return PointRecord(
        id=point_id, asset="docs", kind="files", mode="full", created_at=created, **fields
    )


def test_rpo_missed_when_the_newest_good_point_is_too_old() -> None:
    p = policy(rpo=6 * 3600)
    fresh = [point("a", T0 - 5 * HOUR)]
    assert rpo_misses([p], fresh, T0) == []
    stale = [point("a", T0 - 7 * HOUR)]
    events = rpo_misses([p], stale, T0)
    assert [(e.kind, e.subject) for e in events] == [("rpo_missed", "docs")]
    assert "7 hours old" in events[0].message and "6 hours" in events[0].message
    assert rpo_misses([p], [], T0)[0].details["last_good_point"] is None
    assert rpo_misses([policy(rpo=0)], [], T0) == []  # no target, nothing to miss


def location(
    lid: str, online: bool, seen: datetime | None, removable: bool = False
) -> LocationRecord:
    return LocationRecord(
        id=lid,
        store_id="s",
        kind="pool_dir",
        address=f"/srv/{lid}",
        access="random",
        immutable=False,
        removable=removable,
        offsite=False,
        online=online,
        label=lid,
        created_at=T0 - timedelta(days=30),
        last_seen_at=seen,
    )


def test_lost_copies_and_long_unreachable_locations_are_lost_legs() -> None:
    here = location("nas", True, T0)
    away = location("offsite", False, T0 - 25 * HOUR)
    usb = location("usb1", False, T0 - timedelta(days=9), removable=True)
    brief = location("blip", False, T0 - HOUR)
    lost = [CopyRecord("p1", "s", "lost", T0, location_id="nas")]
    events = copy_legs_lost([here, away, usb, brief], lost, T0)
    assert {e.subject for e in events} == {"nas", "offsite"}
    nas = next(e for e in events if e.subject == "nas")
    assert nas.message == "1 copy at nas is lost."
    assert (
        "not been reachable for 25 hours"
        in next(e for e in events if e.subject == "offsite").message
    )


def test_pool_degraded_and_filling() -> None:
    pools = [
        PoolSnapshot("fast", "degraded", ("disk sdb is missing",), None),
        PoolSnapshot("big", "ok", (), 9.6),
        PoolSnapshot("roomy", "ok", (), 120.0),
    ]
    events = pool_events(pools, T0)
    assert {(e.kind, e.subject) for e in events} == {
        ("pool_degraded", "fast"),
        ("pool_filling", "big"),
    }
    filling = next(e for e in events if e.kind == "pool_filling")
    assert "about 9 days" in filling.message


def test_usb_overdue_and_certificates() -> None:
    media = [OverdueMedium("weekly", "USB-A", 3), OverdueMedium("weekly", "USB-B", 0)]
    events = usb_overdue(media, T0)
    assert [e.subject for e in events] == ["weekly/USB-A"] and "3 days overdue" in events[0].message
    one = usb_overdue([OverdueMedium("weekly", "USB-C", 1)], T0)[0]
    assert "1 day overdue" in one.message
    certs = [
        Expiring("appliance", "the appliance's TLS certificate", T0 + timedelta(days=10)),
        Expiring("peer:x", "the certificate of site B", T0 + timedelta(days=300)),
        Expiring("peer:y", "the certificate of site C", T0 - timedelta(days=1)),
    ]
    found = expiring("certificate_expiring", certs, T0)
    assert [e.subject for e in found] == ["appliance", "peer:y"]
    assert found[0].message.startswith("The appliance's TLS certificate expires on")
    assert "expired on" in found[1].message


def test_only_evaluated_kinds_are_resolved_when_their_condition_ends() -> None:
    open_keys = [("rpo_missed", "docs"), ("rpo_missed", "mail"), ("pool_filling", "big")]
    still = [AlertEvent("rpo_missed", "mail", "x", T0)]
    assert to_resolve(open_keys, still, ["rpo_missed"]) == [("rpo_missed", "docs")]


# --- the summary -----------------------------------------------------------------------------------


def alert(last_seen: datetime, resolved: datetime | None = None) -> AlertRecord:
    return AlertRecord(
        1,
        "backup_failed",
        "docs",
        "critical",
        "The backup of docs failed.",
        {},
        last_seen,
        last_seen,
        1,
        resolved_at=resolved,
    )


def test_summary_is_due_once_a_day_after_its_hour_when_there_is_something_to_say() -> None:
    daily = SummarySettings("daily", 8)
    morning = datetime(2026, 3, 2, 8, 5, tzinfo=UTC)
    open_alert = [alert(morning - HOUR)]
    # Before 08:00 the due time is yesterday's, which this never-sent summary has not met.
    assert summary_due(daily, None, open_alert, morning - timedelta(minutes=10), UTC)
    assert summary_due(daily, None, open_alert, morning, UTC)
    assert not summary_due(daily, morning, open_alert, morning + HOUR, UTC)
    assert summary_due(daily, morning, open_alert, morning + timedelta(days=1), UTC)
    quiet = [alert(morning - timedelta(days=3), resolved=morning - timedelta(days=2))]
    assert not summary_due(daily, morning - timedelta(days=1), quiet, morning, UTC)
    assert not summary_due(SummarySettings("off", 8), None, open_alert, morning, UTC)
    weekly = SummarySettings("weekly", 8)
    tuesday = morning + timedelta(days=1)
    assert not summary_due(weekly, morning, open_alert, tuesday, UTC)
    with pytest.raises(InvalidInput):
        parse_summary({"frequency": "hourly"})


def test_summary_text_counts_and_lists() -> None:
    title, body = summary_text([alert(T0)], None, "Box")
    assert title == "Box: 1 alert needs attention"
    assert "The backup of docs failed." in body and "not acknowledged" in body
    title, _ = summary_text([alert(T0, resolved=T0)], None, "Box")
    assert title == "Box: all clear"


def test_a_verify_that_finds_damage_raises_verify_failed() -> None:
    damaged = JobRecord(
        id="v1",
        kind="verify",
        state="succeeded",
        params={},
        progress={},
        result={"affected_points": {"p1": ["pack 3 is missing"]}},
        error=None,
        created_at=T0,
        started_at=T0,
        finished_at=T0,
        resource=None,
    )
    event = job_event(damaged, T0)
    assert event is not None and event.kind == "verify_failed" and event.subject == "store"
    assert event.message == "The verification found damage in 1 backup: p1."
    clean = job_event(JobRecord(**{**damaged.__dict__, "result": {"affected_points": {}}}), T0)
    assert clean is not None and clean.resolved


def test_a_backup_marked_suspicious_raises_the_ransomware_warning() -> None:
    from appliance.alerts.events import suspicion_event

    done = JobRecord(
        id="b1",
        kind="backup_files",
        state="succeeded",
        params={"asset": "projects"},
        progress={},
        result={"point": "p9", "suspicion": ["88% of files changed against a usual 3%"]},
        error=None,
        created_at=T0,
        started_at=T0,
        finished_at=T0,
        resource=None,
    )
    event = suspicion_event(done, T0)
    assert event is not None and event.kind == "ransomware_warning"
    assert event.subject == "projects" and event.details["point"] == "p9"
    assert "88% of files changed" in event.message
    clean = JobRecord(**{**done.__dict__, "result": {"point": "p9", "suspicion": []}})
    assert suspicion_event(clean, T0) is None
    failed = JobRecord(**{**done.__dict__, "state": "failed"})
    assert suspicion_event(failed, T0) is None
