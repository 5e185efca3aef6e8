"""The boto3 side of a bucket location: the address, the client, and what an S3 error means.

:mod:`tiering.s3` builds the backend on these; only these two modules import boto3.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from appliance.errors import InvalidInput
from appliance.store.backend import check_name

TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
        "502",
        "504",
    }
)
MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchVersion"})
UNAVAILABLE_CODES = frozenset(
    {
        "NoSuchBucket",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidToken",
        "AccountProblem",
        "AllAccessDisabled",
    }
)


@dataclass(frozen=True)
class BucketAddress:
    bucket: str
    prefix: str  # "" or ending in "/"

    @classmethod
    def parse(cls, address: str) -> BucketAddress:
        """``s3://BUCKET[/PREFIX]`` (the prefix's segments are valid object-name segments)."""
        if not address.startswith("s3://"):
            raise InvalidInput(f"a bucket location is s3://BUCKET[/PREFIX], not {address!r}")
        bucket, _, prefix = address[len("s3://") :].partition("/")
        prefix = prefix.strip("/")
        if not (3 <= len(bucket) <= 63) or not all(c.isalnum() or c in "-." for c in bucket):
            raise InvalidInput(f"{bucket!r} is not a valid bucket name", address=address)
        if prefix:
            check_name(prefix)
            prefix += "/"
        return cls(bucket, prefix)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


_SESSIONS: dict[str | None, Any] = {}
_SESSIONS_LOCK = threading.Lock()


def _session(profile: str | None) -> Any:
    """One boto3 session per profile: a new session loads the S3 service model again (~0.1 s
    per client), and a copy opens its location's client each time. Call with the lock held:
    sessions are not thread-safe (their clients are)."""
    if profile not in _SESSIONS:
        _SESSIONS[profile] = boto3.session.Session(profile_name=profile)
    return _SESSIONS[profile]


def make_client(
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    session_token: str | None = None,
    profile: str | None = None,
    addressing_style: str = "auto",
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
) -> Any:
    """A boto3 S3 client. Retries are the appliance's (a wrapper), so boto3's own are off."""
    with _SESSIONS_LOCK:
        session = _session(profile)
    config = Config(
        region_name=region,
        s3={"addressing_style": addressing_style},
        # total_max_attempts counts the first try; botocore's max_attempts counts retries.
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=32,
        # Checksums only where the appliance asks for them (every upload does).
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    with _SESSIONS_LOCK:
        return session.client(
            "s3",
            endpoint_url=endpoint_url or None,
            aws_access_key_id=access_key_id or None,
            aws_secret_access_key=secret_access_key or None,
            aws_session_token=session_token or None,
            config=config,
        )


def error_code(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    code = str(error.get("Code") or "")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code or str(status or "")


def status_code(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def is_transient(exc: ClientError) -> bool:
    return error_code(exc) in TRANSIENT_CODES or status_code(exc) >= 500
