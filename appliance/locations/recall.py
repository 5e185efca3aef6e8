"""Recall: making a point that lies only in cold storage readable, by exactly what a read needs.

A restore, a download or a failover reads a point from its best copy (:mod:`.choice`). When that
copy is ``archived`` (its data packs are in a cold class of a bucket: every readable copy is
gone or there never was one), the packs the read needs -- all of an image point's, or only
those holding one path of a files point -- are asked to be restored (``Backend.warm_up``) with the
location's tier. Until every one of them is readable the read waits; the copy is ``recalling``
meanwhile, and ``archived`` again once thawed (the thawed objects stay readable for the
location's ``restore_days``). Metadata (manifests, indexes, trees, chunk tables) is never cold,
so computing what a read needs costs no thaw. Small packs may lie in bundles (:mod:`.bundles`):
then the bundles holding the packs a read needs are what is thawed, and counted, whole.

:func:`prepare_read` asks and reports; it never blocks. Jobs turn a pending recall into a wait
(:class:`appliance.errors.JobWaiting`) and run again when the poll time comes.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from appliance.catalog.records import LocationRecord
from appliance.errors import NotFound, StoreError
from appliance.locations.bundles import with_bundles
from appliance.locations.choice import CopyOption, order_copies
from appliance.point_packs import point_packs
from appliance.store import format as fmt
from appliance.store.backend import Backend
from appliance.store.identity import check_identity
from appliance.store.packs import pack_object_name
from appliance.store.registry import open_backend
from appliance.store.repository import Repository
from appliance.store.wrappers import compose

if TYPE_CHECKING:
    from appliance.engine import Appliance

#: How long a recall waits between looks, per restore tier (the typical thaw is minutes for
#: Expedited, hours for Standard and Bulk).
POLL_SECONDS = {"Expedited": 60, "Standard": 15 * 60, "Bulk": 60 * 60}
#: The typical wait of each tier (what S3 documents for GLACIER; DEEP_ARCHIVE is slower).
TYPICAL_WAIT = {
    "Expedited": "1-5 minutes",
    "Standard": "3-5 hours",
    "Bulk": "5-12 hours",
}


@dataclass(frozen=True)
class RecallStatus:
    """Where a read of a point stands: nothing to recall, or how far a recall is."""

    #: The location the read needs a recall from (label); None when a readable copy exists.
    location: str | None = None
    location_id: str | None = None
    tier: str | None = None
    #: The data packs the read needs.
    packs: int = 0
    #: The cold objects that hold them, which are thawed: packs on their own, and bundles.
    objects: int = 0
    bundles: int = 0
    #: The size of those objects (a bundle counts whole).
    bytes: int = 0
    #: Of the objects: readable now, still thawing.
    ready: int = 0
    pending: int = 0
    poll_seconds: float = 0.0

    @property
    def done(self) -> bool:
        return self.pending == 0

    def describe(self) -> str:
        if self.location is None:
            return "a readable copy exists"
        mib = self.bytes / (1 << 20)
        what = f"{self.packs} pack(s)"
        if self.bundles:
            what = (
                f"{self.objects} object(s): {self.bundles} bundle(s) of small packs and "
                f"{self.objects - self.bundles} pack(s) on their own, for {self.packs} pack(s)"
            )
        return (
            f"recalling {self.pending} of {what} ({mib:.1f} MiB) from "
            f"{self.location} (tier {self.tier}, typically {TYPICAL_WAIT.get(self.tier or '', '?')})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "done": self.done,
            "typical_wait": TYPICAL_WAIT.get(self.tier or ""),
        }


def _read_order(
    app: Appliance, point_id: str, named: str | None
) -> tuple[list[CopyOption], dict[str, LocationRecord]]:
    """The point's copies in the order a read uses them, and their locations by id. A copy
    being recalled is still the archived copy it was, for the choice."""
    from appliance.locations import work  # the work functions import this module

    found = work.copy_options(app, point_id)
    pairs = {option.location_id: location for option, location in found}
    if named is not None:
        named = work.find_location(app, named).id
    options = [
        replace(option, state="archived") if option.state == "recalling" else option
        for option, _ in found
    ]
    ordered = order_copies(options, named=named)
    if not ordered:
        raise NotFound(f"point {point_id} has no copy that can be read", point=point_id)
    return ordered, pairs


@dataclass(frozen=True)
class _ColdRead:
    """What a read needs thawed: the cold objects (by name, with their sizes) holding its data
    packs, of which some are bundles."""

    packs: int
    objects: dict[str, int]
    bundles: int

    @property
    def bytes(self) -> int:
        return sum(self.objects.values())


def _cold_packs(
    app: Appliance, backend: Backend, location_id: str, point_id: str, subpath: str | None
) -> _ColdRead:
    """The cold objects a read of the point (``subpath`` of it) needs at a location: its data
    packs, or the bundles holding them; tree packs and everything else stay readable."""
    from appliance.locations import work

    repo = Repository(backend, app.repo.config, app.repo.key, work.location_cache(app, location_id))
    with contextlib.closing(repo.index):  # the backend is the caller's to close
        repo.sync_index()
        needs = point_packs(repo, repo.get_manifest(point_id), subpath)
    names = [
        pack_object_name(pack, kind)
        for pack, kind in needs.packs.items()
        if kind == fmt.PACK_KIND_DATA
    ]
    bundled = with_bundles(backend)
    objects: dict[str, int] = {}
    bundles = 0
    for name in names:
        placement = bundled.bundles().placement(name)
        if placement is None:
            objects[name] = backend.stat(name).size
        elif placement.bundle not in objects:
            objects[placement.bundle] = bundled.bundles().listed[placement.bundle].size
            bundles += 1
    return _ColdRead(len(names), objects, bundles)


def prepare_read(
    app: Appliance,
    point_id: str,
    *,
    subpath: str | None = None,
    named: str | None = None,
) -> RecallStatus:
    """Ask for what reading ``point_id`` (``subpath`` of it) needs to be thawed, if its best
    copy (``named`` first) is archived; report how far that is. Never blocks."""
    from appliance.locations import work  # the work functions import this module

    ordered, pairs = _read_order(app, point_id, named)
    best = ordered[0]
    if best.state == "present" and best.online:
        return RecallStatus()
    # No readable copy comes first: the best one is archived (or was being recalled).
    archived = next((o for o in ordered if o.state == "archived"), None)
    if archived is None:
        return RecallStatus()  # an offline copy: the read will say it is unavailable
    location = pairs[archived.location_id]
    with contextlib.closing(work.location_backend(app, location)) as backend:
        cold = _cold_packs(app, backend, location.id, point_id, subpath)
        status = backend.warm_up(sorted(cold.objects))
    settings = location.details.get("options", {})
    tier = str(settings.get("restore_tier", "Standard"))
    state = "archived" if status.done else "recalling"
    app.catalog.set_copy(point_id, location.id, state)
    return RecallStatus(
        location=location.label,
        location_id=location.id,
        tier=tier,
        packs=cold.packs,
        objects=len(cold.objects),
        bundles=cold.bundles,
        bytes=cold.bytes,
        ready=len(status.ready),
        pending=len(status.pending),
        poll_seconds=float(settings.get("recall_poll_seconds") or POLL_SECONDS.get(tier, 900)),
    )


def recall_estimate(
    app: Appliance,
    point_id: str,
    *,
    subpath: str | None = None,
    named: str | None = None,
) -> dict[str, Any]:
    """What reading ``point_id`` (``subpath`` of it; ``named`` copy first) would have to recall,
    without asking for anything: the copy :func:`prepare_read` would use, its restore tier and
    typical wait, the data packs the read needs, and the cold objects holding them with their
    sizes (``stat`` and the bundle listing only; ``objects``, of which ``bundles`` are bundles).

    Read-only: no ``warm_up``, nothing written to the catalog (the location is opened and its
    identity checked, but it is not marked online or offline). ``needed`` is False when a
    readable copy comes first; ``reason`` says why the cold copy could not be looked at now.
    """
    from appliance.locations import work  # the work functions import this module

    ordered, pairs = _read_order(app, point_id, named)
    answer: dict[str, Any] = {
        "point": point_id,
        "path": subpath or None,
        "needed": False,
        "location": None,
        "location_id": None,
        "address": None,
        "copy_state": None,
        "tier": None,
        "typical_wait": None,
        "packs": 0,
        "objects": 0,
        "bundles": 0,
        "bytes": 0,
        "poll_seconds": 0.0,
        "reason": None,
        "message": "a readable copy exists; nothing needs to be recalled",
    }
    best = ordered[0]
    if best.state == "present" and best.online:
        return answer
    archived = next((o for o in ordered if o.state == "archived"), None)
    if archived is None:
        answer["message"] = "no copy of the point can be read now: its locations are unavailable"
        return answer
    location = pairs[archived.location_id]
    settings = location.details.get("options", {})
    tier = str(settings.get("restore_tier", "Standard"))
    state = next(
        (c.state for c in app.catalog.copies_of(point_id) if c.location_id == location.id), None
    )
    answer.update(
        needed=True,
        location=location.label,
        location_id=location.id,
        address=location.address,
        copy_state=state,
        tier=tier,
        typical_wait=TYPICAL_WAIT.get(tier),
        poll_seconds=float(settings.get("recall_poll_seconds") or POLL_SECONDS.get(tier, 900)),
    )
    try:
        backend = with_bundles(
            compose(
                open_backend(
                    location.kind, location.address, **work.location_options(app, location)
                )
            ),
            work.bundles_cache(app, location.id),
        )
        try:
            check_identity(backend, app.repo.store_id, location.id)
            cold = _cold_packs(app, backend, location.id, point_id, subpath)
            answer.update(
                packs=cold.packs, objects=len(cold.objects), bundles=cold.bundles, bytes=cold.bytes
            )
        finally:
            backend.close()
    except StoreError as exc:  # unavailable, refused, not answering: said, not raised
        answer["reason"] = exc.message
    mib = answer["bytes"] / (1 << 20)
    wait = TYPICAL_WAIT.get(tier, "an unknown time")
    if answer["reason"] is not None:
        answer["message"] = (
            f"the point must be recalled from {location.label} (tier {tier}, typically {wait}), "
            f"which cannot be looked at now: {answer['reason']}"
        )
    else:
        bundled = (
            f" in {answer['objects']} object(s), {answer['bundles']} of them bundles of small packs"
            if answer["bundles"]
            else ""
        )
        answer["message"] = (
            f"{answer['packs']} pack(s){bundled} ({mib:.1f} MiB) to recall from {location.label} "
            f"(tier {tier}, typically {wait})"
            + ("; a recall is already under way" if state == "recalling" else "")
        )
    return answer
