"""Schemas of the tape API: libraries (drives, slots, mail slots), the drives' state, the tape
media inventory and the requests that move cartridges or start tape jobs.

Libraries and drives are named by identity: ``serial:<ID_SCSI_SERIAL>`` for a real changer or
drive (udev discovery), ``virtual:<name>`` for a registered virtual library and
``virtual:<library>-drive<N>`` for its drives. Slots and drives are numbered as mtx numbers
them (slots from 1, mail slots among them; drives from 0).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field, SecretStr, StringConstraints

from api.schemas import Cron, Request

Barcode = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")]
Identity = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f]{1,256}$")]
Slot = Annotated[int, Field(ge=1, le=10000)]
DriveIndex = Annotated[int, Field(ge=0, le=64)]
Place = Literal["library", "shelf", "offsite"]


class DriveStatePublic(BaseModel):
    """What a drive says about its cartridge now (None fields: the drive could not be asked)."""

    loaded: bool
    write_protected: bool
    at_bot: bool
    at_eod: bool
    early_warning: bool
    file_number: int
    block_number: int
    block_size: int


class LibraryDrivePublic(BaseModel):
    """A drive of a library: the cartridge in it (from the changer); ``busy``: a running tape
    job holds it; its own state only when asked (``probe``) and idle."""

    index: int
    identity: str | None = None
    full: bool
    barcode: str | None = None
    source_slot: int | None = None
    busy: bool = False
    state: DriveStatePublic | None = None
    problem: str | None = None


class SlotPublic(BaseModel):
    number: int
    full: bool
    barcode: str | None = None
    import_export: bool = False
    #: The catalog says this cartridge left the library (exported): take it out.
    to_take_out: bool = False


class LibraryPublic(BaseModel):
    """A tape library: a real one found by udev (``kind`` ``mtx``) or a registered virtual
    one. ``problem`` says in words why it cannot be used now (then the lists are empty)."""

    identity: str
    name: str
    kind: Literal["mtx", "virtual"]
    where: str
    available: bool
    problem: str | None = None
    emulated_export: bool = False
    drives: list[LibraryDrivePublic] = []
    slots: list[SlotPublic] = []


class TapeDrivePublic(BaseModel):
    """A tape drive udev found (Linux ``st``), with its state when it could be read."""

    identity: str
    devnode: str
    vendor: str | None = None
    model: str | None = None
    serial: str | None = None
    #: A running tape job holds it.
    busy: bool = False
    #: Read only when asked (``GET /api/tape?probe=1``) and the drive is idle.
    state: DriveStatePublic | None = None
    problem: str | None = None


class TapeMediumPublic(BaseModel):
    """A cartridge the catalog knows, and where it is now."""

    barcode: str
    label_id: str | None = None
    pool: str | None = None
    media_set_id: str | None = None
    sequence: int | None = None
    state: str
    place: str
    bytes_written: int = 0
    write_protected: bool = False
    last_written_at: datetime | None = None
    point_count: int = 0
    #: Where the cartridge is in a library now ("virtual:demo slot 3", "... drive 0"), if seen.
    located: str | None = None
    to_take_out: bool = False


class TapeOverviewPublic(BaseModel):
    libraries: list[LibraryPublic]
    drives: list[TapeDrivePublic]
    media: list[TapeMediumPublic]
    #: Which tape job kinds this appliance can run (``tape_backup``, ``tape_restore``, ...).
    job_kinds: list[str]


class LibraryRegister(Request):
    #: The library's directory, absolute.
    path: Annotated[str, StringConstraints(pattern=r"^/[^\x00-\x1f]{0,4095}$")]


class VirtualLibraryCreate(Request):
    """A new virtual library in the data directory (``<data dir>/tape/<name>``), registered."""

    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")]
    slots: Annotated[int, Field(ge=1, le=100)] = 8
    drives: Annotated[int, Field(ge=1, le=4)] = 1
    import_export: Annotated[int, Field(ge=0, le=4)] = 1
    #: Blank cartridges put in the first slots (barcodes from the name: DEMO001, ...).
    cartridges: Annotated[int, Field(ge=0, le=100)] = 4
    capacity_mib: Annotated[int, Field(ge=1, le=1024 * 1024)] = 512


class LoadRequest(Request):
    slot: Slot
    drive: DriveIndex = 0


class UnloadRequest(Request):
    drive: DriveIndex = 0
    #: None: back to the slot it came from (or the first empty one).
    slot: Slot | None = None


class TransferRequest(Request):
    source: Slot
    destination: Slot


class ExportRequest(Request):
    barcode: Barcode
    #: None: the first empty mail slot (or, without mail slots, the last empty slot).
    slot: Slot | None = None


class MoveResultPublic(BaseModel):
    library: LibraryPublic
    #: What happened, in words ("TAPE01 moved from drive 0 to mail slot 10").
    message: str


class PlaceUpdate(Request):
    place: Place


class TapeBackupRequest(Request):
    pool: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    #: Point ids, or the word ``newest`` (the newest point of each asset).
    points: (
        Annotated[
            list[Annotated[str, StringConstraints(min_length=1, max_length=128)]],
            Field(min_length=1, max_length=1000),
        ]
        | Literal["newest"]
    ) = "newest"
    drive: Identity


class TapeRestoreRequest(Request):
    point: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    drive: Identity
    #: One path of a files point (read into the set's mirror; ``restore --from <set>`` reads
    #: it); None: the whole point back into the home pool.
    path: Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f]{1,4096}$")] | None = None


class TapeScanRequest(Request):
    drive: Identity


class TapeRecoverRequest(Request):
    """Recover a fresh appliance from tapes (``api.tape_recovery``): the drive the tapes are
    within reach of, and the lost store's recovery key (used for this run only, never kept)."""

    drive: Identity
    recovery_key: SecretStr = Field(min_length=20, max_length=400)


