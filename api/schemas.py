"""Request (``XCreate``/``XUpdate``) and response (``XPublic``) schemas of the JSON API.

Requests and responses are separate models: a response never echoes a field only a request may
set (a password), and a request never lets a client set a field only the appliance decides (a
creation time). Names of assets, policies and users are restricted to a safe alphabet because
they appear in URLs, lock file names and logs.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from appliance.errors import InvalidInput
from appliance.schedule import check_cron

Role = Literal["viewer", "operator", "admin"]
Mode = Literal["full", "incremental", "differential"]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
AbsolutePath = Annotated[
    str, StringConstraints(pattern=r"^/[^\x00]*$", min_length=1, max_length=4096)
]
Password = Annotated[str, StringConstraints(min_length=8, max_length=1024)]

#: Every integer a request carries (query, path or body) has a maximum: SQLite and PostgreSQL
#: store 64-bit integers, and a larger one would fail in the database (a 500) instead of
#: failing validation (a 422). tests/test_api_limits.py checks the OpenAPI schema for it.
SQL_INT_MAX = 2**63 - 1
#: The most bytes a size in a request may name (1 EiB; no store is near it).
MAX_BYTES = 1 << 60


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorPublic(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = {}


class HealthPublic(BaseModel):
    status: Literal["ok"]
    version: str


# --- accounts ------------------------------------------------------------------------------------


class SetupPublic(BaseModel):
    admin_exists: bool
    #: True while no admin exists: every client, loopback included, must present the set-up code.
    setup_code_required: bool
    #: Where root on the appliance finds the code (also printed on the console and in the log).
    setup_code_file: str | None = None


class SetupCreate(Request):
    name: Name
    password: Password
    setup_code: str | None = Field(default=None, max_length=64)


class LoginCreate(Request):
    name: str = Field(min_length=1, max_length=255)
    password: str = Field(min_length=1, max_length=1024)


class MePublic(BaseModel):
    name: str
    role: Role
    via: Literal["session", "token"]


class SessionPublic(MePublic):
    #: Send it back in the X-CSRF-Token header of every state-changing request.
    csrf_token: str
    expires_at: datetime


class PasswordChange(Request):
    current_password: str = Field(min_length=1, max_length=1024)
    new_password: Password
    #: Revoke the user's API tokens too (every other browser session ends in any case).
    revoke_tokens: bool = True


class UserCreate(Request):
    name: Name
    role: Role = "viewer"
    password: Password


class UserUpdate(Request):
    role: Role | None = None
    #: A password reset ends every session of the user.
    password: Password | None = None
    #: With a password reset: revoke the user's API tokens too.
    revoke_tokens: bool = True
    #: Disable (ends every session, revokes every token, refuses sign-in) or enable again.
    disabled: bool | None = None


class UserPublic(BaseModel):
    name: str
    role: Role
    created_at: datetime
    disabled: bool = False


#: The furthest a token's expiry may be set (ten years): beyond it, "never" says it honestly.
MAX_TOKEN_DAYS = 3650


class TokenExpiry(Request):
    """When a token stops working: ``expires_in_days`` from now, or at ``expires_at`` (an
    aware time); neither: never."""

    expires_in_days: int | None = Field(default=None, ge=1, le=MAX_TOKEN_DAYS)
    expires_at: AwareDatetime | None = None

    @model_validator(mode="after")
    def _one_expiry(self) -> TokenExpiry:
        if self.expires_in_days is not None and self.expires_at is not None:
            raise ValueError("give expires_in_days or expires_at, not both")
        return self

    def expiry(self, now: datetime) -> datetime | None:
        """The expiry asked for, as of ``now``; InvalidInput when it is more than
        :data:`MAX_TOKEN_DAYS` away (one in the past is refused by the catalog)."""
        if self.expires_in_days is not None:
            return now + timedelta(days=self.expires_in_days)
        if self.expires_at is not None and self.expires_at > now + timedelta(days=MAX_TOKEN_DAYS):
            raise InvalidInput(
                f"a token can expire at most {MAX_TOKEN_DAYS} days from now; "
                "choose no expiry for a token that should never expire"
            )
        return self.expires_at


class TokenCreate(TokenExpiry):
    #: Whose token (default: the caller).
    user: Name | None = None
    #: The token's role, at most its user's (default: the user's role).
    role: Role | None = None


class TokenRenew(TokenExpiry):
    """A new expiry for a token that still works: exactly one of ``expires_in_days``,
    ``expires_at`` or ``never``."""

    never: bool = False

    @model_validator(mode="after")
    def _exactly_one(self) -> TokenRenew:
        given = [self.expires_in_days is not None, self.expires_at is not None, self.never]
        if sum(given) != 1:
            raise ValueError("give exactly one of expires_in_days, expires_at or never: true")
        return self


class TokenPublic(BaseModel):
    id: str
    user: str
    role: str
    created_at: datetime
    revoked_at: datetime | None = None
    #: When it stops working (None: never).
    expires_at: datetime | None = None


class TokenCreated(TokenPublic):
    #: Shown once; only its hash is kept.
    token: str


class RecoveryKeyPublic(BaseModel):
    store_id: str
    recovery_key: str


# --- assets and policies ---------------------------------------------------------------------------


class AssetCreate(Request):
    name: Name
    kind: Literal["files", "vm"]
    #: The folder to protect (``files``).
    path: AbsolutePath | None = None
    #: The VM's disk images (``vm``).
    disks: list[AbsolutePath] = Field(default_factory=list, max_length=64)
    #: The VM's definition (JSON, TOML or libvirt XML), read at each backup (``vm``).
    vm_spec: AbsolutePath | None = None
    description: str | None = Field(default=None, max_length=2000)


class AssetUpdate(Request):
    path: AbsolutePath | None = None
    disks: list[AbsolutePath] | None = Field(default=None, max_length=64)
    vm_spec: AbsolutePath | None = None
    description: str | None = Field(default=None, max_length=2000)


class AssetPublic(BaseModel):
    name: str
    kind: str
    path: str | None
    disks: list[str]
    vm_spec: str | None
    description: str | None
    created_at: datetime
    policies: list[str]


class BackupCreate(Request):
    #: Default: incremental for an asset, the policy's mode for a policy.
    mode: Mode | None = None


def _valid_cron(value: str) -> str:
    try:
        return check_cron(value)
    except InvalidInput as exc:
        raise ValueError(exc.message) from None


#: A five-field cron expression, checked (read in the appliance's time zone).
Cron = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(_valid_cron)]


class ScheduleEntryModel(Request):
    cron: Cron = Field(examples=["0 * * * *"])
    #: A backup mode, or ``boot_test``: test-boot the VM's newest point (VM assets only).
    mode: Literal["full", "incremental", "differential", "boot_test"] = "incremental"


class ScheduleModel(Request):
    entries: list[ScheduleEntryModel] = Field(default_factory=list, max_length=50)
    catch_up: Literal["once", "skip"] = "once"


class RetentionModel(Request):
    keep_last: int = Field(default=0, ge=0, le=100_000)
    keep_hourly: int = Field(default=0, ge=0, le=100_000)
    keep_daily: int = Field(default=0, ge=0, le=100_000)
    keep_weekly: int = Field(default=0, ge=0, le=100_000)
    keep_monthly: int = Field(default=0, ge=0, le=100_000)
    keep_yearly: int = Field(default=0, ge=0, le=100_000)

    def rules(self) -> dict[str, int]:
        return {k: v for k, v in self.model_dump().items() if v}


class PolicyUpdate(Request):
    #: The assets the policy covers, in order; ``asset`` names one (the older form).
    assets: list[Name] = Field(default_factory=list, max_length=100)
    asset: Name | None = None
    schedule: ScheduleModel = Field(default_factory=ScheduleModel)
    mode: Mode = "incremental"
    retention: RetentionModel = Field(default_factory=RetentionModel)
    #: Recovery point objective: the newest good point must be at most this old (0: none).
    rpo_seconds: int = Field(default=0, ge=0, le=10 * 365 * 86400)

    @model_validator(mode="after")
    def _some_assets(self) -> PolicyUpdate:
        self.assets = self.assets or ([self.asset] if self.asset else [])
        if not self.assets or len(set(self.assets)) != len(self.assets):
            raise ValueError("name one or more assets, each once")
        return self


class PolicyCreate(PolicyUpdate):
    name: Name


class ScheduleEntryPublic(BaseModel):
    cron: str
    mode: str
    last_fired_at: datetime | None
    next_at: datetime | None


class PolicyPublic(BaseModel):
    name: str
    assets: list[str]
    asset: str  # the first of ``assets``
    schedule: dict[str, Any]
    mode: str
    retention: dict[str, int]
    rpo_seconds: int
    entries: list[ScheduleEntryPublic]


# --- points ----------------------------------------------------------------------------------------------


class BootTestPublic(BaseModel):
    """A boot test's outcome: the newest of a point, or of a VM asset on the dashboard."""

    #: ``never``: the VM was never test-booted (dashboard only).
    state: Literal["proven", "failed", "never"]
    #: The failover session of the test (``GET /api/failover/{session}``).
    session: str | None = None
    point_id: str | None = None
    #: When the boot was proven, or when the test failed.
    at: datetime | None = None
    #: Seconds from the request to the boot proof.
    rto_seconds: float | None = None
    #: In words, which check did not pass (or what else stopped the boot).
    failed_check: str | None = None
    error: str | None = None
    #: ``/api/failover/{session}/screenshot`` when a screenshot was kept.
    screenshot_url: str | None = None
    #: The page's screen of the session: ``#/failover/{session}``.
    link: str | None = None


