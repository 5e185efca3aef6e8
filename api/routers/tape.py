"""Tape: libraries and drives, the cartridges in them, the tape media inventory, and the tape jobs.

Which libraries exist: the changers udev found (each used through ``mtx`` on its SCSI generic
node, :class:`hardware.tape.changer.MtxChanger`) plus the virtual libraries registered in the
catalog's settings (:mod:`hardware.tape.library`; the demo registers its own, an administrator
registers a directory here). Which drives: the ``st`` drives udev found, and each virtual
library's drives. Requests name a library and a drive by identity, never by a device node or a
path (except the one registration, admin only, which must point at a virtual library).

Moving cartridges (load, unload, transfer, export) is quick and answered at once (operator,
audited); an error of the robot is a 409/404 in words. Writing and reading tapes are jobs
(``tape_backup``, ``tape_restore``, ``tape_scan``, ``tape_erase``; 202 with
``Location: /api/jobs/{id}``); a job that needs a cartridge which is not in a drive waits, its
``wait_reason`` saying which ("needs tape B").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response, status

from api.deps import Admin, Operator, ServiceDep, Viewer
from api.schemas_tape import (
    DriveStatePublic,
    ExportRequest,
    LibraryDrivePublic,
    LibraryPublic,
    LibraryRegister,
    LoadRequest,
    MoveResultPublic,
    PlaceUpdate,
    SlotPublic,
    TapeDrivePublic,
    TapeMediumPublic,
    TapeOverviewPublic,
    TransferRequest,
    UnloadRequest,
    VirtualLibraryCreate,
)
from api.security import Principal
from api.service import Service
from appliance.errors import NotFound
from appliance.jobs import JOB_KINDS
from hardware.records import TapeDrive
from hardware.tape.changer import (
    Changer,
    ChangerError,
    MtxChanger,
    export_cartridge,
    to_take_out,
)
from hardware.tape.drive import Drive, DriveBusy, DriveStatus, TapeError
from hardware.tape.library import (
    LibraryError,
    VirtualLibrary,
    barcodes_for,
    clear_exported,
    create_virtual_library,
    exported,
    mark_exported,
    open_registered,
    register_library,
    registered,
    unregister_library,
)
from hardware.tape.mtx import ChangerStatus
from hardware.tape.st import open_st

router = APIRouter(tags=["tape"])

TAPE_JOB_KINDS = ("tape_backup", "tape_restore", "tape_scan", "tape_erase")


def _state(found: DriveStatus) -> DriveStatePublic:
    return DriveStatePublic(
        loaded=found.loaded,
        write_protected=found.write_protected,
        at_bot=found.at_bot,
        at_eod=found.at_eod,
        early_warning=found.early_warning,
        file_number=found.file_number,
        block_number=found.block_number,
        block_size=found.block_size,
    )


# --- libraries -----------------------------------------------------------------------------------


def _libraries(service: Service) -> list[Changer | LibraryError]:
    """Every library: udev's changers, then the registered virtual ones (or why not)."""
    inventory, _ = service.inventory()
    found: list[Changer | LibraryError] = [
        MtxChanger(c.devnode, c.identity) for c in inventory.changers.values()
    ]
    found.extend(open_registered(service.app.catalog))
    return found


def _library(service: Service, identity: str) -> Changer:
    for library in _libraries(service):
        if not isinstance(library, LibraryError) and library.identity == identity:
            return library
    raise NotFound(f"no tape library {identity} is attached or registered", library=identity)


#: Export marks: barcode -> (library identity, slot it was put in to be taken out).
Marks = dict[str, tuple[str, int]]


@dataclass(frozen=True)
class _Seen:
    """What a library's answer is drawn with: the export marks, the drives a running tape job
    holds (identity -> job id), and whether idle drives may be opened to read their state."""

    marks: Marks
    busy: dict[str, str]
    probe: bool = False


def _seen(service: Service, *, probe: bool = False) -> _Seen:
    catalog = service.app.catalog
    busy = {
        str(job.params.get("drive")): job.id
        for job in catalog.list_jobs(state="running", limit=1000)
        if job.kind in TAPE_JOB_KINDS
    }
    return _Seen(exported(catalog), busy, probe)


