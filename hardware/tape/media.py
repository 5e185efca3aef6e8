"""Which tape to write, and whether a tape may be overwritten: pure decisions on plain facts.

The rules (issue 15, "Media pools and sets"):

* **Overwrite only what nobody needs.** A labelled tape may be written from its beginning again
  (relabelled for a new set) only when every point on it has expired (written longer ago than the
  pool's retention) or has another *verified* copy somewhere else. A tape with an unreadable
  label, or a label of another store or of no appliance at all (*foreign*), is never overwritten
  by a backup: only an explicit erase (``tape_erase``) makes it blank.
* **A label on first use.** A blank tape (nothing recorded, or erased) gets a label naming its
  pool, set and sequence when it is first written.
* **Allocation.** A pool with allocation ``continue`` appends to its open set: the last tape of
  the set while it has room, else a new tape joins the set. A pool with ``new_set`` starts a new
  set at every write session (the previous one is closed). A new tape is a blank one, or one of
  the pool's that may be overwritten; tapes in the library come first (no one has to fetch them),
  then the oldest written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from appliance.catalog.tape import TapeMediumRecord, TapePoolRecord, TapeSetRecord


@dataclass(frozen=True)
class PointOnTape:
    """One point on a tape, as far as overwriting is concerned."""

    point_id: str
    written_at: datetime
    #: Another copy of the point (not on this set) is present and verified.
    verified_elsewhere: bool


@dataclass(frozen=True)
class OverwriteDecision:
    allowed: bool
    reason: str


def may_overwrite(
    points: Sequence[PointOnTape], retention_days: int, now: datetime
) -> OverwriteDecision:
    """Whether a tape holding ``points`` may be written over (see the module rules)."""
    keep = timedelta(days=retention_days)
    needed = [p for p in points if p.written_at + keep > now and not p.verified_elsewhere]
    if needed:
        first = needed[0]
        until = (first.written_at + keep).isoformat(timespec="minutes")
        return OverwriteDecision(
            False,
            f"{len(needed)} point(s) on it are kept until at least {until} and have no other "
            f"verified copy (point {first.point_id})",
        )
    return OverwriteDecision(True, "every point on it has expired or has another verified copy")


LabelVerdict = Literal["blank", "ours", "foreign", "unreadable"]


@dataclass(frozen=True)
class LabelAction:
    action: Literal["label", "use", "refuse"]
    reason: str


def label_action(verdict: LabelVerdict, *, erase_requested: bool = False) -> LabelAction:
    """What a backup does with a tape whose first block reads as ``verdict``: label a blank
    tape, use one of ours (the allocation rules decide how), refuse anything else unless the
    user asked for an erase."""
    if verdict == "blank":
        return LabelAction("label", "the tape is blank: it is labelled on first use")
    if verdict == "ours":
        return LabelAction("use", "the tape carries a label of this appliance's store")
    if erase_requested:
        return LabelAction("label", f"the tape's label is {verdict}, and an erase was asked for")
    return LabelAction(
        "refuse",
        f"the tape's label is {verdict}: it is never overwritten without an explicit erase "
        "(appliance tape erase)",
    )


@dataclass(frozen=True)
class Allocation:
    """Where a write session goes: ``append`` to a set's tape, or ``new`` (a tape starting a new
    set, or joining ``media_set_id`` as the next sequence), or ``need`` (no tape is available)."""

    kind: Literal["append", "new", "need"]
    media_set_id: str | None
    barcode: str | None
    sequence: int
    reason: str


def writable_candidates(
    media: Sequence[TapeMediumRecord], pool: str, reusable: set[str]
) -> list[TapeMediumRecord]:
    """Tapes a new set (or the next sequence of one) may take: blank ones, and the pool's tapes
    in ``reusable`` (those :func:`may_overwrite` allows); write-protected and retired tapes
    never. Library first, then the oldest written (never written first)."""
    found = [
        m
        for m in media
        if not m.write_protected
        and m.state != "retired"
        and (m.state == "blank" or (m.pool == pool and m.barcode in reusable))
    ]
    return sorted(
        found,
        key=lambda m: (
            m.place != "library",
            m.last_written_at is not None,
            m.last_written_at or m.created_at,
            m.barcode,
        ),
    )


def allocate(
    pool: TapePoolRecord,
    sets: Sequence[TapeSetRecord],
    media: Sequence[TapeMediumRecord],
    reusable: set[str],
) -> Allocation:
    """Where the next write session of ``pool`` goes (see the module rules)."""
    open_sets = [s for s in sets if s.pool == pool.name and s.closed_at is None]
    current = open_sets[-1] if open_sets else None
    if current is not None and pool.allocation == "continue":
        members = sorted(
            (m for m in media if m.media_set_id == current.id), key=lambda m: m.sequence or 0
        )
        if members and members[-1].state == "writable" and not members[-1].write_protected:
            last = members[-1]
            return Allocation(
                "append",
                current.id,
                last.barcode,
                last.sequence or 0,
                f"appending to tape {last.barcode} of set {current.id}",
            )
        sequence = (members[-1].sequence or 0) + 1 if members else 1
        return _new_tape(pool.name, media, reusable, current.id, sequence)
    return _new_tape(pool.name, media, reusable, None, 1)


def _new_tape(
    pool: str,
    media: Sequence[TapeMediumRecord],
    reusable: set[str],
    media_set_id: str | None,
    sequence: int,
) -> Allocation:
    found = writable_candidates(media, pool, reusable)
    what = f"set {media_set_id}" if media_set_id else "a new set"
    if not found:
        return Allocation(
            "need", media_set_id, None, sequence, f"needs a new tape of pool {pool} for {what}"
        )
    pick = found[0]
    return Allocation(
        "new", media_set_id, pick.barcode, sequence, f"tape {pick.barcode} starts {what}"
    )
