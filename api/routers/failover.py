"""Failover: boot a protected VM straight from a recovery point, watch it, stop, move, fail back.

Starting, stopping, migrating and failing back are jobs (``image.failover`` job kinds); these
routes check what they can at once (the asset is a VM with an image point, the session exists) so
the page can say what is wrong before a job is queued, then answer 202 with the job.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Response, status
from fastapi.responses import FileResponse, PlainTextResponse

from api.deps import Admin, Operator, StoreService, Viewer
from api.schemas import JobPublic
from api.schemas_failover import (
    BootTestCreate,
    FailbackCreate,
    FailoverCreate,
    FailoverDetail,
    FailoverMigrate,
    FailoverNetwork,
    FailoverSessionPublic,
    FailoverSettingsPublic,
    FailoverSettingsUpdate,
    FailoverStop,
    HostNetworkPublic,
)
from api.security import Principal
from api.service import Service
from api.views import job_public
from appliance.errors import InvalidInput, NotFound
from appliance.path_rules import check_area_path, check_image_output
from image.failover.network import check_network_on_host, network_from_dict
from image.host_network import read_host_network

router = APIRouter(tags=["failover"])

PNG_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "the console screenshot"}
}
TEXT_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/plain": {}}, "description": "the tail of the serial console"}
}


def session_public(info: dict[str, Any]) -> FailoverSessionPublic:
    details = dict(info.get("details") or {})
    return FailoverSessionPublic(
        id=info["id"],
        asset=info["asset"],
        point_id=info["point_id"],
        state=info["state"],
        purpose=str(details.get("purpose") or "failover"),
        started_at=info["started_at"],
        rto_seconds=details.get("rto_seconds"),
        accel=details.get("accel"),
        storage=str(details.get("storage") or "backup"),
        ports={str(k): int(v) for k, v in (details.get("ports") or {}).items()},
        error=details.get("error"),
        live=bool(info.get("live", False)),
        details=details,
    )


def network_params(network: FailoverNetwork) -> dict[str, Any]:
    """The request's network in the form the failover manager stores and takes."""
    return {
        "mode": network.mode,
        "port_forwards": [[f.host, f.guest] for f in network.port_forwards],
        **({"bridge": network.bridge} if network.bridge else {}),
        **({"address": str(network.address)} if network.address else {}),
    }


def _check_network(params: dict[str, Any]) -> None:
    """Refuse, before a job is queued, a network this appliance cannot give (a missing bridge:
    ``bridge_missing``; NAT forwards on an address that is not its own)."""
    network = network_from_dict(params.get("network"))
    if network.mode != "isolated":
        check_network_on_host(network, read_host_network())


def _check_vm_point(service: Service, name: str, point: str | None) -> None:
    """A clear 4xx before a job is queued: the asset is a VM with a VM image point."""
    catalog = service.app.catalog
    asset = catalog.get_asset(name)
    if asset.kind != "vm":
        raise InvalidInput(
            f"{name} is a folder asset; only virtual machines can be failed over", asset=name
        )
    if point:
        record = catalog.get_point(point)
        if record.asset != name:
            raise InvalidInput(f"point {record.id} belongs to {record.asset}, not {name}")
        if record.kind != "image":
            raise InvalidInput(f"point {record.id} is not a VM image point")
    elif not any(p.kind == "image" for p in catalog.list_points(asset=name)):
        raise NotFound(
            f"{name} has no VM image recovery point to fail over to; back it up first", asset=name
        )


def _check_location(service: Service, location: str | None) -> dict[str, Any]:
    """The job's ``location`` parameter, as the location's id (404 for an unknown one)."""
    if location is None:
        return {}
    return {"location": service.app.find_location(location).id}


def _submit(
    service: Service,
    principal: Principal,
    response: Response,
    kind: str,
    params: dict[str, Any],
    action: str,
    target: str,
) -> JobPublic:
    job = service.jobs.submit(kind, params)
    service.app.catalog.audit(
        principal.name,
        action,
        target,
        {
            "job": job.id,
            **{k: v for k, v in params.items() if k != "proof"},
            **principal.audit_details,
        },
    )
    response.headers["Location"] = f"/api/jobs/{job.id}"
    return job_public(job)


