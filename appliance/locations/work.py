"""Work functions on locations: add and remove one, copy a point there, read a point from its
best copy, and find the catalog's points in a location. The CLI, the jobs and the tests call these
(through :class:`appliance.engine.Appliance`), never the catalog and backends directly.

A location's backend comes from the registry (``appliance.backends`` entry points), so outer
packages add kinds without this module knowing them, and it is opened only after its identity
file says it holds this store (else :class:`LocationUnavailable`, and the catalog marks it
offline): an unmounted disk never reads as an empty store, and nothing is ever deleted or written
on the grounds of a location that did not answer.

The store's *home location* is the data directory's own pool (``home_location_id``): its backend
is the repository's own.

Whoever opens a location's backend closes it, on every path, failures included: a read
descriptor left open keeps a pool's or a USB disk's filesystem busy, and it cannot be unmounted.
What :func:`location_backend` and :func:`reader` return is the caller's to close; closing it
never closes the home repository (``app.repo``), whose backend a reader only borrows.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from appliance.catalog.records import LocationRecord, home_location_id
from appliance.errors import (
    Conflict,
    IntegrityError,
    InvalidInput,
    LocationUnavailable,
    NotFound,
    ObjectMissing,
)
from appliance.locations.bundles import (
    cold_pack_problem,
    describe_bundles,
    load_bundles,
    with_bundles,
)
from appliance.locations.choice import CopyOption, order_copies
from appliance.locations.copy import FallbackBackend, copy_point
from appliance.maintenance import verify_point
from appliance.path_rules import check_location_dir
from appliance.point_packs import point_packs
from appliance.points import record_from_manifest
from appliance.space import check_free_space, local_root
from appliance.store.backend import Backend, PutOptions
from appliance.store.identity import check_identity, write_identity
from appliance.store.packs import pack_object_name
from appliance.store.registry import open_backend
from appliance.store.repository import Repository
from appliance.store.wrappers import RateLimit, compose

if TYPE_CHECKING:
    from appliance.engine import Appliance

ProgressCallback = Callable[[dict[str, Any]], None]
Switched = Callable[[str, str, Exception], None]
#: What each location kind is accessed like.
ACCESS_BY_KIND = {
    "pool_dir": "random",
    "block_pool": "random",
    "removable": "random",
    "s3_bucket": "cold",
    "tape_set": "sequential",
    "peer": "random",
}


def home_id(app: Appliance) -> str:
    return home_location_id(app.repo.store_id)


def location_cache(app: Appliance, location_id: str) -> str:
    """Where the index of a location's store is cached on this appliance."""
    return os.path.join(app.data_dir.cache_path, "locations", location_id)


def find_location(app: Appliance, name: str) -> LocationRecord:
    """A location of this store by id, id prefix or label."""
    locations = app.catalog.list_locations(app.repo.store_id)
    exact = [loc for loc in locations if name in (loc.id, loc.label)]
    if len(exact) == 1:
        return exact[0]
    prefixed = [loc for loc in locations if loc.id.startswith(name)]
    if len(prefixed) == 1 and len(name) >= 4:
        return prefixed[0]
    raise NotFound(f"no location {name!r} of this store", location=name)


#: Options that are credentials: kept in ``<data dir>/secrets/<location>.json`` (mode 0600),
#: never in the catalog (which may be a shared PostgreSQL, and is shown in the API). ``token``:
#: a peer's replication token.
SECRET_OPTIONS = ("access_key_id", "secret_access_key", "session_token", "token")


def _secrets_file(app: Appliance, location_id: str) -> str:
    return os.path.join(app.data_dir.secrets_path, f"{location_id}.json")


