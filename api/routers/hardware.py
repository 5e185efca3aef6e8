"""Disks, disk pools, USB media and rotation sets: what the appliance's hardware is, and the
actions on it (each one a job, audited).

Disks are named by their stable identity and resolved through the service's latest scan
(:meth:`api.service.Service.inventory`): no device node or path in a request reaches a command.
Before a job is queued the request is checked with the same rules the work applies again when it
runs: which disks may join a pool (:mod:`hardware.eligibility`, refusals in words, 409), which may
become USB media (:func:`hardware.usb.initialise_refusals`), pool names and layouts. Long work runs
as a job (202 with ``Location: /api/jobs/{id}``): ``pool_create``, ``pool_scrub``,
``pool_replace``, ``pool_import``, ``usb_initialise``, ``usb_export``, ``usb_eject``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response, status

from api.deps import Admin, Operator, ServiceDep, Viewer
from api.schemas import JobPublic, PoolMemberPublic, PoolPublic, PoolUsageSample
from api.schemas_hardware import (
    DiskPublic,
    DisksPublic,
    ImportableDiskPublic,
    ImportablePublic,
    MediumCreate,
    MediumPublic,
    OfferedPublic,
    PoolCreate,
    PoolImport,
    PoolReplace,
    RotationSetPublic,
    RotationUpdate,
    SmartPublic,
)
from api.service import INITIALISE_KIND, Service
from api.views import job_public
from appliance.catalog.records import JobRecord, PoolRecord
from appliance.engine import Appliance
from appliance.errors import Conflict, InvalidInput, NotFound
from appliance.protection import filesystem_usage, growth
from hardware.eligibility import partitions_of, pool_candidates, refusals
from hardware.hostfacts import HostFacts, host_facts
from hardware.pool_backend import find_pool, list_pool_status
from hardware.pool_jobs import device_params, member_devid
from hardware.pools import check_layout, check_pool_name, find_importable
from hardware.records import BlockDevice, Inventory
from hardware.rotation import check_label, parse_set
from hardware.smart import read_health
from hardware.usb import (
    configure_set,
    find_medium,
    initialise_refusals,
    media_overview,
    medium_states,
    offered_disks,
    rotation_overview,
)
from hardware.usb_jobs import EJECT_KIND, EXPORT_KIND, submit_eject, submit_export

router = APIRouter(tags=["hardware"])

#: How far back a pool's growth and its usage history look.
HISTORY = timedelta(days=30)
#: smartctl runs at once at most (``GET /api/disks?smart=1``).
SMART_PARALLEL = 8
_ACTIVE = ("queued", "running", "waiting")


def _started(response: Response, job: JobRecord) -> JobPublic:
    response.headers["Location"] = f"/api/jobs/{job.id}"
    return job_public(job)


def _active_jobs(app: Appliance, kinds: tuple[str, ...]) -> list[JobRecord]:
    return [
        job
        for state in _ACTIVE
        for job in app.catalog.list_jobs(state=state, limit=1000)
        if job.kind in kinds
    ]


# --- disks --------------------------------------------------------------------------------------


def _restore_identities(paths: tuple[str, ...], inventory: Inventory) -> set[str]:
    """The identities of the disks registered as restore devices (registered by path)."""
    wanted = {os.path.realpath(p) for p in paths}
    return {
        d.identity
        for d in inventory.block.values()
        if os.path.realpath(d.devnode) in wanted or wanted & {os.path.realpath(x) for x in d.links}
    }


def _facts(app: Appliance, inventory: Inventory) -> HostFacts:
    members: set[str] = set()
    for pool in app.catalog.list_pools():
        members.update(m for m in pool.members if m)
        if pool.fs_uuid:
            members.add(pool.fs_uuid)
    restore = _restore_identities(app.restore_rules().devices, inventory)
    return host_facts(app.data_dir.path, members, restore)


def _disk(inventory: Inventory, identity: str) -> BlockDevice:
    device = inventory.block.get(identity)
    if device is None:
        raise NotFound(
            f"no disk {identity!r} is attached (rescan the disks if it was just plugged in)",
            disk=identity,
        )
    return device


def _smart(devices: list[BlockDevice]) -> dict[str, SmartPublic]:
    """SMART of each whole device, read in parallel (smartctl may take seconds per disk)."""
    whole = [d for d in devices if d.kind != "partition"]
    if not whole:
        return {}
    with ThreadPoolExecutor(max_workers=min(SMART_PARALLEL, len(whole))) as pool:
        found = list(pool.map(lambda d: read_health(d.devnode), whole))
    return {
        d.identity: SmartPublic(
            status=h.status,
            reason=h.reason,
            warnings=list(h.warnings),
            protocol=h.protocol,
            temperature_c=h.temperature_c,
            power_on_hours=h.power_on_hours,
            reallocated_sectors=h.reallocated_sectors,
            pending_sectors=h.pending_sectors,
            media_errors=h.media_errors,
            percentage_used=h.percentage_used,
        )
        for d, h in zip(whole, found, strict=True)
    }


def _disks_public(
    service: Service, inventory: Inventory, scanned_at: datetime, *, smart: bool
) -> DisksPublic:
    app = service.app
    candidates = pool_candidates(inventory, _facts(app, inventory))
    pools: dict[str, str] = {}
    for pool in app.catalog.list_pools():
        for key in (*pool.members, pool.fs_uuid):
            if key:
                pools[key] = pool.name
    media = {k: s.label for k, s in medium_states(app).items()}
    health = _smart([c.device for c in candidates]) if smart else {}
    disks = []
    for c in candidates:
        d = c.device
        disks.append(
            DiskPublic(
                identity=d.identity,
                devnode=d.devnode,
                kind=d.kind,
                size_bytes=d.size_bytes,
                bus=d.bus,
                vendor=d.vendor,
                model=d.model,
                serial=d.serial,
                removable=d.removable,
                read_only=d.read_only,
                fs_type=d.fs_type,
                fs_uuid=d.fs_uuid,
                fs_label=d.fs_label,
                parent=d.parent,
                refusals=list(c.refusals),
                warnings=list(c.warnings),
                eligible=c.eligible,
                pool=pools.get(d.identity) or pools.get(d.fs_uuid or ""),
                medium=media.get(d.fs_uuid or ""),
                smart=health.get(d.identity),
            )
        )
    monitor = service.monitor
    return DisksPublic(
        scanned_at=scanned_at,
        udev_events=bool(monitor is not None and monitor.listening),
        rescan_seconds=service.settings.device_monitor_interval if monitor is not None else None,
        disks=disks,
    )


@router.get("/disks", response_model=DisksPublic)
def list_disks(
    principal: Viewer,
    service: ServiceDep,
    smart: Annotated[bool, Query(description="also read SMART health (slow)")] = False,
) -> DisksPublic:
    """Every block device of the latest scan, with why it may not join a pool (in words), what
    joining would erase, the pool or USB medium it is, and SMART health when asked."""
    inventory, at = service.inventory()
    return _disks_public(service, inventory, at, smart=smart)


@router.post("/disks/rescan", response_model=DisksPublic)
def rescan_disks(principal: Operator, service: ServiceDep) -> DisksPublic:
    """Scan the disks now (a disk plugged in is offered, a USB medium starts its export)."""
    inventory, at = service.rescan()
    service.app.catalog.audit(
        principal.name,
        "disks.rescan",
        "disks",
        {"disks": len(inventory.block), **principal.audit_details},
    )
    return _disks_public(service, inventory, at, smart=False)


# --- pools -------------------------------------------------------------------------------------


def _daily(app: Appliance, pool: str, now: datetime) -> list[PoolUsageSample]:
    """The last usage sample of each day over :data:`HISTORY`."""
    days: dict[str, PoolUsageSample] = {}
    for s in app.catalog.list_pool_usage(pool, since=now - HISTORY, until=now):
        days[s.at.date().isoformat()] = PoolUsageSample(
            day=s.at, used_bytes=s.used_bytes, total_bytes=s.total_bytes
        )
    return list(days.values())


def _sample_growth(samples: list[PoolUsageSample]) -> float:
    if len(samples) < 2:
        return 0.0
    first, last = samples[0], samples[-1]
    span = (last.day - first.day).total_seconds() / 86400
    return round(max(0.0, (last.used_bytes - first.used_bytes) / span), 1) if span > 0 else 0.0


def _pool_public(
    service: Service, status_: dict[str, Any], inventory: Inventory, now: datetime
) -> PoolPublic:
    app = service.app
    name = str(status_["name"])
    health = status_.get("health") or {}
    capacity = status_.get("capacity") or {}
    history = _daily(app, name, now)
    block = status_.get("kind") == "block"
    missing = set(health.get("missing") or [])
    members = []
    for identity in status_.get("members") or []:
        device = inventory.block.get(identity)
        members.append(
            PoolMemberPublic(
                identity=identity,
                devnode=device.devnode if device else None,
                model=device.model if device else None,
                size_bytes=device.size_bytes if device else None,
                missing=identity in missing or device is None,
            )
        )
    common: dict[str, Any] = {
        "kind": "block" if block else "directory",
        "fs_uuid": status_.get("fs_uuid"),
        "fs_type": status_.get("fs_type"),
        "profile": status_.get("profile"),
        "mountpoint": status_.get("mountpoint"),
        "location_id": status_.get("location_id"),
        "members": members,
        "mounted": bool(health.get("mounted", True)) and (bool(capacity) or not block),
        "health": health.get("state", "ok"),
        "health_reasons": list(health.get("reasons") or []),
        "degraded": health.get("state") == "degraded" or bool(health.get("degraded_mount")),
        "device_errors": list(health.get("device_errors") or []),
        "last_scrub": health.get("last_scrub"),
        "reserve_bytes": int(capacity.get("reserve_bytes") or 0),
        "warnings": list(status_.get("warnings") or []),
        "usage_history": history,
    }
    if not block:
        # The data directory's own pool: statvfs of its folder, growth from the points made.
        points = app.catalog.list_points(store_id=str(status_["store_id"]))
        usage = filesystem_usage(str(status_["path"]))
        trend = growth(points, now, HISTORY.days)
        home = status_["store_id"] == app.repo.store_id
        return PoolPublic(
            name=name,
            path=str(status_["path"]),
            store_id=str(status_["store_id"]),
            total_bytes=usage.total_bytes,
            free_bytes=usage.free_bytes,
            used_bytes=usage.used_bytes,
            store_bytes=service.store_bytes() if home else 0,
            points=len(points),
            growth_bytes_per_day=round(trend.bytes_per_day, 1),
            days_until_full=trend.days_until_full(usage.free_bytes),
            **common,
        )
    location = status_.get("location_id")
    held = len(app.catalog.copies_at(str(location), state="present")) if location else 0
    return PoolPublic(
        name=name,
        path=str(status_["path"]),
        store_id=str(status_["store_id"]),
        total_bytes=int(capacity.get("total_bytes") or 0),
        free_bytes=int(capacity.get("free_bytes") or 0),
        used_bytes=int(capacity.get("used_bytes") or 0),
        store_bytes=int(capacity.get("used_bytes") or 0),
        points=held,
        growth_bytes_per_day=_sample_growth(history),
        days_until_full=status_.get("days_until_full"),
        **common,
    )


@router.get("/pools", response_model=list[PoolPublic])
def list_pools(principal: Viewer, service: ServiceDep) -> list[PoolPublic]:
    """Every pool, the data directory's own first: capacity, store size, points, growth, days
    until full, health with its reasons and missing disks, the members, the daily usage of the
    last 30 days, and warnings ("shares the system disk")."""
    app = service.app
    now = service.now()
    inventory, _ = service.inventory()
    out = []
    for pool_status in list_pool_status(app, now):
        document = pool_status.to_dict()
        try:
            out.append(_pool_public(service, document, inventory, now))
        except OSError:
            continue  # the data directory's folder vanished under it: nothing to measure
    return out


def _refused(inventory: Inventory, facts: HostFacts, devices: list[BlockDevice]) -> None:
    found = {d.identity: list(refusals(d, inventory, facts)) for d in devices}
    found = {k: v for k, v in found.items() if v}
    if found:
        said = "; ".join(f"disk {k} {', '.join(v)}" for k, v in found.items())
        raise Conflict(f"{said}; nothing was changed", refusals=found)


def _resolve(service: Service, identities: list[str]) -> tuple[Inventory, list[BlockDevice]]:
    if len(set(identities)) != len(identities):
        raise InvalidInput("a disk is named twice")
    inventory, _ = service.inventory()
    devices = [_disk(inventory, identity) for identity in identities]
    _refused(inventory, _facts(service.app, inventory), devices)
    return inventory, devices


@router.post("/pools", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED)
def create_pool(
    body: PoolCreate, principal: Admin, service: ServiceDep, response: Response
) -> JobPublic:
    """Make a pool of the disks named (job ``pool_create``): one disk (ext4, xfs or btrfs) or
    a btrfs mirror (raid1: 2 or more, raid10: 4 or more). The disks are ERASED."""
    app = service.app
    name = check_pool_name(body.name)
    if any(p.name == name for p in app.catalog.list_pools()):
        raise Conflict(f"a pool named {name} exists already", pool=name)
    several = len(body.disks) > 1
    fs_type = body.fs_type or ("btrfs" if several else "ext4")
    profile = body.profile or ("raid1" if several else "single")
    check_layout(fs_type, profile, len(body.disks))
    _, devices = _resolve(service, list(body.disks))
    params = {
        "name": name,
        "devices": [device_params(d) for d in devices],
        "fs_type": fs_type,
        "profile": profile,
        "force": body.force,
    }
    job = service.jobs.submit("pool_create", params)
    app.catalog.audit(
        principal.name,
        "pool.create",
        name,
        {
            "disks": [d.identity for d in devices],
            "fs_type": fs_type,
            "profile": profile,
            "job": job.id,
            **principal.audit_details,
        },
    )
    return _started(response, job)


def _btrfs(pool: PoolRecord, what: str) -> None:
    if pool.fs_type != "btrfs":
        raise InvalidInput(
            f"pool {pool.name} is {pool.fs_type or 'a folder'}: only a btrfs pool keeps the "
            f"checksums {what} needs",
            pool=pool.name,
        )


@router.post("/pools/{name}/scrub", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED)
def scrub_pool(
    name: str, principal: Operator, service: ServiceDep, response: Response
) -> JobPublic:
    """Read and check every copy of every block of a btrfs pool, rewriting bad copies from
    good ones (job ``pool_scrub``); a scrub already queued or running is answered instead."""
    app = service.app
    pool = find_pool(app, name)
    _btrfs(pool, "a scrub")
    running = [j for j in _active_jobs(app, ("pool_scrub",)) if j.params.get("pool") == pool.name]
    job = (
        running[0]
        if running
        else service.jobs.submit("pool_scrub", {"pool": pool.name, "trigger": "manual"})
    )
    app.catalog.audit(
        principal.name, "pool.scrub", pool.name, {"job": job.id, **principal.audit_details}
    )
    return _started(response, job)


@router.post(
    "/pools/{name}/replace", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED
)
def replace_disk(
    name: str, body: PoolReplace, principal: Admin, service: ServiceDep, response: Response
) -> JobPublic:
    """Rebuild a missing or failing member of a mirrored pool onto a new disk (job
    ``pool_replace``); the new disk is ERASED and takes the old one's place."""
    app = service.app
    pool = find_pool(app, name)
    _btrfs(pool, "a replacement")
    if pool.profile not in ("raid1", "raid10"):
        raise InvalidInput(
            f"pool {pool.name} has no mirror to rebuild a disk from: make a new pool and copy "
            "its points there",
            pool=pool.name,
        )
    member_devid(pool, body.member)
    _, (device,) = _resolve(service, [body.disk])
    job = service.jobs.submit(
        "pool_replace", {"pool": pool.name, "member": body.member, "device": device_params(device)}
    )
    app.catalog.audit(
        principal.name,
        "pool.replace",
        pool.name,
        {"member": body.member, "disk": device.identity, "job": job.id, **principal.audit_details},
    )
    return _started(response, job)


