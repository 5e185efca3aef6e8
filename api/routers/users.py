"""Users and API tokens (admin only). The last admin can be neither demoted nor deleted.

Replication accounts (role ``replication``, named ``peer-<source appliance id>``, one per paired
source; see ``api.pairing``) are made and unmade by pairing alone: they are left out of the user
list (``GET /api/replication/sources`` lists the sources instead), ``GET /api/users/{name}`` does
not find them, changing or deleting one by hand is 409, and the ``peer-`` prefix is reserved.
Their tokens show in the token list with the role ``replication``; revoking one by hand is
allowed (it only cuts the link), making one by hand is not.

A token may carry an expiry (``expires_in_days`` or ``expires_at`` when it is made, changed with
``PATCH /api/tokens/{id}`` while it still works). From then on it is refused like a revoked one
(401, audited ``token.refused``); the alert evaluation warns before (``credentials_expiring``),
and renewing or revoking the token resolves that alert.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Response, status

from api.alerting import settle_token_alert
from api.deps import Admin, CatalogDep, ServiceDep
from api.pairing import PEER_USER_PREFIX
from api.schemas import (
    TokenCreate,
    TokenCreated,
    TokenPublic,
    TokenRenew,
    UserCreate,
    UserPublic,
    UserUpdate,
)
from api.security import REPLICATION_ROLE, ROLE_RANK, digest, hash_password, new_api_token
from appliance.catalog.records import TokenRecord, UserRecord
from appliance.errors import Conflict, InvalidInput, NotFound

router = APIRouter(tags=["users"])


def _user(user: UserRecord) -> UserPublic:
    return UserPublic(
        name=user.name,
        role=user.role,  # type: ignore[arg-type]
        created_at=user.created_at,
        disabled=user.disabled_at is not None,
    )


def _token(token: TokenRecord) -> TokenPublic:
    return TokenPublic(
        id=token.id,
        user=token.user,
        role=token.scopes[0] if token.scopes else "viewer",
        created_at=token.created_at,
        revoked_at=token.revoked_at,
        expires_at=token.expires_at,
    )


def _refuse_replication_account(catalog: CatalogDep, name: str) -> None:
    """409 for a replication account: pairing manages it, not the users page."""
    try:
        user = catalog.get_user(name)
    except NotFound:
        return
    if user.role == REPLICATION_ROLE:
        raise Conflict(
            f"{name} is the replication account of a paired source; unpair the source on the "
            "replication page instead",
            user=name,
        )


@router.get("/users", response_model=list[UserPublic])
def list_users(principal: Admin, catalog: CatalogDep) -> list[UserPublic]:
    """The users, without replication accounts (see the module docstring)."""
    return [_user(u) for u in catalog.list_users() if u.role != REPLICATION_ROLE]


@router.post("/users", response_model=UserPublic, status_code=status.HTTP_201_CREATED)
def create_user(body: UserCreate, principal: Admin, catalog: CatalogDep) -> UserPublic:
    if body.name.lower().startswith(PEER_USER_PREFIX):
        raise InvalidInput(
            f"user names beginning {PEER_USER_PREFIX} are reserved for replication accounts"
        )
    user = catalog.add_user(body.name, body.role, hash_password(body.password))
    catalog.audit(principal.name, "user.create", user.name, {"role": user.role})
    return _user(user)


@router.get("/users/{name}", response_model=UserPublic)
def get_user(name: str, principal: Admin, catalog: CatalogDep) -> UserPublic:
    user = catalog.get_user(name)
    if user.role == REPLICATION_ROLE:
        raise NotFound(f"user {name} does not exist", user=name)
    return _user(user)


@router.patch("/users/{name}", response_model=UserPublic)
def update_user(name: str, body: UserUpdate, principal: Admin, catalog: CatalogDep) -> UserPublic:
    """Change a user's role, reset their password (ends every session of theirs; revokes their
    tokens unless ``revoke_tokens`` is false) or disable / enable the account (disabling ends
    every session and revokes every token)."""
    _refuse_replication_account(catalog, name)
    if body.disabled and name == principal.name:
        raise Conflict("you cannot disable your own account; ask another admin")
    user = catalog.update_user(
        name,
        role=body.role,
        password_hash=hash_password(body.password) if body.password is not None else None,
        disabled=body.disabled,
    )
    details: dict[str, object] = {
        "changed": [f for f in ("role", "password", "disabled") if getattr(body, f) is not None],
        "role": user.role,
    }
    if body.password is not None:
        details["sessions_ended"] = catalog.end_sessions(name)
        if body.revoke_tokens:
            details["tokens_revoked"] = catalog.revoke_tokens(name)
    catalog.audit(principal.name, "user.update", name, details)
    return _user(user)


@router.delete("/users/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_user(name: str, principal: Admin, catalog: CatalogDep) -> Response:
    if name == principal.name:
        raise Conflict("you cannot delete your own account; ask another admin")
    _refuse_replication_account(catalog, name)
    catalog.delete_user(name)
    catalog.audit(principal.name, "user.delete", name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/tokens", response_model=list[TokenPublic])
def list_tokens(
    principal: Admin, catalog: CatalogDep, user: str | None = None
) -> list[TokenPublic]:
    return [_token(t) for t in catalog.list_tokens(user)]


@router.post("/tokens", response_model=TokenCreated, status_code=status.HTTP_201_CREATED)
def create_token(
    body: TokenCreate, principal: Admin, service: ServiceDep, catalog: CatalogDep
) -> TokenCreated:
    """A new API token; the response is the only time the token itself is shown."""
    owner = catalog.get_user(body.user or principal.name)
    if owner.role == REPLICATION_ROLE:
        raise Conflict(
            f"{owner.name} is a replication account; its token is made by pairing", user=owner.name
        )
    role = body.role or owner.role
    if ROLE_RANK[role] > ROLE_RANK[owner.role]:
        raise InvalidInput(f"a token of {owner.name} can have at most the {owner.role} role")
    expires_at = body.expiry(service.now())
    secret = new_api_token()
    token = catalog.add_token(owner.name, digest(secret), [role], expires_at)
    catalog.audit(
        principal.name,
        "token.create",
        token.id,
        {"user": owner.name, "role": role, "expires_at": _when(token.expires_at)},
    )
    return TokenCreated(**_token(token).model_dump(), token=secret)


@router.patch("/tokens/{token_id}", response_model=TokenPublic)
def renew_token(
    token_id: str, body: TokenRenew, principal: Admin, service: ServiceDep, catalog: CatalogDep
) -> TokenPublic:
    """Give a working token a new expiry (or none); a revoked or expired one is 409."""
    now = service.now()
    token = catalog.set_token_expiry(token_id, None if body.never else body.expiry(now), at=now)
    catalog.audit(
        principal.name,
        "token.renew",
        token_id,
        {"user": token.user, "expires_at": _when(token.expires_at)},
    )
    settle_token_alert(catalog, token, now)
    return _token(token)


@router.delete("/tokens/{token_id}", response_model=TokenPublic)
def revoke_token(
    token_id: str, principal: Admin, service: ServiceDep, catalog: CatalogDep
) -> TokenPublic:
    token = catalog.revoke_token(token_id)
    catalog.audit(principal.name, "token.revoke", token_id, {"user": token.user})
    settle_token_alert(catalog, token, service.now())
    return _token(token)


def _when(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None