def save_location_secrets(app: Appliance, location_id: str, secrets: dict[str, Any]) -> None:
    os.makedirs(app.data_dir.secrets_path, mode=0o700, exist_ok=True)
    path = _secrets_file(app, location_id)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(secrets, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _load_secrets(app: Appliance, location_id: str) -> dict[str, Any]:
    try:
        with open(_secrets_file(app, location_id)) as f:
            loaded = json.load(f)
    except FileNotFoundError:
        return {}
    return dict(loaded) if isinstance(loaded, dict) else {}


def location_options(app: Appliance, location: LocationRecord) -> dict[str, Any]:
    """What the location's backend factory is given: its options and its credentials."""
    return {**location.details.get("options", {}), **_load_secrets(app, location.id)}


def bundles_cache(app: Appliance, location_id: str) -> str:
    """Where the bundle directories of a location are cached (:mod:`.bundles`)."""
    return os.path.join(location_cache(app, location_id), "bundles.json")


def location_backend(
    app: Appliance, location: LocationRecord, *, bandwidth: float | None = None
) -> Backend:
    """The location's backend, opened and identity-checked; marks the location online or
    offline in the catalog as it answers. ``bandwidth``: bytes per second its uploads may use.
    Packs bundled there (:mod:`.bundles`) read as the pack objects they are."""
    if location.id == home_id(app):
        return app.repo.backend
    try:
        # Retried with backoff once, here, for every location (throttling, a dropped link).
        backend = compose(
            open_backend(location.kind, location.address, **location_options(app, location)),
            rate_limit=RateLimit(put_bytes_per_second=bandwidth) if bandwidth else None,
        )
        try:
            check_identity(backend, app.repo.store_id, location.id)
        except BaseException:
            backend.close()  # it read the identity file: its descriptor must not stay open
            raise
    except LocationUnavailable:
        if location.online:
            app.catalog.update_location(location.id, online=False)
        raise
    try:
        if not location.online:
            app.catalog.update_location(location.id, online=True)
        return with_bundles(backend, bundles_cache(app, location.id))
    except BaseException:
        backend.close()
        raise


def add_location(
    app: Appliance,
    address: str,
    *,
    kind: str = "pool_dir",
    label: str = "",
    require_mount: bool = False,
    offsite: bool = False,
    options: dict[str, Any] | None = None,
) -> LocationRecord:
    """Register a place as a location of this store: its identity file is written there first
    (a place already holding another store or location is refused). ``options`` go to the
    kind's backend factory (a bucket's endpoint, region, credentials, ``cold``, ``lock_mode``);
    credentials (:data:`SECRET_OPTIONS`) are kept apart from the catalog."""
    if kind == "pool_dir":
        address = check_location_dir(address, data_dir=app.data_dir.path)
    everything = dict(options or {})
    if require_mount:
        everything["require_mount"] = True
    backend = open_backend(kind, address, **dict(everything))
    try:
        location_id = uuid.uuid4().hex
        write_identity(backend, app.repo.store_id, location_id)
    finally:
        backend.close()
    secrets = {k: everything.pop(k) for k in SECRET_OPTIONS if k in everything}
    if secrets:
        save_location_secrets(app, location_id, secrets)
    access = ACCESS_BY_KIND.get(kind, "random")
    if kind == "s3_bucket" and not everything.get("cold"):
        access = "random"  # a hot bucket: every object readable at once
    return app.catalog.add_location(
        app.repo.store_id,
        kind,
        address,
        access=access,
        immutable=bool(everything.get("lock_mode")),
        removable=kind == "removable",
        offsite=offsite or kind == "s3_bucket",
        label=label or os.path.basename(address.rstrip("/")) or location_id[:8],
        details={"options": everything},
        location_id=location_id,
    )


def remove_location(app: Appliance, name: str) -> LocationRecord:
    """Forget a location (Conflict while it holds copies; the data there is left alone)."""
    location = find_location(app, name)
    if location.id == home_id(app):
        raise Conflict("the data directory's own pool cannot be removed")
    app.catalog.remove_location(location.id)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_secrets_file(app, location.id))
    return location


