"""The store's verify schedule: when a slice of the store is verified by itself.

``GET``/``PUT /api/settings/verify``. The slice's size is the settings' ``verify_max_bytes``
(``PUT /api/settings``); the decision and the job live in :mod:`appliance.verify_schedule`.
"""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import Admin, ServiceDep, Viewer
from api.schemas_verify import VerifySchedulePublic, VerifyScheduleUpdate
from api.service import Service
from appliance.schedule import timezone_named
from appliance.verify_schedule import last_slot, load_schedule, next_slot, set_schedule

router = APIRouter(tags=["maintenance"])


def _public(service: Service) -> VerifySchedulePublic:
    document = service.settings_document()
    schedule = load_schedule(service.app)
    last = last_slot(service.app)
    now = service.now()
    after = max(now, last) if last else now
    return VerifySchedulePublic(
        cron=schedule.cron,
        timezone=str(document["timezone"]),
        max_bytes=document.get("verify_max_bytes"),
        next_at=next_slot(schedule.cron, after, timezone_named(str(document["timezone"]))),
        last_slot=last if schedule.cron else None,
    )


@router.get("/settings/verify", response_model=VerifySchedulePublic)
def get_verify_schedule(principal: Viewer, service: ServiceDep) -> VerifySchedulePublic:
    return _public(service)


@router.put("/settings/verify", response_model=VerifySchedulePublic)
def put_verify_schedule(
    body: VerifyScheduleUpdate, principal: Admin, service: ServiceDep
) -> VerifySchedulePublic:
    """Set when the store is verified by itself (null: never); the schedule starts now."""
    set_schedule(service.app, body.cron, service.now())
    service.app.catalog.audit(
        principal.name,
        "settings.verify_schedule",
        "verify",
        {"cron": body.cron, **principal.audit_details},
    )
    return _public(service)
