"""A pool's filesystem as the appliance uses it: mounted by UUID (degraded if need be), the
``block_pool`` location kind on it, its capacity, health and growth forecast.

A block pool's location has the filesystem UUID as its address and the mountpoint
(``<data dir>/pools/<name>``) as its one option; its store is the ``store/`` folder on the
filesystem. Opening it (:func:`open_block_pool`, registered under the ``appliance.backends``
entry-point group) mounts the filesystem when it is not mounted yet -- ``-o degraded`` when a
mirror's disk is missing, so a degraded pool keeps serving -- and returns a directory backend on
its store that checks, at every operation, that the filesystem is still mounted there.

A pool whose disks are gone, or that will not mount even degraded, is
:class:`~appliance.errors.LocationUnavailable`, never an empty store: the bare mountpoint
folder on the system disk is never read or written as the pool.

:func:`pool_capacity`, :func:`pool_health` and :func:`forecast` describe a pool record (mounting
it when needed); health is the worst of its reasons (:func:`health_state`): a missing disk or
data with one copy only is ``degraded``, errors a scrub could not repair ``damaged``, non-zero
device error counters or a member disk that SMART says is failing (:func:`smart_reasons`) a
``warning``. Decisions are pure and tested with explicit values. SMART is read through
:data:`SMART_READINGS`, at most once an hour per disk: ``smartctl -a`` can take seconds and
wakes a sleeping disk, and health is asked for on every page view.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, NoReturn

from appliance.catalog.records import PoolRecord, PoolUsageRecord
from appliance.engine import DEFAULT_POOL, Appliance
from appliance.errors import ApplianceError, Conflict, LocationUnavailable, NotFound
from appliance.space import reserve_bytes
from appliance.store.backend import LocalDirectoryBackend
from hardware import btrfs
from hardware.mounts import (
    CommandFailed,
    devnodes_of,
    mount_filesystem,
    mounted_at,
    unmount,
    uuids_of_mount,
)
from hardware.smart import Health, read_health

#: The store's folder on a pool's filesystem (frozen: existing pools are found by it).
STORE_DIR = "store"


@dataclass(frozen=True)
class PoolMount:
    """A pool's filesystem, mounted."""

    mountpoint: str
    #: The device the kernel mounted it from.
    device: str
    #: Mounted with a member missing (``-o degraded``).
    degraded: bool
    #: It was mounted already (by an earlier open, or at service start).
    already: bool


