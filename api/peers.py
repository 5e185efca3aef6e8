"""The source's side of pairing and the peers page: pair, list, change, unpair.

docs/replication.md is the contract. :func:`pair_with_peer` pairs this appliance (the source)
with a peer (the appliance that receives):

1. The peer's certificate is read once without trusting it (:func:`fetch_certificate`) and
   fingerprinted; from then on the link trusts that certificate alone (an SSL context whose only
   trust anchor it is), so the request that uses the code already goes to the certificate the
   user sees on both pages.
2. ``POST /api/replication/pair`` ``{code, source: {appliance_id, name, store_id, fingerprint}}``
   (our own certificate's fingerprint: generated first if the service runs without TLS, so the
   peer can show it); the peer answers ``{peer: {appliance_id, name, fingerprint}, token}``. A
   peer that names another fingerprint than it presented is refused (something is in between).
3. The peer becomes a location of kind ``peer`` (address ``https://host:port``; options
   ``cert_pem``, ``fingerprint``, ``peer_appliance_id``, ``peer_name``, ``replicate_new``,
   ``bandwidth_mib_s``, ``catch_up_minutes``; the token a secret option kept apart from the
   catalog), after its identity file is written on the peer's replica through the backend. Pairing
   again with the same peer (a new certificate, a new token) updates that location; a replica
   that already holds this store under a location this catalog forgot is adopted, its points
   recorded as copies there.

The RPO at the peer is the age of the newest point whose copy there is ``present``: "newest point
at the peer is 35 min old". Both times are the source's own (the point's creation and this
appliance's clock), so a peer whose clock is off does not change it; the page shows that skew
apart (``clock_skew_seconds``, a warning in words above five minutes). The page's ``status`` is
the link's last known state in words (:func:`link_status`), from the last replication or the
tick's link check: "the peer refused the token (unpaired?)" once the peer's admin unpaired us.

Unpairing (:func:`unpair_peer`) first asks the peer to revoke the token
(``POST /api/replication/store/unpair`` with the token itself: the peer disables the account and
marks the source unpaired, keeping the replica), then forgets the peer here: its token is deleted
with the location's secrets, its copies are marked ``deleted`` and the location removed. A peer
that cannot be reached (or does not know the route) is still forgotten here, and the answer says
to unpair on the peer's page too; a peer that refuses the token had revoked it already.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from api.errors import LocationRefused
from api.identity import APPLIANCE_ID, FINGERPRINT, appliance_id, certificate_fingerprint
from api.peer_backend import (
    STORE_ROUTES,
    PeerLink,
    PeerTokenRefused,
    fetch_certificate,
    open_link,
    parse_address,
    pem_fingerprint,
    short_fingerprint,
)
from api.peer_wire import PEER_CLOCKS, skew_words
from api.replication_jobs import (
    DEFAULT_CATCH_UP_MINUTES,
    PEER_KIND,
    active_jobs,
    find_peer,
    peer_locations,
    peer_options,
    pending_points,
    replication_state,
    window_of,
)
from api.replication_window import local_timezone, parse_window, window_state
from api.takeover_grant import takeover_status
from api.tls import ensure_certificate
from appliance.catalog.records import HELD_COPY_STATES, LocationRecord
from appliance.engine import Appliance
from appliance.errors import ApplianceError, Conflict, InvalidInput, StoreError, StoreExists
from appliance.locations.work import location_options, save_location_secrets

#: Where the peer takes a pairing code.
PAIR_ROUTE = "/api/replication/pair"
#: Where a replication token revokes itself on the peer.
UNPAIR_ROUTE = f"{STORE_ROUTES}unpair"
#: Seconds the unpairing waits for the peer (a peer that is down must not hold the page long).
UNPAIR_TIMEOUT = 15.0
#: The link's states (``status_code`` on the page) and their words.
LINK_WORDS = {
    "ok": "answering",
    "unreachable": "the peer does not answer",
    "token_refused": "the peer refused the token (unpaired?)",
    "certificate_changed": "the peer's certificate changed: re-pair to accept it",
    "full": "the peer is full",
}
_LINK_CODES = {
    "peer_token_refused": "token_refused",
    "peer_certificate_changed": "certificate_changed",
    "peer_full": "full",
    "location_unavailable": "unreachable",
}


class PeerPairingRefused(ApplianceError):
    """The peer refused to pair (a wrong, expired or used code, or too many tries); nothing was
    added."""

    code = "peer_pairing_refused"
    kind = "invalid"


def own_fingerprint(cert_path: Path, key_path: Path, host: str) -> str:
    """This appliance's certificate fingerprint (the certificate is generated first when the
    service runs without TLS and has none yet: the peer shows it for comparison)."""
    ensure_certificate(cert_path, key_path, host)
    return certificate_fingerprint(cert_path)


def pair_with_peer(
    app: Appliance,
    address: str,
    code: str,
    label: str = "",
    *,
    name: str,
    cert_path: Path,
    key_path: Path,
    host: str = "127.0.0.1",
    replicate_new: bool = True,
    bandwidth_mib_s: float | None = None,
    catch_up_minutes: int = DEFAULT_CATCH_UP_MINUTES,
) -> LocationRecord:
    """Pair with the peer at ``address`` using its one-time ``code``; see the module doc."""
    address = parse_address(address)[0]
    try:
        cert_pem = fetch_certificate(address)
    except StoreError as exc:
        raise LocationRefused(f"{exc.message}; the peer was not added", location=address) from exc
    fingerprint = pem_fingerprint(cert_pem)
    claim = {
        "appliance_id": appliance_id(app),
        "name": name,
        "store_id": app.repo.store_id,
        "fingerprint": own_fingerprint(cert_path, key_path, host),
    }
    with contextlib.closing(PeerLink(address, cert_pem=cert_pem, fingerprint=fingerprint)) as link:
        try:
            answer = link.post_json(
                PAIR_ROUTE, {"code": code, "source": claim}, what="the pairing request"
            )
        except StoreError as exc:
            raise _pairing_failed(exc, address) from exc
    peer, token = _check_answer(answer, fingerprint, address)
    options: dict[str, Any] = {
        "cert_pem": cert_pem,
        "fingerprint": fingerprint,
        "peer_appliance_id": peer["appliance_id"],
        "peer_name": peer["name"],
        "replicate_new": bool(replicate_new),
        "bandwidth_mib_s": bandwidth_mib_s,
        "catch_up_minutes": int(catch_up_minutes),
    }
    known = [
        loc
        for loc in peer_locations(app)
        if peer_options(loc).get("peer_appliance_id") == peer["appliance_id"]
    ]
    if known:
        return _repaired(app, known[0], address, options, token, label)
    try:
        return app.add_location(
            address,
            kind=PEER_KIND,
            label=label or peer["name"],
            offsite=True,
            options={**options, "token": token},
        )
    except StoreExists as exc:
        if exc.details.get("store_id") != app.repo.store_id:
            raise
    # The replica holds this store under a location this catalog no longer knows (unpaired
    # here, or a catalog rebuilt): adopt it, with what it holds.
    adopted = app.adopt_location(address, kind=PEER_KIND, options={**options, "token": token})
    return app.catalog.update_location(adopted["location"], label=label or peer["name"])


def _pairing_failed(exc: StoreError, address: str) -> ApplianceError:
    """A refusal of the pairing request, in the user's terms."""
    status = exc.details.get("status")
    if isinstance(status, int) and 400 <= status < 500:
        said = exc.details.get("peer_message") or exc.message
        return PeerPairingRefused(
            f"the peer at {address} refused to pair ({status}): {said}",
            location=address,
            status=status,
            code_from_peer=exc.details.get("code_from_peer"),
        )
    return LocationRefused(f"{exc.message}; the peer was not added", location=address)


