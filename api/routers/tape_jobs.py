"""Tape jobs and media pools: back up, restore, scan, erase (jobs), and the pools with their
schedules.

Split from :mod:`api.routers.tape` (libraries, drives, media, cartridge moves); the routes are
the same. Jobs answer 202 with ``Location: /api/jobs/{id}``; a job that needs a cartridge which
is not in a drive waits, its ``wait_reason`` saying which ("needs tape B"). A pool is set by an
operator (audited): allocation, retention, and a schedule in cron form with the drive and the
points rule its ``tape_backup`` jobs use (:mod:`hardware.tape.schedule`); an operator deletes a
pool once no tape and no set with a copy is left in it.
"""

from __future__ import annotations

from datetime import UTC
from typing import Any

from fastapi import APIRouter, Response, status

from api.deps import Admin, Operator, ServiceDep, Viewer
from api.routers.tape import TAPE_JOB_KINDS
from api.schemas import JobPublic
from api.schemas_tape import (
    TapeBackupRequest,
    TapeEraseRequest,
    TapePoolPublic,
    TapePoolUpdate,
    TapeRecoverRequest,
    TapeRecoveryPublic,
    TapeRestoreRequest,
    TapeScanRequest,
)
from api.security import Principal
from api.service import Service
from api.views import job_public
from appliance.catalog.records import JobRecord
from appliance.catalog.tape import TapePoolRecord
from appliance.errors import InvalidInput, NotFound, WrongPassphrase
from appliance.store.crypto import MasterKey
from appliance.verify_schedule import next_slot
from hardware.tape.deck import open_deck
from hardware.tape.library import VirtualLibrary, open_registered
from hardware.tape.schedule import check_rule, rule_words

router = APIRouter(tags=["tape"])

_ACTIVE = ("queued", "running", "waiting")


def _check_drive(service: Service, identity: str) -> str:
    """``identity`` if it names a drive udev found or a drive of a registered virtual library:
    a job is never queued for a drive that does not exist."""
    inventory, _ = service.inventory()
    known = set(inventory.tapes)
    for library in open_registered(service.app.catalog):
        if isinstance(library, VirtualLibrary):
            known.update(library.drive_identity(d.index) for d in library.status().drives)
    if identity not in known:
        raise NotFound(f"no tape drive {identity} is attached or registered", drive=identity)
    return identity


def _submit(
    service: Service, principal: Principal, response: Response, kind: str, params: dict[str, Any]
) -> JobPublic:
    _check_drive(service, str(params["drive"]))
    job: JobRecord = service.jobs.submit(kind, params)
    service.app.catalog.audit(
        principal.name, f"tape.{kind}", kind, {**params, "job": job.id, **principal.audit_details}
    )
    response.headers["Location"] = f"/api/jobs/{job.id}"
    return job_public(job)


@router.get("/tape/jobs", response_model=list[JobPublic])
def tape_jobs(principal: Viewer, service: ServiceDep) -> list[JobPublic]:
    """Tape jobs queued, running or waiting (a waiting one says which tape it needs)."""
    catalog = service.app.catalog
    return [
        job_public(job)
        for state in _ACTIVE
        for job in catalog.list_jobs(state=state, limit=1000)
        if job.kind in TAPE_JOB_KINDS
    ]


@router.post("/tape/backup", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED)
def tape_backup(
    body: TapeBackupRequest, principal: Operator, service: ServiceDep, response: Response
) -> JobPublic:
    """Write points to a media pool (job ``tape_backup``): the ids given, or ``newest``."""
    catalog = service.app.catalog
    catalog.get_tape_pool(body.pool)
    points = (
        body.points if body.points == "newest" else [catalog.get_point(p).id for p in body.points]
    )
    params = {"pool": body.pool, "points": points, "drive": body.drive}
    return _submit(service, principal, response, "tape_backup", params)


@router.post("/tape/restore", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED)
def tape_restore(
    body: TapeRestoreRequest, principal: Operator, service: ServiceDep, response: Response
) -> JobPublic:
    """Read what a point needs back from tape into the home pool (job ``tape_restore``)."""
    params: dict[str, Any] = {
        "point": service.app.catalog.get_point(body.point).id,
        "drive": body.drive,
    }
    if body.path is not None:
        params["path"] = body.path
    return _submit(service, principal, response, "tape_restore", params)


@router.post("/tape/scan", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED)
def tape_scan(
    body: TapeScanRequest, principal: Operator, service: ServiceDep, response: Response
) -> JobPublic:
    """Read the labels and set catalogs of the tapes and rebuild the catalog (``tape_scan``)."""
    return _submit(service, principal, response, "tape_scan", {"drive": body.drive})


