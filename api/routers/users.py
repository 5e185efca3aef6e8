"""Users and API tokens (admin only). The last admin can be neither demoted nor deleted."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from api.deps import Admin, CatalogDep
from api.schemas import TokenCreate, TokenCreated, TokenPublic, UserCreate, UserPublic, UserUpdate
from api.security import ROLE_RANK, digest, hash_password, new_api_token
from appliance.catalog.records import TokenRecord, UserRecord
from appliance.errors import Conflict, InvalidInput

router = APIRouter(tags=["users"])


def _user(user: UserRecord) -> UserPublic:
    return UserPublic(name=user.name, role=user.role, created_at=user.created_at)  # type: ignore[arg-type]


def _token(token: TokenRecord) -> TokenPublic:
    return TokenPublic(
        id=token.id,
        user=token.user,
        role=token.scopes[0] if token.scopes else "viewer",
        created_at=token.created_at,
        revoked_at=token.revoked_at,
    )


@router.get("/users", response_model=list[UserPublic])
def list_users(principal: Admin, catalog: CatalogDep) -> list[UserPublic]:
    return [_user(u) for u in catalog.list_users()]


@router.post("/users", response_model=UserPublic, status_code=status.HTTP_201_CREATED)
def create_user(body: UserCreate, principal: Admin, catalog: CatalogDep) -> UserPublic:
    user = catalog.add_user(body.name, body.role, hash_password(body.password))
    catalog.audit(principal.name, "user.create", user.name, {"role": user.role})
    return _user(user)


@router.get("/users/{name}", response_model=UserPublic)
def get_user(name: str, principal: Admin, catalog: CatalogDep) -> UserPublic:
    return _user(catalog.get_user(name))


@router.patch("/users/{name}", response_model=UserPublic)
def update_user(name: str, body: UserUpdate, principal: Admin, catalog: CatalogDep) -> UserPublic:
    user = catalog.update_user(
        name,
        role=body.role,
        password_hash=hash_password(body.password) if body.password is not None else None,
    )
    changed = [field for field in ("role", "password") if getattr(body, field) is not None]
    catalog.audit(principal.name, "user.update", name, {"changed": changed, "role": user.role})
    return _user(user)


@router.delete("/users/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_user(name: str, principal: Admin, catalog: CatalogDep) -> Response:
    if name == principal.name:
        raise Conflict("you cannot delete your own account; ask another admin")
    catalog.delete_user(name)
    catalog.audit(principal.name, "user.delete", name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/tokens", response_model=list[TokenPublic])
def list_tokens(
    principal: Admin, catalog: CatalogDep, user: str | None = None
) -> list[TokenPublic]:
    return [_token(t) for t in catalog.list_tokens(user)]


@router.post("/tokens", response_model=TokenCreated, status_code=status.HTTP_201_CREATED)
def create_token(body: TokenCreate, principal: Admin, catalog: CatalogDep) -> TokenCreated:
    """A new API token; the response is the only time the token itself is shown."""
    owner = catalog.get_user(body.user or principal.name)
    role = body.role or owner.role
    if ROLE_RANK[role] > ROLE_RANK[owner.role]:
        raise InvalidInput(f"a token of {owner.name} can have at most the {owner.role} role")
    secret = new_api_token()
    token = catalog.add_token(owner.name, digest(secret), [role])
    catalog.audit(principal.name, "token.create", token.id, {"user": owner.name, "role": role})
    return TokenCreated(**_token(token).model_dump(), token=secret)


@router.delete("/tokens/{token_id}", response_model=TokenPublic)
def revoke_token(token_id: str, principal: Admin, catalog: CatalogDep) -> TokenPublic:
    token = catalog.revoke_token(token_id)
    catalog.audit(principal.name, "token.revoke", token_id, {"user": token.user})
    return _token(token)
