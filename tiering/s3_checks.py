"""What the bucket backend checks of its bucket beyond single objects: the checks at open, retried
like a data operation, and the sweep of multipart uploads left behind.

Opening a bucket location (``tiering.s3.open_s3_bucket``) asks, in this order:

1. ``HeadBucket``: the bucket exists and takes these credentials. The answer's ``Date`` header
   tells how far this clock is from the bucket's (:func:`clock_skew`); beyond
   :data:`MAX_CLOCK_SKEW` the location is refused, since lock dates and signatures depend on it.
2. For a location that locks its copies, the bucket's versioning and Object Lock settings:
   Object Lock on and versioning ``Enabled``. :func:`lock_problem` says in words what is not so,
   e.g. versioning suspended behind the appliance's back after the location was added.

Each request is retried with the retry wrapper's own loop and policy
(:class:`~appliance.store.wrappers.RetryingBackend`; :data:`OPEN_RETRIES` unless the location's
``open_retries`` option says otherwise) when the backend calls its failure transient
(throttling, a server error, a dropped or refused connection). Only when the retries are spent
is the location :class:`LocationUnavailable`, naming the request and what the bucket kept
answering. A permanent answer (no such bucket, refused credentials, wrong lock settings) makes
it unavailable at once: retrying cannot change it. This module holds no boto3: the backend's
methods (``head_bucket``, ``lock_settings``) make the requests and convert their errors.

A multipart upload whose ``CreateMultipartUpload`` answer was lost (the server created it, the
writer never learnt its id), or whose process was killed, stays in the bucket, billed, until
aborted. :func:`abort_abandoned_uploads` aborts those under the store's prefix that began more
than :data:`ABANDONED_UPLOAD_AGE` ago; :func:`sweep` runs it before a backend's first write, at
most every :data:`SWEEP_INTERVAL` per bucket prefix in a process, and never fails the write. The
uploads this process is carrying out are never aborted, whatever the bucket says of their age
(moto's server says 2010 of every upload). A bucket lifecycle rule
(``AbortIncompleteMultipartUpload``) is the second line of defence.
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from appliance.errors import InvalidInput, LocationUnavailable, StoreError, TransientBackendError
from appliance.store.wrappers import Clock, RetryingBackend, RetryPolicy, Sleep

if TYPE_CHECKING:
    from tiering.s3 import S3Backend

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Largest difference between this clock and the bucket's that is accepted (S3 refuses
#: signatures beyond 15 minutes; lock dates would be off by as much).
MAX_CLOCK_SKEW = 300.0
#: How the checks at open are retried: the data operations' policy (``compose``'s default),
#: five attempts at most 0.2, 0.4, 0.8 and 1.6 s apart (less with jitter).
OPEN_RETRIES = RetryPolicy()
#: Answers that mean "too many requests" (a HEAD answer has no body: its status is its code).
_THROTTLED = frozenset({"SlowDown", "Throttling", "ThrottlingException", "503"})
#: An incomplete multipart upload initiated longer ago than this is abandoned: no live upload of
#: ours is that old. One upload is one attempt at one object (a pack of tens of MiB; a retry
#: starts a new upload), its parts sent back to back, each bounded by the read timeout: even at
#: 1 MiB/s a 1 GiB object is done within 20 minutes, and a failed attempt aborts its own upload.
#: The bucket's clock (``Initiated``) and this one agree within :data:`MAX_CLOCK_SKEW`.
ABANDONED_UPLOAD_AGE = timedelta(hours=24)
#: A process sweeps one bucket prefix at most this often (seconds): orphans are rare, and one
#: found an hour later costs next to nothing.
SWEEP_INTERVAL = 3600.0

#: When this process last swept each (endpoint, bucket, prefix), by ``time.monotonic``; and the
#: ids of the multipart uploads it is carrying out.
_SWEPT_AT: dict[tuple[str, str, str], float] = {}
_LIVE_UPLOADS: set[str] = set()
_UPLOADS_LOCK = threading.Lock()


@dataclass(frozen=True)
class LockSettings:
    """A bucket's versioning status (``Enabled``, ``Suspended``, or None: never turned on) and
    whether Object Lock is enabled on it."""

    versioning: str | None
    object_lock: bool


@dataclass(frozen=True)
class OpenUpload:
    """An incomplete multipart upload under the store's prefix: the name of the object it was
    to make, its id, and when the bucket says it began."""

    name: str
    upload_id: str
    initiated: datetime


def clock_skew(answer: dict[str, Any]) -> float | None:
    """Seconds the bucket's clock (its ``Date`` header) is ahead of this one; None if unknown."""
    header = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if not header:
        return None
    try:
        theirs = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    return (theirs - datetime.now(UTC)).total_seconds()


def lock_problem(bucket: str, settings: LockSettings) -> str | None:
    """What keeps a bucket from holding locked copies, in words; None when nothing does."""
    if not settings.object_lock:
        return (
            f"bucket {bucket} does not have Object Lock enabled (versioning: "
            f"{settings.versioning or 'off'}): copies there could be deleted early. Use a bucket "
            "created with Object Lock, or a location without a lock mode"
        )
    if settings.versioning != "Enabled":
        return (
            f"bucket {bucket} has Object Lock but its versioning is "
            f"{settings.versioning or 'off'}, not Enabled (changed since the location was "
            "added?): new copies there would not be kept as locked versions. Enable versioning "
            "on the bucket again"
        )
    return None


