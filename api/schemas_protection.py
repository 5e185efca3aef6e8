"""Schemas of protection status: the dashboard's verdict per asset, trends, the weekly report.

The verdict and its rules are :mod:`appliance.protection_status`'s; these are its public form.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from api.schemas import AssetStatus, CopyPublic, DashboardPublic

State = Literal["running_from_backup", "at_risk", "needs_attention", "protected"]


class FixPublic(BaseModel):
    """What the page offers to fix a reason."""

    #: ``add_policy``, ``add_copy_rule``, ``run_backup``, ``run_verify``, ``run_boot_test``,
    #: ``open_failover``, ``open_boot_test``.
    action: str
    label: str
    #: Where the page does it (``#/...``); None when the page starts it by itself.
    link: str | None = None
    #: The point a verify reads.
    point: str | None = None


class ReasonPublic(BaseModel):
    #: Stable: ``no_policy``, ``no_good_point``, ``rpo_missed``, ``one_copy``,
    #: ``system_disk_only``, ``one_medium``, ``no_offsite_copy``,
    #: ``no_immutable_or_offline_copy``, ``copy_lost``, ``never_verified``, ``verify_stale``,
    #: ``verify_damaged``, ``never_boot_tested``, ``boot_test_failed``, ``boot_proof_stale``,
    #: ``running_from_backup``.
    code: str
    severity: State
    message: str
    fix: FixPublic | None = None


class LegsPublic(BaseModel):
    """The 3-2-1 legs of the newest good point's copies, and which are met."""

    copies: int
    #: Kinds of media holding a copy: ``system_disk``, ``appliance_disk``, ``removable_disk``,
    #: ``tape``, ``cloud``, ``other_appliance``.
    media: list[str]
    enough_copies: bool
    two_media: bool
    offsite: bool
    offline: bool
    immutable: bool
    offline_or_immutable: bool
    system_disk_only: bool


class AssetProtectionPublic(AssetStatus):
    """An asset's dashboard row: the figures of :class:`AssetStatus` and the verdict."""

    state: State
    reasons: list[ReasonPublic]
    legs: LegsPublic
    last_verified_at: datetime | None = None
    #: The failover session the VM runs from right now (``#/failover/{session}``).
    running_session: str | None = None


class ProtectionSummary(BaseModel):
    """Assets per state; ``all_protected`` only when every asset passes every rule."""

    assets: int
    protected: int
    needs_attention: int
    at_risk: int
    running_from_backup: int
    all_protected: bool


class AttentionPublic(BaseModel):
    asset: str
    kind: str
    state: State
    reasons: list[ReasonPublic]


class ProtectionDashboardPublic(DashboardPublic):
    assets: list[AssetProtectionPublic]  # type: ignore[assignment]
    summary: ProtectionSummary
    #: Every asset that is not protected, worst first (a VM running from backup leads).
    attention: list[AttentionPublic] = Field(default_factory=list)


class AgeSamplePublic(BaseModel):
    at: datetime
    age_seconds: float | None


class RtoSamplePublic(BaseModel):
    at: datetime
    rto_seconds: float
    #: ``boot_test`` or ``failover``.
    purpose: str
    session: str


class BytesSamplePublic(BaseModel):
    at: datetime
    point: str
    stored_bytes: int
    logical_bytes: int


class TrendsPublic(BaseModel):
    """One asset over ``days`` days: the RPO achieved (a sawtooth's vertices), the RTO of each
    proven boot test or failover, the bytes each backup added."""

    asset: str
    days: int
    generated_at: datetime
    rpo_seconds: int | None
    rpo: list[AgeSamplePublic]
    rto: list[RtoSamplePublic]
    bytes_added: list[BytesSamplePublic]


class FailedJobPublic(BaseModel):
    id: str
    kind: str
    description: str
    at: datetime
    error: str | None = None


class ReportAssetPublic(BaseModel):
    asset: str
    kind: str
    state: State
    reasons: list[ReasonPublic]
    policies: list[str]
    legs: LegsPublic
    copies: list[CopyPublic]
    rpo_seconds: int | None
    #: The oldest the newest good point got during the week (None: none all week).
    worst_age_seconds: float | None
    rto_seconds: list[float]
    points_made: int
    bytes_added: int
    failed_jobs: list[FailedJobPublic]


class ReportPublic(BaseModel):
    generated_at: datetime
    since: datetime
    days: int
    appliance_name: str
    summary: ProtectionSummary
    assets: list[ReportAssetPublic]
    #: Failed jobs of the week that name no asset (maintenance, copies, ...).
    other_failed_jobs: list[FailedJobPublic]