def _read_state(open_drive: Callable[[], Drive]) -> tuple[DriveStatePublic | None, str | None]:
    """(state, problem) of an idle drive: opened, asked, closed (nothing written)."""
    try:
        drive = open_drive()
    except DriveBusy:
        return None, "in use by another process"
    except TapeError as exc:
        return None, str(exc)
    try:
        return _state(drive.status()), None
    except TapeError as exc:
        return None, str(exc)
    finally:
        drive.close()


def _library_public(library: Changer | LibraryError, seen: _Seen) -> LibraryPublic:
    if isinstance(library, LibraryError):
        path, name = str(library.details.get("path", "")), str(library.details.get("name", ""))
        return LibraryPublic(
            identity=f"virtual:{name}",
            name=name,
            kind="virtual",
            where=path,
            available=False,
            problem=library.message,
        )
    if isinstance(library, VirtualLibrary):
        name, kind, where = library.name, "virtual", str(library.root)
    else:
        name, kind = library.describe(), "mtx"
        where = library.devnode if isinstance(library, MtxChanger) else name
    base: dict[str, Any] = {
        "identity": library.identity,
        "name": name,
        "kind": kind,
        "where": where,
    }
    try:
        found: ChangerStatus = library.status()
    except ChangerError as exc:
        return LibraryPublic(**base, available=False, problem=exc.message)
    drives = []
    for d in found.drives:
        identity = library.drive_identity(d.index) if isinstance(library, VirtualLibrary) else None
        busy = identity is not None and identity in seen.busy
        state, problem = None, None
        if seen.probe and d.full and not busy and isinstance(library, VirtualLibrary):
            state, problem = _read_state(partial(library.drive, d.index))
        drives.append(
            LibraryDrivePublic(
                index=d.index,
                identity=identity,
                full=d.full,
                barcode=d.barcode,
                source_slot=d.source_slot,
                busy=busy,
                state=state,
                problem=problem,
            )
        )
    mine = {b: slot for b, (lib, slot) in seen.marks.items() if lib == library.identity}
    leaving = set(to_take_out(found, mine))
    slots = [
        SlotPublic(
            number=s.number,
            full=s.full,
            barcode=s.barcode,
            import_export=s.import_export,
            to_take_out=(s.barcode, s.number) in leaving,
        )
        for s in found.all_slots()
    ]
    return LibraryPublic(
        **base,
        available=True,
        emulated_export=not found.import_export,
        drives=drives,
        slots=slots,
    )


def _drive_public(drive: TapeDrive, seen: _Seen) -> TapeDrivePublic:
    busy = drive.identity in seen.busy
    state, problem = None, None
    if seen.probe and not busy:
        state, problem = _read_state(partial(open_st, drive.devnode, drive.identity))
    return TapeDrivePublic(
        identity=drive.identity,
        devnode=drive.devnode,
        vendor=drive.vendor,
        model=drive.model,
        serial=drive.serial,
        busy=busy,
        state=state,
        problem=problem,
    )


def _located(libraries: list[LibraryPublic]) -> dict[str, str]:
    where: dict[str, str] = {}
    for library in libraries:
        for d in library.drives:
            if d.full and d.barcode:
                where[d.barcode] = f"{library.name} drive {d.index}"
        for s in library.slots:
            if s.full and s.barcode:
                kind = "mail slot" if s.import_export else "slot"
                where[s.barcode] = f"{library.name} {kind} {s.number}"
    return where


def _media(service: Service, libraries: list[LibraryPublic]) -> list[TapeMediumPublic]:
    where = _located(libraries)
    leaving = {s.barcode for lib in libraries for s in lib.slots if s.to_take_out and s.barcode}
    return [
        TapeMediumPublic(
            barcode=m.barcode,
            label_id=m.label_id,
            pool=m.pool,
            media_set_id=m.media_set_id,
            sequence=m.sequence,
            state=m.state,
            place=m.place,
            bytes_written=m.bytes_written,
            write_protected=m.write_protected,
            last_written_at=m.last_written_at,
            point_count=m.point_count,
            located=where.get(m.barcode),
            to_take_out=m.barcode in leaving,
        )
        for m in service.app.catalog.list_tape_media()
    ]