def open_retries(value: RetryPolicy | Mapping[str, Any] | None) -> RetryPolicy:
    """The ``open_retries`` option: a :class:`RetryPolicy`, its fields as a mapping (a location's
    options are JSON), or None for :data:`OPEN_RETRIES`."""
    if value is None:
        return OPEN_RETRIES
    if isinstance(value, RetryPolicy):
        return value
    try:
        return RetryPolicy(**dict(value))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"open_retries is not a retry policy: {exc}") from exc


class _RetriedCheck(RetryingBackend):
    """The retry wrapper's loop (capped exponential backoff with jitter, bounded in attempts
    and in time) around one open check instead of a data operation."""

    def run(self, what: str, check: Callable[[], T]) -> T:
        return self._call(what, check)


def check_bucket(
    backend: S3Backend,
    *,
    retries: RetryPolicy = OPEN_RETRIES,
    sleep: Sleep = time.sleep,
    clock: Clock = time.monotonic,
) -> None:
    """Ask the bucket what the module docstring lists; raise :class:`LocationUnavailable` in
    words when it cannot be used."""
    retried = _RetriedCheck(backend, retries, sleep=sleep, clock=clock)
    answer = _retried(retried, backend, "HeadBucket", backend.head_bucket, clock)
    skew = clock_skew(answer)
    if skew is not None and abs(skew) > MAX_CLOCK_SKEW:
        raise LocationUnavailable(
            f"this appliance's clock is {abs(skew):.0f} s "
            f"{'behind' if skew > 0 else 'ahead of'} bucket {backend.bucket}'s; set the time "
            "(NTP) first: locks and signatures depend on it",
            location=str(backend.address),
        )
    if backend.lock_mode is None:
        return
    settings = _retried(
        retried, backend, "reading the Object Lock settings", backend.lock_settings, clock
    )
    problem = lock_problem(backend.bucket, settings)
    if problem is not None:
        raise LocationUnavailable(problem, location=str(backend.address))


def _retried(
    retried: _RetriedCheck,
    backend: S3Backend,
    request: str,
    check: Callable[[], T],
    clock: Clock,
) -> T:
    """``check`` retried while it fails transiently; once the retries are spent, the location
    is unavailable, saying what the bucket kept answering."""
    attempts = 0
    started = clock()

    def attempt() -> T:
        nonlocal attempts
        attempts += 1
        return check()

    try:
        return retried.run(request, attempt)
    except TransientBackendError as exc:
        code = str(exc.details.get("code_from_bucket") or "")
        if not code:  # no answer at all: the connection was refused, timed out or cut
            cause = f"cannot be reached ({exc.__cause__ or exc.message})"
        elif code in _THROTTLED:
            cause = f"is throttling requests ({code})"
        else:
            cause = f"keeps failing ({code})"
        raise LocationUnavailable(
            f"bucket {backend.bucket} {cause}: {request} was tried {attempts} time(s) over "
            f"{clock() - started:.1f} s; the location is unavailable until it answers",
            location=str(backend.address),
            code_from_bucket=code or None,
            attempts=attempts,
        ) from exc


# --- multipart uploads left behind ----------------------------------------------------------------


def upload_started(upload_id: str) -> None:
    """A multipart upload of this process began: no sweep aborts it until :func:`upload_ended`."""
    with _UPLOADS_LOCK:
        _LIVE_UPLOADS.add(upload_id)


def upload_ended(upload_id: str) -> None:
    with _UPLOADS_LOCK:
        _LIVE_UPLOADS.discard(upload_id)


def abandoned(
    uploads: Iterable[OpenUpload], *, now: datetime, older_than: timedelta = ABANDONED_UPLOAD_AGE
) -> list[OpenUpload]:
    """The uploads begun more than ``older_than`` before ``now`` that this process is not
    carrying out."""
    with _UPLOADS_LOCK:
        live = set(_LIVE_UPLOADS)
    return [u for u in uploads if u.upload_id not in live and now - u.initiated > older_than]


def abort_abandoned_uploads(
    backend: S3Backend, *, older_than: timedelta | None = None, now: datetime | None = None
) -> tuple[OpenUpload, ...]:
    """Abort the uploads under the backend's prefix that :func:`abandoned` picks (``now``: this
    clock; ``older_than``: :data:`ABANDONED_UPLOAD_AGE`); return those aborted."""
    picked = abandoned(
        backend.open_uploads(),
        now=datetime.now(UTC) if now is None else now,
        older_than=ABANDONED_UPLOAD_AGE if older_than is None else older_than,
    )
    return tuple(upload for upload in picked if backend.abort_upload(upload))


def sweep(backend: S3Backend, endpoint: str) -> None:
    """:func:`abort_abandoned_uploads`, unless this process swept the same bucket prefix less
    than :data:`SWEEP_INTERVAL` ago. A sweep that fails (throttled, no
    ``s3:ListBucketMultipartUploads``) is logged, not raised: it must never fail a write."""
    where = (endpoint, backend.bucket, backend.prefix)
    with _UPLOADS_LOCK:
        last = _SWEPT_AT.get(where)
        if last is not None and time.monotonic() - last < SWEEP_INTERVAL:
            return
        _SWEPT_AT[where] = time.monotonic()
    try:
        aborted = abort_abandoned_uploads(backend)
    except StoreError as exc:
        log.warning("%s: abandoned multipart uploads not swept: %s", backend.describe(), exc)
        return
    for upload in aborted:
        log.warning(
            "%s: aborted a multipart upload of %s left behind since %s",
            backend.describe(),
            upload.name,
            upload.initiated.isoformat(),
        )
