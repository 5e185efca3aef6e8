"""The peer's side of pairing: pairing codes, replication sources and their accounts.

docs/replication.md is the contract. On the peer (the appliance that receives):

1. An admin asks for a **pairing code** (:func:`new_pairing_code`): 8 characters of
   :data:`CODE_ALPHABET` (no 0/O, 1/I/L), valid :data:`CODE_TTL`, one use. Only its SHA-256 is
   kept, in the catalog's settings document :data:`CODES_KEY` (``{"codes": [{hash, expires_at,
   created_by, created_at}]}``), so a code survives a restart of the service and a leaked catalog
   pairs nobody. At most :data:`MAX_OPEN_CODES` are open at once (the oldest go first).
2. The source sends it (``POST /api/replication/pair``, no login): :func:`pair` checks the code,
   then makes (or re-enables) the system user ``peer-<source appliance id>`` with role
   ``replication`` (:data:`api.security.REPLICATION_ROLE`) and an unusable password, revokes
   the user's earlier tokens (re-pairing replaces the link), makes a token scoped
   ``["replication", "store:<source store id>"]``, creates the replica folder
   (:mod:`api.replica_store`), records the source in the settings document :data:`SOURCES_KEY`
   (``{"sources": {appliance id: {appliance_id, name, store_id, fingerprint, token_id,
   paired_at, last_seen}}}``) and only then consumes the code. A wrong, expired or used code is
   :class:`PairingRefused`, the same answer for all three; the router throttles failures per
   client like failed sign-ins.
3. :func:`unpair` revokes the token and disables the user; the replica stays unless asked.
   A source that unpairs itself (:func:`unpaired_by_source`, its own token asking) gets the
   same revocation, and its record stays, marked ``unpaired_at`` / ``unpaired_by: "source"``,
   so the peer's page still shows whose replica it keeps until its admin removes it.

Read-modify-write of both documents holds :data:`_LOCK` (one service process writes them).
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from api.identity import APPLIANCE_ID, FINGERPRINT, appliance_id
from api.replica_store import check_store_id, replica_store
from api.security import REPLICATION_ROLE, digest, new_api_token, same_secret
from appliance.engine import Appliance
from appliance.errors import ApplianceError, Conflict, InvalidInput, NotFound

#: Settings documents (frozen: an upgraded peer keeps its pairings).
CODES_KEY = "replication_pairing_codes"
SOURCES_KEY = "replication_sources"
#: 31 characters nobody misreads (no 0/O, no 1/I/L): 8 of them are about 40 bits.
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
CODE_LENGTH = 8
CODE_TTL = timedelta(minutes=10)
MAX_OPEN_CODES = 20
#: A source's system user is named this and its appliance id.
PEER_USER_PREFIX = "peer-"
#: The scope naming the one store a replication token may use.
STORE_SCOPE_PREFIX = "store:"
#: A source's ``last_seen`` is written at most this often (not a catalog write per request).
LAST_SEEN_INTERVAL = 60.0
#: The key failed pairings are throttled under (not a valid user name: no collision).
THROTTLE_KEY = "(pairing)"
#: The stored password hash of a replication user: no argon2 hash, so no password matches it.
NO_PASSWORD = "!replication-account"

_LOCK = threading.Lock()
_TOUCHED: dict[tuple[str, str], float] = {}


class PairingRefused(ApplianceError):
    """The pairing code is wrong, has expired or was used already; ask the peer's admin for a
    new one."""

    code = "pairing_refused"
    kind = "forbidden"


class PairingThrottled(ApplianceError):
    """Too many wrong pairing codes from this address; wait before trying again."""

    code = "pairing_throttled"
    kind = "throttled"


@dataclass(frozen=True)
class PairingCode:
    code: str
    expires_at: datetime


@dataclass(frozen=True)
class SourceClaim:
    """What a source says about itself when it pairs."""

    appliance_id: str
    name: str
    store_id: str
    fingerprint: str


@dataclass(frozen=True)
class SourceRecord:
    """A paired source, as kept in :data:`SOURCES_KEY`."""

    appliance_id: str
    name: str
    store_id: str
    fingerprint: str
    token_id: str
    paired_at: str
    last_seen: str | None = None
    #: Set when the source unpaired itself: the token is revoked, the replica kept.
    unpaired_at: str | None = None
    unpaired_by: str | None = None

    @property
    def user(self) -> str:
        return replication_user(self.appliance_id)

    @property
    def store_scope(self) -> str:
        return f"{STORE_SCOPE_PREFIX}{self.store_id}"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceRecord:
        return cls(
            appliance_id=str(d["appliance_id"]),
            name=str(d.get("name", "")),
            store_id=str(d["store_id"]),
            fingerprint=str(d.get("fingerprint", "")),
            token_id=str(d.get("token_id", "")),
            paired_at=str(d.get("paired_at", "")),
            last_seen=d.get("last_seen") if isinstance(d.get("last_seen"), str) else None,
            unpaired_at=str(d["unpaired_at"]) if d.get("unpaired_at") else None,
            unpaired_by=str(d["unpaired_by"]) if d.get("unpaired_by") else None,
        )


@dataclass(frozen=True)
class Pairing:
    source: SourceRecord
    #: The replication token itself: shown once, only its hash is kept.
    token: str


def replication_user(source_appliance_id: str) -> str:
    return f"{PEER_USER_PREFIX}{source_appliance_id}"


def normalise_code(text: str) -> str:
    """A code as typed: case, spaces and dashes do not matter."""
    return "".join(ch for ch in text.upper() if ch not in " -\t")


def check_claim(claim: SourceClaim) -> SourceClaim:
    if not APPLIANCE_ID.match(claim.appliance_id):
        raise InvalidInput("source.appliance_id must be 32 lowercase hex digits")
    check_store_id(claim.store_id)
    if not FINGERPRINT.match(claim.fingerprint):
        raise InvalidInput(
            "source.fingerprint must be a SHA-256 fingerprint AB:CD:... (upper case)"
        )
    if not claim.name.strip() or len(claim.name) > 100:
        raise InvalidInput("source.name must be 1 to 100 characters")
    return claim


# --- pairing codes -------------------------------------------------------------------------


def new_pairing_code(app: Appliance, now: datetime, created_by: str) -> PairingCode:
    """A new one-time code, valid :data:`CODE_TTL` from ``now``; only its hash is kept."""
    code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
    expires = now + CODE_TTL
    with _LOCK:
        codes = _open_codes(app, now)
        codes.append(
            {
                "hash": digest(code),
                "expires_at": expires.isoformat(),
                "created_at": now.isoformat(),
                "created_by": created_by,
            }
        )
        app.catalog.put_settings(CODES_KEY, {"codes": codes[-MAX_OPEN_CODES:]})
    return PairingCode(code, expires)


def _open_codes(app: Appliance, now: datetime) -> list[dict[str, Any]]:
    """The stored codes that have not expired (the caller holds ``_LOCK``)."""
    stored = app.catalog.get_settings(CODES_KEY).get("codes")
    codes: list[dict[str, Any]] = []
    for entry in stored if isinstance(stored, list) else []:
        try:
            if isinstance(entry, dict) and datetime.fromisoformat(entry["expires_at"]) > now:
                codes.append(entry)
        except (KeyError, TypeError, ValueError):
            continue
    return codes


# --- sources ---------------------------------------------------------------------------------


def _sources_document(app: Appliance) -> dict[str, dict[str, Any]]:
    stored = app.catalog.get_settings(SOURCES_KEY).get("sources")
    if not isinstance(stored, dict):
        return {}
    return {k: v for k, v in stored.items() if isinstance(v, dict)}


def list_sources(app: Appliance) -> list[SourceRecord]:
    """Every paired source, by name."""
    records = [SourceRecord.from_dict(d) for d in _sources_document(app).values()]
    return sorted(records, key=lambda r: (r.name.lower(), r.appliance_id))


def get_source(app: Appliance, source_appliance_id: str) -> SourceRecord:
    found = _sources_document(app).get(source_appliance_id)
    if found is None:
        raise NotFound(
            f"no replication source {source_appliance_id[:64]} is paired with this appliance",
            source=source_appliance_id[:64],
        )
    return SourceRecord.from_dict(found)


def source_of_token(app: Appliance, token_id: str | None) -> SourceRecord | None:
    """The source whose replication token this is; None when none (unpaired, re-paired)."""
    if token_id is None:
        return None
    for record in list_sources(app):
        if record.token_id == token_id and record.unpaired_at is None:
            return record
    return None


def pair(app: Appliance, code: str, claim: SourceClaim, now: datetime, *, data_dir: str) -> Pairing:
    """Pair the source ``claim`` with the one-time ``code``; see the module docstring."""
    check_claim(claim)
    wanted = digest(normalise_code(code))
    with _LOCK:
        codes = _open_codes(app, now)
        match = next((c for c in codes if same_secret(str(c.get("hash", "")), wanted)), None)
        if match is None:
            raise PairingRefused()
        if claim.appliance_id == appliance_id(app):
            raise InvalidInput("an appliance cannot replicate into itself")
        sources = _sources_document(app)
        for other in sources.values():
            if other.get("store_id") == claim.store_id and (
                other.get("appliance_id") != claim.appliance_id
            ):
                raise Conflict(
                    f"store {claim.store_id} already replicates here from another appliance "
                    f"({other.get('name')}); unpair it first",
                    store_id=claim.store_id,
                )
        user = replication_user(claim.appliance_id)
        _ensure_replication_user(app, user)
        app.catalog.revoke_tokens(user)
        secret = new_api_token()
        token = app.catalog.add_token(
            user, digest(secret), [REPLICATION_ROLE, f"{STORE_SCOPE_PREFIX}{claim.store_id}"]
        )
        replica_store(data_dir, claim.store_id).create()
        record = SourceRecord(
            appliance_id=claim.appliance_id,
            name=claim.name.strip(),
            store_id=claim.store_id,
            fingerprint=claim.fingerprint,
            token_id=token.id,
            paired_at=now.isoformat(),
            last_seen=now.isoformat(),
        )
        sources[claim.appliance_id] = asdict(record)
        app.catalog.put_settings(SOURCES_KEY, {"sources": sources})
        app.catalog.put_settings(CODES_KEY, {"codes": [c for c in codes if c is not match]})
    return Pairing(record, secret)


def _ensure_replication_user(app: Appliance, user: str) -> None:
    try:
        existing = app.catalog.get_user(user)
    except NotFound:
        app.catalog.add_user(user, REPLICATION_ROLE, NO_PASSWORD)
        return
    if existing.role != REPLICATION_ROLE:
        raise Conflict(f"user {user} exists and is not a replication account", user=user)
    if existing.disabled_at is not None:
        app.catalog.update_user(user, disabled=False)


def unpair(
    app: Appliance, source_appliance_id: str, *, data_dir: str, delete_data: bool = False
) -> tuple[SourceRecord, int]:
    """Forget a source: its token is revoked and its user disabled; its replica stays unless
    ``delete_data``. Returns the record and how many tokens were revoked."""
    with _LOCK:
        sources = _sources_document(app)
        found = sources.pop(source_appliance_id, None)
        if found is None:
            raise NotFound(
                f"no replication source {source_appliance_id[:64]} is paired with this appliance",
                source=source_appliance_id[:64],
            )
        record = SourceRecord.from_dict(found)
        revoked = 0
        try:
            revoked = app.catalog.revoke_tokens(record.user)
            app.catalog.update_user(record.user, disabled=True)
        except NotFound:
            pass  # the account is gone already: nothing left to revoke
        app.catalog.put_settings(SOURCES_KEY, {"sources": sources})
    if delete_data:
        replica_store(data_dir, record.store_id).remove()
    return record, revoked


def unpaired_by_source(app: Appliance, record: SourceRecord, now: datetime) -> int:
    """The source revokes its own token (``POST /api/replication/store/unpair``): the token is
    revoked, the account disabled, the record marked unpaired; the replica stays. Returns how
    many tokens were revoked."""
    with _LOCK:
        sources = _sources_document(app)
        current = sources.get(record.appliance_id)
        revoked = app.catalog.revoke_tokens(record.user)
        app.catalog.update_user(record.user, disabled=True)
        if current is not None:
            current.update(unpaired_at=now.isoformat(), unpaired_by="source")
            app.catalog.put_settings(SOURCES_KEY, {"sources": sources})
    return revoked


def touch_source(app: Appliance, record: SourceRecord, now: datetime) -> None:
    """Note that ``record``'s source was just heard from (written at most every
    :data:`LAST_SEEN_INTERVAL` seconds per source)."""
    key = (app.data_dir.path, record.appliance_id)
    moment = time.monotonic()
    last = _TOUCHED.get(key)
    if last is not None and moment - last < LAST_SEEN_INTERVAL:
        return
    _TOUCHED[key] = moment
    with _LOCK:
        sources = _sources_document(app)
        current = sources.get(record.appliance_id)
        if current is None or current.get("token_id") != record.token_id:
            return
        current["last_seen"] = now.isoformat()
        app.catalog.put_settings(SOURCES_KEY, {"sources": sources})
