"""An S3 bucket as a backend (with :mod:`tiering.s3_client`, the only modules that import boto3).

A bucket location is addressed ``s3://BUCKET[/PREFIX]``; every object of the store lives under
the prefix, named as the backend contract names it. The bucket may be AWS S3 or any
S3-compatible store (the options name the endpoint, region, credentials and addressing style).

What the contract asks, and how S3 gives it:

- Atomic puts: S3 makes an object visible whole or not at all. Objects up to
  :data:`MULTIPART_THRESHOLD` are one ``PutObject``; larger ones a multipart upload (parts of
  :data:`PART_SIZE`, sent in parallel) that is aborted on any failure. Every upload asks the bucket
  to verify a SHA-256 checksum (``ChecksumAlgorithm``), so a body damaged on the way is refused.
- Storage classes: ``PutOptions.storage_class`` is honoured when it is an S3 class
  (:data:`STORAGE_CLASSES`); anything else is stored in the default class (the contract's
  "honour or ignore"). Cold classes (:data:`COLD_CLASSES`) make ``get`` raise
  :class:`ObjectArchived` until the object is restored: ``warm_up`` asks ``RestoreObject`` with
  the backend's tier and reads the ``Restore`` header of ``HeadObject`` to tell thawing from ready.
- Object Lock: ``PutOptions.retain_until`` on a bucket with Object Lock sets the object's
  retention (``lock_mode``: COMPLIANCE or GOVERNANCE). Deleting a locked version is refused by the
  bucket and raises :class:`ObjectLocked`; the backend never asks to bypass governance.
- Versioned buckets (Object Lock needs versioning): ``delete`` removes every version of the key,
  so a deleted object does not linger as a noncurrent version; a locked version stops it.
- Errors: throttling (``SlowDown``, 503), server errors (500), timeouts and dropped connections
  are :class:`TransientBackendError` (the retry wrapper retries them); a missing bucket, refused
  credentials or an unreachable endpoint make the location :class:`LocationUnavailable`;
  ``NoSuchKey`` is :class:`ObjectMissing`.
- Opening a location checks the bucket (``tiering.s3_checks``: it answers, the clocks agree, its
  lock settings fit), retrying transient failures as the retry wrapper does.
- Abandoned multipart uploads: an upload whose ``CreateMultipartUpload`` answer was lost, or whose
  process was killed, cannot be aborted by its writer and is billed until aborted. Before its
  first write a backend aborts those under its prefix older than a day (``s3_checks``: the age,
  the rate limit); a bucket lifecycle rule (``AbortIncompleteMultipartUpload``) is the second line.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError

from appliance.errors import (
    IntegrityError,
    InvalidInput,
    LocationUnavailable,
    ObjectArchived,
    ObjectLocked,
    ObjectMissing,
    StoreError,
    TransientBackendError,
)
from appliance.store.backend import (
    BackendCapabilities,
    ObjectInfo,
    PutOptions,
    WarmUpStatus,
    check_name,
)
from tiering import s3_checks
from tiering.s3_checks import LockSettings, OpenUpload, check_bucket, open_retries
from tiering.s3_client import (
    MISSING_CODES,
    UNAVAILABLE_CODES,
    BucketAddress,
    error_code,
    is_transient,
    make_client,
)

#: The storage classes S3 knows; a class outside this set is stored in the default class.
STORAGE_CLASSES = frozenset(
    {
        "STANDARD",
        "STANDARD_IA",
        "ONEZONE_IA",
        "INTELLIGENT_TIERING",
        "REDUCED_REDUNDANCY",
        "GLACIER_IR",
        "GLACIER",
        "DEEP_ARCHIVE",
    }
)
#: Classes whose objects must be restored before they can be read (GLACIER_IR reads at once).
COLD_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})
#: Restore tiers, fastest (and dearest) first.
RESTORE_TIERS = ("Expedited", "Standard", "Bulk")
LOCK_MODES = ("COMPLIANCE", "GOVERNANCE")
#: Objects larger than this are uploaded in parts.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
#: The size of each part (S3's minimum is 5 MiB, except the last).
PART_SIZE = 16 * 1024 * 1024
#: Parts of one object sent at once.
PART_THREADS = 4
#: Options of a bucket location that the backend takes.
BACKEND_OPTIONS = frozenset({"cold", "lock_mode", "restore_tier", "restore_days", "poll_seconds"})
#: Options of a bucket location that the appliance uses above the backend: the class and lock
#: of a copy's data packs, how often a recall looks (``appliance.locations``).
LOCATION_OPTIONS = frozenset({"data_class", "lock_days", "recall_poll_seconds"})


class S3Backend:
    """A store (or a copy of one) in a bucket, under a prefix; see the module docstring."""

    def __init__(
        self,
        client: Any,
        address: BucketAddress,
        *,
        cold: bool = False,
        lock_mode: str | None = None,
        restore_tier: str = "Standard",
        restore_days: int = 7,
        poll_seconds: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if lock_mode is not None and lock_mode not in LOCK_MODES:
            raise InvalidInput(f"lock mode is one of {', '.join(LOCK_MODES)}, not {lock_mode!r}")
        if restore_tier not in RESTORE_TIERS:
            raise InvalidInput(f"restore tier is one of {', '.join(RESTORE_TIERS)}")
        self.client = client
        self.address = address
        self.bucket = address.bucket
        self.prefix = address.prefix
        self.lock_mode = lock_mode
        self.restore_tier = restore_tier
        self.restore_days = restore_days
        self.poll_seconds = poll_seconds
        self._sleep = sleep
        self._capabilities = BackendCapabilities(
            ranged_reads=True,
            listing_cost="expensive",
            cold_objects=cold,
            immutable_objects=lock_mode is not None,
        )
        self._versioned: bool | None = None
        self._swept = False
        self._lock = threading.Lock()

    # --- the contract ---

    @property
    def capabilities(self) -> BackendCapabilities:
        return self._capabilities

    def describe(self) -> str:
        return f"bucket {self.address}"

    def _key(self, name: str) -> str:
        return self.prefix + check_name(name)

    def _fail(self, exc: Exception, name: str | None = None, action: str = "read") -> NoReturn:
        """Raise the contract's error for a boto3/botocore failure."""
        details: dict[str, Any] = {"location": str(self.address)}
        if name is not None:
            details["name"] = name
        what = f"{name} in {self.describe()}" if name else self.describe()
        if isinstance(exc, ClientError):
            code = error_code(exc)
            if code in MISSING_CODES:
                raise ObjectMissing(f"{what} does not exist", **details) from exc
            if code == "InvalidObjectState":
                raise ObjectArchived(
                    f"{what} is archived (cold storage); recall it before reading", **details
                ) from exc
            if code in UNAVAILABLE_CODES:
                raise LocationUnavailable(
                    f"{self.describe()} cannot be used: {code} ({exc.response['Error'].get('Message', '')})",
                    code_from_bucket=code,
                    **details,
                ) from exc
            if code == "403" and action != "delete":
                # A HEAD answer has no body, so no code: a bare 403 is the bucket refusing
                # these credentials (or this access), as open_s3_bucket reads it.
                raise LocationUnavailable(
                    f"{self.describe()} refuses these credentials (403 Forbidden to a {action} "
                    f"of {name or 'the bucket'})",
                    code_from_bucket=code,
                    **details,
                ) from exc
            if is_transient(exc):
                raise TransientBackendError(
                    f"{self.describe()} answered {code} to a {action}; retrying may help",
                    code_from_bucket=code,
                    **details,
                ) from exc
            if code in ("AccessDenied", "403") and action == "delete" and self.lock_mode:
                raise ObjectLocked(
                    f"{what} is locked (Object Lock) and cannot be deleted yet", **details
                ) from exc
            raise StoreError(
                f"{self.describe()} refused a {action} of {name or 'the bucket'}: {code} "
                f"({exc.response.get('Error', {}).get('Message', '')})",
                code_from_bucket=code,
                **details,
            ) from exc
        if isinstance(exc, ConnectionError | HTTPClientError | BotoCoreError):
            raise TransientBackendError(
                f"{self.describe()} could not be reached for a {action}: {exc}", **details
            ) from exc
        raise exc

    def put(
        self, name: str, data: bytes | bytearray | memoryview, options: PutOptions | None = None
    ) -> None:
        key = self._key(name)
        self._sweep_once()
        body = bytes(data)
        extra: dict[str, Any] = {}
        if options is not None:
            if options.storage_class in STORAGE_CLASSES and options.storage_class != "STANDARD":
                extra["StorageClass"] = options.storage_class
            if options.retain_until is not None and self.lock_mode is not None:
                extra["ObjectLockMode"] = self.lock_mode
                extra["ObjectLockRetainUntilDate"] = options.retain_until.astimezone(UTC)
        try:
            if len(body) <= MULTIPART_THRESHOLD:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=body,
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=_sha256(body),
                    **extra,
                )
            else:
                self._multipart(key, body, extra)
        except (ClientError, BotoCoreError) as exc:
            self._fail(exc, name, "write")

    def _multipart(self, key: str, body: bytes, extra: dict[str, Any]) -> None:
        upload = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ChecksumAlgorithm="SHA256", **extra
        )
        upload_id = upload.get("UploadId")
        if not upload_id:
            self._cut_short(key[len(self.prefix) :], "write")

        def send(number: int) -> dict[str, Any]:
            piece = body[(number - 1) * PART_SIZE : number * PART_SIZE]
            checksum = _sha256(piece)
            reply = self.client.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=piece,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=checksum,
            )
            if "ETag" not in reply:
                self._cut_short(key[len(self.prefix) :], "write")
            return {"PartNumber": number, "ETag": reply["ETag"], "ChecksumSHA256": checksum}

        count = (len(body) + PART_SIZE - 1) // PART_SIZE
        try:
            s3_checks.upload_started(upload_id)
            with ThreadPoolExecutor(max_workers=min(PART_THREADS, count)) as pool:
                parts = list(pool.map(send, range(1, count + 1)))
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            # Parts of an unfinished upload are billed until aborted.
            with contextlib.suppress(ClientError, BotoCoreError):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise
        finally:
            s3_checks.upload_ended(upload_id)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        key = self._key(name)
        if offset < 0 or (length is not None and length < 0):
            raise InvalidInput("offsets and lengths are never negative")
        if length == 0:
            size = self.stat(name).size  # the object must exist, and the offset be inside it
            if offset > size:
                raise IntegrityError(f"{name}: offset {offset} is past its end ({size})", name=name)
            return b""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            args["Range"] = f"bytes={offset}-{end}"
        try:
            reply = self.client.get_object(**args)
            data: bytes = reply["Body"].read()
        except ClientError as exc:
            if error_code(exc) == "InvalidRange":
                size = self.stat(name).size
                if offset == size and length is None:
                    return b""
                raise IntegrityError(
                    f"{name} in {self.describe()}: the range {offset}+{length} is past its end "
                    f"({size} bytes)",
                    name=name,
                ) from exc
            self._fail(exc, name)
        except BotoCoreError as exc:
            self._fail(exc, name)
        if reply.get("ContentLength") != len(data):
            # A connection closed inside the headers reads as their end, and the body is then
            # read to the close: an answer cut short, never the object's bytes.
            self._cut_short(name, "read")
        if length is not None and len(data) != length:
            raise IntegrityError(
                f"{name} in {self.describe()}: asked {length} bytes at {offset}, got {len(data)}",
                name=name,
            )
        return data

    def stat(self, name: str) -> ObjectInfo:
        head = self._head(name)
        return ObjectInfo(name, int(head["ContentLength"]), head["LastModified"].timestamp())

    def _head(self, name: str) -> dict[str, Any]:
        try:
            head: dict[str, Any] = self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except (ClientError, BotoCoreError) as exc:
            self._fail(exc, name)
        if "ContentLength" not in head or "LastModified" not in head:
            self._cut_short(name, "stat")  # headers cut off: not an object without a size
        return head

    def _cut_short(self, name: str, action: str) -> NoReturn:
        raise TransientBackendError(
            f"{self.describe()} could not be reached for a {action}: the answer about {name} "
            "was cut short",
            name=name,
            location=str(self.address),
        )

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if prefix:
            # A prefix need not be a whole name ("data/0"), but it must not escape.
            check_name(prefix.rstrip("/") or "x")
        paginator = self.client.get_paginator("list_objects_v2")
        found = []
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                if "IsTruncated" not in page:  # every listing says; a cut one is not empty
                    self._cut_short(prefix or "the store", "listing")
                for item in page.get("Contents", []):
                    name = item["Key"][len(self.prefix) :]
                    found.append(
                        ObjectInfo(name, int(item["Size"]), item["LastModified"].timestamp())
                    )
        except (ClientError, BotoCoreError) as exc:
            self._fail(exc, None, "listing")
        return iter(found)

    def delete(self, name: str) -> None:
        key = self._key(name)
        try:
            if not self._is_versioned():
                self.client.delete_object(Bucket=self.bucket, Key=key)
                return
            paginator = self.client.get_paginator("list_object_versions")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=key):
                entries = [*page.get("Versions", []), *page.get("DeleteMarkers", [])]
                for entry in entries:
                    if entry["Key"] != key:
                        continue  # another name that starts with this one
                    self.client.delete_object(
                        Bucket=self.bucket, Key=key, VersionId=entry["VersionId"]
                    )
        except (ClientError, BotoCoreError) as exc:
            try:
                self._fail(exc, name, "delete")
            except ObjectLocked as locked:
                # Say until when, so a GC can report when the object may go.
                try:
                    until = self.retention(name)[1]
                except StoreError:
                    until = None
                when = f" (locked until {until.isoformat()})" if until else ""
                raise ObjectLocked(
                    locked.message + when,
                    **{**locked.details, "retain_until": until.isoformat() if until else None},
                ) from exc

    def _is_versioned(self) -> bool:
        with self._lock:
            if self._versioned is None:
                reply = self.client.get_bucket_versioning(Bucket=self.bucket)
                self._versioned = reply.get("Status") in ("Enabled", "Suspended")
            return self._versioned

    # --- the bucket itself: the checks at open (tiering.s3_checks), abandoned uploads ---

    def head_bucket(self) -> dict[str, Any]:
        """``HeadBucket``'s answer; a missing bucket or refused credentials are unavailable."""
        try:
            answer: dict[str, Any] = self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            self._check_failed(exc, "HeadBucket", "s3:ListBucket")
        return answer

    def lock_settings(self) -> LockSettings:
        """The bucket's versioning status and whether Object Lock is enabled on it."""
        try:
            versioning = self.client.get_bucket_versioning(Bucket=self.bucket).get("Status")
        except (ClientError, BotoCoreError) as exc:
            self._check_failed(exc, "GetBucketVersioning", "s3:GetBucketVersioning")
        try:
            config = self.client.get_object_lock_configuration(Bucket=self.bucket)
        except ClientError as exc:
            if error_code(exc) != "ObjectLockConfigurationNotFoundError":
                self._check_failed(
                    exc, "GetObjectLockConfiguration", "s3:GetBucketObjectLockConfiguration"
                )
            config = {}
        except BotoCoreError as exc:
            self._check_failed(
                exc, "GetObjectLockConfiguration", "s3:GetBucketObjectLockConfiguration"
            )
        enabled = config.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
        return LockSettings(versioning or None, enabled == "Enabled")

    def _check_failed(self, exc: Exception, request: str, permission: str) -> NoReturn:
        """A check at open failed: transient (retried) when it may pass, otherwise the location
        is unavailable, in words."""
        if not isinstance(exc, ClientError) or is_transient(exc):
            self._fail(exc, None, request)
        code = error_code(exc)
        # A HEAD answer has no body: its code is its status, its message the status's words.
        said = "" if code.isdigit() else exc.response.get("Error", {}).get("Message") or ""
        if code in ("404", "NoSuchBucket"):
            reason = "does not exist"
        elif code in ("403", "AccessDenied"):
            reason = (
                f"refuses these credentials ({code} to {request}: a wrong or expired key, or "
                f"no {permission} permission)"
            )
        elif code in UNAVAILABLE_CODES:
            reason = f"refuses these credentials ({code} to {request})"
        elif code == "400":  # what S3 answers a HEAD signed with an expired session token
            reason = f"answered 400 to {request}: an expired session token, or a wrong region"
        else:
            reason = f"answered {code} to {request}"
        raise LocationUnavailable(
            f"bucket {self.bucket} {reason}" + (f": {said}" if said else ""),
            location=str(self.address),
            code_from_bucket=code,
        ) from exc

    def open_uploads(self) -> tuple[OpenUpload, ...]:
        """Every incomplete multipart upload under the prefix (``ListMultipartUploads``, page
        after page)."""
        paginator = self.client.get_paginator("list_multipart_uploads")
        found = []
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                if "IsTruncated" not in page:  # every listing says; a cut one is not empty
                    self._cut_short("the multipart uploads", "listing")
                for item in page.get("Uploads", []):
                    if not {"Key", "UploadId", "Initiated"} <= item.keys():
                        continue  # its age cannot be judged: never aborted
                    name = item["Key"][len(self.prefix) :]
                    found.append(OpenUpload(name, item["UploadId"], item["Initiated"]))
        except (ClientError, BotoCoreError) as exc:
            self._fail(exc, None, "listing of multipart uploads")
        return tuple(found)

    def abort_upload(self, upload: OpenUpload) -> bool:
        """Abort one multipart upload; False if it was gone (completed or aborted meanwhile)."""
        try:
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self.prefix + upload.name, UploadId=upload.upload_id
            )
        except ClientError as exc:
            if error_code(exc) == "NoSuchUpload":
                return False
            self._fail(exc, upload.name, "abort of a multipart upload")
        except BotoCoreError as exc:
            self._fail(exc, upload.name, "abort of a multipart upload")
        return True

    def abort_abandoned_uploads(
        self, *, older_than: timedelta | None = None, now: datetime | None = None
    ) -> tuple[OpenUpload, ...]:
        """Abort the multipart uploads under the prefix left behind (``s3_checks``); return
        them. For a caller such as a location GC; writes sweep by themselves."""
        return s3_checks.abort_abandoned_uploads(self, older_than=older_than, now=now)

    def _sweep_once(self) -> None:
        """Before this backend's first write, sweep abandoned uploads (rate-limited per process:
        a copy opens its location afresh; a failed sweep never fails the write)."""
        with self._lock:
            if self._swept:
                return
            self._swept = True
        s3_checks.sweep(self, str(self.client.meta.endpoint_url))

    # --- cold objects ---

    def warm_up(self, names: Iterable[str]) -> WarmUpStatus:
        ready, pending = set(), set()
        for name in names:
            state = self.thaw_state(name)
            if state == "ready":
                ready.add(name)
                continue
            if state == "archived":
                self._restore(name)
            pending.add(name)
        return WarmUpStatus(frozenset(ready), frozenset(pending))

    def thaw_state(self, name: str) -> str:
        """``ready`` (readable now), ``thawing`` (a restore is under way) or ``archived``."""
        try:
            head = self._head(name)
        except ObjectMissing:
            return "ready"  # nothing to thaw: the read will say it is missing
        if head.get("StorageClass") not in COLD_CLASSES:
            return "ready"
        restore = head.get("Restore") or ""
        if 'ongoing-request="false"' in restore:
            return "ready"
        if 'ongoing-request="true"' in restore:
            return "thawing"
        return "archived"

    def _restore(self, name: str) -> None:
        try:
            self.client.restore_object(
                Bucket=self.bucket,
                Key=self._key(name),
                RestoreRequest={
                    "Days": self.restore_days,
                    "GlacierJobParameters": {"Tier": self.restore_tier},
                },
            )
        except ClientError as exc:
            if error_code(exc) == "RestoreAlreadyInProgress":
                return
            self._fail(exc, name, "restore request")
        except BotoCoreError as exc:
            self._fail(exc, name, "restore request")

    def wait_warm(self, names: Iterable[str], timeout: float) -> None:
        wanted = list(names)
        deadline = time.monotonic() + timeout
        while True:
            status = self.warm_up(wanted)
            if status.done:
                return
            if time.monotonic() >= deadline:
                raise ObjectArchived(
                    f"{len(status.pending)} object(s) in {self.describe()} are still being "
                    f"restored after {timeout:.0f} s",
                    pending=sorted(status.pending)[:10],
                )
            wanted = sorted(status.pending)
            self._sleep(min(self.poll_seconds, max(0.0, deadline - time.monotonic())))

    def retain(self, name: str, until: datetime) -> None:
        """Extend the object's Object Lock to ``until`` (never shorten it); without a lock mode
        the bucket cannot lock, and only the object's existence is checked."""
        mode, current = self.retention(name)
        if self.lock_mode is None:
            return
        until = until.astimezone(UTC)
        if current is not None and current >= until:
            return
        try:
            self.client.put_object_retention(
                Bucket=self.bucket,
                Key=self._key(name),
                Retention={"Mode": mode or self.lock_mode, "RetainUntilDate": until},
            )
        except (ClientError, BotoCoreError) as exc:
            self._fail(exc, name, "lock extension")

    def retention(self, name: str) -> tuple[str | None, datetime | None]:
        """The object's lock mode and retain-until date, read back from the bucket."""
        head = self._head(name)
        return head.get("ObjectLockMode"), head.get("ObjectLockRetainUntilDate")

    def storage_class(self, name: str) -> str:
        return str(self._head(name).get("StorageClass") or "STANDARD")

    def close(self) -> None:
        self.client.close()


