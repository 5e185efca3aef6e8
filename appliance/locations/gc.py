"""Removing what a location no longer needs: expired copies, then unreferenced packs.

The home pool has its own GC (:func:`appliance.maintenance.collect_garbage`); another location
(a bucket, a disk) holds copies whose points may have expired there. Two steps, each one a work
function the CLI, the jobs and the tests call:

- :func:`expire_copy`: a copy whose ``retain_until`` has passed leaves the location (its manifest
  is deleted there; the copy becomes ``deleted``); a point left with no copy holding data leaves
  the catalog.
- :func:`collect_location_garbage`: the packs no manifest at the location needs are deleted --
  never on uncertainty (an unreadable manifest, an unavailable location: nothing is deleted),
  never a pack younger than the grace period (a copy in progress uploads packs before its
  manifest), and never a locked one: the bucket refuses, and the report says until when the
  pack stays and that a later run deletes it. Index files listing deleted packs are rewritten
  with the live entries only (locked as long as the location's longest-kept copy) and the old
  ones deleted when their lock allows.

Bundles (:mod:`.bundles`) are never rewritten (their data is cold): a bundle and its directory are
deleted whole once none of its packs is needed by a manifest there, past the grace period and
its lock (a locked one is reported with its date, like a pack); a bundle one needed pack keeps
stays whole. A bundle whose directory cannot be read is left alone, and a bundle without a
directory (a copy stopped between the two puts) is deleted after the grace period.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from appliance.errors import ApplianceError, InvalidInput, ObjectLocked, StoreError
from appliance.locations.bundles import BundledBackend, unwrapped
from appliance.point_packs import point_packs
from appliance.store import format as fmt
from appliance.store.backend import PutOptions
from appliance.store.index import encode_index
from appliance.store.packs import IndexEntry, pack_object_name
from appliance.store.repository import Repository

if TYPE_CHECKING:
    from appliance.engine import Appliance

#: Packs younger than this are never collected (a copy uploads packs before its manifest).
GRACE_SECONDS = 6 * 3600


@dataclass
class LocationGcReport:
    location: str
    dry_run: bool
    manifests: int = 0
    packs_referenced: int = 0
    packs_deleted: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    #: Packs the location still locks: ``{pack, until}`` (deleted by a run after that date).
    locked: list[dict[str, Any]] = field(default_factory=list)
    index_files_rewritten: int = 0
    index_files_kept_locked: int = 0
    #: Bundles deleted (or, in a dry run, to delete); kept because a pack in them is needed;
    #: still locked ``{bundle, until}``; whose directory cannot be read (left alone).
    bundles_deleted: list[str] = field(default_factory=list)
    bundles_kept: int = 0
    bundles_locked: list[dict[str, Any]] = field(default_factory=list)
    bundle_directories_unreadable: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def expire_copy(app: Appliance, point_id: str, name: str) -> dict[str, Any]:
    """Remove a point's copy from a location once its ``retain_until`` has passed (InvalidInput
    before that, and for the home pool, whose points prune and GC remove)."""
    from appliance.locations import work

    location = work.find_location(app, name)
    if location.id == work.home_id(app):
        raise InvalidInput("points leave the home pool by prune (and its GC)")
    copy = next((c for c in app.catalog.copies_of(point_id) if c.location_id == location.id), None)
    if copy is None or copy.state == "deleted":
        raise InvalidInput(f"point {point_id} has no copy at {location.label}")
    now = app.clock()
    if copy.retain_until is not None and copy.retain_until > now:
        raise InvalidInput(
            f"the copy of point {point_id} at {location.label} is kept until "
            f"{copy.retain_until.isoformat()}",
            retain_until=copy.retain_until.isoformat(),
        )
    with contextlib.closing(work.location_backend(app, location)) as backend:
        backend.delete(f"manifests/{point_id}")
    app.catalog.set_copy(point_id, location.id, "deleted")
    held = [c for c in app.catalog.copies_of(point_id) if c.state not in ("deleted", "lost")]
    if not held:
        app.catalog.delete_point(point_id)
    return {"point": point_id, "location": location.label, "point_removed": not held}


def collect_location_garbage(
    app: Appliance,
    name: str,
    *,
    dry_run: bool = False,
    grace_seconds: float = GRACE_SECONDS,
) -> LocationGcReport:
    """Delete the packs a location holds that none of its manifests needs (see module doc)."""
    from appliance.locations import work

    location = work.find_location(app, name)
    if location.id == work.home_id(app):
        raise InvalidInput("the home pool is collected by `appliance gc`")
    report = LocationGcReport(location.label, dry_run)
    with contextlib.ExitStack() as opened:  # the backend and the index, closed on every path
        backend = opened.enter_context(contextlib.closing(work.location_backend(app, location)))
        raw = unwrapped(backend)  # packs as the objects they are: bundled ones are not listed
        cache = work.location_cache(app, location.id)
        repo = Repository(backend, app.repo.config, app.repo.key, cache)
        opened.callback(repo.index.close)
        repo.sync_index()
        referenced: set[bytes] = set()
        for point_id in repo.manifest_ids():
            try:
                needs = point_packs(repo, repo.get_manifest(point_id))
            except ApplianceError as exc:
                raise StoreError(
                    f"manifest {point_id} at {location.label} cannot be read ({exc.message}); "
                    "nothing was deleted",
                    location=location.label,
                ) from exc
            referenced.update(needs.packs)
            report.manifests += 1
        report.packs_referenced = len(referenced)
        cutoff = time.time() - grace_seconds
        deleted: set[bytes] = set()
        for prefix in ("data/", "meta/"):
            for info in list(raw.list(prefix)):
                pack = bytes.fromhex(info.name.rsplit("/", 1)[1])
                if pack in referenced or info.mtime > cutoff:
                    continue
                if dry_run:
                    report.packs_deleted.append(pack.hex())
                    report.bytes_freed += info.size
                    continue
                try:
                    raw.delete(info.name)
                except ObjectLocked as exc:
                    until = exc.details.get("retain_until")
                    report.locked.append({"pack": pack.hex(), "until": until})
                    continue
                deleted.add(pack)
                report.packs_deleted.append(pack.hex())
                report.bytes_freed += info.size
        if isinstance(backend, BundledBackend):
            _collect_bundles(backend, referenced, cutoff, report, deleted)
        if deleted:
            _rewrite_index(app, location.id, repo, deleted, report)
    return report


def _collect_bundles(
    backend: BundledBackend,
    referenced: set[bytes],
    cutoff: float,
    report: LocationGcReport,
    deleted: set[bytes],
) -> None:
    """Delete the bundles none of whose packs is referenced (see the module doc); the packs of
    deleted bundles join ``deleted`` (their index entries go)."""
    bundles = backend.bundles()
    raw = backend.backend
    needed = {pack_object_name(pack, fmt.PACK_KIND_DATA) for pack in referenced}
    report.bundle_directories_unreadable = list(bundles.damaged)
    doomed: list[tuple[str, list[str], list[str]]] = []  # bundle, its objects, its packs
    for name, directory in sorted(bundles.directories.items()):
        packs = [pack for pack, _, _ in directory.packs]
        if any(pack in needed for pack in packs):
            report.bundles_kept += 1
            continue
        info = bundles.listed.get(name)
        if info is not None and info.mtime > cutoff:
            continue
        objects = [name, directory.name] if info is not None else [directory.name]
        doomed.append((name, objects, packs))
    # An orphan younger than the grace period may be a copy between its two puts.
    doomed.extend((o.name, [o.name], []) for o in bundles.orphans() if o.mtime <= cutoff)
    for name, objects, packs in doomed:
        info = bundles.listed.get(name)
        if not report.dry_run:
            try:
                # The bundle first: a locked one stops here, whole. A directory left naming a
                # deleted bundle reads as absent packs, and goes at the next run.
                for object_name in objects:
                    raw.delete(object_name)
            except ObjectLocked as exc:
                report.bundles_locked.append(
                    {"bundle": name, "until": exc.details.get("retain_until")}
                )
                continue
            deleted.update(bytes.fromhex(pack.rsplit("/", 1)[1]) for pack in packs)
        report.bundles_deleted.append(name)
        report.bytes_freed += info.size if info is not None else 0


def _rewrite_index(
    app: Appliance,
    location_id: str,
    repo: Repository,
    deleted: set[bytes],
    report: LocationGcReport,
) -> None:
    """Index files that list deleted packs are replaced by one with their live entries."""
    kept_until = [
        c.retain_until for c in app.catalog.copies_at(location_id) if c.retain_until is not None
    ]
    options = PutOptions(retain_until=max(kept_until)) if kept_until else None
    stale: list[str] = []
    live: list[IndexEntry] = []
    for name in sorted(repo.index.index_files()):
        entries = repo._read_index_file(name)
        if any(entry.pack in deleted for entry in entries):
            stale.append(name)
            live.extend(entry for entry in entries if entry.pack not in deleted)
    if live:
        plaintext = encode_index(live)
        blob_id = repo.envelope.chunk_id(plaintext)
        repo.backend.put(
            f"index/{blob_id.hex()}",
            repo.envelope.seal(fmt.BLOB_INDEX, blob_id, plaintext),
            options,
        )
    for name in stale:
        try:
            repo.backend.delete(name)
            report.index_files_rewritten += 1
        except ObjectLocked:
            report.index_files_kept_locked += 1