@router.post(
    "/assets/{name}/failover", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED
)
def fail_over(
    name: str,
    principal: Operator,
    service: StoreService,
    response: Response,
    body: FailoverCreate | None = None,
) -> JobPublic:
    """Boot the VM from a recovery point (default: the newest verified one) and prove the boot."""
    body = body or FailoverCreate()
    location = _check_location(service, body.location)
    _check_vm_point(service, name, body.point)
    params: dict[str, Any] = {"asset": name, **location}
    if body.point:
        params["point"] = body.point
    if body.network is not None:
        params["network"] = network_params(body.network)
    else:
        configured = service.failovers.asset_settings(name).get("network")
        if configured:
            params["network"] = configured
    _check_network(params)
    return _submit(service, principal, response, "failover_start", params, "asset.failover", name)


@router.post(
    "/assets/{name}/boot-test", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED
)
def boot_test(
    name: str,
    principal: Operator,
    service: StoreService,
    response: Response,
    body: BootTestCreate | None = None,
) -> JobPublic:
    """Boot a point isolated, record its RTO and screenshot, then shut it down and discard it."""
    point = body.point if body else None
    location = _check_location(service, body.location if body else None)
    _check_vm_point(service, name, point)
    params: dict[str, Any] = {"asset": name, **({"point": point} if point else {}), **location}
    return _submit(service, principal, response, "boot_test", params, "asset.boot_test", name)


def _settings_public(name: str, stored: dict[str, Any]) -> FailoverSettingsPublic:
    return FailoverSettingsPublic(
        asset=name,
        proof=dict(stored.get("proof") or {}),
        network=dict(stored.get("network") or {}),
    )


@router.get("/assets/{name}/failover-settings", response_model=FailoverSettingsPublic)
def get_failover_settings(
    name: str, principal: Viewer, service: StoreService
) -> FailoverSettingsPublic:
    """How the asset's failovers prove their boot, and their network."""
    service.app.catalog.get_asset(name)  # 404 for an unknown asset
    return _settings_public(name, service.failovers.asset_settings(name))


@router.put("/assets/{name}/failover-settings", response_model=FailoverSettingsPublic)
def put_failover_settings(
    name: str, body: FailoverSettingsUpdate, principal: Admin, service: StoreService
) -> FailoverSettingsPublic:
    """Set the boot proof and/or network of the asset's failovers (a part left out is kept)."""
    asset = service.app.catalog.get_asset(name)
    if asset.kind != "vm":
        raise InvalidInput(f"{name} is a folder asset; only virtual machines fail over", asset=name)
    proof = body.proof.model_dump() if body.proof is not None else None
    network = network_params(body.network) if body.network is not None else None
    stored = service.failovers.set_asset_settings(name, proof=proof, network=network)
    service.app.catalog.audit(
        principal.name,
        "asset.failover_settings",
        name,
        {"proof": proof, "network": network, **principal.audit_details},
    )
    return _settings_public(name, stored)


@router.get("/failover", response_model=list[FailoverSessionPublic])
def list_failovers(
    principal: Viewer, service: StoreService, asset: str | None = None
) -> list[FailoverSessionPublic]:
    """Failover sessions and boot tests, newest first."""
    manager = service.failovers
    return [session_public(manager.get(s["id"])) for s in manager.list(asset)]


@router.get("/failover/{session_id}", response_model=FailoverDetail)
def get_failover(session_id: str, principal: Viewer, service: StoreService) -> FailoverDetail:
    """One session, with the tail of the guest's serial console."""
    manager = service.failovers
    public = session_public(manager.get(session_id))
    return FailoverDetail(
        **public.model_dump(),
        serial_log=manager.serial_log(session_id),
        addresses=manager.addresses(session_id),
    )


@router.get("/network/bridges", response_model=HostNetworkPublic)
def list_bridges(principal: Operator) -> HostNetworkPublic:
    """The appliance's network bridges with their links, and its IPv4 addresses (from the host,
    ``ip -j``); what a failover's network can use."""
    return HostNetworkPublic.model_validate(read_host_network().to_dict())


