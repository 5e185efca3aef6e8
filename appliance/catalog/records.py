"""What the catalog hands out: plain frozen records, free of any database type.

Every public method of :class:`appliance.catalog.Catalog` takes and returns these records, so the
engine, the CLI, the API and the tiering code never see SQLAlchemy objects and never hold a
session. This module imports nothing but the standard library: importing it is cheap, and it can
be used wherever records are built or inspected (for example when `catalog rebuild` turns a
store's manifests into :class:`PointRecord` values) without pulling in the database layer.

Invariants of every record:

- Datetimes are timezone-aware and in UTC. The catalog refuses naive datetimes on the way in
  (a naive value is ambiguous: local time or UTC?) and converts aware ones to UTC.
- JSON-valued fields (``labels``, ``params``, ``schedule``, ...) hold plain ``dict``/``list``
  values that survive a JSON round trip unchanged.
- A record is a snapshot: changing the catalog later does not change a record already returned.

The allowed values of the enumerated text fields are the frozensets below; the catalog raises
:class:`appliance.errors.InvalidInput` for anything else.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

ASSET_KINDS = frozenset({"files", "vm"})
POINT_KINDS = frozenset({"files", "image"})
POINT_MODES = frozenset({"full", "incremental", "differential"})
#: What a person found when they looked at a suspicious point.
REVIEW_VERDICTS = frozenset({"expected", "attack"})
STORE_LOCATION_KINDS = frozenset({"pool", "usb", "tape", "bucket", "peer"})
#: States of a copy. ``present`` copies are readable now; ``archived`` ones are in a cold storage
#: class and need a recall (``recalling``) first; ``lost`` means the location no longer holds it.
COPY_STATES = frozenset({"copying", "present", "archived", "recalling", "lost", "deleted"})
#: Copy states that still stand for data at (or on its way to) a location: a location holding
#: a copy in one of these states cannot be removed.
HELD_COPY_STATES = frozenset({"copying", "present", "archived", "recalling"})
#: Kinds of location (one place that holds a store, or part of it).
LOCATION_KINDS = frozenset({"pool_dir", "block_pool", "removable", "tape_set", "s3_bucket", "peer"})
#: How a location is read: ``random`` (disk, hot bucket, peer), ``cold`` (an archive class that
#: needs a recall first), ``sequential`` (tape).
LOCATION_ACCESS = frozenset({"random", "cold", "sequential"})
#: The location kind, access and removability that stand for a store's own ``location_kind``
#: (the store's home location, created with the store and by migration 0004).
STORE_HOME_LOCATIONS: dict[str, tuple[str, str, bool]] = {
    "pool": ("pool_dir", "random", False),
    "usb": ("removable", "random", True),
    "tape": ("tape_set", "sequential", True),
    "bucket": ("s3_bucket", "random", False),
    "peer": ("peer", "random", False),
}
#: Filesystems a block pool is made of, and its layouts (btrfs data and metadata profiles; a
#: pool of one ext4 or xfs disk is ``single``).
POOL_FS_TYPES = frozenset({"ext4", "xfs", "btrfs"})
POOL_PROFILES = frozenset({"single", "raid1", "raid10"})
MEDIA_KINDS = frozenset({"usb", "tape"})
#: ``replication``: a peer's system user for one replication source (made by pairing only).
USER_ROLES = frozenset({"admin", "operator", "viewer", "replication", "client"})
LOG_LEVELS = frozenset({"debug", "info", "warning", "error"})
#: States of a failover session (``image.failover`` owns the state machine).
FAILOVER_STATES = frozenset(
    {"starting", "booting", "running", "migrating", "stopping", "stopped", "failed"}
)
#: A session in one of these states holds its VM: a second failover of the asset is a Conflict.
ACTIVE_FAILOVER_STATES = frozenset({"starting", "booting", "running", "migrating", "stopping"})

JOB_STATES = frozenset(
    {"queued", "running", "waiting", "succeeded", "failed", "cancelled", "interrupted"}
)
#: A job in one of these states is over for good; nothing moves it again.
TERMINAL_JOB_STATES = frozenset({"succeeded", "failed", "cancelled"})
#: Entering one of these states stamps ``finished_at``: the job is not running any more.
#: ``interrupted`` is among them although it is not terminal (it can be resumed).
STOPPED_JOB_STATES = TERMINAL_JOB_STATES | {"interrupted"}
#: The state machine of a job. Staying in the same state is always allowed (a no-op).
JOB_TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled", "failed"}),
    "running": frozenset({"succeeded", "failed", "cancelled", "interrupted", "waiting"}),
    # Waiting (a thaw, a disk, a tape, a retry's backoff): woken back to queued, or cancelled.
    "waiting": frozenset({"queued", "cancelled", "failed"}),
    "interrupted": frozenset({"queued", "running", "failed", "cancelled"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}


def home_location_id(store_id: str) -> str:
    """The ID of a store's *home location*: the location the store-keyed methods (``add_point``,
    ``add_copy``, ``set_copy_state``, ``replace_store_points``) put copies at.

    Derived from the store ID, so it is stable and needs no column. Never change the
    derivation: migration 0004 created the home locations of existing stores with it.
    """
    return uuid.uuid5(uuid.NAMESPACE_URL, f"appliance:store-home:{store_id}").hex


@dataclass(frozen=True)
class AssetRecord:
    """Something the appliance protects: a file tree or a virtual machine.

    ``source`` is the path of a file tree, or the VM's disk list as JSON text.
    """

    name: str
    kind: str
    source: str
    created_at: datetime
    description: str | None = None


@dataclass(frozen=True)
class StoreRecord:
    """A store (pool directory, USB disk, tape, bucket or peer) the catalog knows copies in."""

    store_id: str
    location_kind: str
    location: str
    created_at: datetime


@dataclass(frozen=True)
class PointRecord:
    """A recovery point: one complete, independently restorable snapshot of an asset.

    ``parent_id`` is the point an incremental was compared against and ``base_full_id`` the full
    a differential was compared against; both are informational (no point depends on another for
    its data). ``stored_bytes`` counts only the bytes this point added to its store.
    """

    id: str
    asset: str
    kind: str
    mode: str
    created_at: datetime
    parent_id: str | None = None
    base_full_id: str | None = None
    source: str = ""
    logical_bytes: int = 0
    stored_bytes: int = 0
    file_count: int = 0
    warning_count: int = 0
    status: str = "complete"
    verified_at: datetime | None = None
    verify_status: str | None = None
    labels: dict[str, Any] = field(default_factory=dict)
    #: What the backup measured against its parent (``appliance.backup.signals``; {}: none).
    signals: dict[str, Any] = field(default_factory=dict)
    #: Why the point looks like a ransomware attack, in words ([]: it does not).
    suspicion: list[str] = field(default_factory=list)
    #: Who looked at a suspicious point: ``{"by", "at", "verdict": "expected" | "attack"}``.
    review: dict[str, Any] | None = None


@dataclass(frozen=True)
class LocationRecord:
    """One place that holds (part of) a store: a pool directory, a block-device pool, a removable
    disk, a tape media set, an S3 bucket or a peer appliance.

    ``online`` and ``last_seen_at`` say whether the place answered lately; ``details`` holds what
    its backend needs (bucket region, tape pool, peer fingerprint, ...).
    """

    id: str
    store_id: str
    kind: str
    address: str
    access: str
    immutable: bool
    removable: bool
    offsite: bool
    online: bool
    label: str
    created_at: datetime
    last_seen_at: datetime | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CopyRecord:
    """One copy of a recovery point at one location, and whether it is usable yet (or still).

    ``store_id`` is the store of ``location_id`` (a copy is keyed by point and location).
    ``storage_class`` is the backend's class (``STANDARD``, ``DEEP_ARCHIVE``, ...), ``retain_until``
    how long the location must keep it (object lock, tape retention), ``verified_at`` when this
    copy was last read back and checked.
    """

    point_id: str
    store_id: str
    state: str
    added_at: datetime
    location_id: str | None = None
    storage_class: str | None = None
    retain_until: datetime | None = None
    verified_at: datetime | None = None


@dataclass(frozen=True)
class JobRecord:
    """A long operation and its outcome. ``resource`` names what the job locks (a pool, a drive)."""

    id: str
    kind: str
    state: str
    params: dict[str, Any]
    progress: dict[str, Any]
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    resource: str | None
    #: Why a ``waiting`` job waits, and when it wakes by itself (None: an outside event wakes it).
    wait_reason: str | None = None
    wake_at: datetime | None = None
    #: The last checkpoint the work function saved (empty: none); a resumed run starts from it.
    checkpoint: dict[str, Any] = field(default_factory=dict)
    #: How many times the job started running.
    attempts: int = 0


@dataclass(frozen=True)
class JobLogRecord:
    """One log line of a job; ``seq`` counts 1, 2, 3, ... per job in the order lines were added."""

    job_id: str
    seq: int
    at: datetime
    level: str
    message: str


@dataclass(frozen=True)
class PolicyRecord:
    """When and how a policy's assets are backed up, and how long their points are kept.

    ``assets`` is ordered and never empty (a single name is taken as a list of one).
    ``schedule`` and ``retention`` are the JSON forms the scheduler and retention code define;
    the catalog stores them without interpreting them.
    """

    name: str
    assets: list[str]
    schedule: dict[str, Any]
    mode: str
    retention: dict[str, Any]
    rpo_seconds: int

    def __post_init__(self) -> None:
        if isinstance(self.assets, str):
            object.__setattr__(self, "assets", [self.assets])

    @property
    def asset(self) -> str:
        """The first asset (for readers written when a policy had exactly one)."""
        return self.assets[0] if self.assets else ""


@dataclass(frozen=True)
class PoolRecord:
    """A disk pool: a place on the appliance's own disks that holds (a location of) the store
    ``store_id``; ``path`` is the store's folder there.

    The data directory's own pool (``default``) is a folder on the system disk: no ``fs_uuid``.
    A *block pool* (revision 0006) is a filesystem of its own on its own disks: ``fs_type``
    (:data:`POOL_FS_TYPES`) with ``profile`` (:data:`POOL_PROFILES`), mounted by ``fs_uuid`` at
    ``mountpoint``, its store (``path``) registered as location ``location_id``. ``members`` are
    the stable identities of its disks in btrfs device-id order: ``members[i]`` is device id
    ``i + 1`` (mkfs numbers the disks in the order given; a replaced disk takes its place).
    """

    name: str
    path: str
    store_id: str
    created_at: datetime
    fs_uuid: str | None = None
    fs_type: str | None = None
    profile: str | None = None
    members: list[str] = field(default_factory=list)
    location_id: str | None = None
    mountpoint: str | None = None

    @property
    def block(self) -> bool:
        """A filesystem of its own on its own disks (not a folder of the system disk)."""
        return self.fs_uuid is not None


@dataclass(frozen=True)
class PoolUsageRecord:
    """One sample of a pool's filesystem usage (the history its growth forecast is made from)."""

    pool: str
    at: datetime
    used_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class MediaRecord:
    """A removable medium (USB disk or tape) known by a stable identity (serial, WWN, FS UUID)."""

    identity: str
    kind: str
    label: str
    last_seen: datetime
    #: The location this medium is part of (a removable disk, a tape of a media set), if any.
    location_id: str | None = None