def _check_answer(
    answer: dict[str, Any], fingerprint: str, address: str
) -> tuple[dict[str, str], str]:
    peer = answer.get("peer")
    token = answer.get("token")
    if (
        not isinstance(peer, dict)
        or not isinstance(token, str)
        or not token
        or not APPLIANCE_ID.match(str(peer.get("appliance_id", "")))
        or not FINGERPRINT.match(str(peer.get("fingerprint", "")))
    ):
        raise LocationRefused(
            f"the peer at {address} answered the pairing with something this appliance cannot "
            "read; nothing was added",
            location=address,
        )
    if peer["fingerprint"] != fingerprint:
        raise LocationRefused(
            f"the peer at {address} says its certificate is {short_fingerprint(peer['fingerprint'])} "
            f"but presented {short_fingerprint(fingerprint)}: something stands between the "
            "appliances; nothing was added",
            location=address,
            said=peer["fingerprint"],
            presented=fingerprint,
        )
    return {
        "appliance_id": str(peer["appliance_id"]),
        "name": str(peer.get("name") or address),
        "fingerprint": str(peer["fingerprint"]),
    }, token


def _repaired(
    app: Appliance,
    location: LocationRecord,
    address: str,
    options: dict[str, Any],
    token: str,
    label: str,
) -> LocationRecord:
    """Pairing again with a known peer: its new certificate and token replace the old ones."""
    if location.address != address:
        raise Conflict(
            f"peer {location.label} is paired at {location.address}, not {address}; unpair it "
            "first",
            location=location.id,
        )
    save_location_secrets(app, location.id, {"token": token})
    return app.catalog.update_location(
        location.id,
        label=label or None,
        details={"options": {**peer_options(location), **options}},
    )