def _sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def open_s3_bucket(address: str, **options: Any) -> S3Backend:
    """The ``s3_bucket`` backend kind (entry point): ``address`` is ``s3://BUCKET[/PREFIX]``.

    Options: ``endpoint_url``, ``region``, ``access_key_id``, ``secret_access_key``,
    ``session_token``, ``profile``, ``addressing_style`` (the client); ``cold`` (data packs go to
    a cold class), ``lock_mode``, ``restore_tier``, ``restore_days``, ``poll_seconds``. The bucket
    is checked (``tiering.s3_checks``): one that does not exist, refuses the credentials, cannot
    be reached or keeps failing after the retries (``open_retries``: a ``RetryPolicy`` or its
    fields; the data operations' policy by default), or whose lock settings do not fit, is
    :class:`LocationUnavailable`.
    """
    parsed = BucketAddress.parse(address)
    client_options = {
        k: options.pop(k)
        for k in (
            "endpoint_url",
            "region",
            "access_key_id",
            "secret_access_key",
            "session_token",
            "profile",
            "addressing_style",
        )
        if k in options
    }
    for name in LOCATION_OPTIONS:
        options.pop(name, None)  # used above the backend (copies and recalls)
    retries = open_retries(options.pop("open_retries", None))
    unknown = sorted(set(options) - BACKEND_OPTIONS)
    if unknown:
        raise InvalidInput(f"unknown bucket option(s): {', '.join(unknown)}", options=unknown)
    client = make_client(**client_options)
    try:
        backend = S3Backend(client, parsed, **options)
        check_bucket(backend, retries=retries)
    except BaseException:
        client.close()
        raise
    return backend