def probe(devnode: str) -> dict[str, str]:
    """What ``blkid -p`` reads from the disk itself (TYPE, UUID, LABEL, ...); empty when it
    holds no filesystem."""
    try:
        done = subprocess.run(
            ["blkid", "-p", "-o", "export", devnode],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return {}
    found = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            found[key] = value
    return found


def _unavailable(fs_uuid: str, mountpoint: str, reason: str) -> NoReturn:
    raise LocationUnavailable(
        f"pool filesystem {fs_uuid} is not available: {reason}",
        location=mountpoint,
        fs_uuid=fs_uuid,
        reason=reason,
    )


def devices_of(fs_uuid: str) -> list[str]:
    """The device nodes holding the filesystem ``fs_uuid`` now, probed afresh
    (:func:`hardware.mounts.devnodes_of`: blkid's cache is not asked -- it still names a node
    that went away, even once that node holds another filesystem)."""
    return devnodes_of(fs_uuid)


def mount_pool_filesystem(fs_uuid: str, mountpoint: str) -> PoolMount:
    """Mount the pool filesystem ``fs_uuid`` at ``mountpoint`` unless it is mounted there;
    degraded when a btrfs mirror misses a disk. The device is found by the UUID on it
    (:func:`devices_of`, never blkid's cache) and what got mounted is checked to carry it.
    :class:`LocationUnavailable` when no disk of it is attached, something else is mounted
    there, or it will not mount even degraded."""
    mountpoint = os.path.abspath(mountpoint)
    current = mounted_at(mountpoint)
    if current is not None:
        if fs_uuid not in uuids_of_mount(current):
            _unavailable(
                fs_uuid, mountpoint, f"another filesystem is mounted there ({current.source})"
            )
        return PoolMount(mountpoint, current.source, "degraded" in current.options.split(","), True)
    devices = devices_of(fs_uuid)
    if not devices:
        _unavailable(fs_uuid, mountpoint, "none of its disks is attached")
    os.makedirs(mountpoint, mode=0o700, exist_ok=True)
    is_btrfs = probe(devices[0]).get("TYPE") == "btrfs"
    if is_btrfs:
        with contextlib.suppress(CommandFailed):  # the mount below says what is wrong
            btrfs.scan_devices(devices)
    degraded = False
    try:
        device = mount_filesystem(fs_uuid, mountpoint)
    except ApplianceError as exc:
        if not is_btrfs:
            _unavailable(fs_uuid, mountpoint, exc.message)
        try:
            device = mount_filesystem(fs_uuid, mountpoint, degraded=True)
        except ApplianceError as again:
            _unavailable(
                fs_uuid,
                mountpoint,
                f"it will not mount ({exc.message}), not even degraded ({again.message})",
            )
        degraded = True
    mounted = mounted_at(mountpoint)
    if mounted is None or fs_uuid not in uuids_of_mount(mounted):
        with contextlib.suppress(ApplianceError):
            unmount(mountpoint)
        _unavailable(fs_uuid, mountpoint, f"{device} did not mount as it")
    return PoolMount(mountpoint, device, degraded, False)


def is_mounted(fs_uuid: str, mountpoint: str) -> bool:
    """Whether the filesystem ``fs_uuid`` is mounted at ``mountpoint`` now."""
    current = mounted_at(mountpoint)
    return current is not None and fs_uuid in uuids_of_mount(current)


class BlockPoolBackend(LocalDirectoryBackend):
    """The store folder of a mounted pool filesystem; every operation first checks that the
    filesystem is still mounted there (else :class:`LocationUnavailable`)."""

    def __init__(self, fs_uuid: str, mountpoint: str, *, fsync: bool = True) -> None:
        self.fs_uuid = fs_uuid
        self.mountpoint = os.path.abspath(mountpoint)
        super().__init__(os.path.join(self.mountpoint, STORE_DIR), fsync=fsync, require_root=True)

    def describe(self) -> str:
        return f"pool filesystem {self.fs_uuid} at {self.mountpoint}"

    def _open_root(self) -> int:
        fd = super()._open_root()
        try:
            here = os.fstat(fd)
            mount = os.stat(self.mountpoint)
            parent = os.stat(os.path.dirname(self.mountpoint))
        except OSError as exc:
            os.close(fd)
            self._unavailable(str(exc))
        if mount.st_dev == parent.st_dev or here.st_dev != mount.st_dev:
            os.close(fd)
            self._unavailable("its filesystem is not mounted")
        return fd


def open_block_pool(
    address: str, *, mountpoint: str, fsync: bool = True, **_: Any
) -> BlockPoolBackend:
    """The ``block_pool`` backend of the registry: ``address`` is the filesystem UUID; the
    filesystem is mounted at ``mountpoint`` first when it is not (degraded if need be)."""
    mount_pool_filesystem(address, mountpoint)
    backend = BlockPoolBackend(address, mountpoint, fsync=fsync)
    backend.check_available()
    return backend


# --- capacity, health, growth ------------------------------------------------------------------

SYSTEM_DISK_WARNING = "shares the system disk"
#: How far back the growth forecast looks.
FORECAST_WINDOW = timedelta(days=30)
#: Health states, mildest first.
HEALTH_STATES = ("ok", "warning", "degraded", "damaged", "unavailable")


@dataclass(frozen=True)
class PoolCapacity:
    total_bytes: int
    used_bytes: int
    #: What a write may use (statvfs ``f_bavail``).
    free_bytes: int
    #: What must stay free: a backup or copy that would eat into it is refused.
    reserve_bytes: int


@dataclass(frozen=True)
class PoolHealth:
    """How a pool is: ``state`` (one of :data:`HEALTH_STATES`) and why."""

    state: str
    reasons: list[str] = field(default_factory=list)
    mounted: bool = False
    #: Mounted with a member missing (``-o degraded``).
    degraded_mount: bool = False
    #: Identities of the members btrfs cannot find.
    missing: list[str] = field(default_factory=list)
    #: Members with non-zero error counters: ``{member, device, devid, counters}``.
    device_errors: list[dict[str, Any]] = field(default_factory=list)
    last_scrub: dict[str, Any] | None = None
    #: SMART of each member attached: ``{member, device, status, reason, warnings}``;
    #: ``status`` ``unknown`` (a loop or virtio disk, no smartctl) says nothing against the pool.
    smart: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- SMART of the members ------------------------------------------------------------------------

#: Seconds a member's SMART reading is reused before smartctl is asked again.
SMART_INTERVAL = 3600.0


def smart_reasons(readings: Sequence[tuple[str, Health]]) -> list[str]:
    """The ``warning`` reasons SMART gives a pool: one for each member (``(member, health)``)
    whose SMART says it is failing, naming the disk and why. ``ok`` disks (with or without
    warnings such as reallocated sectors) and ``unknown`` ones (no SMART: a loop or virtio disk,
    a USB bridge that hides it, no smartctl) add none: only a disk's own verdict that it fails
    counts against the pool; the details list everything."""
    return [
        f"disk {member} is failing according to SMART ({health.reason}): replace it"
        for member, health in readings
        if health.status == "failing"
    ]


def smart_details(readings: Sequence[tuple[str, str, Health]]) -> list[dict[str, Any]]:
    """``(member, device, health)`` as the pool's health shows them."""
    return [
        {
            "member": member,
            "device": device,
            "status": health.status,
            "reason": health.reason,
            "warnings": list(health.warnings),
        }
        for member, device, health in readings
    ]


class SmartReadings:
    """SMART of devices, read at most once per ``interval`` seconds each (keyed by the disk's
    identity and its node: a disk that comes back on another node is read again). Thread-safe;
    smartctl runs outside the lock, so a slow disk does not hold up the others."""

    def __init__(
        self,
        read: Callable[[str], Health] = read_health,
        *,
        interval: float = SMART_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.read = read
        self.interval = interval
        self.clock = clock
        self._seen: dict[tuple[str, str], tuple[float, Health]] = {}
        self._lock = threading.Lock()

    def health(self, identity: str, devnode: str) -> Health:
        key = (identity, devnode)
        with self._lock:
            seen = self._seen.get(key)
        if seen is not None and self.clock() - seen[0] < self.interval:
            return seen[1]
        health = self.read(devnode)
        with self._lock:
            self._seen[key] = (self.clock(), health)
        return health


#: The readings :func:`pool_health` uses (one per process).
SMART_READINGS = SmartReadings()


def _member_smart(attached: Sequence[tuple[str, str]]) -> list[tuple[str, str, Health]]:
    return [(m, dev, SMART_READINGS.health(m, dev)) for m, dev in attached]


def forecast(
    samples: Sequence[PoolUsageRecord], now: datetime, *, window: timedelta = FORECAST_WINDOW
) -> float | None:
    """Days from ``now`` until the pool is full -- its free space down to the reserve
    (:func:`appliance.space.reserve_bytes`), when backups start to be refused -- by a
    least-squares line through the usage samples of the last ``window``. None when it does
    not grow, or the samples span less than an hour."""
    recent = sorted((s for s in samples if now - window <= s.at <= now), key=lambda s: s.at)
    if len(recent) < 2:
        return None
    xs = [(s.at - now).total_seconds() / 86400 for s in recent]
    ys = [float(s.used_bytes) for s in recent]
    if xs[-1] - xs[0] < 1 / 24:
        return None
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
    if slope <= 0:
        return None
    latest = recent[-1]
    limit = latest.total_bytes - reserve_bytes(latest.total_bytes)
    days = (limit - latest.used_bytes) / slope + xs[-1]  # xs[-1] <= 0: the sample's age
    return max(0.0, round(days, 2))


def health_state(reasons: dict[str, list[str]]) -> str:
    """The worst state that has a reason (``{state: [reason, ...]}``), else ``ok``."""
    worst = "ok"
    for state in HEALTH_STATES:
        if reasons.get(state):
            worst = state
    return worst


def pool_capacity(pool: PoolRecord) -> PoolCapacity | None:
    """Space on the pool's filesystem now; None when it is not mounted (a block pool's bare
    mountpoint is the system disk, never the pool)."""
    if pool.block:
        if (
            pool.fs_uuid is None
            or pool.mountpoint is None
            or not is_mounted(pool.fs_uuid, pool.mountpoint)
        ):
            return None
        where = pool.mountpoint
    else:
        where = pool.path
    try:
        st = os.statvfs(where)
    except OSError:
        return None
    total = st.f_blocks * st.f_frsize
    return PoolCapacity(
        total, total - st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize, reserve_bytes(total)
    )


def pool_state(app: Appliance, name: str) -> dict[str, Any]:
    """What the appliance remembers of a pool between runs (its last scrub)."""
    return app.catalog.get_settings(f"pool:{name}")


def save_pool_state(app: Appliance, name: str, **changes: Any) -> None:
    app.catalog.put_settings(f"pool:{name}", {**pool_state(app, name), **changes})


def pool_health(app: Appliance, pool: PoolRecord) -> PoolHealth:
    """Mounted (degraded?), missing members, error counters, data without its second copy,
    the last scrub, the members' SMART (:data:`SMART_READINGS`). Mounts a block pool that is
    not mounted yet."""
    if not pool.block:
        ok = os.path.isdir(pool.path)
        return PoolHealth(
            "ok" if ok else "unavailable", [] if ok else ["its folder is missing"], ok
        )
    assert pool.fs_uuid is not None and pool.mountpoint is not None
    try:
        mounted = mount_pool_filesystem(pool.fs_uuid, pool.mountpoint)
    except LocationUnavailable as exc:
        return PoolHealth("unavailable", [exc.message])
    reasons: dict[str, list[str]] = {}
    members = list(pool.members)
    if pool.fs_type != "btrfs":
        smart = _member_smart([(members[0] if members else mounted.device, mounted.device)])
        reasons["warning"] = smart_reasons([(m, h) for m, _, h in smart])
        return PoolHealth(
            health_state(reasons),
            reasons["warning"],
            True,
            mounted.degraded,
            smart=smart_details(smart),
        )

    def member(devid: int | None) -> str:
        if devid is not None and 0 < devid <= len(members):
            return members[devid - 1]
        return f"device {devid}"

    missing: list[str] = []
    errors: list[dict[str, Any]] = []
    last: dict[str, Any] | None = pool_state(app, pool.name).get("last_scrub")
    try:
        fs = btrfs.filesystem(pool.mountpoint)
        missing = [member(devid) for devid in fs.missing_devids] if fs is not None else []
        counters = btrfs.device_errors(pool.mountpoint)
        chunks = btrfs.chunk_profiles(pool.mountpoint)
        if last is None:
            status = btrfs.last_scrub(pool.mountpoint)
            last = None if status.status == "never" else status.to_dict()
    except CommandFailed as exc:
        return PoolHealth("warning", [f"its state cannot be read: {exc.message}"], True)
    attached = [(member(d.devid), d.path) for d in fs.devices if d.path] if fs is not None else []
    smart = _member_smart(attached)
    if missing:
        reasons.setdefault("degraded", []).append(
            f"{len(missing)} disk(s) missing ({', '.join(missing)}): the pool serves from the "
            "other copies; replace the disk"
        )
    for device in counters:
        if device.total:
            who = member(device.devid)
            errors.append(
                {"member": who, "device": device.device, "devid": device.devid}
                | {"counters": device.nonzero()}
            )
            said = ", ".join(f"{k} {v}" for k, v in device.nonzero().items())
            reasons.setdefault("warning", []).append(f"disk {who} has reported errors ({said})")
    reasons.setdefault("warning", []).extend(smart_reasons([(m, h) for m, _, h in smart]))
    unredundant = btrfs.unredundant_chunks(chunks, pool.profile or "single")
    if unredundant:
        kinds = sorted({c.kind.lower() for c in unredundant})
        reasons.setdefault("degraded", []).append(
            f"some {' and '.join(kinds)} has one copy only (written while a disk was missing); "
            "a scrub restores the mirror once every disk is there"
        )
    if last and last.get("uncorrectable"):
        reasons.setdefault("damaged", []).append(
            f"the last scrub found {last['uncorrectable']} error(s) it could not repair: verify "
            "the points on this pool"
        )
    state = health_state(reasons)
    flat = [r for s in reversed(HEALTH_STATES) for r in reasons.get(s, [])]
    return PoolHealth(
        state, flat, True, mounted.degraded, missing, errors, last, smart_details(smart)
    )


# --- the pools and their status ---------------------------------------------------------------


@dataclass(frozen=True)
class PoolStatus:
    pool: PoolRecord
    #: None while the pool's filesystem is not mounted.
    capacity: PoolCapacity | None
    health: PoolHealth
    #: Days until full (see :func:`forecast`); None: not growing, or too little history.
    days_until_full: float | None
    #: Flags such as :data:`SYSTEM_DISK_WARNING`.
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self.pool)
        record["created_at"] = self.pool.created_at.isoformat()
        return {
            **record,
            "kind": "block" if self.pool.block else "directory",
            "capacity": asdict(self.capacity) if self.capacity else None,
            "health": self.health.to_dict(),
            "days_until_full": self.days_until_full,
            "warnings": list(self.warnings),
        }


def ensure_default_pool(app: Appliance) -> PoolRecord:
    """The data directory's own pool, recorded if it is not yet."""
    try:
        return app.catalog.get_pool(DEFAULT_POOL)
    except NotFound:
        try:
            return app.catalog.add_pool(DEFAULT_POOL, app.data_dir.store_path, app.repo.store_id)
        except Conflict:  # another process recorded it meanwhile
            return app.catalog.get_pool(DEFAULT_POOL)


def list_pools(app: Appliance) -> list[PoolRecord]:
    """Every pool, the data directory's own first."""
    ensure_default_pool(app)
    return sorted(app.catalog.list_pools(), key=lambda p: (p.name != DEFAULT_POOL, p.name))


def find_pool(app: Appliance, name: str) -> PoolRecord:
    """A pool by name or filesystem UUID."""
    for pool in list_pools(app):
        if name in (pool.name, pool.fs_uuid):
            return pool
    raise NotFound(f"no pool {name!r}", pool=name)


def shares_system_disk(path: str) -> bool:
    """Whether ``path`` is on the filesystem the system runs from."""
    try:
        return os.stat(path).st_dev == os.stat("/").st_dev
    except OSError:
        return True


def pool_status(app: Appliance, name: str, now: datetime | None = None) -> PoolStatus:
    """Capacity, health, growth forecast and warnings of one pool."""
    pool = find_pool(app, name)
    now = now or app.clock()
    health = pool_health(app, pool)
    warnings = []
    if not pool.block and shares_system_disk(pool.path):
        warnings.append(SYSTEM_DISK_WARNING)
    samples = app.catalog.list_pool_usage(pool.name, since=now - FORECAST_WINDOW, until=now)
    return PoolStatus(pool, pool_capacity(pool), health, forecast(samples, now), warnings)


def list_pool_status(app: Appliance, now: datetime | None = None) -> list[PoolStatus]:
    return [pool_status(app, p.name, now) for p in list_pools(app)]