# --- the page ---------------------------------------------------------------------------------------


def rpo_words(seconds: float | None) -> str:
    """The RPO at the peer in words: "newest point at the peer is 35 min old"."""
    if seconds is None:
        return "the peer holds no point yet"
    minutes = max(0, int(seconds // 60))
    if minutes < 120:
        age = f"{minutes} min"
    elif minutes < 48 * 60:
        age = f"{minutes // 60} h"
    else:
        age = f"{minutes // 1440} days"
    return f"newest point at the peer is {age} old"


def link_status(online: bool, state: dict[str, Any]) -> tuple[str, str]:
    """The link's state on the page, ``(code, words)`` (:data:`LINK_WORDS`), from the peer's
    last recorded exchange (``state``: its ``replication`` details) and whether it answered: a
    refused token, a changed certificate or a full peer is said until an exchange goes well."""
    code = _LINK_CODES.get(str(state.get("link_code")), "ok")
    if code in ("ok", "unreachable"):
        code = "ok" if online else "unreachable"
    return code, LINK_WORDS[code]


def peer_status(app: Appliance, location: LocationRecord, now: datetime) -> dict[str, Any]:
    """One peer as the page shows it: who it is, whether it answered, the last replication, the
    RPO at the peer (from this appliance's own times), what is still to send, its window and how
    far its clock is from ours."""
    options = peer_options(location)
    present = {c.point_id for c in app.catalog.copies_at(location.id, state="present")}
    held = [p for p in app.catalog.list_points(store_id=app.repo.store_id) if p.id in present]
    newest = held[-1] if held else None  # the list is oldest first
    age = (now - newest.created_at).total_seconds() if newest is not None else None
    jobs = sorted(active_jobs(app, location.id), key=lambda j: j.created_at)
    state = replication_state(location)
    window = window_of(location)
    opens = window_state(now, window, local_timezone(app))
    reading = PEER_CLOCKS.get(parse_address(location.address)[0])
    skew = reading.skew_seconds if reading is not None else state.get("clock_skew_seconds")
    skew = round(float(skew), 3) if isinstance(skew, int | float) else None
    status_code, status_words = link_status(location.online, state)
    return {
        "id": location.id,
        "label": location.label,
        "address": location.address,
        "peer_name": options.get("peer_name"),
        "peer_appliance_id": options.get("peer_appliance_id"),
        "fingerprint": options.get("fingerprint"),
        "online": location.online,
        "last_seen_at": location.last_seen_at,
        "replicate_new": bool(options.get("replicate_new", True)),
        "bandwidth_mib_s": options.get("bandwidth_mib_s"),
        "catch_up_minutes": int(options.get("catch_up_minutes", DEFAULT_CATCH_UP_MINUTES)),
        "window": window.to_option() if window is not None else None,
        "window_open": opens.open,
        "window_opens_at": opens.next_open,
        "status": status_words,
        "status_code": status_code,
        "clock_skew_seconds": skew,
        "clock_skew": skew_words(skew),
        "points_at_peer": len(present),
        "points_pending": len(pending_points(app, location.id)),
        "newest_point_id": newest.id if newest is not None else None,
        "newest_point_at": newest.created_at if newest is not None else None,
        "rpo_seconds": age,
        "rpo": rpo_words(age),
        "last_replication": {
            "at": state.get("last_at"),
            "job": state.get("last_job"),
            "outcome": state.get("last_outcome"),
            "error": state.get("last_error"),
            "points": state.get("last_points"),
            "bytes_sent": state.get("last_bytes_sent"),
        },
        "job": (
            {"id": jobs[-1].id, "state": jobs[-1].state, "wait_reason": jobs[-1].wait_reason}
            if jobs
            else None
        ),
        "takeover": takeover_status(location),
    }


def list_peers(app: Appliance, now: datetime) -> list[dict[str, Any]]:
    return [peer_status(app, location, now) for location in peer_locations(app)]


def update_peer(
    app: Appliance,
    name: str,
    *,
    label: str | None = None,
    replicate_new: bool | None = None,
    bandwidth_mib_s: float | None = None,
    clear_bandwidth: bool = False,
    catch_up_minutes: int | None = None,
    window: dict[str, str] | None = None,
    clear_window: bool = False,
) -> LocationRecord:
    """Change a peer's label and replication settings (None leaves one as it is; the window
    is checked, :func:`api.replication_window.parse_window`)."""
    location = find_peer(app, name)
    options = peer_options(location)
    if replicate_new is not None:
        options["replicate_new"] = replicate_new
    if bandwidth_mib_s is not None:
        if bandwidth_mib_s <= 0:
            raise InvalidInput("bandwidth_mib_s must be positive (null: no limit)")
        options["bandwidth_mib_s"] = bandwidth_mib_s
    elif clear_bandwidth:
        options["bandwidth_mib_s"] = None
    if catch_up_minutes is not None:
        options["catch_up_minutes"] = catch_up_minutes
    if window is not None:
        checked = parse_window(window)
        options["window"] = checked.to_option() if checked is not None else None
    elif clear_window:
        options["window"] = None
    return app.catalog.update_location(location.id, label=label, details={"options": options})


def unpair_peer(
    app: Appliance, name: str, *, cancel: Callable[[str], object] | None = None
) -> dict[str, Any]:
    """Forget a peer here (see the module doc); ``cancel(job_id)`` cancels its queued or waiting
    replications. Refused (:class:`Conflict`) while a point's only held copy is at the peer, or
    while a replication to it runs."""
    location = find_peer(app, name)
    running = [job.id for job in active_jobs(app, location.id) if job.state == "running"]
    if running:
        raise Conflict(
            f"a replication to {location.label} is running (job {running[0]}); cancel it first",
            job=running[0],
        )
    stranded = []
    held_here = app.catalog.copies_at(location.id)
    for copy in held_here:
        if copy.state not in HELD_COPY_STATES:
            continue
        elsewhere = [
            c
            for c in app.catalog.copies_of(copy.point_id)
            if c.location_id != location.id and c.state in HELD_COPY_STATES
        ]
        if not elsewhere:
            stranded.append(copy.point_id)
    if stranded:
        raise Conflict(
            f"{len(stranded)} point(s) are held only at {location.label} "
            f"({', '.join(p[:8] for p in stranded[:5])}); copy them elsewhere before unpairing",
            points=stranded[:20],
        )
    if cancel is not None:
        for job in active_jobs(app, location.id):
            cancel(job.id)
    revoked, said = revoke_at_peer(app, location)
    for copy in held_here:
        if copy.state != "deleted":
            app.catalog.set_copy(copy.point_id, location.id, "deleted")
    app.remove_location(location.id)  # its secrets (the token) go with it
    return {
        "id": location.id,
        "label": location.label,
        "token_deleted": True,
        "revoked_at_peer": revoked,
        "peer_answer": said,
        "copies_forgotten": len(held_here),
        "peer_still_holds_replica": True,
        "next": None
        if revoked
        else f"the peer could not revoke the token ({said}): unpair this appliance on the "
        "peer's page too; the replica stays on the peer until its admin deletes it",
    }


def revoke_at_peer(app: Appliance, location: LocationRecord) -> tuple[bool, str]:
    """Ask the peer to revoke our token (the token itself asks); returns whether it is revoked
    there now and what the peer said, in words. A refused token was revoked already."""
    options = {**location_options(app, location), "timeout": UNPAIR_TIMEOUT}
    try:
        with contextlib.closing(open_link(location.address, **options)) as link:
            link.post_json(UNPAIR_ROUTE, {}, what="the unpairing")
    except PeerTokenRefused:
        return True, "the peer had refused the token already (unpaired there)"
    except ApplianceError as exc:
        return False, exc.message
    return True, "the peer revoked the token and keeps the replica until its admin deletes it"
