"""Protection policies: schedule (several cron entries), mode, retention and RPO of assets.

A policy covers one or more assets (``assets``, in order; ``asset`` alone names one, as before).
A schedule entry runs a backup of each (its mode) or, for the VM assets among them, a boot test
(mode ``boot_test``: an isolated test boot of each VM's newest point). A boot-test entry on a
policy without a VM is a 422 naming the entry. "Run now" submits one job per asset.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Response, status
from fastapi.exceptions import RequestValidationError

from api.deps import Admin, CatalogDep, Operator, ServiceDep, Viewer
from api.schemas import (
    BackupCreate,
    JobPublic,
    PolicyCreate,
    PolicyPublic,
    PolicyUpdate,
    ScheduleEntryPublic,
)
from api.service import Service
from api.views import job_public
from appliance.catalog import Catalog
from appliance.catalog.records import PolicyRecord
from appliance.errors import InvalidInput
from appliance.policies import POLICY_JOB_KIND
from appliance.schedule import check_schedule_for_assets, next_slot, parse_schedule

router = APIRouter(tags=["policies"])


def policy_public(
    service: Service, policy: PolicyRecord, state: dict[str, datetime] | None = None
) -> PolicyPublic:
    if state is None:
        state = service.app.catalog.schedule_state(policy.name).get(policy.name, {})
    schedule = parse_schedule(policy.schedule)
    now = service.now()
    tz = service.scheduler.tz if service.scheduler is not None else UTC
    entries = []
    for entry in schedule.entries:
        last = state.get(entry.key)
        entries.append(
            ScheduleEntryPublic(
                cron=entry.cron,
                mode=entry.mode,
                last_fired_at=last,
                next_at=next_slot(entry, max(now, last) if last else now, tz),
            )
        )
    return PolicyPublic(
        name=policy.name,
        assets=list(policy.assets),
        asset=policy.asset,
        schedule=schedule.document(),
        mode=policy.mode,
        retention={k: int(v) for k, v in policy.retention.items()},
        rpo_seconds=policy.rpo_seconds,
        entries=entries,
    )


def _record(catalog: Catalog, name: str, body: PolicyUpdate) -> PolicyRecord:
    schedule = body.schedule.model_dump()
    parsed = parse_schedule(schedule)  # rules the model cannot express (no entry listed twice)
    kinds = {a: catalog.get_asset(a).kind for a in body.assets}  # 404 for an unknown asset
    try:
        check_schedule_for_assets(parsed, kinds)
    except InvalidInput as exc:
        # A request the model could not check alone: answered like the model's own 422s.
        raise RequestValidationError(
            [
                {
                    "loc": ("body", "schedule", "entries", exc.details.get("entry", 0), "mode"),
                    "msg": exc.message,
                    "type": "value_error",
                }
            ]
        ) from None
    return PolicyRecord(
        name=name,
        assets=list(body.assets),
        schedule=schedule,
        mode=body.mode,
        retention=body.retention.rules(),
        rpo_seconds=body.rpo_seconds,
    )


def _entry_keys(policy: PolicyRecord) -> list[str]:
    return [entry.key for entry in parse_schedule(policy.schedule).entries]


@router.get("/policies", response_model=list[PolicyPublic])
def list_policies(
    principal: Viewer, service: ServiceDep, asset: str | None = None
) -> list[PolicyPublic]:
    catalog = service.app.catalog
    states = catalog.schedule_state()
    return [policy_public(service, p, states.get(p.name, {})) for p in catalog.list_policies(asset)]


@router.post("/policies", response_model=PolicyPublic, status_code=status.HTTP_201_CREATED)
def create_policy(body: PolicyCreate, principal: Admin, service: ServiceDep) -> PolicyPublic:
    catalog = service.app.catalog
    policy = catalog.add_policy(_record(catalog, body.name, body))
    # The schedule starts now: a new entry never fires for a slot before it existed.
    catalog.reset_schedule_state(policy.name, _entry_keys(policy), service.now())
    catalog.audit(
        principal.name,
        "policy.create",
        policy.name,
        {"assets": policy.assets, "schedule": policy.schedule, **principal.audit_details},
    )
    return policy_public(service, policy)


@router.get("/policies/{name}", response_model=PolicyPublic)
def get_policy(name: str, principal: Viewer, service: ServiceDep) -> PolicyPublic:
    return policy_public(service, service.app.catalog.get_policy(name))


@router.put("/policies/{name}", response_model=PolicyPublic)
def update_policy(
    name: str, body: PolicyUpdate, principal: Admin, service: ServiceDep
) -> PolicyPublic:
    catalog = service.app.catalog
    policy = catalog.update_policy(_record(catalog, name, body))
    catalog.reset_schedule_state(policy.name, _entry_keys(policy), service.now())
    catalog.audit(
        principal.name,
        "policy.update",
        name,
        {"assets": policy.assets, "schedule": policy.schedule, **principal.audit_details},
    )
    return policy_public(service, policy)


@router.delete("/policies/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_policy(name: str, principal: Admin, catalog: CatalogDep) -> Response:
    catalog.delete_policy(name)
    catalog.audit(principal.name, "policy.delete", name, principal.audit_details)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/policies/{name}/run", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED)
def run_policy(
    name: str,
    principal: Operator,
    service: ServiceDep,
    response: Response,
    body: BackupCreate | None = None,
) -> JobPublic:
    """Run the policy now: a backup job per asset (the policy's mode unless one is given), each
    followed by a prune job with the policy's retention when its backup succeeds. The answer is
    the first asset's job; ``X-Job-Ids`` lists every one."""
    catalog = service.app.catalog
    policy = catalog.get_policy(name)
    mode = (body.mode if body else None) or policy.mode
    jobs = [
        service.jobs.submit(
            POLICY_JOB_KIND,
            {
                "policy": policy.name,
                "asset": asset,
                "mode": mode,
                "trigger": "manual",
                "apply_retention": True,
            },
        )
        for asset in policy.assets
    ]
    catalog.audit(
        principal.name,
        "policy.run",
        name,
        {"jobs": [j.id for j in jobs], "mode": mode, **principal.audit_details},
    )
    response.headers["Location"] = f"/api/jobs/{jobs[0].id}"
    response.headers["X-Job-Ids"] = ",".join(j.id for j in jobs)
    return job_public(jobs[0])