def _importable(service: Service) -> list[ImportablePublic]:
    app = service.app
    inventory, _ = service.inventory()
    known = [p.fs_uuid for p in app.catalog.list_pools() if p.fs_uuid]
    return [
        ImportablePublic(
            fs_uuid=found.fs_uuid,
            fs_type=found.fs_type,
            label=found.label,
            name=found.name,
            disks=[
                ImportableDiskPublic(
                    identity=d.identity, devnode=d.devnode, size_bytes=d.size_bytes, model=d.model
                )
                for d in found.devices
            ],
        )
        for found in find_importable(inventory, known)
    ]


@router.get("/pools/importable", response_model=list[ImportablePublic])
def importable_pools(principal: Admin, service: ServiceDep) -> list[ImportablePublic]:
    """Pool filesystems found on the attached disks that this appliance does not know (from
    another appliance, or before a reinstall)."""
    return _importable(service)


@router.post("/pools/import", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED)
def import_pool(
    body: PoolImport, principal: Admin, service: ServiceDep, response: Response
) -> JobPublic:
    """Take over a pool found on the disks (job ``pool_import``): mounted, its location
    adopted (its points become copies there) and recorded. A pool of another store is refused."""
    app = service.app
    inventory, _ = service.inventory()
    known = [p.fs_uuid for p in app.catalog.list_pools() if p.fs_uuid]
    found = next((f for f in find_importable(inventory, known) if f.fs_uuid == body.fs_uuid), None)
    if found is None:
        raise NotFound(
            f"no pool filesystem {body.fs_uuid} on the attached disks", fs_uuid=body.fs_uuid
        )
    name = check_pool_name(body.name or found.name)
    if any(p.name == name for p in app.catalog.list_pools()):
        raise Conflict(f"a pool named {name} exists already: import it under another name")
    job = service.jobs.submit(
        "pool_import",
        {
            "fs_uuid": found.fs_uuid,
            "name": name,
            "devices": [device_params(d) for d in found.devices],
        },
    )
    app.catalog.audit(
        principal.name,
        "pool.import",
        name,
        {"fs_uuid": found.fs_uuid, "job": job.id, **principal.audit_details},
    )
    return _started(response, job)