def copy_to(
    app: Appliance,
    point_id: str,
    name: str,
    *,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    storage_class: str | None = None,
    retain_until: datetime | None = None,
    bandwidth: float | None = None,
) -> dict[str, Any]:
    """Copy a point to a location: the copy is ``copying`` until every pack is there and read
    back, then ``present`` (``archived`` at a cold location) and verified now. A rerun after a
    failure resumes. ``storage_class`` and ``retain_until`` override the location's defaults for
    the data packs (:func:`put_options`); ``bandwidth`` limits the upload (bytes per second)."""
    point = app.point(point_id)
    location = find_location(app, name)
    if location.id == home_id(app):
        raise InvalidInput("the point's home pool is where it was made; name another location")
    with contextlib.closing(location_backend(app, location, bandwidth=bandwidth)) as target:
        root = local_root(target)
        if root is not None:  # a full disk refuses before the copy is even recorded
            check_free_space(root, f"location {location.label}")
        put = put_options(
            location, app.clock(), storage_class=storage_class, retain_until=retain_until
        )
        app.catalog.set_copy(point.id, location.id, "copying")
        with app.locks.shared():
            result = copy_point(
                app.repo, point.id, target, progress=progress, cancel=cancel, options=put
            )
    # A copy whose data sits in a cold class is "archived": readable after a recall.
    state = "archived" if location.access == "cold" else "present"
    app.catalog.set_copy(
        point.id,
        location.id,
        state,
        storage_class=put.storage_class,
        retain_until=put.retain_until,
        verified_at=app.clock(),
    )
    return {
        "location": location.id,
        "label": location.label,
        "state": state,
        "storage_class": put.storage_class,
        "retain_until": put.retain_until.isoformat() if put.retain_until else None,
        **result.to_dict(),
    }


def put_options(
    location: LocationRecord,
    now: datetime,
    *,
    storage_class: str | None = None,
    retain_until: datetime | None = None,
) -> PutOptions:
    """How a copy's data packs are stored at ``location``: the class and lock asked for, else
    the location's defaults (``data_class``, or GLACIER for a cold bucket; ``lock_days`` from
    now when the location locks objects). Metadata always stays in the default class."""
    options = location.details.get("options", {})
    if storage_class is None:
        storage_class = options.get("data_class") or ("GLACIER" if options.get("cold") else None)
    if retain_until is None and options.get("lock_mode") and options.get("lock_days"):
        retain_until = now + timedelta(days=int(options["lock_days"]))
    return PutOptions(storage_class=storage_class, retain_until=retain_until)


def copy_options(app: Appliance, point_id: str) -> list[tuple[CopyOption, LocationRecord]]:
    """The point's copies with their locations, as the choice rule sees them."""
    locations = {loc.id: loc for loc in app.catalog.list_locations(app.repo.store_id)}
    out = []
    for copy in app.catalog.copies_of(point_id):
        location = locations.get(copy.location_id or "")
        if location is None:
            continue
        option = CopyOption(
            location.id,
            location.label,
            copy.state,
            location.access,
            location.online,
            copy.verified_at,
        )
        out.append((option, location))
    return out


def reader(
    app: Appliance,
    point_id: str,
    *,
    named: str | None = None,
    only: bool = False,
    switched: Switched | None = None,
) -> Repository:
    """A repository that reads ``point_id`` from its best copy and falls back to the next when
    a read fails (``switched`` is told); ``only``: the named copy and nothing else.

    The caller closes it (``repo.close()``, or ``with contextlib.closing(...)``): that closes
    the backends it opened at other locations and never the home repository, whose backend it
    borrows (the home pool alone is read through it too)."""
    found = copy_options(app, point_id)
    pairs = {opt.location_id: loc for opt, loc in found}
    if named is not None:
        named = find_location(app, named).id
    ordered = order_copies([opt for opt, _ in found], named=named, only=only)
    if not ordered:
        raise NotFound(f"point {point_id} has no copy that can be read", point=point_id)
    home = home_id(app)
    sources: list[tuple[str, Backend]] = []
    with contextlib.ExitStack() as opened:  # closed unless the reader is handed over
        for option in ordered:
            try:
                backend = location_backend(app, pairs[option.location_id])
            except LocationUnavailable as exc:
                if switched is not None:
                    switched(option.location_name, "the next copy", exc)
                continue
            if backend is not app.repo.backend:
                opened.callback(backend.close)
            sources.append((option.location_name, backend))
        fallback = FallbackBackend(sources, switched, borrowed=[app.repo.backend])
        first = ordered[0].location_id
        # The home pool's index knows every pack of points made here.
        cache = app.repo.cache_dir if first == home else location_cache(app, first)
        repo = Repository(fallback, app.repo.config, app.repo.key, cache)
        opened.callback(repo.index.close)
        if first != home:
            repo.sync_index()
        opened.pop_all()
    return repo


