"""Which point of a VM a failover boots: ``GET /api/assets/{name}/failover-points``.

The fail-over dialog lists the VM's image points with what decides between them (age, verify
state, last boot proof, where copies are) and preselects the one the failover would boot
without a choice (:func:`image.failover.choose_point`), with the reason in a sentence when that
is not simply the newest point. Starting the failover stays with ``POST .../failover`` (its
``point`` is checked there: another asset's point or a folder point is a 400).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import StoreService, Viewer
from api.routers.status import boot_test_public
from api.schemas_failover_points import (
    FailoverPointPublic,
    FailoverPointsPublic,
    PointCopyPublic,
)
from appliance.boot_verification import boot_test_result
from appliance.catalog.records import PointRecord
from appliance.errors import InvalidInput
from appliance.point_check import PROBLEMS_KEY, recorded_problems
from appliance.schedule import timezone_named
from image.failover import choice_reason, choose_point

router = APIRouter(tags=["failover"])


@router.get("/assets/{name}/failover-points", response_model=FailoverPointsPublic)
def failover_points(
    name: str,
    principal: Viewer,
    service: StoreService,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> FailoverPointsPublic:
    """The VM's image points, newest first, and the one a failover boots unless told otherwise,
    with why (``reason``: None when it is the newest point and that point verified ok)."""
    catalog = service.app.catalog
    asset = catalog.get_asset(name)  # 404 for an unknown asset
    if asset.kind != "vm":
        raise InvalidInput(
            f"{name} is a folder asset; only virtual machines can be failed over", asset=name
        )
    images = [p for p in catalog.list_points(asset=name) if p.kind == "image"]
    choice = choose_point(images)
    now = service.app.clock()
    tz = timezone_named(str(service.settings_document()["timezone"]))
    problems = recorded_problems(catalog.get_settings(PROBLEMS_KEY), images)
    proofs = catalog.last_boot_tests(per="point", asset=name) if images else {}
    labels = {loc.id: (loc.label, loc.kind) for loc in catalog.list_locations()}
    newest_first = sorted(images, key=lambda p: (p.created_at, p.id), reverse=True)[:limit]

    def public(point: PointRecord) -> FailoverPointPublic:
        proof = proofs.get(point.id)
        copies = [
            PointCopyPublic(
                location=labels.get(c.location_id or "", (c.location_id or "?", "unknown"))[0],
                location_kind=labels.get(c.location_id or "", ("", "unknown"))[1],
                state=c.state,
            )
            for c in catalog.copies_of(point.id)
            if c.state not in ("deleted", "lost")
        ]
        return FailoverPointPublic(
            id=point.id,
            created_at=point.created_at,
            age_seconds=round(max(0.0, (now - point.created_at).total_seconds()), 1),
            mode=point.mode,
            logical_bytes=point.logical_bytes,
            verify_status=point.verify_status,
            verified_at=point.verified_at,
            verify_problem=problems.get(point.id),
            boot_proof=boot_test_public(boot_test_result(proof)) if proof is not None else None,
            copies=copies,
        )

    return FailoverPointsPublic(
        asset=name,
        chosen=choice.point.id if choice.point else None,
        newest=choice.newest.id if choice.newest else None,
        why=choice.why,
        reason=choice_reason(choice, now=now, problems=problems, tz=tz),
        points=[public(p) for p in newest_first],
    )