# --- USB media -----------------------------------------------------------------------------------


@router.get("/media", response_model=list[MediumPublic])
def list_media(principal: Viewer, service: ServiceDep) -> list[MediumPublic]:
    """USB media: state (``in``, ``exporting``, ``safe_to_remove``, ``out``), set, when last
    written, whether it is mounted and safe to remove, points held, days overdue, the export or
    eject job under way."""
    app = service.app
    overdue = {
        m["identity"]: m.get("overdue_days")
        for rotation in rotation_overview(app, service.now())
        for m in rotation["status"]["media"]
    }
    busy: dict[str, str] = {}
    for job in _active_jobs(app, (EXPORT_KIND, EJECT_KIND)):
        busy.setdefault(str(job.params.get("medium")), job.id)
    return [
        MediumPublic(
            **m, overdue_days=overdue.get(m["identity"]), active_job=busy.get(m["identity"])
        )
        for m in media_overview(app)
    ]


@router.post("/media", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED)
def initialise_disk(
    body: MediumCreate, principal: Admin, service: ServiceDep, response: Response
) -> JobPublic:
    """Make a USB disk appliance media (job ``usb_initialise``): ERASED, ext4 labelled
    ``label``, a location of its own, a member of rotation set ``set``; safe to remove when the
    job ends. Refused (409, in words) unless the disk may be initialised now."""
    app = service.app
    inventory, _ = service.inventory()
    device = _disk(inventory, body.disk)
    label = check_label(body.label) if body.label else None
    set_name = parse_set({"name": body.set}).name
    if label and any(s.label.casefold() == label.casefold() for s in medium_states(app).values()):
        raise Conflict(f"a USB disk is labelled {label} already", label=label)
    found = initialise_refusals(app, device, inventory)
    if found:
        raise Conflict(
            f"cannot initialise {device.identity}: {'; '.join(found)}; nothing was changed",
            disk=device.identity,
            refusals=list(found),
        )
    params = {
        "device": device_params(device),
        "related": [device_params(p) for p in partitions_of(device, inventory)],
        "label": label,
        "set": set_name,
    }
    job = service.jobs.submit(INITIALISE_KIND, params)
    app.catalog.audit(
        principal.name,
        "media.initialise",
        device.identity,
        {"label": label, "set": set_name, "job": job.id, **principal.audit_details},
    )
    return _started(response, job)