@router.get(
    "/failover/{session_id}/screenshot", response_class=FileResponse, responses=PNG_RESPONSE
)
def failover_screenshot(session_id: str, principal: Viewer, service: StoreService) -> FileResponse:
    """The console: fresh while the VM runs, else the last one kept (404 if there is none)."""
    path = service.failovers.screenshot(session_id)
    if path is None:
        raise NotFound(f"failover session {session_id} has no screenshot yet", session=session_id)
    return FileResponse(path, media_type="image/png")


@router.get(
    "/failover/{session_id}/serial", response_class=PlainTextResponse, responses=TEXT_RESPONSE
)
def failover_serial(
    session_id: str,
    principal: Viewer,
    service: StoreService,
    max_bytes: int = Query(default=65536, ge=1, le=1 << 20),
) -> PlainTextResponse:
    """The tail of the guest's serial console (empty until QEMU has written to it)."""
    manager = service.failovers
    service.app.catalog.get_failover_session(session_id)  # 404 for an unknown session
    return PlainTextResponse(manager.serial_log(session_id, max_bytes=max_bytes))


def _session_job(
    service: Service,
    principal: Principal,
    response: Response,
    session_id: str,
    kind: str,
    params: dict[str, Any],
    action: str,
) -> JobPublic:
    service.app.catalog.get_failover_session(session_id)  # 404 before a job is queued
    return _submit(
        service, principal, response, kind, {"session": session_id, **params}, action, session_id
    )


@router.post(
    "/failover/{session_id}/stop", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED
)
def stop_failover(
    session_id: str,
    principal: Operator,
    service: StoreService,
    response: Response,
    body: FailoverStop | None = None,
) -> JobPublic:
    """Power the VM down (ACPI, then quit, then kill); ``discard`` also deletes its overlays."""
    params = {"discard": True} if body and body.discard else {}
    return _session_job(
        service, principal, response, session_id, "failover_stop", params, "failover.stop"
    )


@router.post(
    "/failover/{session_id}/migrate",
    response_model=JobPublic,
    status_code=status.HTTP_202_ACCEPTED,
)
def migrate_failover(
    session_id: str,
    principal: Operator,
    service: StoreService,
    response: Response,
    body: FailoverMigrate | None = None,
) -> JobPublic:
    """Move the running VM's disks off the backup onto local storage (it keeps running). A
    ``target_dir`` must lie inside a restore area (default: the failover's own folder)."""
    params = {}
    if body and body.target_dir:
        check_area_path(body.target_dir, service.app.restore_rules())
        params["target_dir"] = body.target_dir
    return _session_job(
        service, principal, response, session_id, "failover_migrate", params, "failover.migrate"
    )


@router.post(
    "/failover/{session_id}/failback",
    response_model=JobPublic,
    status_code=status.HTTP_202_ACCEPTED,
)
def failback_failover(
    session_id: str,
    principal: Operator,
    service: StoreService,
    response: Response,
    body: FailbackCreate | None = None,
) -> JobPublic:
    """Keep what changed during the failover: a new point, and/or written back to a disk: the
    ``original`` images, or a new image file inside a restore area or a restore device."""
    body = body or FailbackCreate()
    if not body.new_point and not body.write_to:
        raise InvalidInput("a failback makes a new point, writes the disks back, or both")
    params: dict[str, Any] = {"new_point": body.new_point, "format": body.format}
    if body.write_to == "original" and service.store_taken_over:
        # The disks the source backed up are the source's paths, not this appliance's.
        raise InvalidInput(
            "a taken-over store's VM has no original disks here: write to a restore area"
        )
    if body.write_to:
        if body.write_to != "original":
            # A new image goes into a restore area or onto a registered restore device.
            app = service.app
            check_image_output(body.write_to, app.restore_rules(), app.block_facts())
        params["write_to"] = body.write_to
    return _session_job(
        service, principal, response, session_id, "failover_failback", params, "failover.failback"
    )