def reading_from(app: Appliance, repo: Repository) -> str:
    """The name of the location a :func:`reader` repository reads from now (it moves on to the
    next copy when a read fails)."""
    label = getattr(repo.backend, "label", None)
    if isinstance(label, str):
        return label
    return app.catalog.get_location(home_id(app)).label


def verify_copy(app: Appliance, point_id: str, name: str) -> dict[str, Any]:
    """Read back and check every blob of the point's copy at one location (that copy alone);
    the copy is marked verified now, or ``lost`` when its data is damaged or missing."""
    point = app.point(point_id)
    location = find_location(app, name)
    if location.access == "cold":
        result = _verify_cold_copy(app, point.id, location)
    else:
        with contextlib.closing(reader(app, point.id, named=location.id, only=True)) as repo:
            result = verify_point(repo, point.id).to_dict()
    if result["ok"]:
        app.catalog.mark_copy_verified(point.id, location.id, app.clock())
    else:
        app.catalog.set_copy(point.id, location.id, "lost")
    return {"location": location.id, "label": location.label, **result}


def _verify_cold_copy(app: Appliance, point_id: str, location: LocationRecord) -> dict[str, Any]:
    """Check a copy whose data packs are cold without thawing them: its manifest, trees and
    chunk tables (hot) are read and decrypted, its index lists every blob, and every data pack
    is there with the size the home pool's pack has (when the home pool still has it): on its
    own, or in a bundle listed with the size its directory says."""
    problems: list[str] = []
    checked = 0
    with contextlib.closing(location_backend(app, location)) as backend:
        repo = Repository(backend, app.repo.config, app.repo.key, location_cache(app, location.id))
        with contextlib.closing(repo.index):
            repo.sync_index()
            try:
                needs = point_packs(repo, repo.get_manifest(point_id))
            except (IntegrityError, ObjectMissing) as exc:
                problems.append(f"unreadable: {exc}")
            else:
                if not needs.complete:
                    missing = len(needs.missing_metadata) + len(needs.missing)
                    problems.append(f"missing: {missing} blob(s) not in the copy's index")
                for pack, kind in sorted(needs.packs.items()):
                    name = pack_object_name(pack, kind)
                    try:
                        expected: int | None = app.repo.backend.stat(name).size
                    except ObjectMissing:
                        expected = None  # the home pool dropped it: presence is what can be checked
                    problem = cold_pack_problem(backend, name, expected)
                    if problem is None:
                        checked += 1
                    else:
                        problems.append(problem)
    return {
        "ok": not problems,
        "mode": "cold: metadata read and checked, data packs present with their sizes, on "
        "their own or in bundles (cold data is not read)",
        "packs_checked": checked,
        "points_checked": 1,
        "affected_points": {point_id: problems[:20]} if problems else {},
    }