def _recovery_public(service: Service) -> TapeRecoveryPublic:
    recovery = service.tape_recovery
    state = recovery.state()
    return TapeRecoveryPublic(
        state=state.state,  # type: ignore[arg-type]
        refusal=recovery.refusal(),
        drive=state.drive,
        message=state.message,
        store_id=state.store_id,
        scan_job=state.scan_job,
        started_at=state.started_at,
        ended_at=state.ended_at,
        log=list(state.log),
    )


@router.get("/tape/recover", response_model=TapeRecoveryPublic)
def tape_recovery(principal: Admin, service: ServiceDep) -> TapeRecoveryPublic:
    """Where a recovery of this appliance from tapes stands (``api.tape_recovery``)."""
    return _recovery_public(service)


@router.post(
    "/tape/recover", response_model=TapeRecoveryPublic, status_code=status.HTTP_202_ACCEPTED
)
def tape_recover(
    body: TapeRecoverRequest, principal: Admin, service: ServiceDep
) -> TapeRecoveryPublic:
    """Make the lost store on the tapes this fresh appliance's store, then scan them
    (``api.tape_recovery``; 409 while its store holds a point or a job is active)."""
    key = body.recovery_key.get_secret_value()
    try:  # a typo is the typist's (400), not a failed sign-in (401)
        MasterKey.from_recovery_key(key)
    except WrongPassphrase as exc:
        raise InvalidInput(str(exc)) from None
    drive = _check_drive(service, body.drive)
    service.tape_recovery.start(drive, open_deck(service.app.catalog, drive), key)
    service.app.catalog.audit(
        principal.name, "tape.recover", drive, {"drive": drive, **principal.audit_details}
    )
    return _recovery_public(service)


@router.post("/tape/erase", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED)
def tape_erase(
    body: TapeEraseRequest, principal: Admin, service: ServiceDep, response: Response
) -> JobPublic:
    """ERASE a cartridge (job ``tape_erase``; admin): what is on it is gone."""
    params = {"barcode": body.barcode, "drive": body.drive}
    return _submit(service, principal, response, "tape_erase", params)


# --- pools ----------------------------------------------------------------------------------------


def _pool_public(service: Service, pool: TapePoolRecord) -> TapePoolPublic:
    catalog = service.app.catalog
    rule = check_rule(pool.points_rule or "newest")
    after = max(pool.schedule_last_slot or service.clock(), service.clock())
    tz = service.scheduler.tz if service.scheduler is not None else UTC
    return TapePoolPublic(
        name=pool.name,
        allocation=pool.allocation,
        retention_days=pool.retention_days,
        schedule=pool.schedule,
        drive=pool.schedule_drive,
        points=rule,
        points_words=rule_words(rule),
        next_run=next_slot(pool.schedule, after, tz),
        last_slot=pool.schedule_last_slot if pool.schedule else None,
        sets=len(catalog.list_tape_sets(pool.name)),
        tapes=len(catalog.list_tape_media(pool=pool.name)),
    )


@router.get("/tape/pools", response_model=list[TapePoolPublic])
def tape_pools(principal: Viewer, service: ServiceDep) -> list[TapePoolPublic]:
    """The media pools, each with its schedule, the points it writes and when it runs next."""
    return [_pool_public(service, p) for p in service.app.catalog.list_tape_pools()]


@router.put("/tape/pools/{name}", response_model=TapePoolPublic)
def put_tape_pool(
    name: str, body: TapePoolUpdate, principal: Operator, service: ServiceDep
) -> TapePoolPublic:
    """Create or change a media pool and its schedule (operator, audited). A schedule needs
    the drive its backups write with; it starts now (no slot before it fires)."""
    if body.schedule is not None and body.drive is None:
        raise InvalidInput("a scheduled tape backup needs the drive it writes with")
    rule = check_rule(body.points.model_dump(exclude_defaults=True))
    for asset in rule.get("assets", []):
        service.app.catalog.get_asset(asset)  # NotFound in words
    if body.drive is not None:
        _check_drive(service, body.drive)
    catalog = service.app.catalog
    catalog.put_tape_pool(name, allocation=body.allocation, retention_days=body.retention_days)
    pool = catalog.set_tape_pool_schedule(
        name, schedule=body.schedule, drive=body.drive, points_rule=rule
    )
    catalog.audit(
        principal.name,
        "tape.pool.put",
        name,
        {
            "allocation": body.allocation,
            "retention_days": body.retention_days,
            "schedule": body.schedule,
            "drive": body.drive,
            "points": rule,
            **principal.audit_details,
        },
    )
    return _pool_public(service, pool)


@router.delete("/tape/pools/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_tape_pool(name: str, principal: Operator, service: ServiceDep) -> Response:
    """Delete a media pool and its schedule (operator, audited): 409 in words while a tape
    belongs to it or a set of it still holds a copy (erase them first)."""
    service.app.catalog.delete_tape_pool(name)
    service.app.catalog.audit(
        principal.name, "tape.pool.delete", name, {"pool": name, **principal.audit_details}
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
