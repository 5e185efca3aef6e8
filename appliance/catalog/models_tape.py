"""The tape tables (revision 0012), kept apart from ``models`` so that module stays small.

Imported by the tape repository (so by :class:`~appliance.catalog.Catalog`) and by the migration
environment, which puts these tables in the same metadata as every other model.

- ``tape_pools``: one row per media pool (allocation ``continue`` | ``new_set``, retention days)
  and its schedule: a cron expression, the drive the scheduled job uses, which points it writes
  (``points_rule``: ``{"rule": "newest"|"gfs", "assets": [...], "keep_daily": N, ...}``) and
  the last slot that fired (:mod:`hardware.tape.schedule`).
- ``tape_media``: one row per cartridge the appliance knows, keyed by barcode; its label id once
  labelled, the pool and set it belongs to and its sequence there, state, place and slot.
- ``tape_media_sets``: one row per media set (the set's id is also its location's id, kind
  ``tape_set``); ``catalog`` is the newest set catalog written to its tapes (the JSON document
  of :class:`hardware.tape.layout.SetCatalog`). Where each object of a set lies is read from
  that document, not kept in rows of its own: the tapes carry the same document, so a scan on a
  fresh appliance restores exactly this row, and the two can never disagree.

States, allocations and places are validated in code (no CHECK constraint).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from appliance.catalog.models import NAME, STATE, Base, UTCDateTime


class TapePoolRow(Base):
    __tablename__ = "tape_pools"

    name: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    allocation: Mapped[str] = mapped_column(String(STATE))
    retention_days: Mapped[int] = mapped_column(Integer)
    schedule: Mapped[str | None] = mapped_column(String(NAME), nullable=True)
    schedule_drive: Mapped[str | None] = mapped_column(String(NAME), nullable=True)
    points_rule: Mapped[dict[str, Any]] = mapped_column(JSON)
    schedule_last_slot: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class TapeMediumRow(Base):
    __tablename__ = "tape_media"

    barcode: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    label_id: Mapped[str | None] = mapped_column(String(NAME), nullable=True)
    pool: Mapped[str | None] = mapped_column(String(NAME), nullable=True)
    media_set_id: Mapped[str | None] = mapped_column(String(NAME), nullable=True, index=True)
    sequence: Mapped[int | None] = mapped_column(Integer, nullable=True)
    state: Mapped[str] = mapped_column(String(STATE))
    place: Mapped[str] = mapped_column(String(STATE))
    slot: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bytes_written: Mapped[int] = mapped_column(BigInteger)
    write_protected: Mapped[bool] = mapped_column(Boolean)
    point_count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_written_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class TapeMediaSetRow(Base):
    __tablename__ = "tape_media_sets"

    id: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    pool: Mapped[str] = mapped_column(String(NAME), index=True)
    store_id: Mapped[str] = mapped_column(String(NAME))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    catalog: Mapped[dict[str, Any]] = mapped_column(JSON)
