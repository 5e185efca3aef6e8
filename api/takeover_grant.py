"""Letting a peer take over, the source's side: the grant sent, revoked, and remembered.

By default the store key stays with the source and a peer holds only ciphertext. An admin may
allow a peer to take over (docs/replication.md, "Take over"): the source fetches the peer's
X25519 public key over the pinned link, seals the store's recovery key to it
(:func:`api.takeover_keys.seal`, bound to this store id and the peer's appliance id) and puts the
grant on the peer. Revoking deletes it there.

What this appliance believes is kept in the peer location's details (``takeover``):
``{allowed, granted_at, revocation_pending, error}``. A revocation that cannot reach the peer is
remembered (``revocation_pending``) and retried by the scheduler's tick until the peer confirms,
so the page never says "revoked" for a grant the peer still holds. Revoking stops future
take-overs; a peer that already opened the store had the key in memory, and whoever holds the
peer's private key and an old copy of the grant can still open it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from api.peer_backend import PeerLink, open_link
from api.replication_jobs import peer_locations, peer_options
from api.takeover_keys import ALGORITHM, parse_public_key, seal
from appliance.catalog.records import LocationRecord
from appliance.engine import Appliance
from appliance.errors import ApplianceError, InvalidInput
from appliance.locations.work import location_options

log = logging.getLogger("appliance.takeover")

DETAILS_KEY = "takeover"
KEY_ROUTE = "/api/replication/store/takeover-key"
GRANT_ROUTE = "/api/replication/store/takeover-grant"


def takeover_status(location: LocationRecord) -> dict[str, Any]:
    """``{allowed, granted_at, revocation_pending, error}`` as the peers page shows it."""
    stored = location.details.get(DETAILS_KEY)
    state = stored if isinstance(stored, dict) else {}
    return {
        "allowed": bool(state.get("allowed", False)),
        "granted_at": state.get("granted_at"),
        "revocation_pending": bool(state.get("revocation_pending", False)),
        "error": state.get("error"),
    }


def _record(app: Appliance, location: LocationRecord, **changes: Any) -> LocationRecord:
    state = {**takeover_status(location), **changes}
    return app.catalog.update_location(location.id, details={DETAILS_KEY: state})


def _link(app: Appliance, location: LocationRecord) -> PeerLink:
    return open_link(location.address, **location_options(app, location))


def allow_takeover(app: Appliance, location: LocationRecord, now: datetime) -> LocationRecord:
    """Seal the store's recovery key to the peer's take-over key and put the grant there."""
    peer_id = peer_options(location).get("peer_appliance_id")
    if not isinstance(peer_id, str) or not peer_id:
        raise InvalidInput("this peer's appliance id is unknown: pair with it again")
    link = _link(app, location)
    try:
        answer = link.get_json(KEY_ROUTE, what="the peer's take-over key")
        if answer.get("algorithm") != ALGORITHM:
            raise InvalidInput(f"{link.describe()} offers no take-over key this appliance can use")
        if answer.get("appliance_id") != peer_id:
            raise InvalidInput(
                f"{link.describe()} answered as appliance {answer.get('appliance_id')}, "
                f"not {peer_id}: re-pair with it"
            )
        public = parse_public_key(answer.get("public_key"))
        sealed = seal(app.repo.key.recovery_key(), public, app.repo.store_id, peer_id)
        link.request(
            "PUT",
            GRANT_ROUTE,
            what="the take-over grant",
            ok=(204,),
            json={"sealed": sealed.to_dict(), "public_key": answer["public_key"]},
        )
    finally:
        link.close()
    return _record(
        app,
        location,
        allowed=True,
        granted_at=now.isoformat(),
        revocation_pending=False,
        error=None,
    )


def revoke_takeover(app: Appliance, location: LocationRecord) -> LocationRecord:
    """Delete the grant on the peer. The wish is recorded first: a peer that cannot be reached
    now keeps ``revocation_pending`` (and the reason) and is asked again by the tick."""
    location = _record(app, location, allowed=False, revocation_pending=True)
    link: PeerLink | None = None
    try:
        link = _link(app, location)
        link.request("DELETE", GRANT_ROUTE, what="the take-over revocation", ok=(204,))
    except ApplianceError as exc:
        log.warning("revoking the take-over at %s is pending: %s", location.address, exc.message)
        return _record(app, location, error=exc.message)
    finally:
        if link is not None:
            link.close()
    return _record(app, location, granted_at=None, revocation_pending=False, error=None)


def takeover_tick(app: Appliance) -> Callable[[datetime], list[str]]:
    """The scheduler's hook: ask again every peer whose revocation is still pending."""

    def tick(now: datetime) -> list[str]:
        for location in peer_locations(app):
            if takeover_status(location)["revocation_pending"]:
                revoke_takeover(app, location)
        return []

    return tick
