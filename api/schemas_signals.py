"""Schemas of a point's change signals, its ransomware suspicion and a person's review of it
(``appliance.backup.signals``, ``appliance.ransomware``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from api.schemas import PointDetail, PointPublic, Request
from appliance.catalog.records import PointRecord
from appliance.ransomware import needs_hold


class SignalsPublic(BaseModel):
    """How the point's files changed against its parent (``parent``; None: a first backup)."""

    parent: str | None = None
    files: int = 0
    files_before: int = 0
    new: int = 0
    changed: int = 0
    deleted: int = 0
    renamed: int = 0
    #: New extensions gained by renamed files (``.locked``), with how many files gained each.
    extensions: dict[str, int] = {}
    new_data_bytes: int = 0
    #: Of the new data, the bytes that do not compress (encrypted data looks random).
    dense_bytes: int = 0


class ReviewPublic(BaseModel):
    by: str
    at: datetime
    verdict: Literal["expected", "attack"]


class ReviewCreate(Request):
    """``expected``: the changes were wanted (the warning ends, retention goes on); ``attack``:
    the point is kept as evidence and the clean point before it stays protected."""

    verdict: Literal["expected", "attack"]


class SignalFields(BaseModel):
    signals: SignalsPublic | None = None
    #: Why the backup looks like ransomware, in words (empty: it does not).
    suspicion: list[str] = []
    #: Suspicious and not found expected by a person: retention keeps this point and the last
    #: clean one before it.
    suspicious: bool = False
    review: ReviewPublic | None = None


class PointWithSignals(PointPublic, SignalFields):
    pass


class PointDetailWithSignals(PointDetail, SignalFields):
    pass


def signal_fields(point: PointRecord) -> dict[str, Any]:
    return {
        "signals": SignalsPublic(**point.signals) if point.signals else None,
        "suspicion": list(point.suspicion),
        "suspicious": needs_hold(point.suspicion, point.review),
        "review": ReviewPublic(**point.review) if point.review else None,
    }
