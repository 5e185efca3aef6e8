"""USB rotation, decided: the sets, the state of each disk, what is overdue and what an insert does.

Pure functions over plain records and explicit times; the adapters (:mod:`hardware.usb`, the
``usb_export`` job of :mod:`hardware.usb_jobs`) load and store them as catalog settings documents
and act on the answers.

A **rotation set** ("Offsite") is a few USB disks that take turns: one is plugged into the
appliance, the others are away. Each time a member is plugged in, the set's export runs by
itself: the newest ``keep_newest`` points of each of its assets (every asset when it names none)
are copied to the disk, verified when ``verify`` is on, and the disk is unmounted and declared
safe to remove. A member should come back every ``rotate_days``; one not written for longer is
*overdue* by the days past that.

A **medium's state** is one of :data:`MEDIUM_STATES`:

* ``in``: plugged in and mounted, nothing written yet since;
* ``exporting``: its export is running;
* ``safe_to_remove``: written (or just initialised), flushed and unmounted: it may be pulled;
* ``out``: not plugged in.

The decision on an insert (:func:`insert_action`) keys on that state, so a ``udev`` add delivered
twice (or a ``changed`` event after the add) starts no second export: only a disk that was
``out`` (or never seen) starts one; one whose export is waiting is woken instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from appliance.errors import InvalidInput

#: The catalog settings key of the rotation sets (``{"sets": [...]}``).
SETS_KEY = "usb_rotation"
#: The set a disk joins when none is named.
DEFAULT_SET = "Offsite"
MEDIUM_STATES = ("in", "exporting", "safe_to_remove", "out")
#: States in which the disk is plugged in.
PRESENT_STATES = frozenset({"in", "exporting", "safe_to_remove"})
#: ext4 keeps 16 bytes of label.
LABEL_LENGTH = 16
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,15}$")
_SET_NAME = re.compile(r"^[\w][\w .-]{0,63}$")
DAY = timedelta(days=1)


@dataclass(frozen=True)
class RotationSet:
    """A set of USB disks that take turns, and what their export copies."""

    name: str
    #: The members' filesystem UUIDs (the media identities).
    members: tuple[str, ...] = ()
    #: The assets exported; empty: every asset.
    assets: tuple[str, ...] = ()
    #: How many of each asset's newest complete points go on the disk.
    keep_newest: int = 1
    #: A member should be plugged in (and written) at least this often.
    rotate_days: int = 7
    #: Read back every exported point before the disk is declared safe to remove.
    verify: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "members": list(self.members),
            "assets": list(self.assets),
            "keep_newest": self.keep_newest,
            "rotate_days": self.rotate_days,
            "verify": self.verify,
        }


def parse_set(document: Mapping[str, Any]) -> RotationSet:
    """A rotation set from its JSON document; :class:`InvalidInput` names what is wrong."""
    name = str(document.get("name", "")).strip()
    if not _SET_NAME.match(name):
        raise InvalidInput(
            f"rotation set name {name!r} must be 1-64 letters, digits, ' ', '.', '-'"
        )
    unknown = sorted(set(document) - {*RotationSet.__dataclass_fields__})
    if unknown:
        raise InvalidInput(f"unknown rotation set field(s): {', '.join(unknown)}")
    members = document.get("members", [])
    assets = document.get("assets", [])
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise InvalidInput("members must be a list of filesystem UUIDs")
    if not isinstance(assets, list) or not all(isinstance(a, str) and a for a in assets):
        raise InvalidInput("assets must be a list of asset names (empty: every asset)")
    keep = document.get("keep_newest", 1)
    days = document.get("rotate_days", 7)
    verify = document.get("verify", True)
    if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= 1000:
        raise InvalidInput("keep_newest must be a whole number from 1 to 1000")
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 3650:
        raise InvalidInput("rotate_days must be a whole number of days from 1 to 3650")
    if not isinstance(verify, bool):
        raise InvalidInput("verify must be true or false")
    return RotationSet(
        name, tuple(dict.fromkeys(members)), tuple(dict.fromkeys(assets)), keep, days, verify
    )


def parse_sets(document: Mapping[str, Any]) -> list[RotationSet]:
    """The sets of the ``usb_rotation`` settings document (names are unique, case-insensitive;
    a disk belongs to one set)."""
    sets = [parse_set(d) for d in document.get("sets", [])]
    names = [s.name.casefold() for s in sets]
    if len(set(names)) != len(names):
        raise InvalidInput("two rotation sets have the same name")
    members = [m for s in sets for m in s.members]
    if len(set(members)) != len(members):
        raise InvalidInput("a disk belongs to one rotation set only")
    return sets


def sets_document(sets: Iterable[RotationSet]) -> dict[str, Any]:
    return {"sets": [s.to_dict() for s in sets]}


def find_set(sets: Iterable[RotationSet], name: str) -> RotationSet | None:
    return next((s for s in sets if s.name.casefold() == name.casefold()), None)


def with_member(sets: Sequence[RotationSet], name: str, identity: str) -> list[RotationSet]:
    """The sets with ``identity`` a member of ``name`` (created with defaults if missing) and of
    no other set."""
    out = [replace(s, members=tuple(m for m in s.members if m != identity)) for s in sets]
    target = find_set(out, name)
    if target is None:
        return [*out, RotationSet(parse_set({"name": name}).name, (identity,))]
    return [replace(s, members=(*s.members, identity)) if s is target else s for s in out]


def check_label(label: str) -> str:
    if not _LABEL.match(label):
        raise InvalidInput(
            f"disk label {label!r} must be 1-{LABEL_LENGTH} letters, digits, '_', '.', '-' "
            "(it is the filesystem label)"
        )
    return label


def next_label(set_name: str, taken: Iterable[str]) -> str:
    """The first free label ``appl-<set>-<n>`` (the set's name shortened to fit 16 bytes)."""
    slug = re.sub(r"[^a-z0-9]+", "", set_name.casefold())[:7] or "set"
    used = {t.casefold() for t in taken}
    n = 1
    while f"appl-{slug}-{n}" in used:
        n += 1
    return f"appl-{slug}-{n}"


# --- the media --------------------------------------------------------------------------------


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) and value else None


