"""Replication, the peer's side: pairing, the sources that replicate here, and their stores.

docs/replication.md is the contract; the source's side is ``api.peers``. Three kinds of caller:

- an admin of this appliance makes pairing codes, and unpairs sources; any signed-in user sees
  the sources (``GET /api/replication/sources``: what each holds here and how fresh it is);
- a source pairs with a code (``POST /api/replication/pair``, no login: the code is the
  credential; failures are throttled per client address like failed sign-ins, and audited);
- a source's replication token (``ReplicationPeer``) lists, reads and uploads the objects of its
  own replica store and posts its points' summaries: nothing else, and no delete.

The storage rules (names, checksums, no overwrite, the reserve) are :mod:`api.replica_store`'s.

Clocks (:mod:`api.peer_wire`): every answer of these routes carries this appliance's own time
(its service clock) in ``X-Appliance-Time``, so a source can tell how far apart the clocks are;
the store routes read the source's time from the same header of its requests and keep the skew
per source (``clock_skew_seconds`` in the sources listing). A source may revoke its own token
(``POST /api/replication/store/unpair``): it is then listed as unpaired, its replica kept.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response, status
from fastapi.responses import FileResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from api.deps import Admin, ReplicationPeer, ServiceDep, Viewer, client_address
from api.errors import LoginThrottled
from api.identity import appliance_id, appliance_name, certificate_fingerprint
from api.pairing import (
    THROTTLE_KEY,
    PairingRefused,
    PairingThrottled,
    SourceClaim,
    SourceRecord,
    get_source,
    list_sources,
    new_pairing_code,
    pair,
    unpair,
    unpaired_by_source,
)
from api.peer_wire import TIME_HEADER, ClockBook, parse_time_header, skew_words, time_header
from api.replica_store import (
    MAX_BATCH,
    check_point_id,
    check_replica_name,
    is_pack_name,
    replica_store,
    replicas_dir,
)
from api.schemas import MAX_BYTES
from api.schemas import Request as RequestModel
from api.security import LoginThrottle
from api.service import Service
from api.takeover import TakeoverOpen, takeover_state
from appliance import space
from appliance.errors import InvalidInput


class _TimedRoute(APIRoute):
    """A route whose answers carry this appliance's time (its service clock, which the web
    server's ``Date`` does not follow) in :data:`api.peer_wire.TIME_HEADER`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def timed(request: Request) -> Response:
            response = await handler(request)
            service: Service = request.app.state.service
            response.headers[TIME_HEADER] = time_header(service.now())
            return response

        return timed


router = APIRouter(tags=["replication"], route_class=_TimedRoute)

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=100)]


# --- schemas ---------------------------------------------------------------------------------


class PairingCodePublic(BaseModel):
    #: The code to type on the source: 8 characters, one use.
    code: str
    expires_at: datetime
    #: This appliance's TLS certificate (SHA-256 of the DER, ``AB:CD:...``); null without TLS.
    fingerprint: str | None
    appliance_id: str
    name: str


class SourceClaimCreate(RequestModel):
    appliance_id: str = Field(max_length=64)
    name: ShortText
    store_id: str = Field(max_length=64)
    fingerprint: str = Field(max_length=128)


class PairCreate(RequestModel):
    code: str = Field(min_length=1, max_length=64)
    source: SourceClaimCreate


class PeerPublic(BaseModel):
    appliance_id: str
    name: str
    fingerprint: str | None


class PairPublic(BaseModel):
    peer: PeerPublic
    #: The replication token: shown once; send it as ``Authorization: Bearer``.
    token: str


class SourcePointsPublic(BaseModel):
    count: int
    newest_created_at: datetime | None = None
    #: Age of the newest point held, in seconds (the replication RPO as the peer sees it).
    newest_age_seconds: float | None = None


class SourcePublic(BaseModel):
    appliance_id: str
    name: str
    store_id: str
    fingerprint: str
    paired_at: datetime | None
    last_seen: datetime | None
    bytes_held: int
    points: SourcePointsPublic
    #: Free bytes of the filesystem holding the replicas, and the reserve kept free on it.
    free_bytes: int | None
    reserve_bytes: int | None
    #: Set when the source unpaired itself (its token revoked, its replica kept here).
    unpaired_at: datetime | None = None
    unpaired_by: str | None = None
    #: The source's clock minus this appliance's, read from its last request (None: unknown).
    clock_skew_seconds: float | None = None
    #: A warning in words above 5 minutes: "the source's clock is 12 min behind this appliance's".
    clock_skew: str | None = None
    #: ``{granted, granted_at, open, opened_at}``: may this appliance take the store over, and
    #: has it (docs/replication.md, "Take over").
    takeover: dict[str, Any] | None = None


class ObjectPublic(BaseModel):
    name: str
    size: int