@router.get("/tape", response_model=TapeOverviewPublic)
def tape_overview(
    principal: Viewer,
    service: ServiceDep,
    probe: Annotated[
        bool, Query(description="also open the idle drives holding a cartridge to read their state")
    ] = False,
) -> TapeOverviewPublic:
    """Libraries (drives, slots, mail slots, barcodes, what is to be taken out), the drives
    udev found, the tape media inventory and the tape jobs this appliance runs.

    A drive a running tape job holds is ``busy``; the others are opened only when asked
    (``probe``): a drive is held by one opener at a time, and a page polling it would make a
    job that starts at that instant find it busy."""
    seen = _seen(service, probe=probe)
    libraries = [_library_public(lib, seen) for lib in _libraries(service)]
    inventory, _ = service.inventory()
    return TapeOverviewPublic(
        libraries=libraries,
        drives=[_drive_public(d, seen) for d in inventory.tapes.values()],
        media=_media(service, libraries),
        job_kinds=[k for k in TAPE_JOB_KINDS if k in JOB_KINDS],
    )


@router.post("/tape/libraries", response_model=LibraryPublic, status_code=status.HTTP_201_CREATED)
def register(body: LibraryRegister, principal: Admin, service: ServiceDep) -> LibraryPublic:
    """Register the virtual library in the directory ``path`` (made with
    ``hardware.tape.library.create_virtual_library``)."""
    library = register_library(service.app.catalog, body.path)
    service.app.catalog.audit(
        principal.name,
        "tape.library.register",
        library.identity,
        {"path": str(library.root), **principal.audit_details},
    )
    return _library_public(library, _seen(service))


@router.post(
    "/tape/libraries/virtual", response_model=LibraryPublic, status_code=status.HTTP_201_CREATED
)
def create_virtual(
    body: VirtualLibraryCreate, principal: Admin, service: ServiceDep
) -> LibraryPublic:
    """Make a virtual library with blank cartridges in ``<data dir>/tape/<name>`` and register
    it (the demo's way to write points to tape without a drive)."""
    catalog = service.app.catalog
    if any(e["name"] == body.name for e in registered(catalog)):
        raise LibraryError(f"a virtual library {body.name} is registered already")
    if body.cartridges > body.slots:
        raise LibraryError(f"{body.cartridges} cartridges do not fit in {body.slots} slots")
    capacity = body.capacity_mib * 1024 * 1024
    codes = barcodes_for(body.name, body.cartridges)
    root = Path(service.app.data_dir.path) / "tape" / body.name
    library = create_virtual_library(
        root,
        slots=body.slots,
        drives=body.drives,
        ie=body.import_export,
        cartridges=[(code, capacity) for code in codes],
        name=body.name,
    )
    register_library(catalog, library.root)
    catalog.audit(
        principal.name,
        "tape.library.create",
        library.identity,
        {**body.model_dump(), "path": str(library.root), **principal.audit_details},
    )
    return _library_public(library, _seen(service))