class PointPublic(BaseModel):
    id: str
    asset: str
    kind: str
    mode: str
    created_at: datetime
    parent_id: str | None
    base_full_id: str | None
    source: str
    logical_bytes: int
    stored_bytes: int
    file_count: int
    warning_count: int
    status: str
    verified_at: datetime | None
    verify_status: str | None
    #: The newest boot test of this point (VM image points that were test-booted).
    boot_proof: BootTestPublic | None = None


class CopyPublic(BaseModel):
    store_id: str
    #: The location's kind: pool_dir, block_pool, removable, tape_set, s3_bucket, peer.
    location_kind: str
    #: The location's label.
    location: str
    state: str
    added_at: datetime
    location_id: str | None = None
    #: Whether the location answered when last opened (an unmounted disk is offline).
    online: bool = True
    verified_at: datetime | None = None
    storage_class: str | None = None
    retain_until: datetime | None = None


class DiskPublic(BaseModel):
    name: str
    size: int
    source: str | None = None


class ManifestSummary(BaseModel):
    host: str | None
    source: str
    stats: dict[str, Any]
    warnings: list[dict[str, Any]]
    disks: list[DiskPublic]
    vm: dict[str, Any] | None


class PointDetail(PointPublic):
    copies: list[CopyPublic]
    manifest: ManifestSummary


