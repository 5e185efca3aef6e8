"""Read-mostly views of the whole appliance: dashboard, settings, audit log, metrics (the pools
are in :mod:`api.routers.hardware`, with the disks they are made of).

The dashboard and ``/metrics`` take their numbers from :mod:`appliance.protection` (RPO status,
growth trend) with the service's clock, so tests pin "now". Boot verification comes from the
boot-test sessions in the catalog (:mod:`appliance.boot_verification`): each VM's last boot test
and last proven boot, and the dashboard's alerts (a failed last boot test, a missed RPO).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse

from api.deps import Admin, CatalogDep, ServiceDep, Viewer
from api.protection_views import attention_public, legs_public, reason_public, summary_public
from api.schemas import (
    AlertPublic,
    AssetStatus,
    AuditPublic,
    BootTestPublic,
    CapacityPublic,
    CapacitySample,
    JobCounts,
    SettingsPublic,
    SettingsUpdate,
)
from api.schemas_protection import AssetProtectionPublic, ProtectionDashboardPublic
from api.service import Service
from api.views import copies_public
from appliance.boot_verification import BootTestResult, boot_test_result
from appliance.catalog import Catalog
from appliance.catalog.records import FailoverSessionRecord, JobRecord, PointRecord
from appliance.protection import filesystem_usage, growth, last_good_point, rpo_status
from appliance.protection_facts import gather_facts
from appliance.protection_status import AssetProtection, asset_status

router = APIRouter(tags=["status"])
metrics_router = APIRouter(tags=["status"])

GROWTH_DAYS = 30
SEVERITY_ORDER = {"critical": 0, "warning": 1}


def boot_test_public(result: BootTestResult) -> BootTestPublic:
    """A decided boot test (the catalog's ``last_boot_tests`` leaves out running ones)."""
    return BootTestPublic(
        state="proven" if result.state == "proven" else "failed",
        session=result.session,
        point_id=result.point_id,
        at=result.at,
        rto_seconds=result.rto_seconds,
        failed_check=result.failed_check,
        error=result.error,
        screenshot_url=(
            f"/api/failover/{result.session}/screenshot" if result.has_screenshot else None
        ),
        link=f"#/failover/{result.session}",
    )


def _boot_tests(
    last: FailoverSessionRecord | None, proven: FailoverSessionRecord | None
) -> tuple[BootTestPublic, BootTestPublic | None]:
    """(last boot test, or state ``never``; last proven boot or None) of one VM asset."""
    if last is None:
        return BootTestPublic(state="never"), None
    return (
        boot_test_public(boot_test_result(last)),
        boot_test_public(boot_test_result(proven)) if proven is not None else None,
    )


def _period(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}".replace(".0 ", " ")
    return f"{seconds:.0f} s"


def dashboard_alerts(assets: list[AssetStatus]) -> list[AlertPublic]:
    """A failed last boot test is critical (the VM may not come back); a missed RPO a warning."""
    alerts: list[AlertPublic] = []
    for a in assets:
        test = a.last_boot_test
        if test is not None and test.state == "failed":
            alerts.append(
                AlertPublic(
                    severity="critical",
                    kind="boot_test_failed",
                    asset=a.asset,
                    message=f"last boot test of {a.asset} failed: {test.failed_check}",
                    at=test.at,
                    link=test.link or "#/assets",
                )
            )
        if a.rpo_status == "missed":
            target = _period(a.rpo_seconds or 0)
            why = (
                f"its newest good point is {_period(a.age_seconds or 0)} old (target {target})"
                if a.last_point_id
                else f"it has no good recovery point yet (target {target})"
            )
            alerts.append(
                AlertPublic(
                    severity="warning",
                    kind="rpo_missed",
                    asset=a.asset,
                    message=f"RPO missed for {a.asset}: {why}",
                    at=a.last_point_at,
                    link="#/assets",
                )
            )
    alerts.sort(key=lambda al: SEVERITY_ORDER[al.severity])
    return alerts


def _capacity(service: Service, points: list[PointRecord], now: datetime) -> CapacityPublic:
    usage = filesystem_usage(service.app.data_dir.store_path)
    trend = growth(points, now, GROWTH_DAYS)
    return CapacityPublic(
        total_bytes=usage.total_bytes,
        free_bytes=usage.free_bytes,
        used_bytes=usage.used_bytes,
        store_bytes=service.store_bytes(),
        growth_bytes_per_day=round(trend.bytes_per_day, 1),
        days_until_full=trend.days_until_full(usage.free_bytes),
        series=[CapacitySample(day=day, bytes=total) for day, total in trend.series],
        history_days=trend.history_days,
    )


@router.get("/dashboard", response_model=ProtectionDashboardPublic)
def dashboard(principal: Viewer, service: ServiceDep) -> ProtectionDashboardPublic:
    """Per asset: its verdict (state, reasons with their fixes, 3-2-1 legs), last good point,
    its age, RPO target and status, copies and sizes, and for a VM its last boot test and last
    proven boot; every asset that is not protected, worst first; alerts (failed boot tests,
    missed RPOs); the pool's capacity with a 30-day growth trend; job counts."""
    catalog = service.app.catalog
    now = service.now()
    points = catalog.list_points()
    stored: dict[str, int] = defaultdict(int)
    counts_by_asset: dict[str, int] = defaultdict(int)
    for point in points:
        stored[point.asset] += point.stored_bytes
        counts_by_asset[point.asset] += 1
    statuses = [asset_status(facts, now) for facts in gather_facts(catalog)]
    assets = [
        _asset_public(catalog, s, now, counts_by_asset[s.asset], stored[s.asset]) for s in statuses
    ]
    counts = catalog.count_jobs()
    return ProtectionDashboardPublic(
        generated_at=now,
        appliance_name=str(service.settings_document()["appliance_name"]),
        assets=assets,
        summary=summary_public(statuses),
        attention=attention_public(statuses),
        capacity=_capacity(service, points, now),
        jobs=JobCounts(
            queued=counts.get("queued", 0),
            running=counts.get("running", 0),
            failed=counts.get("failed", 0),
            interrupted=counts.get("interrupted", 0),
        ),
        alerts=dashboard_alerts(list(assets)),
    )


def _asset_public(
    catalog: Catalog, s: AssetProtection, now: datetime, points: int, stored: int
) -> AssetProtectionPublic:
    last = s.last_good
    last_test = last_proven = None
    if s.kind == "vm":
        last_test = boot_test_public(s.boot_test) if s.boot_test else BootTestPublic(state="never")
        last_proven = boot_test_public(s.proven_boot) if s.proven_boot else None
    return AssetProtectionPublic(
        asset=s.asset,
        kind=s.kind,
        policies=s.policies,
        points=points,
        last_point_id=last.id if last else None,
        last_point_at=last.created_at if last else None,
        age_seconds=(now - last.created_at).total_seconds() if last else None,
        rpo_seconds=s.rpo_seconds,
        rpo_status=rpo_status(last, s.rpo_seconds, now),  # type: ignore[arg-type]
        copies=copies_public(catalog, last.id) if last else [],
        logical_bytes=last.logical_bytes if last else 0,
        stored_bytes=stored,
        last_boot_test=last_test,
        last_proven_boot=last_proven,
        state=s.state,  # type: ignore[arg-type]
        reasons=[reason_public(r) for r in s.reasons],
        legs=legs_public(s.legs),
        last_verified_at=s.last_verified_at,
        running_session=s.running_session,
    )


@router.get("/settings", response_model=SettingsPublic)
def get_settings(principal: Viewer, service: ServiceDep) -> SettingsPublic:
    return SettingsPublic(**service.settings_document())


@router.put("/settings", response_model=SettingsPublic)
def put_settings(body: SettingsUpdate, principal: Admin, service: ServiceDep) -> SettingsPublic:
    document = service.apply_settings(body.model_dump())
    service.app.catalog.audit(
        principal.name,
        "settings.update",
        "appliance",
        {**body.model_dump(), **principal.audit_details},
    )
    return SettingsPublic(**document)


@router.get("/audit", response_model=list[AuditPublic])
def audit_log(
    principal: Admin,
    catalog: CatalogDep,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 200,
) -> list[AuditPublic]:
    """The newest audit entries, newest first."""
    return [
        AuditPublic(
            id=a.id, at=a.at, actor=a.actor, action=a.action, target=a.target, details=a.details
        )
        for a in catalog.list_audit(limit)
    ]


# --- Prometheus ---------------------------------------------------------------------------------------


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


DURATION_BUCKETS = (1, 10, 60, 300, 1800, 3600, 6 * 3600, 24 * 3600)


def _durations(jobs: list[JobRecord]) -> list[str]:
    by_kind: dict[str, list[float]] = defaultdict(list)
    for job in jobs:
        if job.started_at and job.finished_at and job.state == "succeeded":
            by_kind[job.kind].append((job.finished_at - job.started_at).total_seconds())
    lines = [
        "# HELP appliance_job_duration_seconds Run time of recent succeeded jobs.",
        "# TYPE appliance_job_duration_seconds histogram",
    ]
    for kind, values in sorted(by_kind.items()):
        for bound in DURATION_BUCKETS:
            count = sum(1 for v in values if v <= bound)
            lines.append(
                f'appliance_job_duration_seconds_bucket{{kind="{_label(kind)}",le="{bound}"}} {count}'
            )
        lines.append(
            f'appliance_job_duration_seconds_bucket{{kind="{_label(kind)}",le="+Inf"}} {len(values)}'
        )
        lines.append(
            f'appliance_job_duration_seconds_sum{{kind="{_label(kind)}"}} {sum(values):.3f}'
        )
        lines.append(f'appliance_job_duration_seconds_count{{kind="{_label(kind)}"}} {len(values)}')
    return lines


@metrics_router.get("/metrics", response_class=PlainTextResponse)
def metrics(principal: Viewer, service: ServiceDep) -> PlainTextResponse:
    """Prometheus text format: jobs by state, bytes backed up, job durations, pool usage, the
    age of each asset's newest point and each VM's boot verification (RTO of its last proven
    boot, when that was, whether its last boot test passed). Needs a token or session like
    every other route."""
    app = service.app
    catalog = app.catalog
    now = service.now()
    lines = ["# HELP appliance_jobs Jobs by state.", "# TYPE appliance_jobs gauge"]
    counts = catalog.count_jobs()
    for state in (
        "queued",
        "running",
        "waiting",
        "succeeded",
        "failed",
        "cancelled",
        "interrupted",
    ):
        lines.append(f'appliance_jobs{{state="{state}"}} {counts.get(state, 0)}')
    points = catalog.list_points()
    lines += [
        "# HELP appliance_backup_logical_bytes_total Bytes read by backups (sum over points).",
        "# TYPE appliance_backup_logical_bytes_total counter",
        f"appliance_backup_logical_bytes_total {sum(p.logical_bytes for p in points)}",
        "# HELP appliance_backup_stored_bytes_total Bytes backups added to the store.",
        "# TYPE appliance_backup_stored_bytes_total counter",
        f"appliance_backup_stored_bytes_total {sum(p.stored_bytes for p in points)}",
        "# HELP appliance_points Recovery points in the catalog.",
        "# TYPE appliance_points gauge",
        f"appliance_points {len(points)}",
    ]
    lines += _durations(catalog.list_jobs(limit=1000))
    usage = filesystem_usage(app.data_dir.store_path)
    lines += [
        "# HELP appliance_pool_bytes Pool filesystem size, used and free bytes.",
        "# TYPE appliance_pool_bytes gauge",
        f'appliance_pool_bytes{{pool="default",kind="total"}} {usage.total_bytes}',
        f'appliance_pool_bytes{{pool="default",kind="used"}} {usage.used_bytes}',
        f'appliance_pool_bytes{{pool="default",kind="free"}} {usage.free_bytes}',
        f'appliance_pool_bytes{{pool="default",kind="store"}} {service.store_bytes()}',
    ]
    by_asset: dict[str, list[PointRecord]] = defaultdict(list)
    for point in points:
        by_asset[point.asset].append(point)
    ages: dict[str, str] = {}
    for asset, mine in by_asset.items():
        last = last_good_point(mine)
        if last is not None:
            ages[asset] = f"{max(0.0, (now - last.created_at) / timedelta(seconds=1)):.0f}"
    lines += _gauge(
        "appliance_newest_point_age_seconds", "Age of each asset's newest good point.", ages
    )
    lines += _boot_test_metrics(catalog)
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


def _gauge(name: str, text: str, values: dict[str, str]) -> list[str]:
    """One Prometheus gauge with a sample per asset (``values``: asset -> formatted value)."""
    lines = [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
    lines += [
        f'{name}{{asset="{_label(asset)}"}} {value}' for asset, value in sorted(values.items())
    ]
    return lines


def _boot_test_metrics(catalog: Catalog) -> list[str]:
    last = catalog.last_boot_tests(per="asset")
    proven = {
        name: boot_test_result(record)
        for name, record in catalog.last_boot_tests(per="asset", proven_only=True).items()
    }
    return [
        *_gauge(
            "appliance_boot_test_rto_seconds",
            "RTO measured by each VM's last proven boot test.",
            {n: f"{r.rto_seconds:g}" for n, r in proven.items() if r.rto_seconds is not None},
        ),
        *_gauge(
            "appliance_boot_test_last_success_timestamp_seconds",
            "When each VM's boot was last proven (Unix time).",
            {n: f"{r.at.timestamp():.0f}" for n, r in proven.items()},
        ),
        *_gauge(
            "appliance_boot_test_ok",
            "Whether each VM's last boot test proved the boot (1) or not (0).",
            {n: "1" if boot_test_result(r).state == "proven" else "0" for n, r in last.items()},
        ),
    ]
