"""Take over: the routes of both sides (docs/replication.md, "Take over").

- The **source** (admin): ``PUT /api/peers/{id}/takeover`` ``{allow}`` seals the store's recovery
  key to the peer's key and puts the grant there, or revokes it (:mod:`api.takeover_grant`).
- The **peer**, for a source's replication token (``ReplicationPeer``: only its own store):
  ``GET /api/replication/store/takeover-key`` (this appliance's X25519 public key),
  ``PUT`` / ``DELETE /api/replication/store/takeover-grant`` (keep or drop the grant; dropping
  it is a revocation, not a deletion of data).
- The **peer** (admin): ``POST`` / ``DELETE /api/replication/sources/{id}/takeover`` open the
  replica as a store of its own, or close it (:mod:`api.takeover`); the store-scoped routes then
  take ``?store=<store id>`` (``api.deps.StoreService``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response, status
from pydantic import BaseModel

from api.deps import Admin, ReplicationPeer, ServiceDep
from api.identity import appliance_id
from api.pairing import get_source
from api.peers import peer_status
from api.replication_jobs import find_peer
from api.routers.peers import PeerPublic
from api.schemas import Request
from api.takeover import delete_grant, private_key, store_grant
from api.takeover_grant import allow_takeover, revoke_takeover
from api.takeover_keys import ALGORITHM, public_key_text
from appliance.errors import ApplianceError

router = APIRouter(tags=["takeover"])


class TakeoverAllow(Request):
    #: True: seal the store key to the peer and send it; false: revoke the grant there.
    allow: bool


class TakeoverKeyPublic(BaseModel):
    #: The raw 32-byte X25519 public key, base64.
    public_key: str
    algorithm: str
    appliance_id: str


class TakeoverGrantCreate(Request):
    #: ``{v, epk, nonce, ct}`` (api.takeover_keys); checked by the route, not by the schema.
    sealed: dict[str, Any]
    #: The peer key it was sealed to (base64), which must be this appliance's current one.
    public_key: str


class TakeoverOpenPublic(BaseModel):
    store_id: str
    opened_at: datetime
    #: Points the taken-over store holds, and assets made from them.
    points: int
    assets: int


# --- the source's side -------------------------------------------------------------------------


@router.put("/peers/{peer_id}/takeover", response_model=PeerPublic)
def set_takeover(
    peer_id: str, body: TakeoverAllow, principal: Admin, service: ServiceDep
) -> PeerPublic:
    """Allow the peer to take over this store (the recovery key, sealed to the peer's key, is
    sent to it) or revoke that. A revocation that cannot reach the peer is remembered and
    retried: ``takeover.revocation_pending`` stays true until the peer confirms."""
    app = service.app
    location = find_peer(app, peer_id)
    if body.allow:
        location = allow_takeover(app, location, service.now())
        action = "peer.takeover_allowed"
    else:
        location = revoke_takeover(app, location)
        action = "peer.takeover_revoked"
    peer = peer_status(app, location, service.now())
    app.catalog.audit(
        principal.name,
        action,
        location.id,
        {
            "peer": peer["peer_appliance_id"],
            "revocation_pending": peer["takeover"]["revocation_pending"],
            **principal.audit_details,
        },
    )
    return PeerPublic(**peer)


# --- the peer's side: a source's replication token ----------------------------------------------


@router.get("/replication/store/takeover-key", response_model=TakeoverKeyPublic)
def get_takeover_key(source: ReplicationPeer, service: ServiceDep) -> TakeoverKeyPublic:
    """This appliance's take-over public key (made on first need), to seal a grant to."""
    key = private_key(service.app.data_dir.path)
    return TakeoverKeyPublic(
        public_key=public_key_text(key), algorithm=ALGORITHM, appliance_id=appliance_id(service.app)
    )


@router.put("/replication/store/takeover-grant", status_code=status.HTTP_204_NO_CONTENT)
def put_takeover_grant(
    body: TakeoverGrantCreate, source: ReplicationPeer, service: ServiceDep
) -> Response:
    """Keep the source's grant (400 when malformed or sealed to another key than the current)."""
    app = service.app
    store_grant(app.data_dir.path, source, body.sealed, body.public_key, service.now())
    app.catalog.audit(
        source.user,
        "replication.takeover_granted",
        source.appliance_id,
        {"store_id": source.store_id, "name": source.name},
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.delete("/replication/store/takeover-grant", status_code=status.HTTP_204_NO_CONTENT)
def delete_takeover_grant(source: ReplicationPeer, service: ServiceDep) -> Response:
    """Drop the source's grant (a revocation; 204 also when there was none). A store already
    taken over stays open until an admin here closes it."""
    app = service.app
    deleted = delete_grant(app.data_dir.path, source.store_id)
    app.catalog.audit(
        source.user,
        "replication.takeover_revoked",
        source.appliance_id,
        {"store_id": source.store_id, "name": source.name, "had_grant": deleted},
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# --- the peer's side: this appliance's admin -------------------------------------------------------


SourceId = Annotated[str, Path(max_length=64)]


@router.post("/replication/sources/{source_id}/takeover", response_model=TakeoverOpenPublic)
def open_takeover(source_id: SourceId, principal: Admin, service: ServiceDep) -> TakeoverOpenPublic:
    """Open the source's replica as a store of this appliance (409 ``takeover_not_granted``
    without a grant). Its points, browsing, restores, failovers and jobs are then reached with
    ``?store=<store id>``. Opening an open one answers it as it is."""
    catalog = service.app.catalog
    try:
        takeover = service.takeovers.open(source_id)
    except ApplianceError as exc:
        catalog.audit(
            principal.name,
            "replication.takeover_failed",
            source_id[:64],
            {"code": exc.code, "error": exc.message, **principal.audit_details},
        )
        raise
    tcat = takeover.app.catalog
    points = len(tcat.list_points(store_id=takeover.store_id))
    assets = len(tcat.list_assets())
    catalog.audit(
        principal.name,
        "replication.takeover_opened",
        source_id,
        {"store": takeover.store_id, "points": points, **principal.audit_details},
    )
    return TakeoverOpenPublic(
        store_id=takeover.store_id,
        opened_at=datetime.fromisoformat(takeover.opened_at),
        points=points,
        assets=assets,
    )


@router.delete("/replication/sources/{source_id}/takeover", status_code=status.HTTP_204_NO_CONTENT)
def close_takeover(source_id: SourceId, principal: Admin, service: ServiceDep) -> Response:
    """Close the take-over of the source's store (409 while a VM runs from it). The replica
    keeps what was written into it (a failback's new point)."""
    record = get_source(service.app, source_id)
    service.takeovers.close(record.store_id)
    service.app.catalog.audit(
        principal.name,
        "replication.takeover_closed",
        source_id,
        {"store": record.store_id, **principal.audit_details},
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