class FileEntry(BaseModel):
    name: str
    path: str
    type: str
    size: int
    mode: int
    mtime: datetime
    #: A symbolic link's target, or the first name of a hard-linked file.
    target: str | None = None


class DirectoryListing(BaseModel):
    point: str
    path: str
    entries: list[FileEntry]
    #: Pass as ``after`` to get the next page; None on the last page.
    next_after: str | None


class RestoreCreate(Request):
    """Where a restore writes; anything outside these is refused (403, ``path_refused``).

    - ``area``: ``target`` is a folder (or, for one disk, an image file) inside a restore area.
    - ``source``: back over the asset's own registered source; ``on_conflict`` is required and
      ``target`` must be left out.
    - ``device``: VM points only; ``target`` is a registered restore device.
    """

    destination: Literal["area", "source", "device"] = "area"
    target: AbsolutePath | None = None
    #: What happens to an existing file in the way: replaced, or renamed aside (kept).
    on_conflict: Literal["overwrite", "keep_both"] | None = None
    #: Restore only this file or folder of a files point.
    path: str | None = Field(default=None, max_length=4096)
    #: Restore only this disk of an image point.
    disk: str | None = Field(default=None, max_length=255)
    format: Literal["raw", "qcow2", "vmdk", "vhdx", "vdi"] = "raw"
    #: Read from this location's copy first (id or label); default: the best copy.
    location: str | None = Field(default=None, max_length=255)


