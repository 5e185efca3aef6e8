"""Where restores may go: the restore settings (areas, devices) and a point's restore choices.

The rules themselves live in ``appliance.path_rules``; the restore route (``points.py``) checks a
request against them before it submits the job, and the job checks again when it starts.
"""

from __future__ import annotations

import os

from fastapi import APIRouter

from api.deps import Admin, Operator, ServiceDep, StoreService
from api.schemas import RestoreChoices, RestoreDevicePublic, RestoreSettings, RestoreSettingsPublic
from appliance.engine import Appliance
from appliance.engine_restore import RESTORE_SETTINGS_KEY
from appliance.errors import PathRefused
from appliance.path_rules import (
    check_restore_area,
    check_restore_device,
    default_restore_area,
    device_state,
)

router = APIRouter(tags=["restores"])


def _devices(app: Appliance, paths: tuple[str, ...]) -> list[RestoreDevicePublic]:
    if not paths:
        return []  # no need to read the kernel's view of block devices
    facts = app.block_facts()
    out = []
    for path in paths:
        state = device_state(path, data_dir=app.data_dir.path, facts=facts)
        out.append(
            RestoreDevicePublic(
                path=state.path,
                unavailable=state.unavailable,
                block_device=state.block_device,
                size=state.size,
            )
        )
    return out


def _settings_public(app: Appliance) -> RestoreSettingsPublic:
    rules = app.restore_rules()
    return RestoreSettingsPublic(
        areas=list(rules.areas),
        devices=_devices(app, rules.devices),
        default_area=default_restore_area(app.data_dir.path),
    )


@router.get("/settings/restore", response_model=RestoreSettingsPublic)
def get_restore_settings(principal: Admin, service: ServiceDep) -> RestoreSettingsPublic:
    return _settings_public(service.app)


@router.put("/settings/restore", response_model=RestoreSettingsPublic)
def put_restore_settings(
    body: RestoreSettings, principal: Admin, service: ServiceDep
) -> RestoreSettingsPublic:
    """Replace the restore areas and devices. An area must not be ``/``, a system folder or
    inside the data directory; a device must be a block device (not mounted, not the system
    disk, not a pool) or an image file outside the system folders."""
    app = service.app
    data_dir = app.data_dir.path
    default = default_restore_area(data_dir)
    areas = [check_restore_area(a, data_dir=data_dir) for a in body.areas]
    areas = list(dict.fromkeys(a for a in areas if a != default))
    facts = app.block_facts()
    devices = list(
        dict.fromkeys(check_restore_device(d, data_dir=data_dir, facts=facts) for d in body.devices)
    )
    for area in areas:
        if not os.path.isdir(area):
            raise PathRefused(f"restore area {area} is not a folder", rule="missing", path=area)
    app.catalog.put_settings(RESTORE_SETTINGS_KEY, {"areas": areas, "devices": devices})
    app.catalog.audit(
        principal.name,
        "settings.restore",
        "restore",
        {"areas": areas, "devices": devices, **principal.audit_details},
    )
    return _settings_public(app)


@router.get("/points/{point_id}/restore-targets", response_model=RestoreChoices)
def restore_choices(point_id: str, principal: Operator, service: StoreService) -> RestoreChoices:
    """The targets a restore of this point may go to, for the restore dialog."""
    app = service.app
    point = app.point(point_id)
    rules = app.restore_rules()
    source: str | None = None
    unavailable: str | None = None
    try:
        source = app.check_restore_target(point.id, "source", on_conflict="overwrite").path
    except PathRefused as exc:
        unavailable = exc.message
    return RestoreChoices(
        point=point.id,
        kind=point.kind,
        areas=list(rules.areas),
        source=source,
        source_unavailable=unavailable,
        devices=_devices(app, rules.devices) if point.kind == "image" else [],
        download=point.kind == "files",
    )
