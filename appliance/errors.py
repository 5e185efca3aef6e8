"""Domain errors of the appliance.

Every error has a stable ``code`` (never renamed: scripts, the API and the web page key on it) and
its docstring is the default message. Third-party exceptions are converted into these at the
adapter that catches them; the API maps them to HTTP statuses in exactly one place.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any


class ApplianceError(Exception):
    """An operation of the appliance failed."""

    code = "appliance_error"
    #: HTTP-ish category used by the API's single mapping table.
    kind = "internal"

    def __init__(self, message: str | None = None, **details: object) -> None:
        self.message = message or (self.__doc__ or self.code).strip()
        self.details = details
        super().__init__(self.message)

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "details": self.details}


class NotFound(ApplianceError):
    """The requested object does not exist."""

    code = "not_found"
    kind = "not_found"


class InvalidInput(ApplianceError):
    """The request is not valid."""

    code = "invalid_input"
    kind = "invalid"


class Conflict(ApplianceError):
    """The operation conflicts with the current state."""

    code = "conflict"
    kind = "conflict"


# --- store -------------------------------------------------------------------------------------


class StoreError(ApplianceError):
    """The store could not be used."""

    code = "store_error"


class StoreNotFound(StoreError):
    """No store exists at this location; run `appliance init` first."""

    code = "store_not_found"
    kind = "not_found"


class StoreExists(StoreError):
    """A store already exists at this location."""

    code = "store_exists"
    kind = "conflict"


class UnsupportedFormat(StoreError):
    """The store or object uses a format version this software does not understand."""

    code = "unsupported_format"


class WrongPassphrase(StoreError):
    """The passphrase (or recovery key) does not unlock any key of this store."""

    code = "wrong_passphrase"
    kind = "unauthorized"


class PassphraseRequired(StoreError):
    """A passphrase is needed: set APPLIANCE_PASSPHRASE, use --passphrase-file, or run on a terminal."""

    code = "passphrase_required"
    kind = "invalid"


class IntegrityError(StoreError):
    """Stored data failed its integrity check (corrupt, truncated or tampered)."""

    code = "integrity_error"


class ObjectMissing(StoreError):
    """An object the store refers to is missing."""

    code = "object_missing"
    kind = "not_found"


class StoreFull(StoreError):
    """The pool ran out of space; the backup was stopped and nothing already stored was lost."""

    code = "store_full"
    kind = "insufficient_storage"


class LockHeld(StoreError):
    """Another operation holds the lock this operation needs."""

    code = "lock_held"
    kind = "conflict"


class InvalidName(StoreError):
    """An object name is not valid in the store."""

    code = "invalid_name"
    kind = "invalid"


# --- backup / restore --------------------------------------------------------------------------


class SourceError(ApplianceError):
    """The backup source cannot be read."""

    code = "source_error"
    kind = "invalid"


class PathRefused(ApplianceError):
    """A path the request names breaks one of the appliance's path rules; it was refused."""

    code = "path_refused"
    kind = "forbidden"


class UnsafeRestorePath(ApplianceError):
    """A manifest entry names a path outside the restore target; it was refused."""

    code = "unsafe_restore_path"
    kind = "invalid"


class BackupCancelled(ApplianceError):
    """The backup was cancelled; no recovery point was recorded."""

    code = "cancelled"
    kind = "conflict"


# --- backends and locations --------------------------------------------------------------------
#
# A backend error is either transient (:class:`TransientBackendError`: retrying the same call may
# succeed, and the retry wrapper does) or permanent (every other :class:`StoreError`: retrying
# cannot help, so nothing retries it).


class ObjectArchived(StoreError):
    """The object is in cold storage; warm it up (and wait for it) before reading it."""

    code = "object_archived"
    kind = "conflict"


class ObjectLocked(StoreError):
    """The object is immutable until its retention date; it cannot be deleted or overwritten."""

    code = "object_locked"
    kind = "conflict"


class LocationUnavailable(StoreError):
    """The location is not available (missing, unmounted or holding another store); it is not empty."""

    code = "location_unavailable"
    kind = "conflict"


class ServiceRestarting(ApplianceError):
    """The service is restarting on another store (a recovery from tapes); ask again shortly."""

    code = "service_restarting"
    kind = "conflict"


class TransientBackendError(StoreError):
    """The backend failed in a way that may pass (I/O error, timeout, throttling); it can be retried."""

    code = "backend_transient"
    kind = "internal"


# --- jobs that wait ------------------------------------------------------------------------------


class JobWaiting(Exception):
    """A job's work function asks to wait (a bucket thaw, a disk to insert, a tape to load).

    Not an :class:`ApplianceError`: the user never sees it as a failure. The job runner records
    the job as ``waiting`` with ``reason``, ``wake_at`` (None: only an outside event wakes it)
    and ``checkpoint`` (a JSON document the work function gets back in ``ctx.checkpoint`` when it
    runs again), releases its resources and worker slot, and queues it again once woken.
    """

    def __init__(
        self,
        reason: str,
        wake_at: datetime | None = None,
        checkpoint: dict[str, Any] | None = None,
    ) -> None:
        self.reason = reason
        self.wake_at = wake_at
        self.checkpoint: dict[str, Any] = dict(checkpoint or {})
        super().__init__(reason)
