"""Recovery plans: VMs in ordered boot groups, failed over with one click or test-run.

Anyone signed in reads plans and their runs; an operator or admin creates, changes, deletes
and runs them (each audited). A run is a job (``plan_failover`` / ``plan_test``, see
``image.failover.plans``); the route checks first what it can (every VM has a point to boot) so
the page can say what is wrong before a job is queued, then answers 202 with the job.
"""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response, status

from api.deps import Operator, StoreService, Viewer
from api.schemas import JobPublic
from api.schemas_plans import PlanCreate, PlanId, PlanPublic, PlanRunPublic, PlanRunVm
from api.security import Principal
from api.service import Service
from api.views import job_public
from appliance.catalog.records import STOPPED_JOB_STATES
from appliance.catalog.records_plans import PlanRecord, PlanRunRecord
from appliance.errors import NotFound
from image.failover import parse_plan_groups

router = APIRouter(tags=["recovery plans"])

PlanPath = Annotated[PlanId, Path(description="the plan's id")]


def run_public(service: Service, run: PlanRunRecord) -> PlanRunPublic:
    result = run.result
    state, error = run.state, result.get("error")
    if state == "running" and run.job_id:
        # A run whose job ended without finishing it (a restart, a cancel) is over: say so
        # rather than show it running for ever.
        with contextlib.suppress(NotFound):
            job = service.app.catalog.get_job(run.job_id)
            if job.state in STOPPED_JOB_STATES:
                state = "failed"
                error = (
                    error or f"the run ended before every VM was proven (its job was {job.state})"
                )
    vms = [
        PlanRunVm(
            asset=str(vm.get("asset")),
            group=int(vm.get("group") or 0),
            point=vm.get("point"),
            state=str(vm.get("state") or "waiting"),
            session=vm.get("session"),
            started_at=vm.get("started_at"),
            proven_at=vm.get("proven_at"),
            rto_seconds=vm.get("rto_seconds"),
            error=vm.get("error"),
            code=vm.get("code"),
            screenshot_url=(
                f"/api/failover/{vm['session']}/screenshot"
                if vm.get("session") and vm.get("screenshot")
                else None
            ),
        )
        for vm in result.get("vms") or []
    ]
    return PlanRunPublic(
        id=run.id,
        plan_id=run.plan_id,
        plan_name=run.plan_name,
        kind=run.kind,
        state=state,
        job_id=run.job_id,
        requested_at=run.requested_at,
        finished_at=run.finished_at,
        total_rto_seconds=result.get("total_rto_seconds"),
        error=error,
        failed=result.get("failed"),
        vms=vms,
    )


def plan_public(service: Service, plan: PlanRecord) -> PlanPublic:
    catalog = service.app.catalog
    tests = catalog.list_plan_runs(plan.id, kind="test", limit=1)
    runs = catalog.list_plan_runs(plan.id, limit=1)
    return PlanPublic(
        id=plan.id,
        name=plan.name,
        groups=plan.groups,
        test_cron=plan.test_cron,
        created_at=plan.created_at,
        updated_at=plan.updated_at,
        last_test=run_public(service, tests[0]) if tests else None,
        last_run=run_public(service, runs[0]) if runs else None,
    )


def _groups(service: Service, body: PlanCreate) -> list[dict[str, Any]]:
    """The body's groups, validated (unknown or non-VM assets, a VM twice, empty groups)."""
    kinds = {a.name: a.kind for a in service.app.catalog.list_assets()}
    raw = [
        {
            "vms": [
                {
                    "asset": vm.asset,
                    "network": vm.network.model_dump(exclude_none=True) if vm.network else None,
                    "point": vm.point,
                }
                for vm in group.vms
            ],
            "after": group.after,
            "delay_seconds": group.delay_seconds,
        }
        for group in body.groups
    ]
    return parse_plan_groups(raw, kinds)


def _audit(
    service: Service, principal: Principal, action: str, plan: PlanRecord, **more: Any
) -> None:
    service.app.catalog.audit(
        principal.name,
        action,
        plan.name,
        {"plan": plan.id, **more, **principal.audit_details},
    )


