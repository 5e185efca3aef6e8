"""Tiering: the rules that move aged points to cold buckets, the plan they make now with its
estimated cost, and a run on demand (job ``tier``; the scheduler starts runs by the settings'
cron). The rules are validated by :func:`tiering.rules.parse_settings` (422 in words)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response, status
from pydantic import BaseModel

from api.deps import Admin, Operator, ServiceDep, Viewer
from api.schemas import JobPublic
from api.views import job_public
from tiering.pricing import check_prices, effective_prices
from tiering.work import PRICES_KEY, load_settings, preview, save_settings

router = APIRouter(tags=["tiering"])


class TieringPublic(BaseModel):
    #: The settings document: rules, schedule {cron, window_hours}, bandwidth_mib_s.
    settings: dict[str, Any]
    #: What a run would do now: copies, local drops, problems, bytes per class, cost.
    plan: dict[str, Any]


@router.get("/tiering", response_model=TieringPublic)
def get_tiering(principal: Viewer, service: ServiceDep) -> TieringPublic:
    """The tiering settings and the plan a run would carry out now (a preview: nothing moves)."""
    app = service.app
    return TieringPublic(settings=load_settings(app).to_dict(), plan=preview(app))


@router.put("/tiering", response_model=TieringPublic)
def put_tiering(body: dict[str, Any], principal: Admin, service: ServiceDep) -> TieringPublic:
    """Replace the tiering settings (validated; the reply previews the plan they make)."""
    app = service.app
    settings = save_settings(app, body)
    app.catalog.audit(
        principal.name,
        "tiering.settings",
        "tiering",
        {"rules": [r.name for r in settings.rules], **principal.audit_details},
    )
    return TieringPublic(settings=settings.to_dict(), plan=preview(app))


@router.post("/tiering/run", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED)
def run_tiering_now(principal: Operator, service: ServiceDep, response: Response) -> JobPublic:
    """Carry out the plan now, as a job (no time window)."""
    job = service.jobs.submit("tier", {"trigger": "manual"})
    service.app.catalog.audit(
        principal.name, "tiering.run", "tiering", {"job": job.id, **principal.audit_details}
    )
    response.headers["Location"] = f"/api/jobs/{job.id}"
    return job_public(job)


@router.get("/tiering/prices")
def get_prices(principal: Viewer, service: ServiceDep) -> dict[str, Any]:
    """The prices the cost estimates use: the dated file shipped, with the settings' override."""
    return effective_prices(service.app.catalog.get_settings(PRICES_KEY))


@router.put("/tiering/prices")
def put_prices(body: dict[str, Any], principal: Admin, service: ServiceDep) -> dict[str, Any]:
    """Override prices (same shape as the file: classes, retrieval, as_of, currency)."""
    app = service.app
    prices = effective_prices(check_prices(body))
    app.catalog.put_settings(PRICES_KEY, body)
    app.catalog.audit(principal.name, "tiering.prices", "tiering", principal.audit_details)
    return prices