@dataclass(frozen=True)
class MediumState:
    """What the appliance remembers of one USB medium (a settings document entry)."""

    #: The filesystem UUID the appliance made on the disk (the media table's identity).
    identity: str
    label: str
    set_name: str
    location_id: str
    state: str = "out"
    initialised_at: datetime | None = None
    inserted_at: datetime | None = None
    removed_at: datetime | None = None
    #: When its last export finished (verified, flushed, unmounted).
    last_written: datetime | None = None
    #: A line for the page (``pulled during an export: ...``), None when all is well.
    message: str | None = None
    #: Where the disk came from (``ID_SERIAL``, model), for the page.
    serial: str | None = None
    model: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in self.__dataclass_fields__:
            value = getattr(self, key)
            out[key] = value.isoformat() if isinstance(value, datetime) else value
        return out

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> MediumState:
        times = ("initialised_at", "inserted_at", "removed_at", "last_written")
        fields: dict[str, Any] = {k: document[k] for k in cls.__dataclass_fields__ if k in document}
        for key in times:
            fields[key] = _time(document.get(key))
        return cls(**fields)


@dataclass(frozen=True)
class MediumStatus:
    """One member of a set as the page shows it."""

    identity: str
    label: str
    state: str
    present: bool
    last_written: datetime | None
    #: Whole days since it was last written (or initialised); None if neither is known.
    days_since_written: int | None
    #: Days past ``rotate_days``; None when not overdue.
    overdue_days: int | None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "label": self.label,
            "state": self.state,
            "present": self.present,
            "last_written": self.last_written.isoformat() if self.last_written else None,
            "days_since_written": self.days_since_written,
            "overdue_days": self.overdue_days,
            "message": self.message,
        }


@dataclass(frozen=True)
class RotationStatus:
    name: str
    rotate_days: int
    media: tuple[MediumStatus, ...] = ()
    #: Labels of the members plugged in now.
    present: tuple[str, ...] = ()
    #: Labels of the members away.
    away: tuple[str, ...] = ()
    #: Labels of the overdue members, most overdue first.
    overdue: tuple[str, ...] = ()
    #: The member away the longest since written: the one to bring back next.
    next_to_insert: str | None = None
    problems: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rotate_days": self.rotate_days,
            "media": [m.to_dict() for m in self.media],
            "present": list(self.present),
            "away": list(self.away),
            "overdue": list(self.overdue),
            "next_to_insert": self.next_to_insert,
            "problems": list(self.problems),
        }