def adopt_location(
    app: Appliance,
    address: str,
    *,
    kind: str = "pool_dir",
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Add the points a location holds to the catalog as copies there (``catalog rebuild
    --from``): the location is registered under the identity its file names (with ``options``,
    credentials kept apart), points already in the catalog get one more copy, new ones are
    added. Nothing is copied; only hot objects (identity, manifests, indexes, bundle
    directories, which the location's cache keeps for its later reads) are read."""
    everything = dict(options or {})
    with contextlib.closing(open_backend(kind, address, **dict(everything))) as backend:
        return _adopt(app, backend, address, kind, everything)


def _adopt(
    app: Appliance, backend: Backend, address: str, kind: str, everything: dict[str, Any]
) -> dict[str, Any]:
    """:func:`adopt_location` on the location's opened ``backend`` (which the caller closes)."""
    location_id = check_identity(backend, app.repo.store_id)
    cold = bool(everything.get("cold"))
    try:
        location = app.catalog.get_location(location_id)
    except NotFound:
        secrets = {k: everything.pop(k) for k in SECRET_OPTIONS if k in everything}
        if secrets:
            save_location_secrets(app, location_id, secrets)
        location = app.catalog.add_location(
            app.repo.store_id,
            kind,
            os.path.abspath(address) if kind == "pool_dir" else address,
            access="cold" if cold else ACCESS_BY_KIND.get(kind, "random"),
            immutable=bool(everything.get("lock_mode")),
            offsite=kind == "s3_bucket",
            label=os.path.basename(address.rstrip("/")) or location_id[:8],
            details={"options": everything},
            location_id=location_id,
        )
    source = Repository(backend, app.repo.config, app.repo.key, location_cache(app, location.id))
    added, copies, damaged = 0, 0, []
    with contextlib.closing(source.index):
        # Packs there may lie in bundles: their directories say which (and are cached now).
        bundles = describe_bundles(load_bundles(backend, bundles_cache(app, location.id)))
        for point_id in source.manifest_ids():
            try:
                manifest = source.get_manifest(point_id)
            except Exception:  # a damaged manifest must not stop the others
                damaged.append(point_id)
                continue
            try:
                app.point(point_id)
            except NotFound:
                app.catalog.add_point(record_from_manifest(manifest), app.repo.store_id)
                app.catalog.set_copy(point_id, home_id(app), "deleted")
                added += 1
            app.catalog.set_copy(point_id, location.id, "archived" if cold else "present")
            copies += 1
    return {
        "location": location.id,
        "label": location.label,
        "points_added": added,
        "copies": copies,
        "damaged_points": damaged,
        **bundles,
    }


def copies_public(app: Appliance, point_id: str) -> list[dict[str, Any]]:
    """A point's copies for the CLI: location label, kind, state, verified-at."""
    return [
        {
            "location": location.id,
            "label": location.label,
            "kind": location.kind,
            "state": option.state,
            "online": location.online,
            "verified_at": option.verified_at,
        }
        for option, location in copy_options(app, point_id)
    ]


def drop_home_copy(app: Appliance, point_id: str) -> dict[str, Any]:
    """Remove the home pool's copy of a point kept elsewhere (tiering's ``keep_local_days``):
    its manifest leaves the home store and the home copy becomes ``deleted``; the next GC frees
    the data no other local point uses. Refused (:class:`Conflict`) for an asset's newest point
    (the next backup compares against it) and for a point with no verified copy elsewhere."""
    point = app.point(point_id)
    home = home_id(app)
    kept = [
        c
        for c in app.catalog.copies_of(point.id)
        if c.location_id != home and c.state in ("present", "archived") and c.verified_at
    ]
    if not kept:
        raise Conflict(
            f"point {point.id} has no verified copy at another location; its local copy stays",
            point=point.id,
        )
    newest = max(
        (p for p in app.catalog.list_points(asset=point.asset) if p.status == "complete"),
        key=lambda p: (p.created_at, p.id),
    )
    if newest.id == point.id:
        raise Conflict(
            f"point {point.id} is the newest of {point.asset}: the next backup compares against "
            "it, so its local copy stays",
            point=point.id,
        )
    # Shared lock: deleting a manifest frees nothing by itself (GC, which is exclusive, does).
    with app.locks.shared():
        app.repo.delete_manifest(point.id)
    app.catalog.set_copy(point.id, home, "deleted")
    labels = {loc.id: loc.label for loc in app.catalog.list_locations(app.repo.store_id)}
    return {"point": point.id, "kept_at": sorted(labels.get(c.location_id or "", "") for c in kept)}
