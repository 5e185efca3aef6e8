"""Passwords, secrets, roles and login throttling of the service.

- Passwords are hashed with argon2id (argon2-cffi's RFC 9106 low-memory profile: 64 MiB, 3
  passes). ``APPLIANCE_TEST_WEAK_KDF=1`` (the variable the store's key wrapping honours) makes
  hashing cheap for tests; production never sets it.
- Session cookies, CSRF tokens and API tokens are 32 random bytes. Only their SHA-256 is stored:
  they are random and long, so a slow hash adds nothing, and a leaked catalog does not sign
  anyone in.
- Roles are ordered: viewer < operator < admin. An API token carries a role no higher than its
  user's; the effective role is the lower of the two, so demoting a user demotes their tokens.
  :data:`REPLICATION_ROLE` stands outside that order (rank -1: below viewer, so every route that
  asks for a role refuses it); only the replication object routes take it (``api.deps``).
- Login throttling is per (user, client address): after ``free_failures`` failures each further
  attempt waits 2^(n - free) seconds (capped at 15 minutes) and is answered 429 meanwhile,
  before the password is even checked. A success clears the count. On top, a client address
  has ``client_free_failures`` failures across all user names before the same delays apply to
  every sign-in from it, so spraying passwords over many names is as slow as guessing one
  name's. That count survives a success (one known password must not refill the budget) and is
  forgotten after :attr:`LoginThrottle.CLIENT_MEMORY` seconds without a failure. Throttling
  another client never locks the real admin out.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from api.errors import LoginThrottled

ROLES = ("viewer", "operator", "admin")
ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}
#: The role of a peer's system user for one replication source (docs/replication.md).
REPLICATION_ROLE = "replication"
#: The role of a protected host's system user: its token only adds points to its assets
#: (``/api/client/...``, docs/sources.md).
CLIENT_ROLE = "client"
TOKEN_PREFIX = "apl_"
SESSION_COOKIE = "appliance_session"
CSRF_COOKIE = "appliance_csrf"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _hasher() -> PasswordHasher:
    if os.environ.get("APPLIANCE_TEST_WEAK_KDF") == "1":
        return PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    return PasswordHasher()


def hash_password(password: str) -> str:
    return _hasher().hash(password)


_DUMMY: list[str] = []


def verify_password(password_hash: str | None, password: str) -> bool:
    """True if ``password`` matches; an unknown user (None) costs the same time as a known one."""
    hasher = _hasher()
    if password_hash is None:
        if not _DUMMY:
            _DUMMY.append(hasher.hash(secrets.token_urlsafe(16)))
        password_hash = _DUMMY[0]
        password = ""
    try:
        return hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def new_api_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def same_secret(a: str, b: str) -> bool:
    return hmac.compare_digest(
        a.encode("utf-8", "surrogateescape"), b.encode("utf-8", "surrogateescape")
    )


def lower_role(a: str, b: str) -> str:
    return a if ROLE_RANK.get(a, -1) <= ROLE_RANK.get(b, -1) else b


def role_allows(role: str, needed: str) -> bool:
    return ROLE_RANK.get(role, -1) >= ROLE_RANK[needed]


@dataclass(frozen=True)
class Principal:
    """Who makes a request, and how they proved it."""

    name: str
    role: str
    via: str  # "session" or "token"
    session_hash: str | None = None
    token_id: str | None = None
    #: The token's scopes (a replication token's names its source's store); () for a session.
    scopes: tuple[str, ...] = ()

    @property
    def audit_details(self) -> dict[str, str]:
        if self.token_id is not None:
            return {"via": f"token {self.token_id[:8]}"}
        return {"via": self.via}


class LoginThrottle:
    """Failed sign-ins counted per (user, client) and per client; see the module docstring."""

    MAX_DELAY = 900.0
    #: Seconds without a failure after which a client's count across names is forgotten.
    CLIENT_MEMORY = 3600.0

    def __init__(
        self,
        free_failures: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        client_free_failures: int = 20,
    ) -> None:
        self.free_failures = free_failures
        self.client_free_failures = client_free_failures
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (failures, time of the last failure)
        self._failures: dict[tuple[str, str], tuple[int, float]] = {}
        self._client_failures: dict[str, tuple[int, float]] = {}

    @property
    def _per_client(self) -> bool:
        return self.client_free_failures > 0

    def _wait(self, failures: int, last: float, free: int, now: float) -> float:
        over = failures - free
        if not failures or over < 0:
            return 0.0
        return last + min(self.MAX_DELAY, 2.0**over) - now

    def _client_entry(self, client: str, now: float) -> tuple[int, float]:
        failures, last = self._client_failures.get(client, (0, 0.0))
        return (failures, last) if now - last <= self.CLIENT_MEMORY else (0, 0.0)

    def check(self, user: str, client: str) -> None:
        """Raise :class:`LoginThrottled` while this user+client, or this client, must wait."""
        if self.free_failures <= 0:
            return
        now = self._clock()
        with self._lock:
            failures, last = self._failures.get((user, client), (0, 0.0))
            wait = self._wait(failures, last, self.free_failures, now)
            client_wait = 0.0
            if self._per_client:
                failures, last = self._client_entry(client, now)
                client_wait = self._wait(failures, last, self.client_free_failures, now)
        if client_wait > 0 and client_wait >= wait:
            raise LoginThrottled(
                "too many failed sign-ins from this address; "
                f"try again in {int(client_wait + 0.999)} s",
                retry_after=round(client_wait, 1),
            )
        if wait > 0:
            raise LoginThrottled(
                f"too many failed sign-ins for {user}; try again in {int(wait + 0.999)} s",
                retry_after=round(wait, 1),
            )

    def failure(self, user: str, client: str) -> None:
        if self.free_failures <= 0:
            return
        now = self._clock()
        with self._lock:
            failures, _ = self._failures.get((user, client), (0, 0.0))
            self._failures[(user, client)] = (failures + 1, now)
            if self._per_client:
                failures, _ = self._client_entry(client, now)
                self._client_failures[client] = (failures + 1, now)
            if len(self._failures) > 10_000:  # forget old entries; bounds memory under attack
                horizon = now - 2 * self.MAX_DELAY
                self._failures = {k: v for k, v in self._failures.items() if v[1] > horizon}
            if len(self._client_failures) > 10_000:
                horizon = now - self.CLIENT_MEMORY
                self._client_failures = {
                    k: v for k, v in self._client_failures.items() if v[1] > horizon
                }

    def success(self, user: str, client: str) -> None:
        """Clears the user+client count; the client's count across names stays (see above)."""
        with self._lock:
            self._failures.pop((user, client), None)