class TapeRecoveryPublic(BaseModel):
    """Where a recovery from tapes stands; ``refusal`` says why one may not start now."""

    state: Literal["idle", "reading", "switching", "scanning", "done", "failed"]
    refusal: str | None
    drive: str | None
    message: str | None
    store_id: str | None
    scan_job: str | None
    started_at: datetime | None
    ended_at: datetime | None
    log: list[str]


class TapeEraseRequest(Request):
    barcode: Barcode
    drive: Identity


class PointsRule(Request):
    """Which points a scheduled tape backup writes (:mod:`hardware.tape.schedule`)."""

    rule: Literal["newest", "gfs"] = "newest"
    #: Only these assets; empty: every asset.
    assets: list[Annotated[str, StringConstraints(min_length=1, max_length=255)]] = Field(
        default_factory=list, max_length=1000
    )
    keep_daily: Annotated[int, Field(ge=0, le=1000)] = 0
    keep_weekly: Annotated[int, Field(ge=0, le=1000)] = 0
    keep_monthly: Annotated[int, Field(ge=0, le=1000)] = 0
    keep_yearly: Annotated[int, Field(ge=0, le=1000)] = 0


class TapePoolUpdate(Request):
    """A media pool, created or changed (operator), with its schedule."""

    allocation: Literal["continue", "new_set"] = "continue"
    retention_days: Annotated[int, Field(ge=0, le=100 * 366)] = 365
    #: Cron expression of the scheduled backups (the appliance's time zone); None: only asked.
    schedule: Cron | None = None
    #: The drive the scheduled backups write with (required with a schedule).
    drive: Identity | None = None
    points: PointsRule = Field(default_factory=PointsRule)


class TapePoolPublic(BaseModel):
    name: str
    allocation: str
    retention_days: int
    schedule: str | None = None
    drive: str | None = None
    #: The points rule as stored ({"rule": "newest"} or {"rule": "gfs", "keep_daily": 7, ...}).
    points: dict[str, object]
    #: The rule in words ("the points GFS keeps: 7 daily, 4 weekly").
    points_words: str
    #: When the schedule fires next (UTC), None without a schedule.
    next_run: datetime | None = None
    last_slot: datetime | None = None
    #: Media sets of the pool and tapes in them.
    sets: int = 0
    tapes: int = 0