class RestoreDevicePublic(BaseModel):
    path: str
    #: None when it may be written now; else why not (mounted, the system disk, missing, ...).
    unavailable: str | None
    block_device: bool
    size: int | None


class RestoreChoices(BaseModel):
    """The targets a restore of this point may go to (the page's restore dialog)."""

    point: str
    kind: str
    #: Restore areas (folders); a target must lie inside one of them.
    areas: list[str]
    #: The asset's own source for an in-place restore (None if it has none any more).
    source: str | None
    source_unavailable: str | None
    #: Registered restore devices (VM points only).
    devices: list[RestoreDevicePublic]
    #: Downloads (files points): tar or zip of the point or any folder of it.
    download: bool


class RestoreSettings(Request):
    """Restore areas (folders) and restore devices (block devices or image files) an admin
    allows restores to write to. ``<data>/restores`` is always an area."""

    areas: list[AbsolutePath] = Field(default_factory=list, max_length=64)
    devices: list[AbsolutePath] = Field(default_factory=list, max_length=64)


class RestoreSettingsPublic(BaseModel):
    areas: list[str]
    devices: list[RestoreDevicePublic]
    #: The area that is always there.
    default_area: str


class VerifyCreate(Request):
    #: Budget of this verify run in bytes; coverage is remembered between runs. None: all.
    max_bytes: int | None = Field(default=None, ge=1, le=MAX_BYTES)


class RetentionRequest(Request):
    asset: Name
    rules: RetentionModel


class RetentionPointPublic(BaseModel):
    id: str
    created_at: datetime
    reasons: list[str] = []


class RetentionPreview(BaseModel):
    asset: str
    keep: list[RetentionPointPublic]
    remove: list[RetentionPointPublic]


class GcCreate(Request):
    #: Unreferenced data younger than this is left alone (a backup may still be writing it).
    grace_seconds: float = Field(default=3600.0, ge=0, le=30 * 86400)


# --- jobs ---------------------------------------------------------------------------------------------------


class JobPublic(BaseModel):
    id: str
    kind: str
    description: str
    state: str
    params: dict[str, Any]
    progress: dict[str, Any]
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    resource: str | None
    #: A ``waiting`` job: why, and when it is queued again by itself (None: an outside event).
    wait_reason: str | None = None
    wake_at: datetime | None = None


class JobLogLine(BaseModel):
    seq: int
    at: datetime
    level: str
    message: str


# --- pools, settings, audit, dashboard -------------------------------------------------------------------------


class PoolUsageSample(BaseModel):
    """A pool's usage on one day (the day's last hourly sample): the forecast's history."""

    day: datetime
    used_bytes: int
    total_bytes: int


class PoolMemberPublic(BaseModel):
    """A disk of a block pool, by identity; where it is now if it is attached."""

    identity: str
    devnode: str | None = None
    model: str | None = None
    size_bytes: int | None = None
    #: btrfs cannot find it (the pool runs degraded), or it is not attached.
    missing: bool = False


