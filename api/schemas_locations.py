"""Schemas of the locations API: locations (folders, buckets), copies to them, and what a
restore from a cold copy recalls first. Shared types (``Request``, paths) come from
:mod:`api.schemas`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, StringConstraints, model_validator

from api.schemas import AbsolutePath, Request


class LocationPublic(BaseModel):
    id: str
    label: str
    kind: str
    address: str
    #: ``random`` (read at once), ``cold`` (data packs need a recall first) or ``sequential``.
    access: str
    #: Whether the location answered when last opened (an unmounted disk is offline).
    online: bool
    offsite: bool
    removable: bool
    #: Copies here are locked (Object Lock) until their retain-until date.
    immutable: bool
    #: The data directory's own pool.
    home: bool
    #: Points with a complete copy here (present, or archived in cold storage).
    copies: int
    last_seen_at: datetime | None
    #: A folder that must be a mountpoint (an unmounted disk is unavailable, never empty).
    require_mount: bool = False
    #: Object Lock of a bucket's copies: COMPLIANCE or GOVERNANCE, kept ``lock_days`` days.
    lock_mode: str | None = None
    lock_days: int | None = None
    #: The storage class of a copy's data packs (metadata stays STANDARD); None: the default.
    data_class: str | None = None
    #: How a cold bucket's packs are recalled (Expedited, Standard, Bulk).
    restore_tier: str | None = None
    #: A bucket's endpoint (None: AWS), region and addressing style. Credentials are never shown.
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str | None = None
    #: Why the location is unavailable, in words (``POST /api/locations/{id}/check``).
    reason: str | None = None


#: S3 storage classes (``tiering.s3.STORAGE_CLASSES``); the cold ones need a recall to be read.
StorageClass = Literal[
    "STANDARD",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "REDUCED_REDUNDANCY",
    "GLACIER_IR",
    "GLACIER",
    "DEEP_ARCHIVE",
]
COLD_STORAGE_CLASSES = ("GLACIER", "DEEP_ARCHIVE")
LockMode = Literal["COMPLIANCE", "GOVERNANCE"]
RestoreTier = Literal["Expedited", "Standard", "Bulk"]
#: ``s3://BUCKET[/PREFIX]`` (the bucket's name is checked in full when the location is added).
S3Address = Annotated[
    str, StringConstraints(pattern=r"^s3://[A-Za-z0-9.-]{3,63}(/[^\x00]*)?$", max_length=1024)
]


class BucketOptions(Request):
    """How the appliance reaches a bucket and stores copies there. The credentials are
    write-only: kept in a 0600 file outside the catalog, never answered by any route, never
    written to the audit log."""

    #: An S3-compatible endpoint (None: AWS). No user name or password in the URL.
    endpoint_url: str | None = Field(
        default=None, max_length=2048, pattern=r"^https?://[^/@\s?#]+(/[^\s?#@]*)?$"
    )
    region: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    addressing_style: Literal["auto", "path", "virtual"] | None = None
    access_key_id: str | None = Field(
        default=None, min_length=1, max_length=256, pattern=r"^[^\s\x00]+$"
    )
    secret_access_key: SecretStr | None = Field(default=None, min_length=1, max_length=1024)
    session_token: SecretStr | None = Field(default=None, min_length=1, max_length=4096)
    #: Data packs go to a cold class (GLACIER unless ``data_class`` says DEEP_ARCHIVE): cheap,
    #: but a restore must recall them first (hours).
    cold: bool = False
    data_class: StorageClass | None = None
    #: Object Lock (the bucket must have it enabled): each copy's data packs cannot be deleted
    #: or overwritten for ``lock_days`` days.
    lock_mode: LockMode | None = None
    lock_days: int | None = Field(default=None, ge=1, le=36500)
    #: How a cold bucket's packs are recalled (default Standard).
    restore_tier: RestoreTier | None = None

    @model_validator(mode="after")
    def _consistent(self) -> BucketOptions:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("give both the access key and its secret, or neither")
        if self.lock_mode is not None and self.lock_days is None:
            raise ValueError("Object Lock needs the number of days each copy is kept (lock_days)")
        if self.lock_days is not None and self.lock_mode is None:
            raise ValueError("lock_days needs an Object Lock mode (COMPLIANCE or GOVERNANCE)")
        if self.data_class in COLD_STORAGE_CLASSES and not self.cold:
            raise ValueError(f"{self.data_class} is cold storage: set cold to use it")
        if (
            self.cold
            and self.data_class is not None
            and self.data_class not in COLD_STORAGE_CLASSES
        ):
            raise ValueError(
                f"a cold bucket keeps data in GLACIER or DEEP_ARCHIVE, not {self.data_class}"
            )
        if self.restore_tier is not None and not self.cold:
            raise ValueError("a restore tier applies to a cold bucket only")
        return self

    def backend_options(self) -> dict[str, Any]:
        """The location's options as ``add_location`` takes them (credentials included: it
        keeps them apart from the catalog)."""
        out: dict[str, Any] = {}
        for name in ("endpoint_url", "region", "addressing_style", "access_key_id"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        for name in ("secret_access_key", "session_token"):
            secret = getattr(self, name)
            if secret is not None:
                out[name] = secret.get_secret_value()
        if self.cold:
            out["cold"] = True
        for name in ("data_class", "lock_mode", "lock_days", "restore_tier"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


class LocationCreate(Request):
    """A folder (a mounted disk, a share) or a bucket that holds copies of the store.

    - ``pool_dir`` (the default): ``path`` is an empty folder (the path rules apply).
    - ``s3_bucket``: ``address`` is ``s3://BUCKET[/PREFIX]``, ``bucket`` how to reach it. The
      bucket is asked at once: a missing bucket, refused credentials or an unreachable endpoint
      answer 400 ``location_refused`` in words, and nothing is added.
    """

    kind: Literal["pool_dir", "s3_bucket"] = "pool_dir"
    path: AbsolutePath | None = None
    address: S3Address | None = None
    label: str = Field(default="", max_length=100)
    #: The folder must be a mountpoint: an unmounted disk is then unavailable, never empty.
    require_mount: bool = False
    offsite: bool = False
    bucket: BucketOptions | None = None

    @model_validator(mode="after")
    def _fits_kind(self) -> LocationCreate:
        if self.kind == "pool_dir":
            if self.path is None:
                raise ValueError("a folder location needs its path")
            if self.address is not None or self.bucket is not None:
                raise ValueError("address and bucket are for a bucket location (kind s3_bucket)")
        else:
            if self.address is None:
                raise ValueError("a bucket location needs its address, s3://BUCKET[/PREFIX]")
            if self.path is not None or self.require_mount:
                raise ValueError("path and require_mount are for a folder location")
        return self


class CopyCreate(Request):
    #: The location's id or label.
    location: str = Field(min_length=1, max_length=255)


class RecallEstimate(BaseModel):
    """What a read of a point (a restore, a download) would first recall from cold storage,
    looked up without asking for anything (``GET /api/points/{id}/recall``)."""

    point: str
    #: The path of a files point the estimate is for (None: the whole point).
    path: str | None
    #: A recall comes first: the point's readable copies are all cold.
    needed: bool
    #: The location the recall would come from (label, id, address).
    location: str | None
    location_id: str | None
    address: str | None
    #: That copy's state: ``archived``, or ``recalling`` when a recall is under way.
    copy_state: str | None
    tier: str | None
    #: The tier's typical wait in words ("3-5 hours").
    typical_wait: str | None
    #: The data packs the read needs, and the cold objects holding them that are thawed
    #: (packs on their own, and ``bundles`` of small packs, each counted whole) with their bytes.
    packs: int
    bytes: int
    objects: int = 0
    bundles: int = 0
    #: How often a waiting restore looks again.
    poll_seconds: float
    #: Why the cold copy could not be looked at now (packs and bytes are then 0).
    reason: str | None
    #: The estimate in words.
    message: str
    #: The storage class of the cold copy's data packs, which the recall is priced for.
    storage_class: str | None = None
    #: The estimated charge of the recall (retrieval per GiB and per request, from the dated
    #: prices, ``GET /api/tiering/prices``); None when nothing is recalled, the packs could not
    #: be looked at, or the prices know no such class and tier (DEEP_ARCHIVE has no Expedited).
    cost: float | None = None
    currency: str | None = None
    #: The date of the prices the cost is estimated from.
    prices_as_of: str | None = None
