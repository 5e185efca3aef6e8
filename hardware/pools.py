"""Disk pools: filesystems on the appliance's own disks that hold the store's copies.

A *block pool* is one disk (ext4 or xfs) or several (btrfs raid1 or raid10), labelled
``apool-<name>`` (:func:`pool_label`; the prefix is short because xfs labels hold 12 characters),
mounted by filesystem UUID at ``<data dir>/pools/<name>``. Its ``store/`` folder is a location of
the appliance's store, of kind ``block_pool`` (:mod:`hardware.pool_backend`), so points get there
as copies (``copy_to``), are read from there when it is their best copy, and survive the loss of
the system disk. A marker file at the filesystem's root (:data:`MARKER`) says which pool it is,
so a pool is recognised on its disks after a reinstall or in another appliance and imported
(:func:`import_pool`; :func:`seed_from_pool` first on a fresh data directory).

The data directory's own pool, ``default``, is a folder (``pools/default/store``) on whatever disk
holds the data directory -- usually the system disk, which its status says.

Work functions here (:func:`create_pool`, :func:`import_pool`, :func:`seed_from_pool`,
:func:`mount_pools`) take the appliance and plain values and are called the same way by the CLI,
the jobs (:mod:`hardware.pool_jobs`), the service and the tests; capacity, health, status and
the forecast are in :mod:`hardware.pool_backend`, scrub and replace in :mod:`hardware.pool_jobs`.
Decisions are pure functions: :func:`check_pool_name`, :func:`check_layout`, :func:`pool_label`,
:func:`find_importable`.

Creating a pool is resumable: the disks are formatted once (a rerun finds the filesystem it
made, by its label, and goes on from there), the location is adopted if its identity file was
written before an interruption, and the pool is recorded last.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.catalog.records import POOL_FS_TYPES, PoolRecord
from appliance.engine import DEFAULT_POOL, Appliance, DataDir
from appliance.errors import (
    ApplianceError,
    Conflict,
    InvalidInput,
    LocationUnavailable,
    NotFound,
    StoreExists,
)
from appliance.locations.work import add_location, adopt_location
from appliance.store.backend import LocalDirectoryBackend
from appliance.store.identity import check_identity
from hardware import btrfs
from hardware.mounts import make_filesystem, mounts, unmount
from hardware.pool_backend import (
    STORE_DIR,
    BlockPoolBackend,
    devices_of,
    find_pool,
    list_pools,
    mount_pool_filesystem,
    probe,
)
from hardware.records import BlockDevice, Inventory

#: Filesystem labels of pools start with this (xfs allows 12 characters in all).
LABEL_PREFIX = "apool-"
LABEL_LIMITS = {"ext4": 16, "xfs": 12, "btrfs": 255}
#: The marker file at a pool filesystem's root (frozen: pools are recognised by it).
MARKER = "appliance-pool.json"
MARKER_KIND = "appliance-pool"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")

Log = Callable[[str, str], None]


def _no_log(level: str, message: str) -> None:
    pass


# --- pure decisions ----------------------------------------------------------------------------


def check_pool_name(name: str) -> str:
    """A pool name: 1-32 lower-case letters, digits and dashes, not ``default`` (the data
    directory's own pool)."""
    if not _NAME.match(name or ""):
        raise InvalidInput(
            f"pool name {name!r}: use 1-32 lower-case letters, digits and dashes", pool=name
        )
    if name == DEFAULT_POOL:
        raise InvalidInput("'default' is the data directory's own pool; choose another name")
    return name


def check_layout(fs_type: str, profile: str, disks: int) -> None:
    """One disk: ext4, xfs or btrfs (``single``); several: btrfs ``raid1`` (2+) or ``raid10``
    (4+). A pool of several disks without redundancy would die with any one of them."""
    if fs_type not in POOL_FS_TYPES:
        raise InvalidInput(
            f"filesystem {fs_type!r} is not one of {', '.join(sorted(POOL_FS_TYPES))}"
        )
    if disks < 1:
        raise InvalidInput("a pool needs at least one disk")
    if disks == 1:
        if profile != "single":
            raise InvalidInput(f"{profile} needs several disks; a pool of one disk is 'single'")
        return
    if fs_type != "btrfs":
        raise InvalidInput(f"{fs_type} lives on one disk; a pool of several disks is btrfs")
    if profile == "raid1":
        return
    if profile == "raid10":
        if disks < 4:
            raise InvalidInput("raid10 needs at least four disks")
        return
    raise InvalidInput("a pool of several disks mirrors them: choose raid1 or raid10")


def pool_label(name: str, fs_type: str) -> str:
    """The filesystem label of pool ``name`` (cut to what ``fs_type`` allows)."""
    return (LABEL_PREFIX + name)[: LABEL_LIMITS.get(fs_type, 12)]


@dataclass(frozen=True)
class ImportablePool:
    """A pool filesystem on attached disks that this appliance does not know."""

    fs_uuid: str
    fs_type: str
    label: str
    #: The name its label suggests (possibly cut short: the marker file has the full one).
    name: str
    devices: tuple[BlockDevice, ...]


def find_importable(
    inventory: Inventory, known_fs_uuids: Iterable[str] = ()
) -> list[ImportablePool]:
    """The pool filesystems (labelled ``apool-...``) on the inventory's disks that are not
    among ``known_fs_uuids``; the members of a btrfs pool are grouped."""
    known = set(known_fs_uuids)
    groups: dict[str, list[BlockDevice]] = {}
    for device in inventory.block.values():
        if (
            device.fs_uuid
            and device.fs_uuid not in known
            and device.fs_type in POOL_FS_TYPES
            and (device.fs_label or "").startswith(LABEL_PREFIX)
        ):
            groups.setdefault(device.fs_uuid, []).append(device)
    found = []
    for fs_uuid, devices in sorted(groups.items()):
        devices.sort(key=lambda d: d.identity)
        label = devices[0].fs_label or ""
        found.append(
            ImportablePool(
                fs_uuid, str(devices[0].fs_type), label, label[len(LABEL_PREFIX) :], tuple(devices)
            )
        )
    return found


def pool_mountpoint(data_dir: str, name: str) -> str:
    return os.path.join(os.path.abspath(data_dir), "pools", check_pool_name(name))


# --- mounting ------------------------------------------------------------------------------------


def mount_pools(app: Appliance) -> list[dict[str, Any]]:
    """Mount every block pool (at service start); one that will not mount is reported and the
    others still mount. One ``{pool, mounted, degraded, error}`` per block pool."""
    report = []
    for pool in list_pools(app):
        if not pool.block or pool.fs_uuid is None or pool.mountpoint is None:
            continue
        try:
            mounted = mount_pool_filesystem(pool.fs_uuid, pool.mountpoint)
        except LocationUnavailable as exc:
            report.append(
                {"pool": pool.name, "mounted": False, "degraded": False, "error": exc.message}
            )
            continue
        report.append(
            {"pool": pool.name, "mounted": True, "degraded": mounted.degraded, "error": None}
        )
    return report


def unmount_pool(app: Appliance, name: str) -> None:
    """Flush and unmount a block pool (it mounts again when next used)."""
    pool = find_pool(app, name)
    if pool.block and pool.mountpoint is not None:
        unmount(pool.mountpoint)


# --- the marker file ---------------------------------------------------------------------------


def write_marker(mountpoint: str, document: dict[str, Any]) -> None:
    path = os.path.join(mountpoint, MARKER)
    data = json.dumps({"kind": MARKER_KIND, "version": 1, **document}, indent=2, sort_keys=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(data + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_marker(mountpoint: str) -> dict[str, Any]:
    """The marker of the pool mounted at ``mountpoint`` (empty when it has none)."""
    try:
        with open(os.path.join(mountpoint, MARKER), encoding="utf-8") as f:
            document = json.load(f)
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) and document.get("kind") == MARKER_KIND else {}


# --- create ---------------------------------------------------------------------------------------


def _mounted_fs_uuids() -> set[str]:
    found = set()
    for mount in mounts():
        if mount.source.startswith("/dev/"):
            uuid = probe(mount.source).get("UUID")
            if uuid:
                found.add(uuid)
    return found


def check_disks(
    app: Appliance,
    devices: Sequence[BlockDevice],
    *,
    allow_fs: str | None = None,
    force: bool = False,
) -> dict[str, dict[str, str]]:
    """Refuse disks a pool must not take (gone, read-only, mounted, in a pool, or holding
    another appliance pool unless ``force``); what ``blkid`` reads on each now, by devnode.
    ``allow_fs``: the filesystem an interrupted creation made on them (it may be mounted at
    the pool's mountpoint already). The discovery rules are the caller's first check; these
    are the ones that protect data even without them."""
    identities = [d.identity for d in devices]
    if len(set(identities)) != len(identities) or len({d.devnode for d in devices}) != len(devices):
        raise InvalidInput("a disk is named twice")
    pools = {p.fs_uuid: p.name for p in app.catalog.list_pools() if p.fs_uuid}
    busy = _mounted_fs_uuids()
    sources = {m.source for m in mounts()}
    found = {}
    for device in devices:
        if not os.path.exists(device.devnode):
            raise NotFound(
                f"disk {device.identity} is not at {device.devnode} any more", disk=device.identity
            )
        if device.read_only:
            raise InvalidInput(f"disk {device.identity} is read-only", disk=device.identity)
        fs = probe(device.devnode)
        found[device.devnode] = fs
        uuid = fs.get("UUID")
        if uuid in pools:
            raise Conflict(
                f"disk {device.identity} belongs to pool {pools[uuid]}", disk=device.identity
            )
        if uuid is not None and uuid == allow_fs:
            continue  # what an interrupted creation made (and maybe mounted)
        if device.devnode in sources or (uuid is not None and uuid in busy):
            raise Conflict(f"disk {device.identity} is in use (mounted)", disk=device.identity)
        if fs.get("LABEL", "").startswith(LABEL_PREFIX) and not force:
            raise Conflict(
                f"disk {device.identity} holds pool filesystem {fs.get('LABEL')} ({uuid}): import "
                "it, or create with force to erase it",
                disk=device.identity,
                fs_uuid=uuid,
            )
    return found


def _made_before(found: dict[str, dict[str, str]], label: str, fs_type: str) -> str | None:
    """The filesystem an interrupted creation made on all these disks, if it did."""
    uuids = {fs.get("UUID") for fs in found.values()}
    if len(uuids) != 1 or None in uuids:
        return None
    first = next(iter(found.values()))
    if first.get("LABEL") == label and first.get("TYPE") == fs_type:
        return first.get("UUID")
    return None


def _pool_location(app: Appliance, fs_uuid: str, name: str, mountpoint: str) -> str:
    """The location on the pool's store: found in the catalog, added, or adopted when an
    interrupted run wrote its identity file already. Returns its id."""
    options = {"mountpoint": mountpoint}
    for location in app.catalog.list_locations(app.repo.store_id):
        if location.kind == "block_pool" and location.address == fs_uuid:
            app.catalog.update_location(location.id, label=name, details={"options": options})
            return location.id
    try:
        return add_location(app, fs_uuid, kind="block_pool", label=name, options=options).id
    except StoreExists as exc:
        if exc.details.get("store_id") != app.repo.store_id:
            raise Conflict(
                f"pool filesystem {fs_uuid} holds store {exc.details.get('store_id')}, not this "
                "appliance's: import it on a fresh data directory",
                fs_uuid=fs_uuid,
            ) from exc
    adopted = adopt_location(app, fs_uuid, kind="block_pool", options=options)
    app.catalog.update_location(adopted["location"], label=name)
    return str(adopted["location"])


def create_pool(
    app: Appliance,
    name: str,
    devices: Sequence[BlockDevice],
    fs_type: str = "btrfs",
    profile: str | None = None,
    *,
    force: bool = False,
    made: Callable[[str], None] | None = None,
    log: Log = _no_log,
) -> PoolRecord:
    """Make a pool of ``devices``: filesystem, mount by UUID, ``store/`` registered as a
    ``block_pool`` location, marker, record. ``profile`` defaults to ``single`` for one disk and
    ``raid1`` for several. ``force`` erases disks that hold another pool's filesystem.

    Resumable: a rerun after an interruption finds the filesystem it made (this pool's label
    and type on all the disks) and goes on from there without formatting them again;
    ``made(fs_uuid)`` is told once the filesystem exists (a job logs it in its checkpoint)."""
    check_pool_name(name)
    profile = profile or ("single" if len(devices) == 1 else "raid1")
    check_layout(fs_type, profile, len(devices))
    try:
        app.catalog.get_pool(name)
        raise Conflict(f"pool {name} already exists", pool=name)
    except NotFound:
        pass
    label = pool_label(name, fs_type)
    seen = {d.devnode: probe(d.devnode) for d in devices if os.path.exists(d.devnode)}
    earlier = None if force or len(seen) != len(devices) else _made_before(seen, label, fs_type)
    check_disks(app, devices, allow_fs=earlier, force=force)
    if earlier is None:
        log("info", f"making {fs_type} ({profile}) on {', '.join(d.devnode for d in devices)}")
        fs_uuid = make_filesystem([d.devnode for d in devices], fs_type, label, profile)
    else:
        fs_uuid = earlier
        log("info", f"going on with filesystem {fs_uuid}, made by an interrupted run")
    if made is not None:
        made(fs_uuid)
    mountpoint = pool_mountpoint(app.data_dir.path, name)
    mount_pool_filesystem(fs_uuid, mountpoint)
    log("info", f"mounted {fs_uuid} at {mountpoint}")
    os.makedirs(os.path.join(mountpoint, STORE_DIR), mode=0o700, exist_ok=True)
    members = [d.identity for d in devices]
    location_id = _pool_location(app, fs_uuid, name, mountpoint)
    pool = _register_pool(
        app, name, mountpoint, fs_uuid, fs_type, profile, members, location_id, marker={}
    )
    log("info", f"pool {name} is ready: location {location_id[:10]}")
    return pool


def _register_pool(
    app: Appliance,
    name: str,
    mountpoint: str,
    fs_uuid: str,
    fs_type: str,
    profile: str,
    members: list[str],
    location_id: str,
    *,
    marker: dict[str, Any],
) -> PoolRecord:
    """Write the pool's marker (keeping what an earlier one held), then its catalog row: a crash
    between the two leaves a marked filesystem that an import finds again."""
    write_marker(
        mountpoint,
        {
            **{k: v for k, v in marker.items() if k not in ("kind", "version")},
            "name": name,
            "fs_uuid": fs_uuid,
            "fs_type": fs_type,
            "profile": profile,
            "members": members,
            "store_id": app.repo.store_id,
            "location_id": location_id,
        },
    )
    return app.catalog.add_pool(
        name,
        os.path.join(mountpoint, STORE_DIR),
        app.repo.store_id,
        fs_uuid=fs_uuid,
        fs_type=fs_type,
        profile=profile,
        members=members,
        location_id=location_id,
        mountpoint=mountpoint,
    )


# --- import --------------------------------------------------------------------------------------


def _members_now(mountpoint: str, fs_type: str, devices: Sequence[BlockDevice]) -> list[str]:
    """Identities of the given devices in btrfs device-id order (one disk: as given)."""
    if fs_type != "btrfs" or len(devices) < 2:
        return [d.identity for d in devices]
    fs = btrfs.filesystem(mountpoint)
    by_node = {os.path.realpath(d.devnode): d.identity for d in devices}
    if fs is None:
        return [d.identity for d in devices]
    ordered = sorted(fs.devices, key=lambda d: d.devid)
    return [by_node.get(os.path.realpath(d.path or ""), f"device {d.devid}") for d in ordered]


def import_pool(
    app: Appliance,
    fs_uuid: str,
    name: str | None = None,
    *,
    devices: Sequence[BlockDevice] = (),
    log: Log = _no_log,
) -> dict[str, Any]:
    """Take over a pool filesystem found on attached disks: mount it (degraded if need be),
    adopt the location on it (its points become copies there; points the catalog lacks are
    added from its manifests), and record the pool. ``name`` defaults to the one its marker
    holds; ``devices`` (from :func:`find_importable`) name its members, else its marker does.
    A pool of another store is a :class:`Conflict`: import it on a fresh data directory
    (:func:`seed_from_pool` first)."""
    if any(p.fs_uuid == fs_uuid for p in app.catalog.list_pools()):
        raise Conflict(f"filesystem {fs_uuid} is already a pool of this appliance", fs_uuid=fs_uuid)
    if not devices_of(fs_uuid):
        raise NotFound(f"no disk with filesystem {fs_uuid} is attached", fs_uuid=fs_uuid)
    staging = check_pool_name(name or "import-" + fs_uuid[:8])
    if any(p.name == staging for p in app.catalog.list_pools()):
        raise Conflict(f"pool {staging} already exists; import under another name", pool=staging)
    mountpoint = pool_mountpoint(app.data_dir.path, staging)
    mounted = mount_pool_filesystem(fs_uuid, mountpoint)
    marker = read_marker(mountpoint)
    chosen = name or str(marker.get("name") or staging)
    try:
        check_pool_name(chosen)
        app.catalog.get_pool(chosen)
        raise Conflict(f"pool {chosen} already exists; import under another name", pool=chosen)
    except NotFound:
        pass
    except BaseException:
        unmount(mountpoint)
        raise
    if chosen != staging:
        unmount(mountpoint)
        os.rmdir(mountpoint)
        mountpoint = pool_mountpoint(app.data_dir.path, chosen)
        mounted = mount_pool_filesystem(fs_uuid, mountpoint)
    log("info", f"mounted {fs_uuid} at {mountpoint}" + (" (degraded)" if mounted.degraded else ""))
    fs_type = probe(mounted.device).get("TYPE") or str(marker.get("fs_type", "ext4"))
    profile = str(marker.get("profile") or "single")
    if fs_type == "btrfs":
        data = [c.profile for c in btrfs.chunk_profiles(mountpoint) if c.kind == "Data"]
        profile = next((p for p in data if p in ("raid1", "raid10")), profile)
    members = (
        _members_now(mountpoint, fs_type, devices) if devices else list(marker.get("members") or [])
    )
    options = {"mountpoint": mountpoint}
    store = BlockPoolBackend(fs_uuid, mountpoint)
    try:
        check_identity(store, app.repo.store_id)
    except LocationUnavailable as exc:
        store.close()
        if not mounted.already:  # refused: the disks are left as they were found
            with contextlib.suppress(ApplianceError):
                unmount(mountpoint)
        if exc.details.get("reason") == "another store":
            raise Conflict(
                f"pool filesystem {fs_uuid} holds store {exc.details.get('store_id')}, not this "
                "appliance's: import it on a fresh data directory (`appliance pool import` "
                "seeds one from it)",
                fs_uuid=fs_uuid,
            ) from exc
        if exc.details.get("reason") == "no identity":
            raise Conflict(
                f"pool filesystem {fs_uuid} holds no appliance store (no store/location.json)",
                fs_uuid=fs_uuid,
            ) from exc
        raise
    store.close()
    adopted = adopt_location(app, fs_uuid, kind="block_pool", options=options)
    location_id = str(adopted["location"])
    app.catalog.update_location(location_id, label=chosen, details={"options": options})
    pool = _register_pool(
        app, chosen, mountpoint, fs_uuid, fs_type, profile, members, location_id, marker=marker
    )
    log(
        "info",
        f"pool {chosen}: {adopted['copies']} point(s) there, {adopted['points_added']} added "
        "to the catalog",
    )
    return {"pool": pool.name, "fs_uuid": fs_uuid, "mountpoint": mountpoint, **adopted}


def seed_from_pool(data_dir: str, fs_uuid: str, name: str | None = None) -> str | None:
    """On a fresh data directory: make it belong to the store on the pool ``fs_uuid`` -- its
    config and keys are copied, as ``catalog rebuild --from`` seeds one
    (:func:`appliance.cli_locations.seed_from_location`), so the same passphrase or recovery key
    opens it. Returns the pool's name (``name``, else the one its marker holds), to import it
    under next; None when the data directory has a store already (nothing is done)."""
    store_path = DataDir(os.path.abspath(data_dir)).store_path
    if os.path.exists(os.path.join(store_path, "config")):
        return None
    staging = pool_mountpoint(data_dir, name or "import-" + fs_uuid[:8])
    mount_pool_filesystem(fs_uuid, staging)
    chosen = check_pool_name(
        name or str(read_marker(staging).get("name") or "import-" + fs_uuid[:8])
    )
    source = BlockPoolBackend(fs_uuid, staging)
    try:
        os.makedirs(store_path, exist_ok=True)
        home = LocalDirectoryBackend(store_path)
        for item in ["config", *(info.name for info in source.list("keys/"))]:
            home.put(item, source.get(item))
    finally:
        source.close()  # no descriptor stays open: the pool can move to its own mountpoint
    if staging != pool_mountpoint(data_dir, chosen):
        unmount(staging)
        os.rmdir(staging)
    return chosen