class ObjectListPublic(BaseModel):
    objects: list[ObjectPublic]
    #: Pass as ``after`` for the next page; null on the last page.
    next_after: str | None


class PresentCreate(RequestModel):
    names: list[Annotated[str, StringConstraints(max_length=256)]] = Field(max_length=MAX_BATCH)


class PresentPublic(BaseModel):
    #: The names asked about that the replica holds, with their sizes.
    present: dict[str, int]


class ObjectPutPublic(BaseModel):
    name: str
    size: int
    #: False when the replica held the same bytes already (a repeated upload).
    created: bool


class PointSummaryCreate(BaseModel):
    #: Fields a newer source adds are ignored, not refused: the two sides upgrade apart.
    model_config = ConfigDict(extra="ignore")

    asset: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    kind: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    created_at: datetime
    #: The point's size as the source counts it (null when it does not know).
    bytes: int | None = Field(default=None, ge=0, le=MAX_BYTES)


class PointSummaryPublic(PointSummaryCreate):
    id: str


# --- helpers ---------------------------------------------------------------------------------


def _data_dir(service: Service) -> str:
    return service.app.data_dir.path


def _fingerprint(service: Service) -> str | None:
    """This appliance's certificate fingerprint; None when it serves no certificate."""
    if not service.settings.tls:
        return None
    try:
        return certificate_fingerprint(service.settings.cert_path)
    except OSError:
        return None


def _pairing_throttle(request: Request, service: Service) -> LoginThrottle:
    """The throttle of failed pairings: the login throttle's rules, counted on their own."""
    state = request.app.state
    throttle = getattr(state, "pairing_throttle", None)
    if not isinstance(throttle, LoginThrottle):
        throttle = LoginThrottle(
            service.settings.login_throttle,
            client_free_failures=service.settings.login_throttle_per_client,
        )
        state.pairing_throttle = throttle
    return throttle


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _source_clocks(request: Request) -> ClockBook:
    """This service's readings of its sources' clocks, by source appliance id."""
    state = request.app.state
    book = getattr(state, "source_clocks", None)
    if not isinstance(book, ClockBook):
        book = ClockBook()
        state.source_clocks = book
    return book


def clocked_source(source: ReplicationPeer, request: Request, service: ServiceDep) -> SourceRecord:
    """The source of a store request, whose clock is read from its ``X-Appliance-Time``."""
    sent = parse_time_header(request.headers.get(TIME_HEADER))
    if sent is not None:
        now = service.now()
        _source_clocks(request).note(source.appliance_id, (sent - now).total_seconds(), now)
    return source


ClockedPeer = Annotated[SourceRecord, Depends(clocked_source)]


def _source_public(service: Service, record: SourceRecord, clocks: ClockBook) -> SourcePublic:
    store = replica_store(_data_dir(service), record.store_id)
    summaries = store.summaries()
    newest = _time(str(summaries[-1].get("created_at"))) if summaries else None
    age = (service.now() - newest).total_seconds() if newest and newest.tzinfo else None
    free: int | None = None
    reserve: int | None = None
    reading = clocks.get(record.appliance_id)
    skew = round(reading.skew_seconds, 3) if reading is not None else None
    try:
        free, total = space.filesystem_space(replicas_dir(_data_dir(service)))
        reserve = space.reserve_bytes(total)
    except OSError:
        pass
    return SourcePublic(
        appliance_id=record.appliance_id,
        name=record.name,
        store_id=record.store_id,
        fingerprint=record.fingerprint,
        paired_at=_time(record.paired_at),
        last_seen=_time(record.last_seen),
        bytes_held=store.bytes_held(),
        points=SourcePointsPublic(
            count=len(summaries), newest_created_at=newest, newest_age_seconds=age
        ),
        free_bytes=free,
        reserve_bytes=reserve,
        takeover=takeover_state(service, record),
        unpaired_at=_time(record.unpaired_at),
        unpaired_by=record.unpaired_by,
        clock_skew_seconds=skew,
        clock_skew=skew_words(skew, "the source's clock"),
    )


# --- pairing and sources (this appliance's users) ---------------------------------------------


class IdentityPublic(BaseModel):
    """This appliance as its peers and sources see it: compare the fingerprint with theirs."""

    #: This appliance's certificate (SHA-256 of the DER, ``AB:CD:...``), the one it shows its
    #: peers; null when it has none yet.
    fingerprint: str | None
    appliance_id: str
    name: str


@router.get("/replication/identity", response_model=IdentityPublic)
def get_identity(principal: Viewer, service: ServiceDep) -> IdentityPublic:
    """This appliance's fingerprint, id and name, shown on its Replication page so a person can
    compare them with what a paired appliance's page shows."""
    app = service.app
    # The certificate a source shows its peers when it pairs, served or not (a source behind
    # a TLS proxy serves none itself): the one their pages list for it.
    try:
        fingerprint: str | None = certificate_fingerprint(service.settings.cert_path)
    except OSError:
        fingerprint = None
    return IdentityPublic(
        fingerprint=fingerprint, appliance_id=appliance_id(app), name=appliance_name(app)
    )


