"""Dependencies of the routers: the service, the caller, and role checks.

Authentication, in order:

1. ``Authorization: Bearer <token>``: an API token (for scripts and peers). Not a cookie, so a
   browser never sends it by itself and no CSRF check is needed.
2. The session cookie set by ``POST /api/login``. Every state-changing request (anything but
   GET/HEAD/OPTIONS) must also carry the ``X-CSRF-Token`` header, equal to the ``appliance_csrf``
   cookie (double submit) and to the token recorded with the session: another site can make a
   browser send the cookies, but cannot read them to copy one into a header.

An API token that is revoked or past its expiry is 401, and the refusal is audited
(``token.refused``, with the reason): its holder once had access, so an admin should know.

A route declares the least role it needs with ``Viewer``, ``Operator`` or ``Admin``; only
``/api/health``, ``/api/setup``, ``/api/login`` and ``/api/replication/pair`` (the pairing code
is the credential) take no principal.

A replication token (role ``replication``, docs/replication.md) is refused by all of those with
403, and each refusal is audited as ``replication.refused`` with the request's method and path.
The replication object routes take ``ReplicationPeer`` instead: a replication token, and only
while it is the current token of a paired source and carries that source's store scope; the
route gets the source's record, so it can reach no other source's store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated

from anyio import to_thread
from fastapi import Depends, Query, Request

from api.errors import AuthenticationRequired, CsrfFailed, PermissionDenied
from api.pairing import SourceRecord, source_of_token, touch_source
from api.security import (
    CLIENT_ROLE,
    CSRF_COOKIE,
    CSRF_HEADER,
    REPLICATION_ROLE,
    SAFE_METHODS,
    SESSION_COOKIE,
    Principal,
    digest,
    lower_role,
    role_allows,
    same_secret,
)
from api.service import Service
from appliance.catalog import Catalog
from appliance.catalog.records import TokenRecord
from appliance.errors import NotFound

#: A session's expiry moves forward at most this often (not a catalog write per request).
TOUCH_INTERVAL = timedelta(seconds=60)


# Dependencies that do not touch the catalog are ``async``: FastAPI runs a plain ``def``
# dependency in a worker thread, and that hop costs more than the work itself.


async def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


async def get_catalog(service: ServiceDep) -> Catalog:
    return service.app.catalog


CatalogDep = Annotated[Catalog, Depends(get_catalog)]


def _from_token(service: Service, value: str) -> Principal:
    catalog = service.app.catalog
    try:
        token, user = catalog.find_token_user(digest(value))
    except NotFound:
        raise AuthenticationRequired("the API token is unknown or revoked") from None
    now = service.now()
    reason = token_refusal(token, now)
    if reason is not None:
        # Someone holds a token that once worked: the audit log tells the admin who and which.
        catalog.audit(token.user, "token.refused", token.id, {"reason": reason})
        if reason == "expired" and token.expires_at is not None:
            raise AuthenticationRequired(
                f"the API token expired on {token.expires_at:%Y-%m-%d %H:%M} UTC; "
                "ask an administrator for a new one"
            )
        raise AuthenticationRequired("the API token is unknown or revoked")
    if user is None:
        raise AuthenticationRequired("the API token is unknown or revoked")
    if user.disabled_at is not None:
        raise AuthenticationRequired("the API token's user is disabled")
    scope = token.scopes[0] if token.scopes else "viewer"
    return Principal(
        user.name,
        lower_role(user.role, scope),
        "token",
        token_id=token.id,
        scopes=tuple(token.scopes),
    )


def token_refusal(token: TokenRecord, now: datetime) -> str | None:
    """Why ``token`` is refused at ``now`` (``revoked``, ``expired``), or None: it works."""
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at is not None and token.expires_at <= now:
        return "expired"
    return None


def _from_session(service: Service, request: Request, value: str) -> Principal:
    catalog = service.app.catalog
    hashed = digest(value)
    try:
        session = catalog.get_session(hashed)
        user = catalog.get_user(session.user)
    except NotFound:
        raise AuthenticationRequired("your session has ended; sign in again") from None
    if user.disabled_at is not None:
        raise AuthenticationRequired("your account is disabled")
    if request.method not in SAFE_METHODS:
        header = request.headers.get(CSRF_HEADER, "")
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if not (
            header
            and same_secret(header, cookie)
            and same_secret(digest(header), session.csrf_hashed)
        ):
            raise CsrfFailed()
    now = datetime.now(UTC)
    if now - session.last_seen_at >= TOUCH_INTERVAL:
        try:
            catalog.touch_session(hashed, now + timedelta(seconds=service.settings.session_ttl))
        except NotFound:
            raise AuthenticationRequired("your session has ended; sign in again") from None
    return Principal(user.name, user.role, "session", session_hash=hashed)


def check_credentials(service: Service, request: Request) -> Principal:
    """Who sent ``request`` (bearer token or session cookie); also checks a console's
    WebSocket handshake, which no route dependency runs."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthenticationRequired("use Authorization: Bearer <API token>")
        return _from_token(service, value.strip())
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        return _from_session(service, request, cookie)
    raise AuthenticationRequired()