@router.get("/plans", response_model=list[PlanPublic])
def list_plans(principal: Viewer, service: StoreService) -> list[PlanPublic]:
    """Every plan, by name, with its last test run and its last run of any kind."""
    return [plan_public(service, p) for p in service.app.catalog.list_plans()]


@router.post("/plans", response_model=PlanPublic, status_code=status.HTTP_201_CREATED)
def create_plan(
    body: PlanCreate, principal: Operator, service: StoreService, response: Response
) -> PlanPublic:
    plan = service.app.catalog.add_plan(body.name, _groups(service, body), test_cron=body.test_cron)
    _audit(service, principal, "plan.create", plan, assets=plan.assets, test_cron=plan.test_cron)
    response.headers["Location"] = f"/api/plans/{plan.id}"
    return plan_public(service, plan)


@router.get("/plans/{plan_id}", response_model=PlanPublic)
def get_plan(plan_id: PlanPath, principal: Viewer, service: StoreService) -> PlanPublic:
    return plan_public(service, service.app.catalog.get_plan(plan_id))


@router.put("/plans/{plan_id}", response_model=PlanPublic)
def update_plan(
    plan_id: PlanPath, body: PlanCreate, principal: Operator, service: StoreService
) -> PlanPublic:
    """Replace the plan's name, groups and test schedule."""
    plan = service.app.catalog.update_plan(
        plan_id, name=body.name, groups=_groups(service, body), test_cron=body.test_cron
    )
    _audit(service, principal, "plan.update", plan, assets=plan.assets, test_cron=plan.test_cron)
    return plan_public(service, plan)


@router.delete("/plans/{plan_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_plan(plan_id: PlanPath, principal: Operator, service: StoreService) -> Response:
    """Delete the plan; its past runs stay readable (``GET /api/plan-runs/{id}``)."""
    plan = service.app.catalog.delete_plan(plan_id)
    _audit(service, principal, "plan.delete", plan)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _run(
    service: Service, principal: Principal, response: Response, plan_id: str, kind: str
) -> JobPublic:
    catalog = service.app.catalog
    plan = catalog.get_plan(plan_id)
    for asset in plan.assets:
        if not any(p.kind == "image" for p in catalog.list_points(asset=asset)):
            raise NotFound(
                f"{asset} has no VM image recovery point to boot; back it up first", asset=asset
            )
    job_kind = "plan_test" if kind == "test" else "plan_failover"
    params = {"plan": plan.id, "name": plan.name, "assets": plan.assets}
    job = service.jobs.submit(job_kind, params)
    _audit(service, principal, f"plan.{kind}", plan, job=job.id, assets=plan.assets)
    response.headers["Location"] = f"/api/jobs/{job.id}"
    return job_public(job)


@router.post(
    "/plans/{plan_id}/failover", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED
)
def fail_plan_over(
    plan_id: PlanPath, principal: Operator, service: StoreService, response: Response
) -> JobPublic:
    """Fail every VM of the plan over, group by group (each VM on its plan network)."""
    return _run(service, principal, response, plan_id, "failover")


@router.post(
    "/plans/{plan_id}/test", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED
)
def test_plan(
    plan_id: PlanPath, principal: Operator, service: StoreService, response: Response
) -> JobPublic:
    """Test-run the plan: every VM booted isolated, proven, screenshotted and discarded."""
    return _run(service, principal, response, plan_id, "test")


@router.get("/plans/{plan_id}/runs", response_model=list[PlanRunPublic])
def list_plan_runs(
    plan_id: PlanPath,
    principal: Viewer,
    service: StoreService,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> list[PlanRunPublic]:
    """The plan's last runs, newest first (also of a plan deleted since)."""
    return [
        run_public(service, r) for r in service.app.catalog.list_plan_runs(plan_id, limit=limit)
    ]


@router.get("/plan-runs/{run_id}", response_model=PlanRunPublic)
def get_plan_run(run_id: PlanPath, principal: Viewer, service: StoreService) -> PlanRunPublic:
    return run_public(service, service.app.catalog.get_plan_run(run_id))
