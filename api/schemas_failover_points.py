"""Schemas of ``GET /api/assets/{name}/failover-points``: a VM's points as the fail-over dialog
shows them, and the one a failover boots when none is chosen, with why."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from api.schemas import BootTestPublic
from image.failover.admission import ChoiceWhy


class PointCopyPublic(BaseModel):
    """One place that holds the point."""

    #: The location's label.
    location: str
    #: pool_dir, block_pool, removable, tape_set, s3_bucket, peer.
    location_kind: str
    #: present, archived (cold: a recall first), copying, ...
    state: str


class FailoverPointPublic(BaseModel):
    id: str
    created_at: datetime
    #: Seconds from the point's creation to now (the appliance's clock).
    age_seconds: float
    mode: str
    logical_bytes: int
    #: ``ok``, ``damaged``, or None (not verified).
    verify_status: str | None
    verified_at: datetime | None
    #: What the check after its backup found wrong (only while it is marked damaged by it).
    verify_problem: str | None = None
    #: The newest boot test of this point.
    boot_proof: BootTestPublic | None = None
    copies: list[PointCopyPublic]


class FailoverPointsPublic(BaseModel):
    asset: str
    #: The point a failover or boot test boots when none is named (None: no image point).
    chosen: str | None
    #: The VM's newest image point.
    newest: str | None
    #: Why that point: newest_ok, newest_failed, newest_unverified, none_verified, all_failed,
    #: no_point.
    why: ChoiceWhy
    #: The same in one sentence (times in the appliance's time zone); None when the newest
    #: point boots and it verified ok.
    reason: str | None
    #: Image points, newest first.
    points: list[FailoverPointPublic]
