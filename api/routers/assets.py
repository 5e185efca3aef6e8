"""Assets: what the appliance protects (a folder, or a VM's disks and definition)."""

from __future__ import annotations

import os

from fastapi import APIRouter, Response, status

from api.deps import Admin, CatalogDep, Operator, ServiceDep, StoreService, Viewer
from api.schemas import AssetCreate, AssetPublic, AssetUpdate, BackupCreate, JobPublic
from api.service import Service
from api.views import job_public
from appliance.catalog.records import AssetRecord
from appliance.errors import InvalidInput
from appliance.path_rules import check_disk_source
from appliance.policies import backup_job_for
from appliance.vmspec import parse_vm_source, vm_source

router = APIRouter(tags=["assets"])


def asset_public(asset: AssetRecord, policies: list[str]) -> AssetPublic:
    disks: list[str] = []
    spec: str | None = None
    if asset.kind == "files":
        path = asset.source or None
    else:
        path = None
        disks, spec = parse_vm_source(asset.source)
    return AssetPublic(
        name=asset.name,
        kind=asset.kind,
        path=path,
        disks=disks,
        vm_spec=spec,
        description=asset.description,
        created_at=asset.created_at,
        policies=policies,
    )


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _check_paths(service: Service, kind: str, path: str | None, disks: list[str]) -> None:
    """Sources must exist, and never lie inside the data directory (the store backing itself
    up, or its secrets offered for download); VM disks follow the disk-source rules of
    ``appliance.path_rules`` (an image file or a block device, no system file, no mounted or
    system disk)."""
    data_dir = str(service.settings.data_dir)
    if kind == "files":
        if not path or disks:
            raise InvalidInput("a files asset needs 'path' (a folder) and no 'disks'")
        if not os.path.isdir(path):
            raise InvalidInput(f"{path} is not a folder on the appliance", path=path)
        if _inside(path, data_dir) or _inside(data_dir, path):
            raise InvalidInput("an asset must not contain or lie inside the data directory")
        return
    if path or not disks:
        raise InvalidInput("a vm asset needs 'disks' (disk image paths) and no 'path'")
    facts = service.app.block_facts()
    for disk in disks:
        check_disk_source(disk, data_dir=data_dir, facts=facts)


def _policies_by_asset(catalog: CatalogDep) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for policy in catalog.list_policies():
        for asset in policy.assets:
            out.setdefault(asset, []).append(policy.name)
    return out


@router.get("/assets", response_model=list[AssetPublic])
def list_assets(principal: Viewer, service: StoreService) -> list[AssetPublic]:
    catalog = service.app.catalog
    policies = _policies_by_asset(catalog)
    return [asset_public(a, policies.get(a.name, [])) for a in catalog.list_assets()]


@router.post("/assets", response_model=AssetPublic, status_code=status.HTTP_201_CREATED)
def create_asset(body: AssetCreate, principal: Admin, service: ServiceDep) -> AssetPublic:
    _check_paths(service, body.kind, body.path, body.disks)
    if body.vm_spec is not None and body.kind != "vm":
        raise InvalidInput("only a vm asset has a vm_spec")
    source = (body.path or "") if body.kind == "files" else vm_source(body.disks, body.vm_spec)
    catalog = service.app.catalog
    asset = catalog.add_asset(body.name, body.kind, source, body.description)
    catalog.audit(
        principal.name,
        "asset.create",
        asset.name,
        {"kind": asset.kind, "source": source, **principal.audit_details},
    )
    return asset_public(asset, [])


@router.get("/assets/{name}", response_model=AssetPublic)
def get_asset(name: str, principal: Viewer, service: StoreService) -> AssetPublic:
    catalog = service.app.catalog
    return asset_public(catalog.get_asset(name), _policies_by_asset(catalog).get(name, []))


@router.put("/assets/{name}", response_model=AssetPublic)
def update_asset(
    name: str, body: AssetUpdate, principal: Admin, service: ServiceDep
) -> AssetPublic:
    catalog = service.app.catalog
    current = asset_public(catalog.get_asset(name), [])
    path = body.path if body.path is not None else current.path
    disks = body.disks if body.disks is not None else current.disks
    spec = body.vm_spec if body.vm_spec is not None else current.vm_spec
    if current.kind == "files":
        _check_paths(service, "files", path, [])
        if body.disks or body.vm_spec:
            raise InvalidInput("a files asset has no disks or vm_spec")
        source = path or ""
    else:
        _check_paths(service, "vm", None, disks)
        if body.path is not None:
            raise InvalidInput("a vm asset has no path; give 'disks'")
        source = vm_source(disks, spec)
    description = body.description if body.description is not None else current.description
    asset = catalog.update_asset(name, source, description)
    catalog.audit(
        principal.name, "asset.update", name, {"source": source, **principal.audit_details}
    )
    return asset_public(asset, _policies_by_asset(catalog).get(name, []))


@router.delete("/assets/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_asset(name: str, principal: Admin, catalog: CatalogDep) -> Response:
    """Forget an asset without points or policies (409 otherwise: prune and delete them first)."""
    catalog.delete_asset(name)
    catalog.audit(principal.name, "asset.delete", name, principal.audit_details)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/assets/{name}/backup", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED
)
def backup_asset(
    name: str,
    principal: Operator,
    service: ServiceDep,
    response: Response,
    body: BackupCreate | None = None,
) -> JobPublic:
    """Back up the asset now (a job); its policies' retention is not applied."""
    catalog = service.app.catalog
    asset = catalog.get_asset(name)
    kind, params = backup_job_for(asset, (body.mode if body else None) or "incremental")
    job = service.jobs.submit(kind, params)
    catalog.audit(
        principal.name,
        "asset.backup",
        name,
        {"job": job.id, "mode": params["mode"], **principal.audit_details},
    )
    response.headers["Location"] = f"/api/jobs/{job.id}"
    return job_public(job)