async def authenticate(request: Request, service: ServiceDep) -> AsyncIterator[Principal]:
    """The caller, from a token or a session cookie.

    Reads (GET, HEAD) trust a credential checked in the last ``AUTH_TTL`` seconds: polling
    clients would otherwise cost two catalog queries per request. Anything else is checked in
    full (CSRF included) and, once it has run, empties that cache and the cached answers
    (:meth:`Service.changed`): a revoked token, a deleted user or a signed-out session is
    refused by the very next request, and a cancelled job shows as such at once.
    """
    safe = request.method in SAFE_METHODS
    if safe:
        key = (request.headers.get("authorization"), request.cookies.get(SESSION_COOKIE))
        principal = await service.auth_cache.get_or_compute(
            key, lambda: check_credentials(service, request)
        )
    else:
        principal = await to_thread.run_sync(check_credentials, service, request)
    try:
        yield principal
    finally:
        if not safe:
            service.changed()


def refuse_replication(service: Service, principal: Principal, request: Request) -> None:
    """Audit a replication token used where it is not accepted (``replication.refused``)."""
    route = getattr(request.scope.get("route"), "path", None)
    details: dict[str, object] = {**principal.audit_details}
    if isinstance(route, str):
        details["route"] = route
    service.app.catalog.audit(
        principal.name,
        "replication.refused",
        f"{request.method} {request.url.path}"[:300],
        details,
    )


def _requiring(role: str) -> Callable[..., Awaitable[Principal]]:
    async def check(
        request: Request,
        service: ServiceDep,
        principal: Annotated[Principal, Depends(authenticate)],
    ) -> Principal:
        if not role_allows(principal.role, role):
            if principal.role == REPLICATION_ROLE:
                await to_thread.run_sync(refuse_replication, service, principal, request)
                raise PermissionDenied(
                    "a replication token is accepted only by the replication object routes",
                    needed=role,
                    role=principal.role,
                )
            if principal.role == CLIENT_ROLE:
                raise PermissionDenied(
                    "a host's client token is accepted only by the /api/client routes",
                    needed=role,
                    role=principal.role,
                )
            raise PermissionDenied(
                f"this needs the {role} role; you are signed in as {principal.role}",
                needed=role,
                role=principal.role,
            )
        return principal

    check.__name__ = f"require_{role}"
    return check


_viewer = _requiring("viewer")
Viewer = Annotated[Principal, Depends(_viewer)]
Operator = Annotated[Principal, Depends(_requiring("operator"))]
Admin = Annotated[Principal, Depends(_requiring("admin"))]


def replication_source(
    request: Request,
    service: ServiceDep,
    principal: Annotated[Principal, Depends(authenticate)],
) -> SourceRecord:
    """The paired source whose replication token made this request.

    Any other caller is 403. A replication token that is not its source's current one, or whose
    store scope is not its source's store, is 403 too, and audited (``replication.refused``).
    """
    if principal.role != REPLICATION_ROLE:
        raise PermissionDenied(
            "only a replication token of a paired source may use the replication store",
            needed=REPLICATION_ROLE,
            role=principal.role,
        )
    app = service.app
    source = source_of_token(app, principal.token_id)
    # The token that made the request is the source's own (its scopes came with it).
    scopes = (
        principal.scopes if source is not None and source.token_id == principal.token_id else ()
    )
    if source is None or source.user != principal.name or source.store_scope not in scopes:
        refuse_replication(service, principal, request)
        raise PermissionDenied("this replication token belongs to no paired source's store")
    touch_source(app, source, service.now())
    return source


ReplicationPeer = Annotated[SourceRecord, Depends(replication_source)]


async def store_service(
    service: ServiceDep,
    principal: Annotated[Principal, Depends(_viewer)],
    store: Annotated[str | None, Query(max_length=64, pattern="^[0-9a-f]{8,64}$")] = None,
) -> Service:
    """The service, or with ``?store=<store id>`` the view of a source store this peer took
    over (its appliance, job runner and failover manager; docs/replication.md, "Take over").

    Routes take it in place of ``ServiceDep`` for the store they act on; who may call them is
    still decided by their role dependency, against the service's own accounts (the same
    ``Viewer`` check runs first here, once per request, so a replication token is refused and
    audited before a store is looked up). A store not taken over is 404 ``store_not_open``.
    """
    if store is None:
        return service
    return service.takeovers.get(store).view


StoreService = Annotated[Service, Depends(store_service)]


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"
