"""Peers: the appliances this one replicates to (the source's side of docs/replication.md).

Pairing takes the peer's address and the one-time code its page shows (admin); the peer becomes
a location of kind ``peer`` whose certificate is pinned and whose replication token is kept apart
from the catalog (never in an answer or the audit log). The list shows each peer's fingerprint
(to compare with the peer's page), whether it answered, the last replication and the RPO at the
peer. "Replicate now" submits a ``replicate`` job (operator). Work functions: :mod:`api.peers`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, Field

from api.deps import Admin, Operator, ServiceDep, Viewer
from api.identity import appliance_name
from api.peers import list_peers, pair_with_peer, peer_status, unpair_peer, update_peer
from api.pull_back import PULL_BACK_KIND, active_pulls
from api.replication_jobs import REPLICATE_KIND, active_jobs, find_peer
from api.schemas import JobPublic, Request
from api.views import job_public

router = APIRouter(tags=["peers"])


class PeerCreate(Request):
    #: ``https://host:port`` of the peer.
    address: str = Field(min_length=8, max_length=300)
    #: The pairing code the peer's page shows (one use, 10 minutes).
    code: str = Field(min_length=1, max_length=64)
    label: str = Field(default="", max_length=100)
    replicate_new: bool = True
    #: Upload limit in MiB/s; null: none.
    bandwidth_mib_s: float | None = Field(default=None, gt=0, le=100_000)
    #: Minutes between catch-up replications by the scheduler; 0: only after backups and on demand.
    catch_up_minutes: int = Field(default=15, ge=0, le=7 * 24 * 60)


class PeerWindow(Request):
    #: ``HH:MM`` local time; an end before the start wraps midnight; start == end is refused.
    start: str = Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
    end: str = Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")


class PeerUpdate(Request):
    label: str | None = Field(default=None, min_length=1, max_length=100)
    replicate_new: bool | None = None
    #: MiB/s; null removes the limit (leave the field out to keep it).
    bandwidth_mib_s: float | None = Field(default=None, gt=0, le=100_000)
    catch_up_minutes: int | None = Field(default=None, ge=0, le=7 * 24 * 60)
    #: When replication may run, local time; null: any time (leave the field out to keep it).
    window: PeerWindow | None = None


class ReplicateNow(Request):
    #: Run at once even outside the peer's replication window.
    ignore_window: bool = False


class PeerReplication(BaseModel):
    at: str | None
    job: str | None
    outcome: str | None
    error: str | None
    points: int | None
    bytes_sent: int | None


class PeerPublic(BaseModel):
    id: str
    label: str
    address: str
    peer_name: str | None
    peer_appliance_id: str | None
    #: SHA-256 of the pinned certificate, ``AB:CD:...``: compare it with the peer's page.
    fingerprint: str | None
    online: bool
    last_seen_at: datetime | None
    replicate_new: bool
    bandwidth_mib_s: float | None
    catch_up_minutes: int
    #: ``{start, end}`` (HH:MM, local time) or null: any time.
    window: dict[str, str] | None
    window_open: bool
    #: When the window opens next, while it is closed.
    window_opens_at: datetime | None
    #: The link's last known state in words ("the peer refused the token (unpaired?)").
    status: str
    #: ok, unreachable, token_refused, certificate_changed, full.
    status_code: str
    #: The peer's clock minus this appliance's (None: not read yet).
    clock_skew_seconds: float | None
    #: A warning in words above 5 minutes: "the peer's clock is 12 min ahead of this appliance's".
    clock_skew: str | None
    points_at_peer: int
    points_pending: int
    newest_point_id: str | None
    newest_point_at: datetime | None
    #: Age of the newest point whose copy at the peer is present (None: none yet).
    rpo_seconds: float | None
    #: The same in words: "newest point at the peer is 35 min old".
    rpo: str
    last_replication: PeerReplication
    #: The replication queued, running or waiting now, if any.
    job: dict[str, Any] | None
    #: Whether the peer may take over (``PUT /peers/{id}/takeover``): ``allowed``,
    #: ``granted_at``, ``revocation_pending`` (revoked here, not yet confirmed by the peer),
    #: ``error``.
    takeover: dict[str, Any]


class PeerRemoved(BaseModel):
    id: str
    label: str
    token_deleted: bool
    #: Whether the peer revoked the token (it was asked first); ``peer_answer`` says how.
    revoked_at_peer: bool
    peer_answer: str
    copies_forgotten: int
    peer_still_holds_replica: bool
    #: What is left to do (unpair on the peer's page too), only when the peer did not revoke.
    next: str | None


@router.get("/peers", response_model=list[PeerPublic])
def get_peers(principal: Viewer, service: ServiceDep) -> list[PeerPublic]:
    return [PeerPublic(**peer) for peer in list_peers(service.app, service.now())]


@router.post("/peers", response_model=PeerPublic, status_code=status.HTTP_201_CREATED)
def pair_peer(body: PeerCreate, principal: Admin, service: ServiceDep) -> PeerPublic:
    """Pair with a peer: its certificate is read and pinned, the code exchanged for a
    replication token, and the peer added as a location (400 in words when it refuses)."""
    app, settings = service.app, service.settings
    location = pair_with_peer(
        app,
        body.address,
        body.code,
        body.label,
        name=appliance_name(app),
        cert_path=settings.cert_path,
        key_path=settings.key_path,
        host=settings.host,
        replicate_new=body.replicate_new,
        bandwidth_mib_s=body.bandwidth_mib_s,
        catch_up_minutes=body.catch_up_minutes,
    )
    peer = peer_status(app, location, service.now())
    app.catalog.audit(
        principal.name,
        "peer.pair",
        location.id,
        {
            "address": location.address,
            "label": location.label,
            "peer": peer["peer_appliance_id"],
            "fingerprint": peer["fingerprint"],
            **principal.audit_details,
        },
    )
    return PeerPublic(**peer)


@router.patch("/peers/{peer_id}", response_model=PeerPublic)
def change_peer(
    peer_id: str, body: PeerUpdate, principal: Admin, service: ServiceDep
) -> PeerPublic:
    """Change a peer's label, "replicate new points", bandwidth limit or catch-up interval."""
    app = service.app
    given = body.model_fields_set
    location = update_peer(
        app,
        peer_id,
        label=body.label,
        replicate_new=body.replicate_new,
        bandwidth_mib_s=body.bandwidth_mib_s,
        clear_bandwidth="bandwidth_mib_s" in given and body.bandwidth_mib_s is None,
        catch_up_minutes=body.catch_up_minutes,
        window=body.window.model_dump() if body.window is not None else None,
        clear_window="window" in given and body.window is None,
    )
    app.catalog.audit(
        principal.name,
        "peer.update",
        location.id,
        {**body.model_dump(exclude_unset=True), **principal.audit_details},
    )
    return PeerPublic(**peer_status(app, location, service.now()))