class PoolPublic(BaseModel):
    name: str
    #: The store's folder on the pool.
    path: str
    store_id: str
    #: Zero while a block pool's filesystem is not mounted (``mounted`` false).
    total_bytes: int
    free_bytes: int
    used_bytes: int
    #: The store's size (a block pool holds nothing else: its filesystem's used bytes).
    store_bytes: int
    #: Points with a copy in the pool.
    points: int
    growth_bytes_per_day: float
    days_until_full: float | None
    #: ``directory`` (the data directory's own pool, a folder) or ``block`` (disks of its own).
    kind: Literal["directory", "block"] = "directory"
    fs_uuid: str | None = None
    fs_type: str | None = None
    #: ``single``, ``raid1`` or ``raid10``.
    profile: str | None = None
    mountpoint: str | None = None
    location_id: str | None = None
    members: list[PoolMemberPublic] = []
    mounted: bool = True
    #: ``ok``, ``warning``, ``degraded``, ``damaged`` or ``unavailable``, with the reasons.
    health: str = "ok"
    health_reasons: list[str] = []
    #: Mounted with a disk missing, or holding data with one copy only.
    degraded: bool = False
    #: Members with non-zero btrfs error counters: ``{member, device, devid, counters}``.
    device_errors: list[dict[str, Any]] = []
    #: The last scrub's result (``corrected``, ``uncorrectable``, ...), if any.
    last_scrub: dict[str, Any] | None = None
    #: What must stay free: a backup or copy that would eat into it is refused.
    reserve_bytes: int = 0
    #: Such as "shares the system disk" (the default pool on the disk ``/`` is on).
    warnings: list[str] = []
    #: Daily usage over the last 30 days (the growth forecast's samples).
    usage_history: list[PoolUsageSample] = []


class SettingsUpdate(Request):
    appliance_name: str = Field(default="Backup appliance", min_length=1, max_length=100)
    #: Time zone of the policies' cron schedules (an IANA name such as Europe/Berlin).
    timezone: str = Field(default="UTC", min_length=1, max_length=64)
    scheduler_paused: bool = False
    gc_grace_seconds: int = Field(default=3600, ge=0, le=30 * 86400)
    verify_max_bytes: int | None = Field(default=None, ge=1, le=MAX_BYTES)


class SettingsPublic(BaseModel):
    appliance_name: str
    timezone: str
    scheduler_paused: bool
    gc_grace_seconds: int
    verify_max_bytes: int | None


class AuditPublic(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    details: dict[str, Any]


class AssetStatus(BaseModel):
    asset: str
    kind: str
    policies: list[str]
    points: int
    last_point_id: str | None
    last_point_at: datetime | None
    age_seconds: float | None
    rpo_seconds: int | None
    rpo_status: Literal["met", "missed", "none"]
    copies: list[CopyPublic]
    logical_bytes: int
    stored_bytes: int
    #: VM assets: the newest boot test, proven or failed (state ``never`` if none); else None.
    last_boot_test: BootTestPublic | None = None
    #: VM assets: the newest proven boot (None if none was ever proven).
    last_proven_boot: BootTestPublic | None = None


class AlertPublic(BaseModel):
    """Something that needs a person: a failed boot test, a missed RPO."""

    severity: Literal["critical", "warning"]
    #: A stable kind: ``boot_test_failed``, ``rpo_missed``.
    kind: str
    asset: str
    message: str
    #: When it happened (the failed test; the newest point, or None when there is none).
    at: datetime | None
    #: Where the page shows more: ``#/failover/{session}`` or ``#/assets``.
    link: str


class CapacitySample(BaseModel):
    day: datetime
    bytes: int


class CapacityPublic(BaseModel):
    total_bytes: int
    free_bytes: int
    used_bytes: int
    store_bytes: int
    growth_bytes_per_day: float
    days_until_full: float | None
    series: list[CapacitySample]
    #: Days of backups the trend looked at; under 7 there is no trend (too early to tell).
    history_days: int = 0


class JobCounts(BaseModel):
    queued: int
    running: int
    failed: int
    interrupted: int


class DashboardPublic(BaseModel):
    generated_at: datetime
    appliance_name: str
    assets: list[AssetStatus]
    capacity: CapacityPublic
    jobs: JobCounts
    #: Most severe first.
    alerts: list[AlertPublic] = Field(default_factory=list)
