"""Locations: the places that hold copies of the store, and copying a point to one.

Adding a location writes its identity file there as root, so its folder passes the path rules
(``appliance.path_rules.check_location_dir``): an existing folder, not ``/``, no system folder,
not in the data directory. A copy runs as a job (``copy``), resumable after a crash.
"""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from api.deps import Admin, Operator, ServiceDep, Viewer
from api.schemas import CopyCreate, JobPublic, LocationCreate, LocationPublic
from api.views import job_public
from appliance.catalog.records import LocationRecord, home_location_id
from appliance.engine import Appliance

router = APIRouter(tags=["locations"])


def location_public(app: Appliance, location: LocationRecord) -> LocationPublic:
    return LocationPublic(
        id=location.id,
        label=location.label,
        kind=location.kind,
        address=location.address,
        access=location.access,
        online=location.online,
        offsite=location.offsite,
        removable=location.removable,
        immutable=location.immutable,
        home=location.id == home_location_id(app.repo.store_id),
        copies=len(app.catalog.copies_at(location.id, state="present")),
        last_seen_at=location.last_seen_at,
    )


@router.get("/locations", response_model=list[LocationPublic])
def list_locations(principal: Viewer, service: ServiceDep) -> list[LocationPublic]:
    app = service.app
    return [location_public(app, loc) for loc in app.catalog.list_locations(app.repo.store_id)]


@router.post("/locations", response_model=LocationPublic, status_code=status.HTTP_201_CREATED)
def add_location(body: LocationCreate, principal: Admin, service: ServiceDep) -> LocationPublic:
    """Add a folder as a location of the store (its identity file is written there first)."""
    app = service.app
    location = app.add_location(
        body.path, label=body.label, require_mount=body.require_mount, offsite=body.offsite
    )
    app.catalog.audit(
        principal.name,
        "location.add",
        location.id,
        {"address": location.address, "label": location.label, **principal.audit_details},
    )
    return location_public(app, location)


@router.delete("/locations/{location_id}", status_code=status.HTTP_204_NO_CONTENT)
def remove_location(location_id: str, principal: Admin, service: ServiceDep) -> Response:
    """Forget a location (409 while it holds copies); its data is left where it is."""
    app = service.app
    location = app.remove_location(location_id)
    app.catalog.audit(
        principal.name,
        "location.remove",
        location.id,
        {"label": location.label, **principal.audit_details},
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/points/{point_id}/copy", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED
)
def copy_point(
    point_id: str, body: CopyCreate, principal: Operator, service: ServiceDep, response: Response
) -> JobPublic:
    """Copy a point to a location, as a job: only the packs the location lacks move, each is
    read back and checked, the manifest goes last."""
    app = service.app
    point = app.point(point_id)
    location = app.find_location(body.location)
    job = service.jobs.submit("copy", {"point": point.id, "location": location.id})
    app.catalog.audit(
        principal.name,
        "point.copy",
        point.id,
        {"location": location.id, "job": job.id, **principal.audit_details},
    )
    response.headers["Location"] = f"/api/jobs/{job.id}"
    return job_public(job)
