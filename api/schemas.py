"""Request (``XCreate``/``XUpdate``) and response (``XPublic``) schemas of the JSON API.

Requests and responses are separate models: a response never echoes a field only a request may
set (a password), and a request never lets a client set a field only the appliance decides (a
creation time). Names of assets, policies and users are restricted to a safe alphabet because
they appear in URLs, lock file names and logs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    field_validator,
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


class TokenCreate(Request):
    #: Whose token (default: the caller).
    user: Name | None = None
    #: The token's role, at most its user's (default: the user's role).
    role: Role | None = None


class TokenPublic(BaseModel):
    id: str
    user: str
    role: str
    created_at: datetime
    revoked_at: datetime | None = None


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


class ScheduleEntryModel(Request):
    cron: str = Field(min_length=1, max_length=200, examples=["0 * * * *"])
    #: A backup mode, or ``boot_test``: test-boot the VM's newest point (VM assets only).
    mode: Literal["full", "incremental", "differential", "boot_test"] = "incremental"

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        try:
            return check_cron(value)
        except InvalidInput as exc:
            raise ValueError(exc.message) from None


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
    asset: Name
    schedule: ScheduleModel = Field(default_factory=ScheduleModel)
    mode: Mode = "incremental"
    retention: RetentionModel = Field(default_factory=RetentionModel)
    #: Recovery point objective: the newest good point must be at most this old (0: none).
    rpo_seconds: int = Field(default=0, ge=0, le=10 * 365 * 86400)


class PolicyCreate(PolicyUpdate):
    name: Name


class ScheduleEntryPublic(BaseModel):
    cron: str
    mode: str
    last_fired_at: datetime | None
    next_at: datetime | None


class PolicyPublic(BaseModel):
    name: str
    asset: str
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


class LocationPublic(BaseModel):
    id: str
    label: str
    kind: str
    address: str
    #: ``random`` (read at once), ``cold`` (data packs need a recall first) or ``sequential``.
    access: str
    #: Whether the location answered when last opened (an unmounted disk is offline).
    online: bool
    offsite: bool
    removable: bool
    #: Copies here are locked (Object Lock) until their retain-until date.
    immutable: bool
    #: The data directory's own pool.
    home: bool
    #: Points with a complete copy here (present, or archived in cold storage).
    copies: int
    last_seen_at: datetime | None
    #: A folder that must be a mountpoint (an unmounted disk is unavailable, never empty).
    require_mount: bool = False
    #: Object Lock of a bucket's copies: COMPLIANCE or GOVERNANCE, kept ``lock_days`` days.
    lock_mode: str | None = None
    lock_days: int | None = None
    #: The storage class of a copy's data packs (metadata stays STANDARD); None: the default.
    data_class: str | None = None
    #: How a cold bucket's packs are recalled (Expedited, Standard, Bulk).
    restore_tier: str | None = None
    #: A bucket's endpoint (None: AWS), region and addressing style. Credentials are never shown.
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str | None = None
    #: Why the location is unavailable, in words (``POST /api/locations/{id}/check``).
    reason: str | None = None


#: S3 storage classes (``tiering.s3.STORAGE_CLASSES``); the cold ones need a recall to be read.
StorageClass = Literal[
    "STANDARD",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "REDUCED_REDUNDANCY",
    "GLACIER_IR",
    "GLACIER",
    "DEEP_ARCHIVE",
]
COLD_STORAGE_CLASSES = ("GLACIER", "DEEP_ARCHIVE")
LockMode = Literal["COMPLIANCE", "GOVERNANCE"]
RestoreTier = Literal["Expedited", "Standard", "Bulk"]
#: ``s3://BUCKET[/PREFIX]`` (the bucket's name is checked in full when the location is added).
S3Address = Annotated[
    str, StringConstraints(pattern=r"^s3://[A-Za-z0-9.-]{3,63}(/[^\x00]*)?$", max_length=1024)
]


class BucketOptions(Request):
    """How the appliance reaches a bucket and stores copies there. The credentials are
    write-only: kept in a 0600 file outside the catalog, never answered by any route, never
    written to the audit log."""

    #: An S3-compatible endpoint (None: AWS). No user name or password in the URL.
    endpoint_url: str | None = Field(
        default=None, max_length=2048, pattern=r"^https?://[^/@\s?#]+(/[^\s?#@]*)?$"
    )
    region: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    addressing_style: Literal["auto", "path", "virtual"] | None = None
    access_key_id: str | None = Field(
        default=None, min_length=1, max_length=256, pattern=r"^[^\s\x00]+$"
    )
    secret_access_key: SecretStr | None = Field(default=None, min_length=1, max_length=1024)
    session_token: SecretStr | None = Field(default=None, min_length=1, max_length=4096)
    #: Data packs go to a cold class (GLACIER unless ``data_class`` says DEEP_ARCHIVE): cheap,
    #: but a restore must recall them first (hours).
    cold: bool = False
    data_class: StorageClass | None = None
    #: Object Lock (the bucket must have it enabled): each copy's data packs cannot be deleted
    #: or overwritten for ``lock_days`` days.
    lock_mode: LockMode | None = None
    lock_days: int | None = Field(default=None, ge=1, le=36500)
    #: How a cold bucket's packs are recalled (default Standard).
    restore_tier: RestoreTier | None = None

    @model_validator(mode="after")
    def _consistent(self) -> BucketOptions:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("give both the access key and its secret, or neither")
        if self.lock_mode is not None and self.lock_days is None:
            raise ValueError("Object Lock needs the number of days each copy is kept (lock_days)")
        if self.lock_days is not None and self.lock_mode is None:
            raise ValueError("lock_days needs an Object Lock mode (COMPLIANCE or GOVERNANCE)")
        if self.data_class in COLD_STORAGE_CLASSES and not self.cold:
            raise ValueError(f"{self.data_class} is cold storage: set cold to use it")
        if (
            self.cold
            and self.data_class is not None
            and self.data_class not in COLD_STORAGE_CLASSES
        ):
            raise ValueError(
                f"a cold bucket keeps data in GLACIER or DEEP_ARCHIVE, not {self.data_class}"
            )
        if self.restore_tier is not None and not self.cold:
            raise ValueError("a restore tier applies to a cold bucket only")
        return self

    def backend_options(self) -> dict[str, Any]:
        """The location's options as ``add_location`` takes them (credentials included: it
        keeps them apart from the catalog)."""
        out: dict[str, Any] = {}
        for name in ("endpoint_url", "region", "addressing_style", "access_key_id"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        for name in ("secret_access_key", "session_token"):
            secret = getattr(self, name)
            if secret is not None:
                out[name] = secret.get_secret_value()
        if self.cold:
            out["cold"] = True
        for name in ("data_class", "lock_mode", "lock_days", "restore_tier"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


class LocationCreate(Request):
    """A folder (a mounted disk, a share) or a bucket that holds copies of the store.

    - ``pool_dir`` (the default): ``path`` is an empty folder (the path rules apply).
    - ``s3_bucket``: ``address`` is ``s3://BUCKET[/PREFIX]``, ``bucket`` how to reach it. The
      bucket is asked at once: a missing bucket, refused credentials or an unreachable endpoint
      answer 400 ``location_refused`` in words, and nothing is added.
    """

    kind: Literal["pool_dir", "s3_bucket"] = "pool_dir"
    path: AbsolutePath | None = None
    address: S3Address | None = None
    label: str = Field(default="", max_length=100)
    #: The folder must be a mountpoint: an unmounted disk is then unavailable, never empty.
    require_mount: bool = False
    offsite: bool = False
    bucket: BucketOptions | None = None

    @model_validator(mode="after")
    def _fits_kind(self) -> LocationCreate:
        if self.kind == "pool_dir":
            if self.path is None:
                raise ValueError("a folder location needs its path")
            if self.address is not None or self.bucket is not None:
                raise ValueError("address and bucket are for a bucket location (kind s3_bucket)")
        else:
            if self.address is None:
                raise ValueError("a bucket location needs its address, s3://BUCKET[/PREFIX]")
            if self.path is not None or self.require_mount:
                raise ValueError("path and require_mount are for a folder location")
        return self


class CopyCreate(Request):
    #: The location's id or label.
    location: str = Field(min_length=1, max_length=255)


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


class RecallEstimate(BaseModel):
    """What a read of a point (a restore, a download) would first recall from cold storage,
    looked up without asking for anything (``GET /api/points/{id}/recall``)."""

    point: str
    #: The path of a files point the estimate is for (None: the whole point).
    path: str | None
    #: A recall comes first: the point's readable copies are all cold.
    needed: bool
    #: The location the recall would come from (label, id, address).
    location: str | None
    location_id: str | None
    address: str | None
    #: That copy's state: ``archived``, or ``recalling`` when a recall is under way.
    copy_state: str | None
    tier: str | None
    #: The tier's typical wait in words ("3-5 hours").
    typical_wait: str | None
    #: The data packs the read needs and their bytes.
    packs: int
    bytes: int
    #: How often a waiting restore looks again.
    poll_seconds: float
    #: Why the cold copy could not be looked at now (packs and bytes are then 0).
    reason: str | None
    #: The estimate in words.
    message: str
    #: The storage class of the cold copy's data packs, which the recall is priced for.
    storage_class: str | None = None
    #: The estimated charge of the recall (retrieval per GiB and per request, from the dated
    #: prices, ``GET /api/tiering/prices``); None when nothing is recalled, the packs could not
    #: be looked at, or the prices know no such class and tier (DEEP_ARCHIVE has no Expedited).
    cost: float | None = None
    currency: str | None = None
    #: The date of the prices the cost is estimated from.
    prices_as_of: str | None = None


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


class PoolPublic(BaseModel):
    name: str
    path: str
    store_id: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    store_bytes: int
    points: int
    growth_bytes_per_day: float
    days_until_full: float | None


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


# --- failover ---------------------------------------------------------------------------------------------------

Port = Annotated[int, Field(ge=0, le=65535)]


class PortForward(Request):
    #: 0: the appliance picks a free port.
    host: Port = 0
    guest: Annotated[int, Field(ge=1, le=65535)]


class FailoverNetwork(Request):
    #: isolated: user-mode networking, only the forwarded TCP ports reach the guest (test boots);
    #: bridged: the VM joins a host bridge (a real failover).
    mode: Literal["isolated", "bridged"] = "isolated"
    port_forwards: list[PortForward] = Field(default_factory=list, max_length=32)
    bridge: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,15}$")] | None = None


class FailoverCreate(Request):
    #: The recovery point to boot; default: the newest verified VM image point.
    point: str | None = Field(default=None, max_length=64)
    #: Default: the asset's configured network, else isolated without forwards.
    network: FailoverNetwork | None = None
    #: Read the point from this location's copy first (id or label); default: the best copy.
    location: str | None = Field(default=None, min_length=1, max_length=255)


class BootTestCreate(Request):
    point: str | None = Field(default=None, max_length=64)
    #: Read the point from this location's copy first (id or label); default: the best copy.
    location: str | None = Field(default=None, min_length=1, max_length=255)


class FailoverStop(Request):
    #: Also delete the session's overlays (its changes are lost).
    discard: bool = False


class FailoverMigrate(Request):
    #: Where the local disks go (default: the session's directory).
    target_dir: AbsolutePath | None = None


class FailbackCreate(Request):
    #: Record the overlay's changes as a new recovery point.
    new_point: bool = True
    #: "original" (the disk images the point came from) or a new image file's path.
    write_to: Annotated[str, StringConstraints(pattern=r"^(original|/[^\x00]*)$")] | None = None
    format: Literal["raw", "qcow2"] = "raw"


class FailoverProof(Request):
    """What proves a failover's boot; every check given must pass (none: the screen stopped
    changing for 5 s)."""

    #: A regular expression the serial console must print.
    serial: str | None = Field(default=None, max_length=500)
    #: A guest TCP port that must accept a connection.
    tcp: Annotated[int, Field(ge=1, le=65535)] | None = None
    #: A guest HTTP port whose ``http_path`` must answer 2xx (and contain ``http_expect``).
    http_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    http_path: str = Field(default="/", max_length=500, pattern=r"^/")
    http_expect: str | None = Field(default=None, max_length=500)
    #: The QEMU guest agent must answer a ping.
    agent: bool = False
    #: The console screenshot must stop changing for this many seconds.
    screen_stable: float | None = Field(default=None, gt=0, le=600)
    timeout: float = Field(default=180.0, gt=0, le=3600)
    #: The guest's LAN address for TCP/HTTP checks of a bridged failover.
    address: str | None = Field(default=None, max_length=255)


class FailoverSettingsUpdate(Request):
    """An asset's failover settings; a part left out keeps its stored value."""

    proof: FailoverProof | None = None
    network: FailoverNetwork | None = None


class FailoverSettingsPublic(BaseModel):
    asset: str
    #: The stored boot proof (empty: the generic "screen stopped changing" check).
    proof: dict[str, Any]
    #: The stored network (empty: isolated, without port forwards).
    network: dict[str, Any]


class FailoverSessionPublic(BaseModel):
    id: str
    asset: str
    point_id: str
    state: str
    purpose: str
    started_at: datetime
    #: Seconds from the click to the boot proof (None until proven).
    rto_seconds: float | None
    accel: str | None
    #: "backup" while the disks come from the store's export, "local" after a migration.
    storage: str
    #: Host port of each forwarded guest port of an isolated failover: ``{"80": 40123}``.
    ports: dict[str, int]
    error: str | None
    live: bool
    details: dict[str, Any]


class FailoverDetail(FailoverSessionPublic):
    #: The tail of the guest's serial console.
    serial_log: str
