"""Accounts: users, their browser sessions and API tokens, and the audit log.

Invariants kept in one transaction each: the last enabled admin is never demoted, disabled or
deleted; disabling a user ends their sessions and revokes their tokens; deleting one deletes
both. Only hashes of cookies, CSRF tokens and API tokens are stored. An API token may carry an
expiry (revision 0011): reaching it ends the token like a revocation, and a token that ended is
never brought back (renewing one is refused).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from appliance.catalog.database import Database, check_choice, check_name, utc
from appliance.catalog.models import (
    AuditRow,
    SessionRow,
    TokenRow,
    UserRow,
)
from appliance.catalog.records import (
    USER_ROLES,
    AuditRecord,
    SessionRecord,
    TokenRecord,
    UserRecord,
)
from appliance.errors import Conflict, InvalidInput, NotFound


class AccountRepository:
    """Users, sessions, API tokens and the audit log."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add_user(self, name: str, role: str, password_hash: str) -> UserRecord:
        check_name(name, "user name")
        check_choice(role, USER_ROLES, "role")
        check_name(password_hash, "password hash")
        conflict = f"user {name} already exists"
        with self._db.session(write=True, conflict=conflict) as session:
            if session.get(UserRow, name) is not None:
                raise Conflict(conflict, user=name)
            row = UserRow(
                name=name, role=role, password_hash=password_hash, created_at=self._db.now()
            )
            session.add(row)
            return row.to_record()

    def get_user(self, name: str) -> UserRecord:
        with self._db.session(write=False) as session:
            row = session.get(UserRow, name)
            if row is None:
                raise NotFound(f"user {name} does not exist", user=name)
            return row.to_record()

    def list_users(self) -> list[UserRecord]:
        with self._db.session(write=False) as session:
            return [
                row.to_record() for row in session.scalars(select(UserRow).order_by(UserRow.name))
            ]

    def add_first_admin(self, name: str, password_hash: str) -> UserRecord:
        """Create an admin only while no admin exists (first-run set-up); else Conflict.

        Check and insert share one write transaction, so two set-up requests racing each other
        cannot both create an admin.
        """
        check_name(name, "user name")
        check_name(password_hash, "password hash")
        with self._db.session(write=True, conflict="an admin already exists") as session:
            if self._admin_count(session):
                raise Conflict("an admin already exists; sign in instead")
            if session.get(UserRow, name) is not None:
                raise Conflict(f"user {name} already exists", user=name)
            row = UserRow(
                name=name, role="admin", password_hash=password_hash, created_at=self._db.now()
            )
            session.add(row)
            return row.to_record()

    def update_user(
        self,
        name: str,
        *,
        role: str | None = None,
        password_hash: str | None = None,
        disabled: bool | None = None,
    ) -> UserRecord:
        """Change a user's role, password hash or whether the account is disabled. Demoting or
        disabling the last enabled admin is a Conflict. Disabling ends every session of the
        user and revokes every token in the same transaction."""
        if role is not None:
            check_choice(role, USER_ROLES, "role")
        if password_hash is not None:
            check_name(password_hash, "password hash")
        with self._db.session(write=True) as session:
            row = self._user_row(session, name, lock=True)
            if role is not None and role != row.role:
                if (
                    row.role == "admin"
                    and row.disabled_at is None
                    and self._admin_count(session) <= 1
                ):
                    raise Conflict(f"{name} is the last admin; make another admin first")
                row.role = role
            if password_hash is not None:
                row.password_hash = password_hash
            if disabled is True and row.disabled_at is None:
                if row.role == "admin" and self._admin_count(session) <= 1:
                    raise Conflict(f"{name} is the last admin; make another admin first")
                row.disabled_at = self._db.now()
                session.execute(delete(SessionRow).where(SessionRow.user == name))
                self._revoke_tokens(session, name)
            elif disabled is False:
                row.disabled_at = None
            return row.to_record()

    def end_sessions(self, user: str, *, keep: str | None = None) -> int:
        """End every session of ``user`` (but the one hashed ``keep``); returns how many."""
        query = delete(SessionRow).where(SessionRow.user == user)
        if keep is not None:
            query = query.where(SessionRow.hashed != keep)
        with self._db.session(write=True) as session:
            result = session.execute(query)
            return int(getattr(result, "rowcount", 0) or 0)

    def revoke_tokens(self, user: str) -> int:
        """Revoke every active API token of ``user``; returns how many."""
        with self._db.session(write=True) as session:
            return self._revoke_tokens(session, user)

    def _revoke_tokens(self, session: Session, user: str) -> int:
        result = session.execute(
            update(TokenRow)
            .where(TokenRow.user == user, TokenRow.revoked_at.is_(None))
            .values(revoked_at=self._db.now())
        )
        return int(getattr(result, "rowcount", 0) or 0)

    def delete_user(self, name: str) -> None:
        """Delete a user with their API tokens and sessions. The last admin stays (Conflict)."""
        with self._db.session(write=True) as session:
            row = self._user_row(session, name, lock=True)
            last = row.disabled_at is None and self._admin_count(session) <= 1
            if row.role == "admin" and last:
                raise Conflict(f"{name} is the last admin; make another admin first")
            session.execute(delete(TokenRow).where(TokenRow.user == name))
            session.execute(delete(SessionRow).where(SessionRow.user == name))
            session.delete(row)

    @staticmethod
    def _user_row(session: Session, name: str, *, lock: bool = False) -> UserRow:
        row = session.get(UserRow, name, with_for_update=lock)
        if row is None:
            raise NotFound(f"user {name} does not exist", user=name)
        return row

    @staticmethod
    def _admin_count(session: Session) -> int:
        # Locking the admin rows serialises concurrent demotions on PostgreSQL.
        rows = session.scalars(
            select(UserRow.name)
            .where(UserRow.role == "admin", UserRow.disabled_at.is_(None))
            .with_for_update()
        )
        return len(list(rows))

    # --- sessions ------------------------------------------------------------------------------

    def add_session(
        self, hashed: str, user: str, csrf_hashed: str, expires_at: datetime
    ) -> SessionRecord:
        """Record a browser session by the hash of its cookie value."""
        check_name(hashed, "session hash")
        check_name(csrf_hashed, "CSRF token hash")
        expires_at = utc(expires_at, "session expiry")
        with self._db.session(write=True, conflict="this session is already recorded") as session:
            self._user_row(session, user)
            now = self._db.now()
            row = SessionRow(
                hashed=hashed,
                user=user,
                csrf_hashed=csrf_hashed,
                created_at=now,
                expires_at=expires_at,
                last_seen_at=now,
            )
            session.add(row)
            return row.to_record()

    def get_session(self, hashed: str) -> SessionRecord:
        """The unexpired session with this hash; :class:`NotFound` otherwise."""
        with self._db.session(write=False) as session:
            row = session.get(SessionRow, hashed)
            if row is None or row.expires_at <= self._db.now():
                raise NotFound("no active session matches")
            return row.to_record()

    def touch_session(self, hashed: str, expires_at: datetime) -> None:
        """Note activity on a session and move its expiry (a sliding session lifetime)."""
        expires_at = utc(expires_at, "session expiry")
        with self._db.session(write=True) as session:
            row = session.get(SessionRow, hashed, with_for_update=True)
            if row is None:
                raise NotFound("no active session matches")
            row.last_seen_at = self._db.now()
            row.expires_at = expires_at

    def delete_session(self, hashed: str) -> None:
        """End a session (signing out); ending an unknown session is a no-op."""
        with self._db.session(write=True) as session:
            session.execute(delete(SessionRow).where(SessionRow.hashed == hashed))

    def purge_sessions(self) -> int:
        """Delete expired sessions; returns how many."""
        with self._db.session(write=True) as session:
            result = session.execute(
                delete(SessionRow).where(SessionRow.expires_at <= self._db.now())
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def add_token(
        self, user: str, hashed: str, scopes: list[str], expires_at: datetime | None = None
    ) -> TokenRecord:
        """Record an API token of ``user`` by its hash (the token itself is never stored);
        ``expires_at`` None: it never expires. An expiry that is not in the future is refused."""
        check_name(hashed, "token hash")
        expires = self._future_expiry(expires_at)
        with self._db.session(write=True, conflict="this token is already recorded") as session:
            if session.get(UserRow, user) is None:
                raise NotFound(f"user {user} does not exist", user=user)
            row = TokenRow(
                id=uuid.uuid4().hex,
                user=user,
                hashed=hashed,
                scopes=list(scopes),
                created_at=self._db.now(),
                revoked_at=None,
                expires_at=expires,
            )
            session.add(row)
            return row.to_record()

    def _future_expiry(
        self, expires_at: datetime | None, now: datetime | None = None
    ) -> datetime | None:
        if expires_at is None:
            return None
        expires = utc(expires_at, "token expiry")
        if expires <= (now or self._db.now()):
            raise InvalidInput(
                f"the expiry {expires:%Y-%m-%d %H:%M} UTC has already passed; "
                "give a time in the future"
            )
        return expires

    def list_tokens(self, user: str | None = None) -> list[TokenRecord]:
        """Tokens (revoked and expired ones too), oldest first."""
        query = select(TokenRow).order_by(TokenRow.created_at, TokenRow.id)
        if user is not None:
            query = query.where(TokenRow.user == user)
        with self._db.session(write=False) as session:
            return [row.to_record() for row in session.scalars(query)]

    def find_token(self, hashed: str) -> TokenRecord:
        """The token with this hash, revoked or expired too (to say why it is refused);
        :class:`NotFound` when none has it."""
        with self._db.session(write=False) as session:
            row = session.scalars(select(TokenRow).where(TokenRow.hashed == hashed)).first()
            if row is None:
                raise NotFound("no API token matches")
            return row.to_record()

    def find_token_user(self, hashed: str) -> tuple[TokenRecord, UserRecord | None]:
        """:meth:`find_token` and the user it belongs to (None when that user is gone), read
        together: every request made with a token needs both."""
        with self._db.session(write=False) as session:
            row = session.scalars(select(TokenRow).where(TokenRow.hashed == hashed)).first()
            if row is None:
                raise NotFound("no API token matches")
            user = session.get(UserRow, row.user)
            return row.to_record(), None if user is None else user.to_record()

    def find_active_token(self, hashed: str) -> TokenRecord:
        """The unrevoked, unexpired token with this hash; :class:`NotFound` otherwise."""
        with self._db.session(write=False) as session:
            row = session.scalars(
                select(TokenRow).where(TokenRow.hashed == hashed, TokenRow.revoked_at.is_(None))
            ).first()
            if row is None or (row.expires_at is not None and row.expires_at <= self._db.now()):
                raise NotFound("no active API token matches")
            return row.to_record()

    def revoke_token(self, token_id: str) -> TokenRecord:
        """Revoke the token now; revoking a revoked token keeps its first revocation time."""
        with self._db.session(write=True) as session:
            row = session.get(TokenRow, token_id, with_for_update=True)
            if row is None:
                raise NotFound(f"API token {token_id} does not exist", token_id=token_id)
            if row.revoked_at is None:
                row.revoked_at = self._db.now()
            return row.to_record()

    def set_token_expiry(
        self, token_id: str, expires_at: datetime | None, *, at: datetime | None = None
    ) -> TokenRecord:
        """Renew a token at ``at`` (default: the catalog's now): a new expiry (None: never). A
        revoked or expired token stays ended (Conflict): a token that stopped working is
        replaced by a new one, not brought back."""
        now = utc(at, "renewal time") if at is not None else self._db.now()
        expires = self._future_expiry(expires_at, now)
        with self._db.session(write=True) as session:
            row = session.get(TokenRow, token_id, with_for_update=True)
            if row is None:
                raise NotFound(f"API token {token_id} does not exist", token_id=token_id)
            if row.revoked_at is not None:
                raise Conflict("this token is revoked; create a new one", token_id=token_id)
            if row.expires_at is not None and row.expires_at <= now:
                raise Conflict("this token has expired; create a new one", token_id=token_id)
            row.expires_at = expires
            return row.to_record()

    def audit(
        self, actor: str, action: str, target: str, details: dict[str, Any] | None = None
    ) -> None:
        """Append one line to the audit log."""
        check_name(actor, "audit actor")
        check_name(action, "audit action")
        with self._db.session(write=True) as session:
            session.add(
                AuditRow(
                    at=self._db.now(),
                    actor=actor,
                    action=action,
                    target=target,
                    details=dict(details or {}),
                )
            )

    def list_audit(self, limit: int = 100) -> list[AuditRecord]:
        """The newest ``limit`` audit lines, newest first."""
        if limit < 1:
            raise InvalidInput("limit must be at least 1")
        query = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
        with self._db.session(write=False) as session:
            return [row.to_record() for row in session.scalars(query)]
