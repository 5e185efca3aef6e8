"""Failback from a peer: the ``pull_back`` job fetches the points made on the peer into the home pool.

While this appliance was away, the peer may have taken over (docs/replication.md, "Take over"):
given this store's key, it failed a VM over from its replica and, at failback, wrote a new point
of the VM's asset (an incremental: only the changed blocks) *into the replica*, with this store's
key. The replica is still this store, byte for byte plus the new objects, so pulling a point back
is the engine's :func:`~appliance.locations.copy.copy_point` the other way round: from a
repository over the peer location to the home pool, dedup-aware, manifest last.

What travels over the link is what the home pool lacks, and nothing else:

- The source side is :class:`PeerThroughHome`: a read view of the peer's store that reads an
  object from the home pool whenever the home pool holds one under the same name. Packs are named
  by the BLAKE3 of their bytes and index files by the keyed id of their plaintext, so the same name
  is the same bytes; only manifests, which the home pool lacks by definition here, and the packs
  and index files the peer wrote go over the wire. The repository over it keeps its index in the
  peer location's cache (the one :func:`appliance.locations.work.reader` uses), so an index file
  read once is not read again.
- The target side is :class:`HomeTarget`: the home pool answering "which of these packs do you
  hold?" (``present_many``) with a local ``stat`` each, so ``copy_point`` asks it like it asks a
  peer and neither reads back nor hashes the packs the home pool already holds. A pack that does
  travel is hashed against its name as it is read from the peer, before it is put; a put in the
  home pool is atomic (temporary file, fsync, rename).

The peer's ``bandwidth_mib_s`` paces what comes back too (:class:`PeerThroughHome` waits after
each fetch until the bytes fetched so far fit the limit).

Which points (:func:`points_to_pull`, pure): every point whose manifest the peer holds and which
this catalog does not know, or knows only as deleted (no copy held anywhere), and a point whose
earlier pull did not finish (its home copy ``copying``, or ``present`` without its manifest in the
home pool: a crash between recording it and marking it ``copying``). Each is recorded in the
catalog with a ``present`` copy at the peer and a ``copying`` one at home, copied, and committed:
the home pool's index learns the new index files, the home copy becomes ``present``, and the point
is verified at home (read and decrypted whole), which also makes it the asset's newest *verified*
point, the one a failover picks. A manifest that does not open with this store's key (damaged, or
another store's point), or names another store or point, is refused with those words; the other
points go on.

Faults, like ``replicate`` (:mod:`api.replication_jobs`): a peer that does not answer makes the
job *wait* (checkpoint ``{pulled: [...]}``, woken after :data:`appliance.jobs.LOCATION_RETRY`, by
the replication tick once the peer answers, or by asking again); a changed certificate or a
refused token fails it with those words; a job killed outright is re-queued at the next start.
Either way it starts again from the catalog and the home pool: points already home are skipped,
packs already home are not fetched again.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

from api.peer_backend import PeerCertificateChanged, PeerTokenRefused, parse_address
from api.peer_wire import traffic
from appliance.catalog.records import LocationRecord, home_location_id
from appliance.engine import Appliance
from appliance.errors import (
    ApplianceError,
    BackupCancelled,
    IntegrityError,
    InvalidInput,
    JobWaiting,
    LocationUnavailable,
    NotFound,
    ObjectMissing,
    TransientBackendError,
    UnsupportedFormat,
)
from appliance.job_context import JobView
from appliance.jobs import LOCATION_RETRY, JobKind, register_job_kind
from appliance.locations.copy import copy_point
from appliance.locations.work import location_backend, location_cache
from appliance.points import record_from_manifest
from appliance.space import check_free_space
from appliance.store.backend import (
    HOT_RANDOM_ACCESS,
    Backend,
    BackendCapabilities,
    ObjectInfo,
    PutOptions,
    WarmUpStatus,
)
from appliance.store.repository import Repository
from appliance.store.wrappers import ReadOnly

PULL_BACK_KIND = "pull_back"
PEER_KIND = "peer"
#: Copy states in which a copy holds nothing (a point known only in these is pulled again).
GONE = ("deleted", "lost")
#: Object name prefixes whose names are their content: read from the home pool when it has them.
CONTENT_NAMED = ("data/", "meta/", "index/")
MIB = 1 << 20


# --- which points ---------------------------------------------------------------------------------


def points_to_pull(
    at_peer: Iterable[str],
    copies: Mapping[str, Mapping[str, str]],
    home: str,
    home_manifests: set[str],
) -> list[str]:
    """The points to fetch, oldest first (point ids sort by creation time).

    ``at_peer``: the point ids whose manifest the peer holds; ``copies``: for each point this
    catalog knows, its copies as ``{location id: state}``; ``home``: the home location's id;
    ``home_manifests``: the point ids whose manifest the home pool holds."""
    todo = []
    for point_id in sorted(set(at_peer)):
        held = copies.get(point_id)
        if held is None or all(state in GONE for state in held.values()):
            todo.append(point_id)  # new here, or known only as deleted
        elif held.get(home) == "copying":
            todo.append(point_id)  # an earlier pull did not finish
        elif held.get(home) == "present" and point_id not in home_manifests:
            todo.append(point_id)  # recorded, then cut off before it was marked copying
    return todo


# --- the two sides of the copy --------------------------------------------------------------------


class PeerThroughHome(ReadOnly):
    """The peer's store, read-only, with every content-named object the home pool holds read
    from the home pool instead (see the module docstring). Listing is the peer's: what the peer
    holds is the question. It owns ``peer`` (closed with it) and borrows ``home``."""

    refusing = "a pull from a peer"
    where = "the peer"

    def __init__(
        self, peer: Backend, home: Backend, *, bytes_per_second: float | None = None
    ) -> None:
        self.peer = peer
        self.home = home
        #: The peer's bandwidth limit holds for what comes back too (None: none).
        self.bytes_per_second = bytes_per_second
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._bytes = 0

    def _fetch(self, name: str, offset: int, length: int | None) -> bytes:
        data = self.peer.get(name, offset, length)
        if self.bytes_per_second:
            # The pace of the whole pull, over every thread: each fetch waits until the bytes
            # fetched so far fit the limit (the next one starts no sooner).
            with self._lock:
                self._bytes += len(data)
                due = self._started + self._bytes / self.bytes_per_second
            time.sleep(max(0.0, due - time.monotonic()))
        return data

    @property
    def capabilities(self) -> BackendCapabilities:
        return HOT_RANDOM_ACCESS

    def _local(self, name: str) -> bool:
        if not name.startswith(CONTENT_NAMED):
            return False
        try:
            self.home.stat(name)
        except ObjectMissing:
            return False
        return True

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if self._local(name):
            return self.home.get(name, offset, length)
        return self._fetch(name, offset, length)

    def reread(
        self, name: str, offset: int, length: int | None, damaged: Exception
    ) -> bytes | None:
        """The same bytes from the peer after the home pool's did not decrypt (damage at home
        must not stop a pull: the peer holds the same object)."""
        if not self._local(name):
            return None
        return self._fetch(name, offset, length)

    def stat(self, name: str) -> ObjectInfo:
        if name.startswith(CONTENT_NAMED):
            with contextlib.suppress(ObjectMissing):
                return self.home.stat(name)
        return self.peer.stat(name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.peer.list(prefix)

    def describe(self) -> str:
        return f"{self.peer.describe()} (objects the home pool holds read there)"

    def close(self) -> None:
        self.peer.close()


class HomeTarget:
    """The home pool as ``copy_point``'s target, answering ``present_many`` by a local ``stat``
    per pack.

    It declares listing expensive so that ``copy_point`` asks it which of the point's packs it
    holds instead of reading back and hashing each of them: a local pool answers that cheaply,
    and the packs that travel are checked against their names as they are read from the peer.
    ``close`` leaves the home pool open (the appliance's repository owns it)."""

    capabilities = BackendCapabilities(listing_cost="expensive")

    def __init__(self, home: Backend) -> None:
        self.backend = home

    def present_many(self, names: list[str]) -> dict[str, int]:
        held = {}
        for name in names:
            with contextlib.suppress(ObjectMissing):
                held[name] = self.backend.stat(name).size
        return held

    def put(
        self, name: str, data: bytes | bytearray | memoryview, options: PutOptions | None = None
    ) -> None:
        self.backend.put(name, data, options)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.backend.get(name, offset, length)

    def stat(self, name: str) -> ObjectInfo:
        return self.backend.stat(name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.backend.list(prefix)

    def delete(self, name: str) -> None:
        self.backend.delete(name)

    def warm_up(self, names: Iterable[str]) -> WarmUpStatus:
        return self.backend.warm_up(names)

    def wait_warm(self, names: Iterable[str], timeout: float) -> None:
        self.backend.wait_warm(names, timeout)

    def retain(self, name: str, until: datetime) -> None:
        self.backend.retain(name, until)

    def describe(self) -> str:
        return self.backend.describe()

    def close(self) -> None:
        return None


# --- the job --------------------------------------------------------------------------------------


def _peer(app: Appliance, location_id: str) -> LocationRecord:
    location = app.find_location(location_id)
    if location.kind != PEER_KIND:
        raise NotFound(f"location {location.label} is not a peer", location=location.id)
    return location


def _manifest(source: Repository, point_id: str, store_id: str) -> dict[str, Any]:
    """The point's manifest as the peer holds it, or :class:`IntegrityError` in words."""
    try:
        manifest = source.get_manifest(point_id)
    except (IntegrityError, UnsupportedFormat) as exc:
        raise IntegrityError(
            f"its manifest does not open with this store's key ({exc.message}): it is damaged, "
            "or another store's point",
            point=point_id,
        ) from exc
    if manifest.get("store_id") != store_id or manifest.get("point_id") != point_id:
        raise IntegrityError(
            f"its manifest names store {manifest.get('store_id')} and point "
            f"{manifest.get('point_id')}, not this store's point {point_id}",
            point=point_id,
        )
    return manifest


def _copies(app: Appliance, point_ids: Iterable[str]) -> dict[str, dict[str, str]]:
    known = {p.id for p in app.catalog.list_points(store_id=app.repo.store_id)}
    return {
        point_id: {c.location_id or "": c.state for c in app.catalog.copies_of(point_id)}
        for point_id in point_ids
        if point_id in known
    }


def _record(app: Appliance, manifest: dict[str, Any], peer_id: str, home: str) -> None:
    """The point in the catalog: held at the peer, on its way home."""
    point_id = manifest["point_id"]
    try:
        app.point(point_id)
    except NotFound:
        app.catalog.add_point(record_from_manifest(manifest), app.repo.store_id)
    app.catalog.set_copy(point_id, home, "copying")
    app.catalog.set_copy(point_id, peer_id, "present")


def pull_back(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    """The ``pull_back`` job: see the module docstring."""
    location = _peer(app, p["location"])
    address = parse_address(location.address)[0]
    home = home_location_id(app.repo.store_id)
    options = location.details.get("options", {})
    limit = float(options["bandwidth_mib_s"]) * MIB if options.get("bandwidth_mib_s") else None
    done = [str(x) for x in ctx.checkpoint.get("pulled", [])]
    before = traffic(address)
    totals = {"packs_copied": 0, "bytes_copied": 0, "packs_present": 0}
    pulled: list[str] = []
    refused: list[dict[str, str]] = []
    failed: list[str] = []
    try:
        with contextlib.closing(
            PeerThroughHome(
                location_backend(app, location), app.repo.backend, bytes_per_second=limit
            )
        ) as view:
            source = Repository(
                view, app.repo.config, app.repo.key, location_cache(app, location.id)
            )
            with contextlib.closing(source.index):
                at_peer = source.manifest_ids()
                todo = points_to_pull(
                    at_peer, _copies(app, at_peer), home, set(app.repo.manifest_ids())
                )
                resuming = " (resuming: points already home are skipped)" if ctx.checkpoint else ""
                pace = f" at most {limit / MIB:g} MiB/s" if limit else ""
                ctx.log(
                    "info",
                    f"the peer {location.label} holds {len(at_peer)} point(s); "
                    f"{len(todo)} to fetch{pace}{resuming}",
                )
                if todo:
                    check_free_space(app.data_dir.store_path, "the home pool")
                    source.sync_index()  # the index files only the peer holds travel
                for number, point_id in enumerate(todo, 1):
                    if ctx.cancel.is_set():
                        raise BackupCancelled("the pull was cancelled")
                    outcome = _pull_one(app, source, location, point_id, home, ctx, number, todo)
                    if isinstance(outcome, str):
                        refused.append({"point": point_id, "reason": outcome})
                        continue
                    if outcome is None:
                        failed.append(point_id)
                        continue
                    for key in totals:
                        totals[key] += int(outcome.get(key, 0))
                    pulled.append(point_id)
                    ctx.save_checkpoint({"pulled": done + pulled})
    except (PeerCertificateChanged, PeerTokenRefused):
        app.catalog.update_location(location.id, online=False)
        raise
    except LocationUnavailable as exc:
        app.catalog.update_location(location.id, online=False)
        raise JobWaiting(
            f"the peer {location.label} is unreachable ({exc.message}); the pull goes on when "
            "it answers",
            wake_at=app.clock() + LOCATION_RETRY,
            checkpoint={"pulled": done + pulled},
        ) from exc
    after = traffic(address)
    if refused or failed:
        ctx.log(
            "warning",
            f"{len(refused)} point(s) refused, {len(failed)} failed; the others are home",
        )
    return {
        "location": location.id,
        "label": location.label,
        "points": done + pulled,
        "refused": refused,
        "failed": failed,
        "bytes_sent": after.sent - before.sent,
        "bytes_received": after.received - before.received,
        "requests": after.requests - before.requests,
        **totals,
    }


def _pull_one(
    app: Appliance,
    source: Repository,
    location: LocationRecord,
    point_id: str,
    home: str,
    ctx: JobView,
    number: int,
    todo: list[str],
) -> dict[str, Any] | str | None:
    """Fetch one point: its copy result, the reason it was refused (a str), or None when it
    failed (logged; the next pull tries again). The peer's faults propagate to the job."""
    try:
        manifest = _manifest(source, point_id, app.repo.store_id)
    except (IntegrityError, ObjectMissing) as exc:
        reason = f"point {point_id} at {location.label} is refused: {exc.message}"
        ctx.log("error", reason)
        return reason
    _record(app, manifest, location.id, home)

    def progress(info: dict[str, Any]) -> None:
        ctx.progress({**info, "point": point_id, "points_done": number - 1, "points": len(todo)})

    try:
        with app.locks.shared():  # GC must not free what the point needs while it lands
            result = copy_point(
                source, point_id, HomeTarget(app.repo.backend), progress=progress, cancel=ctx.cancel
            )
            app.repo.sync_index()  # the index files that came with it
        app.catalog.set_copy(point_id, home, "present")
        report = app.verify(point_id)  # marks the point and its home copy verified
    except (LocationUnavailable, BackupCancelled, TransientBackendError):
        raise
    except ApplianceError as exc:
        ctx.log("error", f"point {point_id} was not fetched: {exc.message}")
        return None
    if not report.ok:
        problems = report.affected_points.get(point_id) or report.damaged_packs
        ctx.log("error", f"point {point_id} came home but does not verify: {problems[:3]}")
        return None
    ctx.log(
        "info",
        f"point {point_id} ({manifest['asset']}) is home from {location.label}: "
        f"{result.packs_copied} pack(s), {result.bytes_copied} bytes fetched, "
        f"{result.packs_present} already home",
    )
    return result.to_dict()


def _resources(p: dict[str, Any]) -> list[tuple[str, bool]]:
    # Like replicate: the store shared (GC must not free packs mid-copy), the peer exclusively
    # (one transfer with a peer at a time, either way).
    if not isinstance(p.get("location"), str):
        raise InvalidInput("a pull_back job names its peer's location id")
    return [("store", False), (f"location:{p['location']}", True)]


def waiting_pulls(app: Appliance, location_id: str) -> list[Any]:
    """The pulls from one peer that wait for it (the replication tick wakes them)."""
    return [
        job
        for job in app.catalog.list_jobs(state="waiting", limit=1000)
        if job.kind == PULL_BACK_KIND and job.params.get("location") == location_id
    ]


def active_pulls(app: Appliance, location_id: str) -> list[Any]:
    """The pulls from one peer that are queued or waiting (asking again reuses one)."""
    return [
        job
        for state in ("queued", "waiting")
        for job in app.catalog.list_jobs(state=state, limit=1000)
        if job.kind == PULL_BACK_KIND and job.params.get("location") == location_id
    ]


def register_pull_back_job() -> None:
    """Register the ``pull_back`` kind (resumable: points home are skipped, packs home not
    fetched again)."""
    register_job_kind(
        PULL_BACK_KIND,
        JobKind(
            pull_back,
            _resources,
            True,
            lambda p: f"pull back from peer {str(p.get('location', ''))[:8]}",
            max_attempts=5,
            backoff=60.0,
        ),
    )