@router.delete("/peers/{peer_id}", response_model=PeerRemoved)
def remove_peer(peer_id: str, principal: Admin, service: ServiceDep) -> PeerRemoved:
    """Unpair: the peer is asked to revoke the token first, then the token is deleted here,
    queued or waiting replications cancelled, the copies at the peer forgotten (409 while a
    point is held only there). A peer that could not revoke it: unpair on its page too."""
    app = service.app
    location = find_peer(app, peer_id)
    removed = unpair_peer(app, location.id, cancel=service.jobs.cancel)
    app.catalog.audit(
        principal.name,
        "peer.unpair",
        location.id,
        {
            "label": location.label,
            "address": location.address,
            "revoked_at_peer": removed["revoked_at_peer"],
            **principal.audit_details,
        },
    )
    return PeerRemoved(**removed)


@router.post(
    "/peers/{peer_id}/replicate", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED
)
def replicate_now(
    peer_id: str,
    principal: Operator,
    service: ServiceDep,
    response: Response,
    body: ReplicateNow | None = None,
) -> JobPublic:
    """Send every point the peer lacks now, as a job (a replication already queued is reused,
    and one waiting is woken). Outside the peer's window the job waits for it, unless
    ``ignore_window``: then a queued or waiting one that would wait is replaced by one that
    runs at once."""
    app = service.app
    location = find_peer(app, peer_id)
    pending = [j for j in active_jobs(app, location.id) if j.state in ("queued", "waiting")]
    params: dict[str, Any] = {"location": location.id, "trigger": "manual"}
    if body is not None and body.ignore_window:
        params["ignore_window"] = True
        for job in [j for j in pending if not j.params.get("ignore_window")]:
            service.jobs.cancel(job.id)  # it would wait for the window again
            pending.remove(job)
    if pending:
        job = service.jobs.wake(pending[0].id) or app.catalog.get_job(pending[0].id)
    else:
        job = service.jobs.submit(REPLICATE_KIND, params)
    app.catalog.audit(
        principal.name, "peer.replicate", location.id, {"job": job.id, **principal.audit_details}
    )
    response.headers["Location"] = f"/api/jobs/{job.id}"
    return job_public(job)


@router.post(
    "/peers/{peer_id}/pull", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED
)
def pull_from_peer(
    peer_id: str, principal: Operator, service: ServiceDep, response: Response
) -> JobPublic:
    """Failback: fetch the points the peer holds and this appliance lacks (made there while it
    ran the VMs), as a ``pull_back`` job; only what the home pool lacks travels. A pull already
    queued is reused, and one waiting for the peer is woken."""
    app = service.app
    location = find_peer(app, peer_id)
    pending = active_pulls(app, location.id)
    if pending:
        job = service.jobs.wake(pending[0].id) or app.catalog.get_job(pending[0].id)
    else:
        job = service.jobs.submit(PULL_BACK_KIND, {"location": location.id})
    app.catalog.audit(
        principal.name, "peer.pull", location.id, {"job": job.id, **principal.audit_details}
    )
    response.headers["Location"] = f"/api/jobs/{job.id}"
    return job_public(job)
