"""Locations: the places that hold copies of the store, and copying a point to one.

A folder (``pool_dir``) or a bucket (``s3_bucket``). Adding a location writes its identity file
there as root, so a folder passes the path rules (``appliance.path_rules.check_location_dir``):
an existing folder, not ``/``, no system folder, not in the data directory. A bucket is asked at
once (it exists, takes the credentials, answers); when it does not, the answer is 400
``location_refused`` in words and nothing is added. A bucket's credentials are write-only: kept
apart from the catalog (``appliance.locations.work.SECRET_OPTIONS``), never in an answer or the
audit log. A copy runs as a job (``copy``), resumable after a crash.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response, status

from api.deps import Admin, Operator, ServiceDep, Viewer
from api.errors import LocationRefused
from api.schemas import JobPublic
from api.schemas_locations import CopyCreate, LocationCreate, LocationPublic
from api.views import job_public
from appliance.catalog.records import LocationRecord, home_location_id
from appliance.engine import Appliance
from appliance.errors import LocationUnavailable, StoreError, TransientBackendError
from appliance.locations.work import location_backend

router = APIRouter(tags=["locations"])

#: Options of a location that may be shown (and audited): never credentials.
PUBLIC_OPTIONS = (
    "endpoint_url",
    "region",
    "addressing_style",
    "cold",
    "data_class",
    "lock_mode",
    "lock_days",
    "restore_tier",
)


#: Copy states of a point held in full (a cold copy is archived, or recalling).
HELD = ("present", "archived", "recalling")


def public_options(location: LocationRecord) -> dict[str, Any]:
    options = location.details.get("options", {}) or {}
    return {name: options[name] for name in PUBLIC_OPTIONS if options.get(name) is not None}


def location_public(
    app: Appliance, location: LocationRecord, *, reason: str | None = None
) -> LocationPublic:
    options = location.details.get("options", {}) or {}
    cold = location.access == "cold"
    data_class = options.get("data_class") or ("GLACIER" if options.get("cold") else None)
    lock_days = options.get("lock_days")
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
        copies=sum(c.state in HELD for c in app.catalog.copies_at(location.id)),
        last_seen_at=location.last_seen_at,
        require_mount=bool(options.get("require_mount")),
        lock_mode=options.get("lock_mode"),
        lock_days=int(lock_days) if lock_days is not None else None,
        data_class=data_class,
        restore_tier=str(options.get("restore_tier") or "Standard") if cold else None,
        endpoint_url=options.get("endpoint_url"),
        region=options.get("region"),
        addressing_style=options.get("addressing_style"),
        reason=reason,
    )


@router.get("/locations", response_model=list[LocationPublic])
def list_locations(principal: Viewer, service: ServiceDep) -> list[LocationPublic]:
    app = service.app
    return [location_public(app, loc) for loc in app.catalog.list_locations(app.repo.store_id)]


def _add_bucket(app: Appliance, body: LocationCreate) -> LocationRecord:
    """Add a bucket; what the bucket says against it becomes a 4xx in words."""
    assert body.address is not None  # LocationCreate checks it for kind s3_bucket
    options = body.bucket.backend_options() if body.bucket is not None else {}
    try:
        return app.add_location(
            body.address, kind="s3_bucket", label=body.label, offsite=True, options=options
        )
    except TransientBackendError:
        raise  # 503: asking again later may work
    except StoreError as exc:
        # A missing bucket, refused credentials, an unreachable endpoint (LocationUnavailable),
        # or a write of the identity file refused: the request names a place that cannot be
        # used. Errors with a status of their own (a bucket of another store: 409) keep it.
        if not isinstance(exc, LocationUnavailable) and exc.kind != "internal":
            raise
        raise LocationRefused(f"{exc.message}; the location was not added", **exc.details) from exc


@router.post("/locations", response_model=LocationPublic, status_code=status.HTTP_201_CREATED)
def add_location(body: LocationCreate, principal: Admin, service: ServiceDep) -> LocationPublic:
    """Add a folder, or a bucket, as a location of the store (its identity file is written
    there first)."""
    app = service.app
    if body.kind == "s3_bucket":
        location = _add_bucket(app, body)
    else:
        assert body.path is not None  # LocationCreate checks it for kind pool_dir
        location = app.add_location(
            body.path, label=body.label, require_mount=body.require_mount, offsite=body.offsite
        )
    app.catalog.audit(
        principal.name,
        "location.add",
        location.id,
        {
            "kind": location.kind,
            "address": location.address,
            "label": location.label,
            **public_options(location),
            **principal.audit_details,
        },
    )
    return location_public(app, location)


@router.post("/locations/{location_id}/check", response_model=LocationPublic)
def check_location(location_id: str, principal: Operator, service: ServiceDep) -> LocationPublic:
    """Open the location now and check its identity: it is marked available or unavailable,
    and ``reason`` says in words why it is unavailable."""
    app = service.app
    location = app.find_location(location_id)
    reason = None
    if location.id != home_location_id(app.repo.store_id):
        try:
            location_backend(app, location).close()
        except StoreError as exc:
            # location_backend marks the location offline for LocationUnavailable; a location
            # that answered otherwise wrongly (refused a read, did not answer) is not usable now.
            reason = exc.message
            if not isinstance(exc, LocationUnavailable):
                app.catalog.update_location(location.id, online=False)
    location = app.catalog.get_location(location.id)
    app.catalog.audit(
        principal.name,
        "location.check",
        location.id,
        {"online": reason is None, **principal.audit_details},
    )
    return location_public(app, location, reason=reason)


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
    read back and checked, the manifest goes last. At a cold bucket the copy is ``archived``
    (data packs in its cold class, locked until ``retain_until`` when the bucket locks)."""
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