def medium_status(state: MediumState, rotate_days: int, now: datetime) -> MediumStatus:
    """Where one disk is, when it was last written, and by how many days it is overdue."""
    since = state.last_written or state.initialised_at
    days = None if since is None else max(0, (now - since) // DAY)
    overdue = None if days is None or days <= rotate_days else days - rotate_days
    return MediumStatus(
        state.identity,
        state.label,
        state.state,
        state.state in PRESENT_STATES,
        state.last_written,
        days,
        overdue,
        state.message,
    )


def rotation_status(
    rotation: RotationSet, states: Mapping[str, MediumState], now: datetime
) -> RotationStatus:
    """The set now: which disks are in, which are out, which are overdue, which comes next."""
    media = []
    problems = []
    for identity in rotation.members:
        state = states.get(identity)
        if state is None:
            problems.append(f"member {identity} is not a known USB disk")
            continue
        media.append(medium_status(state, rotation.rotate_days, now))
    overdue = sorted((m for m in media if m.overdue_days), key=lambda m: -(m.overdue_days or 0))
    away = [m for m in media if not m.present]
    oldest = min(
        away,
        key=lambda m: (m.last_written is not None, m.last_written or now, m.label),
        default=None,
    )
    return RotationStatus(
        rotation.name,
        rotation.rotate_days,
        tuple(media),
        tuple(m.label for m in media if m.present),
        tuple(m.label for m in away),
        tuple(m.label for m in overdue),
        oldest.label if oldest is not None else None,
        tuple(problems),
    )


InsertAction = Literal["offer", "wake", "export", "nothing"]


def insert_action(
    state: MediumState | None, *, waiting_job: bool, active_job: bool
) -> tuple[InsertAction, str]:
    """What plugging in a disk should do, and why. ``state``: the medium's (None: a disk the
    appliance did not initialise); ``waiting_job``: an export of it waits for it;
    ``active_job``: an export of it is queued or running."""
    if state is None:
        return "offer", "an unknown disk: offered on the page, never touched unasked"
    if waiting_job:
        return "wake", f"the export to {state.label} waiting for it goes on"
    if active_job:
        return "nothing", f"an export to {state.label} is already queued or running"
    if state.state != "out":
        # Plugged in and seen already (a repeated udev event): it was handled then.
        return "nothing", f"{state.label} was seen plugged in already ({state.state})"
    return "export", f"{state.label} was plugged in: its export runs"


# --- what an export copies --------------------------------------------------------------------


class PointLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def asset(self) -> str: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def status(self) -> str: ...


@dataclass(frozen=True)
class ExportPlan:
    #: Points to copy, newest first (a disk pulled early has the newest of each asset).
    to_copy: tuple[str, ...] = ()
    #: Chosen points the disk already holds verified.
    present: tuple[str, ...] = ()


def plan_export(
    rotation: RotationSet, points: Iterable[PointLike], verified_here: Iterable[str]
) -> ExportPlan:
    """The points a member of ``rotation`` should hold: the newest ``keep_newest`` complete points
    of each of its assets; those it holds verified already (``verified_here``) are not copied."""
    wanted = set(rotation.assets)
    by_asset: dict[str, list[PointLike]] = {}
    for point in points:
        if point.status == "complete" and (not wanted or point.asset in wanted):
            by_asset.setdefault(point.asset, []).append(point)
    chosen: list[PointLike] = []
    for group in by_asset.values():
        group.sort(key=lambda p: (p.created_at, p.id), reverse=True)
        chosen.extend(group[: rotation.keep_newest])
    chosen.sort(key=lambda p: (p.created_at, p.id), reverse=True)
    there = set(verified_here)
    return ExportPlan(
        tuple(p.id for p in chosen if p.id not in there),
        tuple(p.id for p in chosen if p.id in there),
    )