@router.post("/media/{name}/export", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED)
def export_medium(
    name: str, principal: Operator, service: ServiceDep, response: Response
) -> JobPublic:
    """Export the medium's rotation set to it now (job ``usb_export``; one already queued or
    running is answered, one waiting for the disk is woken). A disk not plugged in waits."""
    app = service.app
    state = find_medium(app, name)
    job = submit_export(app, service.jobs, state.identity)
    app.catalog.audit(
        principal.name,
        "media.export",
        state.identity,
        {"label": state.label, "job": job.id, **principal.audit_details},
    )
    return _started(response, job)


@router.post("/media/{name}/eject", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED)
def eject_medium(
    name: str, principal: Operator, service: ServiceDep, response: Response
) -> JobPublic:
    """Flush and unmount the medium (job ``usb_eject``, after an export of it that runs): it is
    safe to remove afterwards."""
    app = service.app
    state = find_medium(app, name)
    job = submit_eject(app, service.jobs, state.identity)
    app.catalog.audit(
        principal.name,
        "media.eject",
        state.identity,
        {"label": state.label, "job": job.id, **principal.audit_details},
    )
    return _started(response, job)


@router.get("/media/offered", response_model=list[OfferedPublic])
def offered(principal: Viewer, service: ServiceDep) -> list[OfferedPublic]:
    """USB disks plugged in that are not appliance media, offered for initialising (never
    touched unasked), with why one may not be initialised now."""
    app = service.app
    inventory, _ = service.inventory()
    out = []
    for disk in offered_disks(app):
        device = inventory.block.get(str(disk.get("identity")))
        found = (
            initialise_refusals(app, device, inventory)
            if device is not None
            else ("is not plugged in now",)
        )
        shown = {**disk, "devnode": device.devnode if device else disk.get("devnode")}
        out.append(OfferedPublic(**shown, present=device is not None, refusals=list(found)))
    return out


