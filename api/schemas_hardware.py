"""Schemas of the hardware API: disks (with their pool eligibility and SMART health), disk
pools' actions, USB media and rotation sets. Shared types come from :mod:`api.schemas`.

Requests name disks by their stable identity (``serial:...``, ``wwn:...``, ``loop:<file>``), never
by a device node: the service resolves an identity through its latest scan of the disks, so no
path in a request reaches a command line.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints

from api.schemas import Request

#: A disk's identity as discovery keys it (printable, no newline; a loop's holds a file path).
Identity = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f]{1,1024}$")]
#: A pool name (``hardware.pools.check_pool_name`` says why a name is refused, in words).
PoolName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
#: A rotation set's name ("Offsite"); ``hardware.rotation.parse_set`` checks its alphabet.
SetName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
#: A medium's filesystem label (ext4 keeps 16 bytes); ``check_label`` checks its alphabet.
MediumLabel = Annotated[str, StringConstraints(min_length=1, max_length=16)]
FsType = Literal["ext4", "xfs", "btrfs"]
Profile = Literal["single", "raid1", "raid10"]


# --- disks ------------------------------------------------------------------------------------


class SmartPublic(BaseModel):
    """What SMART says about a disk (``hardware.smart.Health``): ``ok``, ``failing`` or
    ``unknown`` (no smartctl, no SMART: a loop device, a USB bridge hiding it), and why."""

    status: str
    reason: str
    warnings: list[str] = []
    protocol: str | None = None
    temperature_c: int | None = None
    power_on_hours: int | None = None
    reallocated_sectors: int | None = None
    pending_sectors: int | None = None
    media_errors: int | None = None
    percentage_used: int | None = None


class DiskPublic(BaseModel):
    identity: str
    #: Where it is now (``/dev/sdb``); changes across plugs and reboots.
    devnode: str
    #: ``disk``, ``partition`` or ``loop``.
    kind: str
    size_bytes: int
    bus: str | None
    vendor: str | None
    model: str | None
    serial: str | None
    removable: bool
    read_only: bool
    fs_type: str | None
    fs_uuid: str | None
    fs_label: str | None
    #: A partition's disk (its identity).
    parent: str | None
    #: Why it may not join a pool, in words (empty: it may).
    refusals: list[str]
    #: What joining a pool would erase or risk; shown, but it may join.
    warnings: list[str]
    eligible: bool
    #: The pool it belongs to, if any.
    pool: str | None = None
    #: The USB medium it is (its label), if any.
    medium: str | None = None
    #: Only with ``?smart=1``.
    smart: SmartPublic | None = None


class DisksPublic(BaseModel):
    #: When the disks were last scanned.
    scanned_at: datetime
    #: Whether udev events trigger rescans now (else only the periodic rescans do).
    udev_events: bool
    #: Seconds between periodic rescans; None: the disks are scanned when asked only.
    rescan_seconds: float | None
    disks: list[DiskPublic]


# --- pools -------------------------------------------------------------------------------------


class PoolCreate(Request):
    name: PoolName
    #: The disks, by identity (``GET /api/disks``); several make a mirror.
    disks: list[Identity] = Field(min_length=1, max_length=16)
    #: Default: ext4 on one disk, btrfs on several.
    fs_type: FsType | None = None
    #: Default: ``single`` on one disk, ``raid1`` on several.
    profile: Profile | None = None
    #: Erase disks that hold another appliance pool's filesystem.
    force: bool = False


class PoolReplace(Request):
    #: The member to replace: its identity (see the pool's ``members``) or btrfs device id.
    member: Identity
    #: The new disk, by identity.
    disk: Identity


class PoolImport(Request):
    fs_uuid: Annotated[str, StringConstraints(pattern=r"^[0-9A-Fa-f-]{1,64}$")]
    #: The name here (default: the name it had).
    name: PoolName | None = None


class ImportableDiskPublic(BaseModel):
    identity: str
    devnode: str
    size_bytes: int
    model: str | None


class ImportablePublic(BaseModel):
    fs_uuid: str
    fs_type: str
    label: str
    #: The name its label suggests (the marker on the filesystem holds the full one).
    name: str
    disks: list[ImportableDiskPublic]


# --- USB media and rotation ---------------------------------------------------------------------


class MediumCreate(Request):
    #: The USB disk, by identity (``GET /api/media/offered`` or ``GET /api/disks``). ERASED.
    disk: Identity
    #: The filesystem label (default ``appl-<set>-<n>``): 1-16 letters, digits, ``_.-``.
    label: MediumLabel | None = None
    #: The rotation set it joins (created with the defaults if new).
    set: SetName = "Offsite"


class MediumPublic(BaseModel):
    #: The filesystem UUID the appliance made on it (the media table's identity).
    identity: str
    label: str
    set_name: str
    location_id: str
    #: ``in``, ``exporting``, ``safe_to_remove`` or ``out``.
    state: str
    initialised_at: datetime | None = None
    inserted_at: datetime | None = None
    removed_at: datetime | None = None
    last_written: datetime | None = None
    #: A line for people ("pulled during an export: ..."); None when all is well.
    message: str | None = None
    serial: str | None = None
    model: str | None = None
    mounted: bool
    #: Written (or ejected), flushed and unmounted, and not mounted again since.
    safe_to_remove: bool
    #: Points it holds (complete copies).
    points: int
    #: Days past its set's ``rotate_days`` since it was last written; None: not overdue.
    overdue_days: int | None = None
    #: An export or eject of it queued, running or waiting (its job id), if any.
    active_job: str | None = None


class OfferedPublic(BaseModel):
    """A USB disk plugged in that is not appliance media: never touched unless initialised."""

    identity: str
    devnode: str | None = None
    serial: str | None = None
    vendor: str | None = None
    model: str | None = None
    size_bytes: int | None = None
    fs_type: str | None = None
    fs_label: str | None = None
    fs_uuid: str | None = None
    seen_at: datetime | None = None
    #: Plugged in now (in the latest scan).
    present: bool
    #: Why it may not be initialised now, in words (empty: it may).
    refusals: list[str]


class RotationSetUpdate(Request):
    name: SetName
    #: The assets exported; empty: every asset.
    assets: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=1000
    )
    keep_newest: int = Field(default=1, ge=1, le=1000)
    rotate_days: int = Field(default=7, ge=1, le=3650)
    verify: bool = True


class RotationUpdate(Request):
    #: Each set named is created or changed; sets left out are kept (a disk belongs to its set).
    sets: list[RotationSetUpdate] = Field(max_length=100)


class RotationSetPublic(BaseModel):
    name: str
    #: The members' filesystem UUIDs.
    members: list[str]
    assets: list[str]
    keep_newest: int
    rotate_days: int
    verify: bool
    #: Which disk is in, which are out, when each was last written, which are overdue
    #: (``hardware.rotation.RotationStatus``).
    status: dict[str, Any]