@router.post(
    "/replication/pairing-codes",
    response_model=PairingCodePublic,
    status_code=status.HTTP_201_CREATED,
)
def create_pairing_code(principal: Admin, service: ServiceDep) -> PairingCodePublic:
    """A one-time pairing code, valid 10 minutes, to type on the source with this appliance's
    address; compare the fingerprint shown here with the one the source shows."""
    app = service.app
    made = new_pairing_code(app, service.now(), principal.name)
    app.catalog.audit(
        principal.name,
        "replication.pairing_code",
        "pairing code",
        {"expires_at": made.expires_at.isoformat(), **principal.audit_details},
    )
    return PairingCodePublic(
        code=made.code,
        expires_at=made.expires_at,
        fingerprint=_fingerprint(service),
        appliance_id=appliance_id(app),
        name=appliance_name(app),
    )


@router.post("/replication/pair", response_model=PairPublic)
def pair_source(body: PairCreate, request: Request, service: ServiceDep) -> PairPublic:
    """A source pairs with a pairing code (no login: the code is the credential). A wrong,
    expired or used code is 403 ``pairing_refused``; failures from one address are throttled
    (429 ``pairing_throttled``). The answer's token is shown once."""
    app = service.app
    client = client_address(request)
    throttle = _pairing_throttle(request, service)
    try:
        throttle.check(THROTTLE_KEY, client)
    except LoginThrottled as exc:
        wait = exc.details.get("retry_after")
        seconds = int(wait + 0.999) if isinstance(wait, int | float) else 1
        raise PairingThrottled(
            f"too many wrong pairing codes from this address; try again in {seconds} s",
            retry_after=wait,
        ) from None
    claim = SourceClaim(**body.source.model_dump())
    try:
        paired = pair(app, body.code, claim, service.now(), data_dir=_data_dir(service))
    except PairingRefused:
        throttle.failure(THROTTLE_KEY, client)
        app.catalog.audit(
            "anonymous",
            "replication.pair_failed",
            client,
            {"source": claim.appliance_id, "name": claim.name},
        )
        raise
    throttle.success(THROTTLE_KEY, client)
    source = paired.source
    app.catalog.audit(
        source.user,
        "replication.pair",
        source.appliance_id,
        {
            "client": client,
            "name": source.name,
            "store_id": source.store_id,
            "fingerprint": source.fingerprint,
            "token": source.token_id[:8],
        },
    )
    return PairPublic(
        peer=PeerPublic(
            appliance_id=appliance_id(app),
            name=appliance_name(app),
            fingerprint=_fingerprint(service),
        ),
        token=paired.token,
    )


@router.get("/replication/sources", response_model=list[SourcePublic])
def get_sources(principal: Viewer, service: ServiceDep, request: Request) -> list[SourcePublic]:
    """The sources replicating into this appliance: what each holds here, how fresh it is and
    how far its clock is from ours."""
    clocks = _source_clocks(request)
    return [_source_public(service, record, clocks) for record in list_sources(service.app)]