@dataclass(frozen=True)
class UserRecord:
    """An account of the admin page and API. ``password_hash`` is never a password."""

    name: str
    role: str
    password_hash: str
    created_at: datetime
    #: When an admin disabled the account (None: enabled).
    disabled_at: datetime | None = None


@dataclass(frozen=True)
class TokenRecord:
    """An API token of a user. Only a hash of the token is stored; ``revoked_at`` ends it, and so
    does reaching ``expires_at`` (None: it never expires)."""

    id: str
    user: str
    hashed: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None = None
    expires_at: datetime | None = None


@dataclass(frozen=True)
class SessionRecord:
    """A signed-in browser session. Only hashes of its cookie and CSRF token are stored."""

    hashed: str
    user: str
    csrf_hashed: str
    created_at: datetime
    expires_at: datetime
    last_seen_at: datetime


@dataclass(frozen=True)
class AuditRecord:
    """One audited change: who (``actor``) did what (``action``) to what (``target``)."""

    id: int
    at: datetime
    actor: str
    action: str
    target: str
    details: dict[str, Any]


@dataclass(frozen=True)
class FailoverSessionRecord:
    """A failover (or a scheduled boot test) of a VM asset to one of its recovery points.

    ``details`` holds what the failover code records: purpose, network, proofs, the measured RTO,
    screenshot and log paths, the error of a failed session, migration and failback results.
    """

    id: str
    asset: str
    point_id: str
    state: str
    started_at: datetime
    details: dict[str, Any]
