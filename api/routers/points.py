"""Recovery points: list, detail, file browser, downloads, restore, verify and delete.

Downloads are restores: they need the operator role and are audited like restore jobs. A VM
point that was test-booted carries its newest boot proof (``boot_proof``: proven or failed, when,
the RTO, the failed check, the screenshot's URL), from the boot-test sessions in the catalog.
Before a restore from a point whose readable copies are all cold, ``GET /points/{id}/recall``
says what the restore would first recall (looked up, never asked for) and what that recall would
cost by the dated tiering prices. The price is laid on here: the core's estimate knows packs and
bytes, not money (``appliance`` never imports ``tiering``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Query, Response, status
from fastapi.responses import StreamingResponse
from pydantic import TypeAdapter

from api.deps import Admin, Operator, ServiceDep, StoreService, Viewer
from api.routers.status import boot_test_public
from api.schemas import (
    DirectoryListing,
    DiskPublic,
    FileEntry,
    JobPublic,
    ManifestSummary,
    RestoreCreate,
)
from api.schemas_locations import RecallEstimate
from api.schemas_signals import (
    PointDetailWithSignals,
    PointWithSignals,
    ReviewCreate,
    signal_fields,
)
from api.streams import (
    display,
    file_bytes,
    find_record,
    list_directory,
    normalise,
    primed,
    produced,
    record_mtime,
    write_zip,
)
from api.views import copies_public, job_public, point_public
from appliance.boot_verification import boot_test_result
from appliance.catalog import Catalog
from appliance.catalog.records import FailoverSessionRecord, PointRecord, home_location_id
from appliance.engine import Appliance
from appliance.errors import InvalidInput
from appliance.locations.recall import recall_estimate
from appliance.store.repository import Repository
from tiering.pricing import effective_prices, recall_cost
from tiering.work import PRICES_KEY

router = APIRouter(tags=["points"])


POINT_LIST: TypeAdapter[list[PointWithSignals]] = TypeAdapter(list[PointWithSignals])


def _points_answer(catalog: Catalog, asset: str | None, limit: int) -> bytes:
    points = catalog.newest_points(limit, asset=asset)
    proofs = catalog.last_boot_tests(per="point", asset=asset) if points else {}
    return POINT_LIST.dump_json([_with_proof(p, proofs.get(p.id)) for p in points])


@router.get("/points", response_model=list[PointWithSignals])
async def list_points(
    principal: Viewer,
    service: StoreService,
    asset: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Response:
    """Points, newest first, each with its newest boot proof (if it was test-booted).

    Polled by every open page: the answer is shared for up to ``POINTS_ANSWER_TTL`` seconds,
    and a job ending in this service (which may have made or pruned points) refreshes it."""
    key = (asset, limit, service.jobs_finished)
    catalog = service.app.catalog
    body = await service.points_answers.get_or_compute(
        key, lambda: _points_answer(catalog, asset, limit)
    )
    return Response(body, media_type="application/json")


def _with_proof(point: PointRecord, session: FailoverSessionRecord | None) -> PointWithSignals:
    public = PointWithSignals(**point_public(point).model_dump(), **signal_fields(point))
    if session is not None:
        public.boot_proof = boot_test_public(boot_test_result(session))
    return public


def _proof_of(catalog: Catalog, point: PointRecord) -> FailoverSessionRecord | None:
    if point.kind != "image":
        return None
    return catalog.last_boot_tests(per="point", asset=point.asset).get(point.id)


def _summary(manifest: dict[str, Any]) -> ManifestSummary:
    disks = [
        DiskPublic(name=str(d.get("name")), size=int(d.get("size", 0)), source=d.get("source"))
        for d in manifest.get("disks", []) or []
    ]
    return ManifestSummary(
        host=manifest.get("host"),
        source=str(manifest.get("source", "")),
        stats=dict(manifest.get("stats", {}) or {}),
        warnings=list(manifest.get("warnings", []) or [])[:100],
        disks=disks,
        vm=manifest.get("vm"),
    )


@router.get("/points/{point_id}", response_model=PointDetailWithSignals)
def get_point(point_id: str, principal: Viewer, service: StoreService) -> PointDetailWithSignals:
    app = service.app
    point = app.point(point_id)
    manifest = app.manifest(point.id)
    return PointDetailWithSignals(
        **_with_proof(point, _proof_of(app.catalog, point)).model_dump(),
        copies=copies_public(app.catalog, point.id),
        manifest=_summary(manifest),
    )


@contextmanager
def _trees_of(app: Appliance, point_id: str) -> Iterator[Repository]:
    """Where the point's folders are read: the home pool, or its best copy once the home copy
    left (tree blobs lie in metadata packs, which stay hot in cold buckets)."""
    home = home_location_id(app.repo.store_id)
    if any(c.location_id == home and c.state == "present" for c in app.catalog.copies_of(point_id)):
        yield app.repo
        return
    repo = app.reader(point_id)
    try:
        yield repo
    finally:
        repo.close()


def _files_manifest(service: StoreService, point_id: str) -> tuple[str, dict[str, Any]]:
    app = service.app
    point = app.point(point_id)
    if point.kind != "files":
        raise InvalidInput("only file points have files to browse; restore a VM point instead")
    return point.id, app.manifest(point.id)


@router.get("/points/{point_id}/files", response_model=DirectoryListing)
def browse(
    point_id: str,
    principal: Viewer,
    service: StoreService,
    path: Annotated[str, Query(max_length=4096)] = "",
    after: Annotated[str | None, Query(max_length=4096)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> DirectoryListing:
    """One page of a folder of the point (``path`` relative, "" for the top)."""
    pid, manifest = _files_manifest(service, point_id)
    folder = normalise(path)
    with _trees_of(service.app, pid) as repo:
        records, next_after = list_directory(repo, manifest, folder, after=after, limit=limit)
    entries = [
        FileEntry(
            name=display(str(r["path"]).rsplit("/", 1)[-1]),
            path=display(str(r["path"])),
            type=str(r.get("type")),
            size=int(r.get("size", 0)),
            mode=int(r.get("mode", 0)),
            mtime=record_mtime(r),
            target=display(str(r["target"])) if r.get("target") is not None else None,
        )
        for r in records
    ]
    return DirectoryListing(
        point=pid,
        path=display(folder),
        entries=entries,
        next_after=display(next_after) if next_after else None,
    )


def _attachment(name: str) -> str:
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "_") or "download"
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name)}"


@router.get(
    "/points/{point_id}/download",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}, "application/x-tar": {}}}},
)
def download(
    point_id: str,
    principal: Operator,
    service: StoreService,
    path: Annotated[str, Query(max_length=4096)] = "",
    format: Literal["auto", "tar", "zip"] = "auto",
) -> StreamingResponse:
    """Download a file (``auto``: its bytes) or a folder (``auto``/``tar``: a tar stream,
    ``zip``: a zip archive). Audited."""
    app = service.app
    pid, manifest = _files_manifest(service, point_id)
    target = normalise(path)
    record = find_record(app.repo, manifest, target) if target else {"type": "dir", "path": ""}
    kind = record.get("type")
    base = display(target.rsplit("/", 1)[-1]) if target else f"{manifest['asset']}-{pid}"
    if kind == "symlink":
        raise InvalidInput("this is a symbolic link; download its folder instead")
    if format == "auto" and kind == "file":
        media, filename = "application/octet-stream", base
        body = primed(file_bytes(app.repo, record))
        headers = {"Content-Length": str(int(record.get("size", 0)))}
    elif format == "zip":
        media, filename = "application/zip", base + ".zip"
        body = primed(produced(lambda out: write_zip(app.repo, manifest, target, out)))
        headers = {}
    else:
        media, filename = "application/x-tar", base + ".tar"
        body = primed(produced(lambda out: app.restore_tar(pid, out, subpath=target or None)))
        headers = {}
    app.catalog.audit(
        principal.name,
        "point.download",
        pid,
        {"path": display(target), "format": format, **principal.audit_details},
    )
    headers["Content-Disposition"] = _attachment(filename)
    return StreamingResponse(body, media_type=media, headers=headers)


@router.post(
    "/points/{point_id}/restore", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED
)
def restore(
    point_id: str,
    body: RestoreCreate,
    principal: Operator,
    service: StoreService,
    response: Response,
) -> JobPublic:
    """Restore the point (or one path / disk of it) as a job: into a restore area, back over the
    asset's own source (with an explicit ``on_conflict``), or to a registered restore device.
    Any other target is refused (403 ``path_refused``, naming the rule); see
    ``GET /points/{id}/restore-targets`` for the choices."""
    app = service.app
    point = app.point(point_id)
    if body.path and point.kind != "files":
        raise InvalidInput("'path' selects within a files point; use 'disk' for a VM point")
    if body.disk and point.kind != "image":
        raise InvalidInput("'disk' selects a disk of a VM point")
    checked = app.check_restore_target(
        point.id,
        body.destination,
        target=body.target,
        on_conflict=body.on_conflict,
        disk=body.disk,
    )
    params: dict[str, Any] = {
        "point": point.id,
        "destination": body.destination,
        "format": body.format,
    }
    if body.target is not None:
        params["target"] = body.target
    if body.on_conflict is not None:
        params["on_conflict"] = body.on_conflict
    if body.path:
        params["path"] = normalise(body.path)
    if body.disk:
        params["disk"] = body.disk
    if body.location:
        params["location"] = app.find_location(body.location).id
    job = service.jobs.submit("restore", params)
    app.catalog.audit(
        principal.name,
        "point.restore",
        point.id,
        {**params, "resolved": checked.path, "job": job.id, **principal.audit_details},
    )
    response.headers["Location"] = f"/api/jobs/{job.id}"
    return job_public(job)


@router.get("/points/{point_id}/recall", response_model=RecallEstimate)
def recall(
    point_id: str,
    principal: Viewer,
    service: ServiceDep,
    path: Annotated[str, Query(max_length=4096)] = "",
    location: Annotated[str | None, Query(min_length=1, max_length=255)] = None,
) -> RecallEstimate:
    """What a restore of the point (``path``: one file or folder of a files point; ``location``:
    that copy first) would first recall from cold storage: the location, its restore tier and
    typical wait, the packs and bytes. Asks for nothing (no restore request, no state change):
    the page shows it before a restore from a point whose readable copies are all cold."""
    app = service.app
    point = app.point(point_id)
    if path and point.kind != "files":
        raise InvalidInput("'path' selects within a files point; a VM point is recalled whole")
    estimate = recall_estimate(app, point.id, subpath=normalise(path) or None, named=location)
    return RecallEstimate(**estimate, **_recall_price(app, estimate))


def _recall_price(app: Appliance, estimate: dict[str, Any]) -> dict[str, Any]:
    """What the recall an estimate describes would cost: retrieval per GiB and per request of the
    cold copy's storage class at the location's tier, by the effective prices (the shipped file
    with the settings' override). No cost when nothing is recalled or the packs could not be
    looked at; the class and the prices' date are said whenever a recall is needed."""
    if not estimate["needed"] or estimate["location_id"] is None:
        return {}
    location_id = estimate["location_id"]
    copy = next(
        (c for c in app.catalog.copies_of(estimate["point"]) if c.location_id == location_id),
        None,
    )
    options = app.catalog.get_location(location_id).details.get("options", {}) or {}
    # The copy records the class its packs went to; a copy without one has the location's.
    storage_class = str(
        (copy.storage_class if copy is not None else None) or options.get("data_class") or "GLACIER"
    )
    prices = effective_prices(app.catalog.get_settings(PRICES_KEY))
    cost = None
    if estimate["reason"] is None:
        cost = recall_cost(
            # One restore request per cold object: a bundle of small packs is thawed as one.
            storage_class,
            str(estimate["tier"]),
            estimate["bytes"],
            estimate["objects"],
            prices,
        )
    return {
        "storage_class": storage_class,
        "cost": round(cost, 8) if cost is not None else None,
        "currency": str(prices.get("currency") or "USD"),
        "prices_as_of": str(prices.get("as_of") or "") or None,
    }


@router.post(
    "/points/{point_id}/recall", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED
)
def start_recall(
    point_id: str,
    principal: Operator,
    service: ServiceDep,
    response: Response,
    path: Annotated[str, Query(max_length=4096)] = "",
    location: Annotated[str | None, Query(min_length=1, max_length=255)] = None,
) -> JobPublic:
    """Recall the point (``path``: only what restoring that path needs) from its cold copy, as a
    job that waits until the packs are readable (job ``recall``): before a failover of a point
    that is only in cold storage, or to have it ready for several restores."""
    app = service.app
    point = app.point(point_id)
    if path and point.kind != "files":
        raise InvalidInput("'path' selects within a files point; a VM point is recalled whole")
    params: dict[str, Any] = {"point": point.id}
    if path:
        params["path"] = normalise(path)
    if location is not None:
        params["location"] = app.find_location(location).id
    job = service.jobs.submit("recall", params)
    app.catalog.audit(
        principal.name,
        "point.recall",
        point.id,
        {**params, "job": job.id, **principal.audit_details},
    )
    response.headers["Location"] = f"/api/jobs/{job.id}"
    return job_public(job)


@router.post(
    "/points/{point_id}/verify", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED
)
def verify(
    point_id: str,
    principal: Operator,
    service: ServiceDep,
    response: Response,
    location: Annotated[str | None, Query(max_length=255)] = None,
) -> JobPublic:
    """Re-read and check every chunk of the point, as a job; with ``location``, the point's copy
    at that location alone (marked verified, or ``lost`` when damaged)."""
    app = service.app
    point = app.point(point_id)
    if location is None:
        job = service.jobs.submit("verify", {"point": point.id})
    else:
        where = app.find_location(location).id
        job = service.jobs.submit("verify_copy", {"point": point.id, "location": where})
    app.catalog.audit(
        principal.name,
        "point.verify",
        point.id,
        {"job": job.id, "location": location, **principal.audit_details},
    )
    response.headers["Location"] = f"/api/jobs/{job.id}"
    return job_public(job)


@router.delete("/points/{point_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_point(point_id: str, principal: Admin, service: ServiceDep) -> Response:
    """Delete the point (its manifest and catalog entry; GC frees its data later).
    409 while a backup, restore or maintenance job holds the store."""
    app = service.app
    point = app.point(point_id)
    app.delete_points([point.id])
    app.catalog.audit(
        principal.name, "point.delete", point.id, {"asset": point.asset, **principal.audit_details}
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/points/{point_id}/review", response_model=PointWithSignals)
def review_point(
    point_id: str, body: ReviewCreate, principal: Operator, service: ServiceDep
) -> PointWithSignals:
    """A person looked at a suspicious point: ``expected`` ends the warning and lets retention
    go on; ``attack`` keeps the point and the last clean one before it. 409 when the point is
    not suspicious."""
    app = service.app
    point = app.review_point(app.point(point_id).id, principal.name, body.verdict)
    app.catalog.audit(
        principal.name,
        "point.review",
        point.id,
        {"asset": point.asset, "verdict": body.verdict, **principal.audit_details},
    )
    service.points_answers.clear()
    return _with_proof(point, _proof_of(app.catalog, point))
