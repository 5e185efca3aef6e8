"""Routes of the backup client (``appliance-client``), for host tokens only.

A host's token (role ``client``, scopes ``client`` and ``asset:<name>``) is accepted here and
nowhere else; every other token and every session is refused here (403), so these routes cannot
become a way around roles. What a client may do: learn its assets and the chunking parameters,
open an upload session for one of its assets, send chunks and records, finish the point, and pull
a restore that an operator started for it. It cannot list, read or delete points.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import Field

from api.deps import ServiceDep, authenticate
from api.errors import PermissionDenied
from api.schemas import Request as RequestModel
from api.security import CLIENT_ROLE, Principal
from api.service import Service
from api.streams import primed, produced
from appliance.client import wire
from appliance.client.zipapp import build_zipapp
from appliance.errors import NotFound
from appliance.sources import hosts as host_records
from appliance.sources.ingest import IngestSession, IngestSessions, chunk_parameters
from appliance.sources.ingest_image import MAX_DISK_BYTES, MAX_DISKS, base_table

router = APIRouter(tags=["client"])


class ClientHost:
    def __init__(self, principal: Principal, host: dict[str, Any]) -> None:
        self.principal = principal
        self.host = host
        self.assets = [s.removeprefix("asset:") for s in principal.scopes if s.startswith("asset:")]


def client_host(
    service: ServiceDep, principal: Annotated[Principal, Depends(authenticate)]
) -> ClientHost:
    if principal.role != CLIENT_ROLE or "client" not in principal.scopes:
        raise PermissionDenied(
            "only a host's client token may use the /api/client routes",
            needed=CLIENT_ROLE,
            role=principal.role,
        )
    catalog = service.app.catalog
    host = host_records.host_of_user(catalog, principal.name)
    if host is None or host.get("token_id") != principal.token_id:
        raise PermissionDenied("this client token belongs to no host that is still added")
    host_records.touch(catalog, host["name"], service.now())
    return ClientHost(principal, host)


Client = Annotated[ClientHost, Depends(client_host)]


def sessions_of(service: Service) -> IngestSessions:
    sessions = service.ingest_sessions
    # A new store (recovered from tapes) gets sessions of its own.
    if sessions is None or sessions.app is not service.app:
        sessions = service.ingest_sessions = IngestSessions(service.app)
    return sessions


def _session(service: Service, client: ClientHost, session_id: str) -> IngestSession:
    return sessions_of(service).get(session_id, client.principal.token_id or "")


class DiskDeclared(RequestModel):
    name: str = Field(min_length=1, max_length=64)
    size: int = Field(ge=1, le=MAX_DISK_BYTES)


class SessionCreate(RequestModel):
    asset: str = Field(min_length=1, max_length=120)
    source: str = Field(min_length=1, max_length=4096)
    mode: str = Field(default="incremental", pattern="^(incremental|differential|full)$")
    resume: str | None = Field(default=None, max_length=64)
    #: "files" (a tree) or "image" (block devices, declared in ``disks``).
    kind: str = Field(default="files", pattern="^(files|image)$")
    disks: list[DiskDeclared] = Field(default_factory=list, max_length=MAX_DISKS)


class SessionFinish(RequestModel):
    batches: int = Field(ge=1, le=1_000_000)
    stats: dict[str, Any] = Field(default_factory=dict)
    warnings: list[dict[str, Any]] = Field(default_factory=list, max_length=1000)
    warning_count: int = Field(default=0, ge=0, le=2**62)


@router.get("/client/hello")
def hello(client: Client, service: ServiceDep) -> dict[str, Any]:
    """What the client needs to cut and name chunks as the store does, and its assets."""
    app = service.app
    return {
        "protocol": wire.PROTOCOL,
        "host": client.host["name"],
        "assets": client.assets,
        "chunking": chunk_parameters(app),
        "disk_chunk_size": app.repo.config.disk_chunk_size,
        "id_key": app.repo.key.id_key.hex(),
        "max_batch": wire.MAX_BATCH,
    }


@router.post("/client/sessions", status_code=201)
def open_session(body: SessionCreate, client: Client, service: ServiceDep) -> dict[str, Any]:
    if body.asset not in client.assets:
        raise PermissionDenied(
            f"this host's token may add points to {', '.join(client.assets) or 'no asset'}, "
            f"not to {body.asset}"
        )
    source = body.source
    prefix = f"client://{client.host['name']}/"
    if not source.startswith(prefix):
        raise PermissionDenied(f"a source of this host starts with {prefix}")
    session = sessions_of(service).open_session(
        body.asset,
        source,
        body.mode,
        client.principal.token_id or "",
        body.resume,
        kind=body.kind,
        disks=[d.model_dump() for d in body.disks],
    )
    return session.describe()


@router.get("/client/sessions/{session_id}/known")
def known(session_id: str, client: Client, service: ServiceDep) -> Response:
    """The IDs (32 bytes each) of the chunks this session need not send."""
    session = _session(service, client, session_id)
    data = sessions_of(service).known_ids(session)
    return Response(data, media_type="application/octet-stream")


@router.get("/client/sessions/{session_id}/base")
def base(
    session_id: str,
    client: Client,
    service: ServiceDep,
    disk: Annotated[str, Query(min_length=1, max_length=64)],
) -> StreamingResponse:
    """An image session's base: the chunk table (32-byte IDs in disk order) of this disk in the
    asset's previous point; empty when there is none or the disk's size changed."""
    session = _session(service, client, session_id)
    slices = base_table(service.app, session, disk)
    return StreamingResponse(primed(slices), media_type="application/octet-stream")


@router.post("/client/sessions/{session_id}/chunks")
async def chunks(
    session_id: str, request: Request, client: Client, service: ServiceDep
) -> dict[str, int]:
    session = await to_thread.run_sync(_session, service, client, session_id)
    body = await request.body()
    return await to_thread.run_sync(sessions_of(service).add_chunks, session, body)


@router.post("/client/sessions/{session_id}/records", status_code=204)
async def records(
    session_id: str,
    request: Request,
    client: Client,
    service: ServiceDep,
    seq: Annotated[int, Query(ge=0, le=999_999)],
) -> Response:
    session = await to_thread.run_sync(_session, service, client, session_id)
    body = await request.body()
    await to_thread.run_sync(sessions_of(service).add_records, session, seq, body)
    return Response(status_code=204)


@router.post("/client/sessions/{session_id}/finish")
def finish(
    session_id: str, body: SessionFinish, client: Client, service: ServiceDep
) -> dict[str, Any]:
    session = _session(service, client, session_id)
    outcome = sessions_of(service).finish(
        session,
        batches=body.batches,
        stats=body.stats,
        warnings=body.warnings,
        warning_count=body.warning_count,
    )
    service.app.catalog.audit(
        client.principal.name, "client.backup", outcome.point.id, {"asset": session.asset}
    )
    service.changed()
    return {
        "point": outcome.point.id,
        "mode": outcome.point.mode,
        "new_bytes": outcome.point.stored_bytes,
    }


@router.delete("/client/sessions/{session_id}", status_code=204)
def abort(session_id: str, client: Client, service: ServiceDep) -> Response:
    sessions_of(service).abort(_session(service, client, session_id))
    return Response(status_code=204)


@router.get("/client/appliance-client.pyz")
def download_client(
    service: ServiceDep, principal: Annotated[Principal, Depends(authenticate)]
) -> Response:
    """The client as one zipapp (``python3 appliance-client.pyz ...``); any signed-in user or
    host token may fetch it."""
    cache = os.path.join(service.app.data_dir.cache_path, "appliance-client.pyz")
    build_zipapp(cache)
    with open(cache, "rb") as f:
        data = f.read()
    return Response(
        data,
        media_type="application/octet-stream",
        headers={"Content-Disposition": 'attachment; filename="appliance-client.pyz"'},
    )


# --- restores the host pulls -------------------------------------------------------------------


class RestoreDone(RequestModel):
    ok: bool
    entries: int = Field(ge=0, le=2**62)
    message: str = Field(default="", max_length=500)


def _waiting(service: Service, client: ClientHost) -> list[dict[str, Any]]:
    host = host_records.get_host(service.app.catalog, client.host["name"])
    now = service.now()
    return [
        r
        for r in host.get("restores", [])
        if r["state"] == "waiting" and datetime.fromisoformat(r["expires_at"]) > now
    ]


@router.get("/client/restores")
def waiting_restores(client: Client, service: ServiceDep) -> list[dict[str, Any]]:
    """Restores an operator started for this host that it has not pulled yet."""
    return [
        {k: r[k] for k in ("id", "point", "path", "target", "created_at")}
        for r in _waiting(service, client)
    ]


@router.get("/client/restores/{restore_id}/archive")
def restore_archive(restore_id: str, client: Client, service: ServiceDep) -> StreamingResponse:
    """The waiting restore as a POSIX tar stream (the point, or the folder it names)."""
    grant = next((r for r in _waiting(service, client) if r["id"] == restore_id), None)
    if grant is None:
        raise NotFound("no such restore is waiting for this host")
    app = service.app
    subpath = grant["path"] or None
    body = primed(produced(lambda out: app.restore_tar(grant["point"], out, subpath=subpath)))
    app.catalog.audit(client.principal.name, "client.restore", grant["point"], {"id": restore_id})
    return StreamingResponse(body, media_type="application/x-tar")


@router.post("/client/restores/{restore_id}/done", status_code=204)
def restore_done(
    restore_id: str, body: RestoreDone, client: Client, service: ServiceDep
) -> Response:
    name = client.host["name"]
    host = host_records.get_host(service.app.catalog, name)
    grants = host.get("restores", [])
    for grant in grants:
        if grant["id"] == restore_id:
            grant.update(
                state="done" if body.ok else "failed",
                entries=body.entries,
                message=body.message,
                finished_at=service.now().isoformat(),
            )
            break
    else:
        raise NotFound("no such restore for this host")
    host_records.update_host(service.app.catalog, name, restores=grants)
    return Response(status_code=204)
