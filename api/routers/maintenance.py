"""Store maintenance: verify, retention (preview and prune), GC, catalog rebuild, recovery key."""

from __future__ import annotations

from fastapi import APIRouter, Response, status
from fastapi.responses import JSONResponse

from api.deps import Admin, Operator, ServiceDep, Viewer
from api.routers.system import recovery_key_gone
from api.schemas import (
    GcCreate,
    JobPublic,
    RecoveryKeyPublic,
    RetentionPointPublic,
    RetentionPreview,
    RetentionRequest,
    VerifyCreate,
)
from api.service import Service
from api.views import job_public
from appliance.catalog.records import JobRecord
from appliance.errors import InvalidInput
from appliance.policies import retention_rules
from appliance.retention import apply_retention, ransomware_holds

router = APIRouter(tags=["maintenance"])


def _accepted(response: Response, job: JobRecord) -> JobPublic:
    response.headers["Location"] = f"/api/jobs/{job.id}"
    return job_public(job)


@router.post("/verify", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED)
def verify_store(
    principal: Operator, service: ServiceDep, response: Response, body: VerifyCreate | None = None
) -> JobPublic:
    """Verify the store (or a budgeted slice of it: coverage carries over between runs)."""
    max_bytes = body.max_bytes if body else None
    if max_bytes is None:
        max_bytes = service.settings_document().get("verify_max_bytes")
    job = service.jobs.submit("verify", {"max_bytes": max_bytes})
    service.app.catalog.audit(
        principal.name, "store.verify", "store", {"job": job.id, **principal.audit_details}
    )
    return _accepted(response, job)


def _preview(service: Service, body: RetentionRequest) -> RetentionPreview:
    catalog = service.app.catalog
    catalog.get_asset(body.asset)
    rules = retention_rules(body.rules.rules())
    if rules.empty():
        raise InvalidInput("give at least one keep rule")
    points = catalog.list_points(asset=body.asset)
    decision = apply_retention(points, rules, ransomware_holds(points))
    created = {p.id: p.created_at for p in points}
    return RetentionPreview(
        asset=body.asset,
        keep=[
            RetentionPointPublic(id=pid, created_at=created[pid], reasons=reasons)
            for pid, reasons in decision.keep.items()
        ],
        remove=[RetentionPointPublic(id=pid, created_at=created[pid]) for pid in decision.remove],
    )


@router.post("/retention/preview", response_model=RetentionPreview)
def retention_preview(
    body: RetentionRequest, principal: Viewer, service: ServiceDep
) -> RetentionPreview:
    """What a prune with these rules would keep and remove (nothing is changed)."""
    return _preview(service, body)


@router.post("/retention/prune", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED)
def retention_prune(
    body: RetentionRequest, principal: Admin, service: ServiceDep, response: Response
) -> JobPublic:
    """Remove the points these rules do not keep, as a job (run GC afterwards to free space)."""
    _preview(service, body)  # validates the asset and the rules now, not in the job
    job = service.jobs.submit("prune", {"asset": body.asset, "rules": body.rules.rules()})
    service.app.catalog.audit(
        principal.name,
        "retention.prune",
        body.asset,
        {"rules": body.rules.rules(), "job": job.id, **principal.audit_details},
    )
    return _accepted(response, job)


@router.post("/gc", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED)
def gc(
    principal: Admin, service: ServiceDep, response: Response, body: GcCreate | None = None
) -> JobPublic:
    """Free the space of data no point references (older than the grace period), as a job."""
    grace = body.grace_seconds if body else float(service.settings_document()["gc_grace_seconds"])
    job = service.jobs.submit("gc", {"grace": grace})
    service.app.catalog.audit(
        principal.name,
        "store.gc",
        "store",
        {"grace": grace, "job": job.id, **principal.audit_details},
    )
    return _accepted(response, job)


@router.post("/catalog/rebuild", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED)
def rebuild_catalog(principal: Admin, service: ServiceDep, response: Response) -> JobPublic:
    """Recreate the catalog's view of the store from the store's manifests, as a job."""
    job = service.jobs.submit("rebuild_catalog", {})
    service.app.catalog.audit(
        principal.name, "catalog.rebuild", "store", {"job": job.id, **principal.audit_details}
    )
    return _accepted(response, job)


@router.get(
    "/recovery-key",
    response_model=RecoveryKeyPublic,
    responses={410: {"description": "confirmed already: only the console prints it now"}},
)
def recovery_key(principal: Admin, service: ServiceDep) -> RecoveryKeyPublic | JSONResponse:
    """The store's printable recovery key (print it; keep it apart from the appliance), until
    an admin confirmed keeping it on the first-run page (then 410, as /api/system/recovery-key)."""
    gone = recovery_key_gone(service)
    if gone is not None:
        return gone
    app = service.app
    app.catalog.audit(principal.name, "key.export", app.repo.store_id, principal.audit_details)
    return RecoveryKeyPublic(store_id=app.repo.store_id, recovery_key=app.repo.key.recovery_key())
