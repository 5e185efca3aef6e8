"""Is each asset really protected? A pure verdict, with the reasons and the fix for each.

The dashboard must never say more is fine than is, so the verdict starts from nothing: an asset
is ``protected`` only when every rule below passes; each failed rule adds a :class:`Reason` (a
stable code, a plain sentence and a :class:`Fix` the page offers). The state is the worst reason:

- ``running_from_backup``: a VM runs from one of its backups right now (a failover that is not a
  boot test). The page shows it before anything else.
- ``at_risk``: a restore could fail or lose more than the owner agreed to: no good point at all,
  the RPO target missed, the newest verify found damage, the last boot test failed.
- ``needs_attention``: the backups exist but something the owner relies on is missing: no policy,
  a 3-2-1 leg missing, a lost copy, no verify lately, a VM never boot-tested or its proof stale.
- ``protected``: no reason at all.

The 3-2-1 legs are counted over the *held* copies (present, archived or being recalled) of the
newest good point: at least :data:`MIN_COPIES` copies, on at least two kinds of media (the
appliance's system disk is a medium of its own, and never enough on its own), one off site, and
one immutable or offline (a removable disk, a tape, a cold bucket). Which locations sit on the
system disk is a fact the caller finds out (:func:`appliance.protection_facts.system_disk_locations`)
and passes in, so this module does no I/O and is tested with explicit times.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from appliance.boot_verification import PURPOSE as BOOT_TEST_PURPOSE
from appliance.boot_verification import BootTestResult, boot_test_result
from appliance.catalog.records import (
    ACTIVE_FAILOVER_STATES,
    AssetRecord,
    CopyRecord,
    FailoverSessionRecord,
    LocationRecord,
    PointRecord,
    PolicyRecord,
)
from appliance.protection import last_good_point, rpo_target

PROTECTED = "protected"
NEEDS_ATTENTION = "needs_attention"
AT_RISK = "at_risk"
RUNNING_FROM_BACKUP = "running_from_backup"
#: Worst first: the dashboard lists assets in this order.
STATE_ORDER = {RUNNING_FROM_BACKUP: 0, AT_RISK: 1, NEEDS_ATTENTION: 2, PROTECTED: 3}

#: Copies of the newest good point the appliance should hold (with the original data: three).
MIN_COPIES = 2
#: A verify older than this no longer vouches for the data (the nightly slice covers a week).
VERIFY_MAX_AGE = timedelta(days=7)
#: A proven boot older than this no longer proves the VM comes back (monthly boot tests).
BOOT_PROOF_MAX_AGE = timedelta(days=30)
#: Copy states that stand for readable data (now, or after a recall).
HELD_STATES = frozenset({"present", "archived", "recalling"})

#: Media kinds, in words; ``system_disk`` is a ``pool_dir`` on the root filesystem's device.
MEDIA_NAMES = {
    "system_disk": "the appliance's system disk",
    "appliance_disk": "the appliance's data disks",
    "removable_disk": "a removable disk",
    "tape": "tape",
    "cloud": "a cloud bucket",
    "other_appliance": "another appliance",
}
_MEDIA_OF_KIND = {
    "pool_dir": "appliance_disk",
    "block_pool": "appliance_disk",
    "removable": "removable_disk",
    "tape_set": "tape",
    "s3_bucket": "cloud",
    "peer": "other_appliance",
}


@dataclass(frozen=True)
class Fix:
    """What the page offers to fix a reason: ``action`` is stable (``add_policy``,
    ``add_copy_rule``, ``run_backup``, ``run_verify``, ``run_boot_test``, ``open_failover``,
    ``open_boot_test``); ``link`` is where the page does it (``#/...``), ``point`` the point a
    verify reads."""

    action: str
    label: str
    link: str | None = None
    point: str | None = None


@dataclass(frozen=True)
class Reason:
    code: str
    severity: str  # AT_RISK, NEEDS_ATTENTION or RUNNING_FROM_BACKUP
    message: str
    fix: Fix | None = None


@dataclass(frozen=True)
class Legs:
    """The 3-2-1 legs of the newest good point's held copies."""

    copies: int
    media: tuple[str, ...]
    offsite: bool
    offline: bool
    immutable: bool
    only_system_disk: bool

    @property
    def enough_copies(self) -> bool:
        return self.copies >= MIN_COPIES

    @property
    def two_media(self) -> bool:
        return len(self.media) >= 2

    @property
    def offline_or_immutable(self) -> bool:
        return self.offline or self.immutable


@dataclass(frozen=True)
class AssetFacts:
    """What the catalog knows of one asset, gathered by the caller."""

    asset: AssetRecord
    #: Every policy of the appliance (:func:`policies_of` picks this asset's).
    policies: Sequence[PolicyRecord]
    points: Sequence[PointRecord]
    #: The copies of the newest good point (any state).
    copies: Sequence[CopyRecord] = ()
    locations: Mapping[str, LocationRecord] = field(default_factory=dict)
    #: IDs of the locations on the appliance's system disk.
    system_disk: frozenset[str] = frozenset()
    last_boot_test: FailoverSessionRecord | None = None
    last_proven_boot: FailoverSessionRecord | None = None
    #: Failover sessions of the asset that still hold its VM (boot tests included).
    active_sessions: Sequence[FailoverSessionRecord] = ()


@dataclass(frozen=True)
class AssetProtection:
    asset: str
    kind: str
    state: str
    reasons: list[Reason]
    policies: list[str]
    rpo_seconds: int | None
    last_good: PointRecord | None
    legs: Legs
    last_verified_at: datetime | None
    boot_test: BootTestResult | None
    proven_boot: BootTestResult | None
    #: The failover session the VM runs from right now, if any.
    running_session: str | None = None


def policies_of(asset: str, policies: Iterable[PolicyRecord]) -> list[PolicyRecord]:
    """The policies that cover ``asset`` (a policy may cover several): the one place that
    decides it."""
    return [p for p in policies if asset in p.assets]


def medium(location: LocationRecord, on_system_disk: bool) -> str:
    if on_system_disk:
        return "system_disk"
    return _MEDIA_OF_KIND.get(location.kind, "appliance_disk")


def is_offline(location: LocationRecord) -> bool:
    """Out of reach of a program running on the appliance: a removable disk or a tape (taken
    out between uses), or a cold bucket (a recall must come first)."""
    return location.kind in ("removable", "tape_set") or location.access == "cold"


def legs(
    copies: Iterable[CopyRecord],
    locations: Mapping[str, LocationRecord],
    system_disk: frozenset[str],
) -> Legs:
    held = [
        loc
        for c in copies
        if c.state in HELD_STATES and (loc := locations.get(c.location_id or "")) is not None
    ]
    media = sorted({medium(loc, loc.id in system_disk) for loc in held})
    return Legs(
        copies=len(held),
        media=tuple(media),
        offsite=any(loc.offsite for loc in held),
        offline=any(is_offline(loc) for loc in held),
        immutable=any(loc.immutable for loc in held),
        only_system_disk=bool(held) and media == ["system_disk"],
    )


def _period(seconds: float) -> str:
    """ "3 days", "1 hour", "25 minutes": whole units, correct plurals."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'' if n == 1 else 's'}"
    n = int(seconds)
    return f"{n} second{'' if n == 1 else 's'}"


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _running_session(facts: AssetFacts) -> FailoverSessionRecord | None:
    running = [
        s
        for s in facts.active_sessions
        if s.state in ACTIVE_FAILOVER_STATES and s.details.get("purpose") != BOOT_TEST_PURPOSE
    ]
    return max(running, key=lambda s: s.started_at) if running else None


def _leg_reasons(asset: str, found: Legs) -> list[Reason]:
    copy_rule = Fix("add_copy_rule", "Add a copy rule", link="#/tiering")
    reasons: list[Reason] = []
    if not found.enough_copies:
        reasons.append(
            Reason(
                "one_copy",
                NEEDS_ATTENTION,
                f"Only one copy of {asset}'s newest backup exists: if that disk fails, "
                "the backup is gone.",
                copy_rule,
            )
        )
    if found.only_system_disk:
        reasons.append(
            Reason(
                "system_disk_only",
                NEEDS_ATTENTION,
                f"Every copy of {asset}'s newest backup sits on the appliance's system disk.",
                copy_rule,
            )
        )
    elif not found.two_media:
        reasons.append(
            Reason(
                "one_medium",
                NEEDS_ATTENTION,
                "All copies are on one kind of media "
                f"({MEDIA_NAMES.get(found.media[0], found.media[0])}).",
                copy_rule,
            )
        )
    if not found.offsite:
        reasons.append(
            Reason(
                "no_offsite_copy",
                NEEDS_ATTENTION,
                "No copy is kept off site: a fire or theft would take the backups with the data.",
                Fix("add_copy_rule", "Add an off-site copy", link="#/replication"),
            )
        )
    if not found.offline_or_immutable:
        reasons.append(
            Reason(
                "no_immutable_or_offline_copy",
                NEEDS_ATTENTION,
                "No copy is immutable or offline: ransomware that reaches the appliance could "
                "delete every copy.",
                copy_rule,
            )
        )
    return reasons


def _verify_reasons(
    points: Sequence[PointRecord], good: PointRecord, now: datetime
) -> list[Reason]:
    verify = Fix("run_verify", "Verify now", point=good.id)
    checked = [p for p in points if p.verified_at is not None]
    newest = max(checked, key=lambda p: p.verified_at or now) if checked else None
    if newest is not None and newest.verify_status == "damaged":
        return [
            Reason(
                "verify_damaged",
                AT_RISK,
                f"The last verify found damage in the backup of {_when(newest.created_at)}.",
                Fix("run_backup", "Back up now"),
            )
        ]
    if newest is None or newest.verified_at is None:
        return [
            Reason("never_verified", NEEDS_ATTENTION, "The backups were never verified.", verify)
        ]
    age = now - newest.verified_at
    if age > VERIFY_MAX_AGE:
        return [
            Reason(
                "verify_stale",
                NEEDS_ATTENTION,
                f"The backups were last verified {_period(age.total_seconds())} ago "
                f"(more than {_period(VERIFY_MAX_AGE.total_seconds())}).",
                verify,
            )
        ]
    return []


def _when(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M UTC")


def _boot_reasons(
    asset: str,
    test: BootTestResult | None,
    proven: BootTestResult | None,
    has_point: bool,
    now: datetime,
) -> list[Reason]:
    run = Fix("run_boot_test", "Run a boot test") if has_point else Fix("run_backup", "Back up now")
    if test is None:
        return [
            Reason(
                "never_boot_tested",
                NEEDS_ATTENTION,
                f"{asset} was never test-booted: nobody knows that it starts from its backup.",
                run,
            )
        ]
    if test.state == "failed":
        return [
            Reason(
                "boot_test_failed",
                AT_RISK,
                f"The last boot test failed: {test.failed_check or test.error or 'no proof'}.",
                Fix("open_boot_test", "See the boot test", link=f"#/failover/{test.session}"),
            )
        ]
    if proven is not None and now - proven.at > BOOT_PROOF_MAX_AGE:
        return [
            Reason(
                "boot_proof_stale",
                NEEDS_ATTENTION,
                f"The last proven boot was {_period((now - proven.at).total_seconds())} ago "
                f"(more than {_period(BOOT_PROOF_MAX_AGE.total_seconds())}).",
                run,
            )
        ]
    return []


def asset_status(facts: AssetFacts, now: datetime) -> AssetProtection:
    """The verdict on one asset at ``now``; see the module's docstring for the rules."""
    name = facts.asset.name
    is_vm = facts.asset.kind == "vm"
    mine = policies_of(name, facts.policies)
    good = last_good_point(facts.points)
    target = rpo_target(mine)
    found = (
        legs(facts.copies, facts.locations, facts.system_disk)
        if good is not None
        else Legs(0, (), False, False, False, False)
    )
    reasons: list[Reason] = []

    running = _running_session(facts) if is_vm else None
    if running is not None:
        reasons.append(
            Reason(
                "running_from_backup",
                RUNNING_FROM_BACKUP,
                f"{name} is running from its backup on this appliance right now.",
                Fix("open_failover", "Open the failover", link=f"#/failover/{running.id}"),
            )
        )
    if not mine:
        reasons.append(
            Reason(
                "no_policy",
                NEEDS_ATTENTION,
                f"{name} has no policy: nothing backs it up on a schedule.",
                Fix("add_policy", "Add a policy", link=f"#/assets?add_policy={name}"),
            )
        )
    if good is None:
        reasons.append(
            Reason(
                "no_good_point",
                AT_RISK,
                f"{name} has no good backup yet.",
                Fix("run_backup", "Back up now"),
            )
        )
    elif target is not None and (now - good.created_at).total_seconds() > target:
        age = (now - good.created_at).total_seconds()
        reasons.append(
            Reason(
                "rpo_missed",
                AT_RISK,
                f"The newest good backup is {_period(age)} old; the target is {_period(target)}.",
                Fix("run_backup", "Back up now"),
            )
        )
    if good is not None:
        lost = [c for c in facts.copies if c.state == "lost"]
        if lost:
            where = ", ".join(
                loc.label for c in lost if (loc := facts.locations.get(c.location_id or ""))
            )
            reasons.append(
                Reason(
                    "copy_lost",
                    NEEDS_ATTENTION,
                    f"{_plural(len(lost), 'copy', 'copies')} of the newest backup "
                    f"{'is' if len(lost) == 1 else 'are'} lost"
                    + (f" ({where})." if where else "."),
                    Fix("add_copy_rule", "Check the copies", link="#/pools"),
                )
            )
        reasons += _leg_reasons(name, found)
        reasons += _verify_reasons(facts.points, good, now)

    test = proven = None
    if is_vm:
        test = boot_test_result(facts.last_boot_test) if facts.last_boot_test else None
        proven = boot_test_result(facts.last_proven_boot) if facts.last_proven_boot else None
        reasons += _boot_reasons(name, test, proven, good is not None, now)

    reasons.sort(key=lambda r: STATE_ORDER[r.severity])
    state = reasons[0].severity if reasons else PROTECTED
    verified = [p.verified_at for p in facts.points if p.verified_at is not None]
    return AssetProtection(
        asset=name,
        kind=facts.asset.kind,
        state=state,
        reasons=reasons,
        policies=[p.name for p in mine],
        rpo_seconds=target,
        last_good=good,
        legs=found,
        last_verified_at=max(verified) if verified else None,
        boot_test=test,
        proven_boot=proven,
        running_session=running.id if running else None,
    )


def worst_first(statuses: Iterable[AssetProtection]) -> list[AssetProtection]:
    """Running from backup first, then at risk, needs attention, protected; by name within."""
    return sorted(statuses, key=lambda s: (STATE_ORDER[s.state], s.asset))
