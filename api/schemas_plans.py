"""Schemas of the recovery plan API: plans (boot groups of VMs), their runs and results."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints

from api.schemas import Cron, Name, Request
from api.schemas_failover import FailoverNetwork

#: A plan's name is for people ("Head office"): printable text, no control characters.
PlanName = Annotated[
    str, StringConstraints(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")
]
PlanId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{1,64}$")]


class PlanVm(Request):
    asset: Name
    #: Default: the asset's configured failover network. A test run is always isolated.
    network: FailoverNetwork | None = None
    #: Default: the point the failover would pick (the newest verified one).
    point: str | None = Field(default=None, min_length=1, max_length=64)


class PlanGroup(Request):
    #: Started side by side.
    vms: list[PlanVm] = Field(max_length=64)
    #: Before the next group starts: every VM's boot proof, or ``delay_seconds`` after the start.
    after: Literal["proof", "delay"] = "proof"
    delay_seconds: int = Field(default=0, ge=0, le=86_400)


class PlanCreate(Request):
    name: PlanName
    groups: list[PlanGroup] = Field(max_length=32)
    #: When a test run of the plan runs by itself (a five-field cron, in the appliance's time
    #: zone); null: only when asked.
    test_cron: Cron | None = None


class PlanRunVm(BaseModel):
    asset: str
    group: int
    point: str | None
    #: waiting, booting, proven, failed, not_started
    state: str
    session: str | None
    started_at: str | None
    proven_at: str | None
    rto_seconds: float | None
    error: str | None
    code: str | None
    #: The session's screenshot (``GET /api/failover/{session}/screenshot``), when there is one.
    screenshot_url: str | None


class PlanRunPublic(BaseModel):
    id: str
    plan_id: str
    plan_name: str
    #: failover or test
    kind: str
    #: running, succeeded, failed
    state: str
    job_id: str | None
    requested_at: datetime
    finished_at: datetime | None
    #: From the click to the last VM's boot proof (null unless every VM was proven).
    total_rto_seconds: float | None
    error: str | None
    failed: str | None
    vms: list[PlanRunVm]


class PlanPublic(BaseModel):
    id: str
    name: str
    groups: list[dict[str, Any]]
    test_cron: str | None
    created_at: datetime
    updated_at: datetime
    last_test: PlanRunPublic | None
    last_run: PlanRunPublic | None