# --- rotation sets ------------------------------------------------------------------------------


@router.get("/rotation", response_model=list[RotationSetPublic])
def get_rotation(principal: Viewer, service: ServiceDep) -> list[RotationSetPublic]:
    """The rotation sets: what each exports, how often a disk should come back, which disk is
    in, which are out, when each was last written and which are overdue."""
    return [RotationSetPublic(**s) for s in rotation_overview(service.app, service.now())]


@router.put("/rotation", response_model=list[RotationSetPublic])
def put_rotation(
    body: RotationUpdate, principal: Admin, service: ServiceDep
) -> list[RotationSetPublic]:
    """Create or change the sets named (their members stay: a disk joins a set when it is
    initialised); sets left out are kept. Checked in full before anything is written."""
    app = service.app
    parsed = [parse_set(s.model_dump()) for s in body.sets]  # every set checked before any write
    names = [s.name.casefold() for s in parsed]
    if len(set(names)) != len(names):
        raise InvalidInput("two rotation sets have the same name")
    for s in parsed:
        configure_set(
            app,
            s.name,
            assets=list(s.assets),
            keep_newest=s.keep_newest,
            rotate_days=s.rotate_days,
            verify=s.verify,
        )
    app.catalog.audit(
        principal.name,
        "rotation.update",
        "usb_rotation",
        {"sets": [s.name for s in parsed], **principal.audit_details},
    )
    return [RotationSetPublic(**s) for s in rotation_overview(app, service.now())]
