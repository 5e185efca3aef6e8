"""Protection verdicts as public schemas (the dashboard and the weekly report share them)."""

from __future__ import annotations

from collections.abc import Sequence

from api.schemas_protection import (
    AttentionPublic,
    FixPublic,
    LegsPublic,
    ProtectionSummary,
    ReasonPublic,
)
from appliance.protection_status import (
    AT_RISK,
    NEEDS_ATTENTION,
    PROTECTED,
    RUNNING_FROM_BACKUP,
    AssetProtection,
    Legs,
    Reason,
    worst_first,
)


def reason_public(reason: Reason) -> ReasonPublic:
    fix = reason.fix
    return ReasonPublic(
        code=reason.code,
        severity=reason.severity,  # type: ignore[arg-type]
        message=reason.message,
        fix=FixPublic(action=fix.action, label=fix.label, link=fix.link, point=fix.point)
        if fix
        else None,
    )


def legs_public(legs: Legs) -> LegsPublic:
    return LegsPublic(
        copies=legs.copies,
        media=list(legs.media),
        enough_copies=legs.enough_copies,
        two_media=legs.two_media,
        offsite=legs.offsite,
        offline=legs.offline,
        immutable=legs.immutable,
        offline_or_immutable=legs.offline_or_immutable,
        system_disk_only=legs.only_system_disk,
    )


def summary_public(statuses: Sequence[AssetProtection]) -> ProtectionSummary:
    def count(state: str) -> int:
        return sum(1 for s in statuses if s.state == state)

    return ProtectionSummary(
        assets=len(statuses),
        protected=count(PROTECTED),
        needs_attention=count(NEEDS_ATTENTION),
        at_risk=count(AT_RISK),
        running_from_backup=count(RUNNING_FROM_BACKUP),
        # No asset at all is nothing protected, not everything.
        all_protected=bool(statuses) and count(PROTECTED) == len(statuses),
    )


def attention_public(statuses: Sequence[AssetProtection]) -> list[AttentionPublic]:
    return [
        AttentionPublic(
            asset=s.asset,
            kind=s.kind,
            state=s.state,  # type: ignore[arg-type]
            reasons=[reason_public(r) for r in s.reasons],
        )
        for s in worst_first(statuses)
        if s.state != PROTECTED
    ]