@router.delete("/replication/sources/{source_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_source(
    source_id: Annotated[str, Path(max_length=64)],
    principal: Admin,
    service: ServiceDep,
    delete_data: bool = False,
) -> Response:
    """Unpair a source: its replication token is revoked at once. Its replica store stays,
    unless ``delete_data`` (then it is deleted with its point summaries; 409 ``takeover_open``
    while this appliance has it taken over: close that first)."""
    app = service.app
    if delete_data:
        store_id = get_source(app, source_id).store_id
        if service.takeovers.opened(store_id) is not None:
            raise TakeoverOpen(
                "this appliance has taken over that store: close the take-over before "
                "deleting its replica",
                store_id=store_id,
            )
    record, revoked = unpair(app, source_id, data_dir=_data_dir(service), delete_data=delete_data)
    app.catalog.audit(
        principal.name,
        "replication.unpair",
        record.appliance_id,
        {
            "name": record.name,
            "store_id": record.store_id,
            "delete_data": delete_data,
            "tokens_revoked": revoked,
            **principal.audit_details,
        },
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# --- the replica store (a source's replication token) -----------------------------------------


@router.post("/replication/store/unpair", status_code=status.HTTP_204_NO_CONTENT)
def unpair_by_source(source: ClockedPeer, service: ServiceDep) -> Response:
    """The source unpairs: its token (the one asking) is revoked, its account disabled, and it
    is listed as unpaired; its replica stays here until an admin deletes it."""
    app = service.app
    revoked = unpaired_by_source(app, source, service.now())
    app.catalog.audit(
        source.user,
        "replication.unpair",
        source.appliance_id,
        {
            "by": "the source",
            "name": source.name,
            "store_id": source.store_id,
            "tokens_revoked": revoked,
        },
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/replication/store/objects", response_model=ObjectListPublic)
def list_objects(
    source: ClockedPeer,
    service: ServiceDep,
    prefix: Annotated[str, Query(max_length=256)] = "",
    after: Annotated[str, Query(max_length=256)] = "",
    limit: Annotated[int, Query(ge=1, le=MAX_BATCH)] = 1000,
) -> ObjectListPublic:
    """The replica's objects whose names start with ``prefix``, sorted by name, after
    ``after``, at most ``limit``; ``next_after`` continues."""
    listing = replica_store(_data_dir(service), source.store_id).list_objects(prefix, after, limit)
    return ObjectListPublic(
        objects=[ObjectPublic(name=n, size=s) for n, s in listing.objects],
        next_after=listing.next_after,
    )


@router.post("/replication/store/present", response_model=PresentPublic)
def present_objects(body: PresentCreate, source: ClockedPeer, service: ServiceDep) -> PresentPublic:
    """Which of ``names`` the replica holds (the source then sends only the others)."""
    held = replica_store(_data_dir(service), source.store_id).present(body.names)
    return PresentPublic(present=held)


def _object_response(service: Service, source: SourceRecord, name: str) -> FileResponse:
    store = replica_store(_data_dir(service), source.store_id)
    store.size(name)  # 404 (object_missing) before a response starts
    return FileResponse(
        store.path(name), media_type="application/octet-stream", content_disposition_type="inline"
    )


@router.head("/replication/store/objects/{name:path}", response_class=FileResponse)
def head_object(name: str, source: ClockedPeer, service: ServiceDep) -> FileResponse:
    """The object's size (``Content-Length``); 404 when the replica lacks it."""
    return _object_response(service, source, name)


@router.get("/replication/store/objects/{name:path}", response_class=FileResponse)
def get_object(name: str, source: ClockedPeer, service: ServiceDep) -> FileResponse:
    """The object's bytes; ``Range: bytes=a-b`` answers 206 with that part."""
    return _object_response(service, source, name)


_PUT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.put(
    "/replication/store/objects/{name:path}",
    response_model=ObjectPutPublic,
    status_code=status.HTTP_201_CREATED,
    openapi_extra=_PUT_BODY,
)
async def put_object(
    name: str,
    request: Request,
    source: ClockedPeer,
    service: ServiceDep,
    x_content_sha256: Annotated[str | None, Header(max_length=128)] = None,
) -> ObjectPutPublic:
    """Upload one object (the body), checked against ``X-Content-SHA256`` (optional for a
    pack, whose name is its content's BLAKE3): 400 ``checksum_mismatch`` (or ``name_mismatch``
    for a pack whose bytes do not hash to its name), 409 ``object_exists`` when the replica
    holds the name with other bytes (the same bytes again: 201 with ``created: false``), 507
    ``peer_full`` when it would eat into this appliance's free-space reserve."""
    check_replica_name(name)
    if x_content_sha256 is not None and not _SHA256.match(x_content_sha256):
        raise InvalidInput("send the body's SHA-256 as 64 hex digits in X-Content-SHA256")
    if x_content_sha256 is None and not is_pack_name(name):
        raise InvalidInput(f"send the SHA-256 of {name} as 64 hex digits in X-Content-SHA256")
    # The body is taken as it comes (the size cap is the body limit's, before this) and then
    # written in a thread from its chunks (writev: never joined into one copy) and hashed while
    # its fsync runs: hashing here would hold the event loop, and the upload, for ~4 ms a pack.
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
    store = replica_store(_data_dir(service), source.store_id)
    created = await to_thread.run_sync(store.put, name, chunks, x_content_sha256)
    return ObjectPutPublic(name=name, size=size, created=created)


@router.post("/replication/store/points/{point_id}", response_model=PointSummaryPublic)
def post_point_summary(
    point_id: Annotated[str, Path(max_length=64)],
    body: PointSummaryCreate,
    source: ClockedPeer,
    service: ServiceDep,
) -> PointSummaryPublic:
    """Keep a replicated point's plaintext summary (asset, kind, created_at, bytes) for this
    appliance's page; posting it again replaces it."""
    check_point_id(point_id)
    created = body.created_at
    # Kept in UTC, so the summaries sort by their text (a time without a zone is taken as UTC).
    created = (created if created.tzinfo else created.replace(tzinfo=UTC)).astimezone(UTC)
    summary = body.model_copy(update={"created_at": created})
    store = replica_store(_data_dir(service), source.store_id)
    store.put_summary(point_id, summary.model_dump(mode="json"))
    return PointSummaryPublic(id=point_id, **summary.model_dump())
