"""Health, first-run set-up, signing in and out, and the caller's own account."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Request, Response, status

from api.deps import CatalogDep, ServiceDep, Viewer, client_address
from api.errors import InvalidCredentials, PermissionDenied
from api.schemas import (
    HealthPublic,
    LoginCreate,
    MePublic,
    PasswordChange,
    SessionPublic,
    SetupCreate,
    SetupPublic,
    UserPublic,
)
from api.security import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    digest,
    hash_password,
    new_secret,
    same_secret,
    verify_password,
)
from appliance.catalog.records import UserRecord
from appliance.errors import NotFound

router = APIRouter(tags=["auth"])


def _version() -> str:
    try:
        return version("backup-appliance")
    except PackageNotFoundError:
        return "0"


@router.get("/health", response_model=HealthPublic)
def health() -> HealthPublic:
    """Liveness; the one endpoint that answers without authentication and tells nothing."""
    return HealthPublic(status="ok", version=_version())


@router.get("/setup", response_model=SetupPublic)
def setup_status(request: Request, service: ServiceDep) -> SetupPublic:
    """Whether the first admin still has to be created (public: the first-run page asks)."""
    exists = service.admin_exists()
    return SetupPublic(
        admin_exists=exists,
        setup_code_required=not exists,
        setup_code_file=None if exists else str(service.setup_code_path),
    )


@router.post("/setup", response_model=UserPublic, status_code=status.HTTP_201_CREATED)
def setup(body: SetupCreate, request: Request, service: ServiceDep) -> UserPublic:
    """Create the first admin; refused (409) once any admin exists.

    Every client, loopback included, must present the set-up code from the service's console
    and log (or ``<data>/secrets/setup-code``, readable by root only), so neither anybody on the
    network nor a local user of the appliance can claim a fresh appliance. Root on the box can
    also use ``appliance admin create``.
    """
    client = client_address(request)
    if service.admin_exists() is False:
        code = service.setup_code
        if code is None or body.setup_code is None or not same_secret(body.setup_code, code):
            raise PermissionDenied(
                "give the set-up code shown on the appliance's console and log "
                f"(also in {service.setup_code_path})"
            )
    user = service.app.catalog.add_first_admin(body.name, hash_password(body.password))
    service.setup_done()
    service.app.catalog.audit(user.name, "setup.admin", user.name, {"client": client})
    return UserPublic(name=user.name, role="admin", created_at=user.created_at)


def _set_cookies(response: Response, session: str, csrf: str, ttl: int, secure: bool) -> None:
    response.set_cookie(
        SESSION_COOKIE, session, max_age=ttl, httponly=True, secure=secure, samesite="strict"
    )
    # Readable by the page's script (double-submit CSRF): it copies it into X-CSRF-Token.
    response.set_cookie(
        CSRF_COOKIE, csrf, max_age=ttl, httponly=False, secure=secure, samesite="strict"
    )


@router.post("/login", response_model=SessionPublic)
def login(
    body: LoginCreate, request: Request, response: Response, service: ServiceDep
) -> SessionPublic:
    """Sign in: sets the session cookie (HttpOnly, SameSite=Strict, Secure over TLS) and the
    CSRF cookie, and returns the CSRF token to send as ``X-CSRF-Token``."""
    catalog = service.app.catalog
    client = client_address(request)
    service.throttle.check(body.name, client)
    user: UserRecord | None
    try:
        user = catalog.get_user(body.name)
    except NotFound:
        user = None
    if not verify_password(user.password_hash if user else None, body.password) or user is None:
        service.throttle.failure(body.name, client)
        catalog.audit(body.name, "login.failed", client)
        raise InvalidCredentials()
    if user.disabled_at is not None:
        catalog.audit(body.name, "login.disabled", client)
        raise PermissionDenied("this account is disabled; ask an admin")
    service.throttle.success(body.name, client)
    session, csrf = new_secret(), new_secret()
    ttl = service.settings.session_ttl
    expires = datetime.now(UTC) + timedelta(seconds=ttl)
    catalog.add_session(digest(session), user.name, digest(csrf), expires)
    _set_cookies(response, session, csrf, ttl, service.settings.tls)
    catalog.audit(user.name, "login", client)
    return SessionPublic(
        name=user.name,
        role=user.role,  # type: ignore[arg-type]
        via="session",
        csrf_token=csrf,
        expires_at=expires,
    )


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT)
def logout(principal: Viewer, response: Response, catalog: CatalogDep) -> Response:
    """End the session (a token caller: nothing to end)."""
    if principal.session_hash is not None:
        catalog.delete_session(principal.session_hash)
        catalog.audit(principal.name, "logout", principal.name)
    response.status_code = status.HTTP_204_NO_CONTENT
    response.delete_cookie(SESSION_COOKIE)
    response.delete_cookie(CSRF_COOKIE)
    return response


@router.get("/me", response_model=MePublic)
def me(principal: Viewer) -> MePublic:
    return MePublic(name=principal.name, role=principal.role, via=principal.via)  # type: ignore[arg-type]


@router.post("/me/password", status_code=status.HTTP_204_NO_CONTENT)
def change_password(body: PasswordChange, principal: Viewer, catalog: CatalogDep) -> Response:
    """Change your password. Every other session of yours ends (this one stays); your API
    tokens are revoked unless ``revoke_tokens`` is false."""
    user = catalog.get_user(principal.name)
    if not verify_password(user.password_hash, body.current_password):
        raise InvalidCredentials("the current password is wrong")
    catalog.update_user(principal.name, password_hash=hash_password(body.new_password))
    ended = catalog.end_sessions(principal.name, keep=principal.session_hash)
    revoked = catalog.revoke_tokens(principal.name) if body.revoke_tokens else 0
    catalog.audit(
        principal.name,
        "user.password",
        principal.name,
        {"sessions_ended": ended, "tokens_revoked": revoked, **principal.audit_details},
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
