"""The records of recovery plans (revision 0010): plain frozen values, free of any database type.

A plan's ``groups`` is its stored JSON document: an ordered list of boot groups, each
``{"vms": [{"asset": name, "network": dict | None, "point": id | None}], "after": "proof" |
"delay", "delay_seconds": int}``. Its meaning and validation live in
:mod:`image.failover.plan_rules`; the catalog keeps it as given (already validated).

A run is one failover or test run of a plan: the click (``requested_at``), its state and its
``result`` (each VM's session, times and RTO, the plan's total), written as the run goes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: What a run of a plan does: fail every VM over, or boot them isolated, prove and discard.
PLAN_RUN_KINDS = frozenset({"failover", "test"})
#: ``running`` until every VM is proven (``succeeded``) or one fails (``failed``).
PLAN_RUN_STATES = frozenset({"running", "succeeded", "failed"})


@dataclass(frozen=True)
class PlanRecord:
    id: str
    name: str
    groups: list[dict[str, Any]]
    #: A five-field cron expression of scheduled test runs, or None.
    test_cron: str | None
    created_at: datetime
    updated_at: datetime
    #: The test slot the schedule last fired for (or when the schedule was set).
    test_last_slot: datetime | None = None

    @property
    def assets(self) -> list[str]:
        """Every VM of the plan, in boot order."""
        return [str(vm["asset"]) for group in self.groups for vm in group.get("vms", [])]


@dataclass(frozen=True)
class PlanRunRecord:
    id: str
    plan_id: str
    plan_name: str
    kind: str
    state: str
    job_id: str | None
    requested_at: datetime
    finished_at: datetime | None
    result: dict[str, Any] = field(default_factory=dict)