@router.delete("/tape/libraries/{name}", status_code=status.HTTP_204_NO_CONTENT)
def unregister(name: str, principal: Admin, service: ServiceDep) -> Response:
    """Forget a registered virtual library (its directory and cartridges stay)."""
    unregister_library(service.app.catalog, name)
    service.app.catalog.audit(
        principal.name, "tape.library.unregister", f"virtual:{name}", dict(principal.audit_details)
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _slot_barcode(library: Changer, number: int) -> str | None:
    slot = library.status().slot(number)
    return slot.barcode if slot is not None else None


def _moved(
    service: Service,
    principal: Principal,
    library: Changer,
    action: str,
    message: str,
    **details: Any,
) -> MoveResultPublic:
    service.app.catalog.audit(
        principal.name,
        f"tape.{action}",
        library.identity,
        {**details, **principal.audit_details},
    )
    return MoveResultPublic(library=_library_public(library, _seen(service)), message=message)


@router.post("/tape/libraries/{identity}/load", response_model=MoveResultPublic)
def load(
    identity: str, body: LoadRequest, principal: Operator, service: ServiceDep
) -> MoveResultPublic:
    """Move the cartridge in ``slot`` into ``drive``."""
    library = _library(service, identity)
    barcode = _slot_barcode(library, body.slot)
    library.load(body.slot, body.drive)
    what = barcode or f"the cartridge from slot {body.slot}"
    return _moved(
        service,
        principal,
        library,
        "load",
        f"{what} loaded into drive {body.drive}",
        slot=body.slot,
        drive=body.drive,
        barcode=barcode,
    )


@router.post("/tape/libraries/{identity}/unload", response_model=MoveResultPublic)
def unload(
    identity: str, body: UnloadRequest, principal: Operator, service: ServiceDep
) -> MoveResultPublic:
    """Move the cartridge in ``drive`` to ``slot`` (default: where it came from)."""
    library = _library(service, identity)
    element = library.status().drive(body.drive)
    barcode = element.barcode if element else None
    slot = library.unload(body.drive, body.slot)
    return _moved(
        service,
        principal,
        library,
        "unload",
        f"{barcode or 'the cartridge'} unloaded from drive {body.drive} into slot {slot}",
        drive=body.drive,
        slot=slot,
        barcode=barcode,
    )


@router.post("/tape/libraries/{identity}/transfer", response_model=MoveResultPublic)
def transfer(
    identity: str, body: TransferRequest, principal: Operator, service: ServiceDep
) -> MoveResultPublic:
    """Move a cartridge from one slot (or mail slot) to another."""
    library = _library(service, identity)
    barcode = _slot_barcode(library, body.source)
    library.transfer(body.source, body.destination)
    return _moved(
        service,
        principal,
        library,
        "transfer",
        f"{barcode or 'the cartridge'} moved from slot {body.source} to slot {body.destination}",
        source=body.source,
        destination=body.destination,
        barcode=barcode,
    )


@router.post("/tape/libraries/{identity}/export", response_model=MoveResultPublic)
def export(
    identity: str, body: ExportRequest, principal: Operator, service: ServiceDep
) -> MoveResultPublic:
    """Take a cartridge out: to a mail slot, or (a library without one) to a storage slot
    marked "to be taken out"; the catalog's place of the medium becomes ``shelf``."""
    library = _library(service, identity)
    catalog = service.app.catalog
    known = {m.barcode for m in catalog.list_tape_media()}

    def mark(barcode: str, place: str) -> None:
        if barcode in known:  # a cartridge never written is not in the catalog
            catalog.set_tape_medium_place(barcode, place)

    plan = export_cartridge(library, body.barcode, slot=body.slot, mark=mark)
    mark_exported(catalog, body.barcode, library.identity, plan.destination)
    where = f"slot {plan.destination}" if plan.emulated else f"mail slot {plan.destination}"
    origin = f"{plan.source_kind} {plan.source}"
    message = f"{body.barcode} moved from {origin} to {where}: take it out"
    return _moved(
        service,
        principal,
        library,
        "export",
        message,
        barcode=body.barcode,
        destination=plan.destination,
        emulated=plan.emulated,
    )


@router.post("/tape/libraries/{identity}/inventory", response_model=LibraryPublic)
def inventory(identity: str, principal: Operator, service: ServiceDep) -> LibraryPublic:
    """Make the library check every slot (a barcode scan on a real one)."""
    library = _library(service, identity)
    library.inventory()
    service.app.catalog.audit(
        principal.name, "tape.inventory", library.identity, dict(principal.audit_details)
    )
    return _library_public(library, _seen(service))


# --- media ----------------------------------------------------------------------------------------


@router.put("/tape/media/{barcode}/place", response_model=TapeMediumPublic)
def set_place(
    barcode: str, body: PlaceUpdate, principal: Operator, service: ServiceDep
) -> TapeMediumPublic:
    """Record where a cartridge is: ``library``, ``shelf`` or ``offsite``."""
    catalog = service.app.catalog
    before = catalog.get_tape_medium(barcode)
    catalog.set_tape_medium_place(barcode, body.place, before.slot)
    clear_exported(catalog, [barcode])  # told where it is: no longer "to be taken out"
    catalog.audit(
        principal.name,
        "tape.medium.place",
        barcode,
        {"from": before.place, "to": body.place, **principal.audit_details},
    )
    found = next(m for m in _media(service, []) if m.barcode == barcode)
    return found
