"""The running service: the appliance, its job runner and scheduler, as one object per app.

``create_app`` builds a :class:`Service` from settings and starts it in the app's lifespan;
routers reach it through the ``ServiceDep`` dependency. Start-up:

1. The data directory is created (0700; ``appliance serve`` runs with umask 0077), and whatever
   in it another umask left readable to other users is tightened (files 0600, folders 0700; see
   ``appliance.file_modes``), as is ``<data>/restores``, the default restore area. On first start the store is created with the
   configured passphrase; when none is configured a random one is generated and kept in
   ``<data>/secrets/passphrase`` (0600), and the log says where the recovery key can be read.
2. The job runner starts: jobs a crash left ``running`` become ``interrupted``, and those safe
   to repeat (backups, verify, ...) are queued again and resume.
   The failover manager starts (``image.failover``): sessions a previous process left active
   are reconciled, and the failover job kinds are bound to it. Source stores this peer had
   taken over are opened again (``api.takeover``; each with its own runner and manager).
   Before it starts, every disk pool is mounted (``hardware.pools.mount_pools``; a pool that
   will not mount is logged and the others mount), and the pool and USB job kinds are
   registered (``pool_create``, ``pool_scrub``, ``pool_replace``, ``pool_import``,
   ``usb_export``, ``usb_eject``, and ``usb_initialise`` here), and the ``replicate`` kind
   (``api.replication_jobs``), which also hooks replication to the peers onto the backup kinds.
3. The scheduler starts (unless disabled); its first tick catches up on slots missed while the
   service was down. Besides policies and tiering it samples the pools' usage hourly and asks
   for their monthly scrub (``hardware.pool_jobs.pool_tick``), and catches replication up
   (``api.replication_jobs.replication_tick``: a peer back online wakes its waiting job), and
   evaluates the alert conditions (``api.alerting.AlertService.tick``; the alert service also
   listens for ended jobs, so a failed backup is raised at once; docs/alerts.md).
4. The device monitor starts (``hardware.udev.DeviceMonitor``, unless ``device_monitor`` is
   off): a first scan, then :func:`~hardware.usb_jobs.reconcile_media` over it (media pulled
   while the service was down are ``out``, a medium found plugged in starts its export); after
   that every rescan that differs (on a udev event, or every ``device_monitor_interval``
   seconds; only the latter where udevd does not run) goes to
   :func:`~hardware.usb_jobs.on_devices_changed`. The service keeps the latest scan for the
   API (:meth:`Service.inventory`); without the monitor the API scans when it asks.
5. While no admin exists, a one-time set-up code is written to ``<data>/secrets/setup-code``
   (0600) and printed in the log; every first-run request, loopback included, must present it.

Shutdown reverses it: the device monitor stops, the scheduler stops, running jobs are
interrupted (they resume on the next start), VMs still running from a backup export are stopped
(migrated ones run on) and the appliance closes. Pools and media stay mounted as they are.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from api.alerting import AlertService
from api.cache import TtlCache
from api.replication_jobs import register_replication_jobs, replication_tick
from api.security import LoginThrottle, Principal
from api.settings import Settings
from api.takeover_grant import takeover_tick
from appliance.engine import Appliance, DataDir, utcnow
from appliance.errors import Conflict, InvalidInput, PassphraseRequired, ServiceRestarting
from appliance.file_modes import tighten_data_dir
from appliance.job_context import JobView
from appliance.jobs import JobKind, JobRunner, register_job_kind
from appliance.path_rules import default_restore_area
from appliance.policies import register_policy_jobs
from appliance.protection import directory_bytes
from appliance.schedule import Scheduler, timezone_named
from appliance.sources.ingest import IngestSessions
from appliance.sources.jobs import register_source_jobs
from hardware.pool_jobs import device_from_params, pool_tick, register_pool_jobs
from hardware.pools import mount_pools
from hardware.records import BlockDevice, DeviceDiff, Inventory, diff
from hardware.rotation import DEFAULT_SET
from hardware.tape.jobs import register_tape_jobs
from hardware.tape.schedule import tape_backup_tick
from hardware.udev import DeviceMonitor, record_from_properties, scan
from hardware.usb import initialise_medium
from hardware.usb_jobs import on_devices_changed, reconcile_media, register_usb_jobs
from image.appliance_os.layout import SETUP_DONE_MARK
from image.failover import FailoverManager, register_failover_jobs
from image.failover.plan_schedule import plan_test_tick
from image.libvirt.jobs import register_libvirt_jobs
from tiering.schedule import tiering_tick
from tiering.work import register_tiering_jobs

log = logging.getLogger("appliance.service")

Clock = Callable[[], datetime]
SETTINGS_KEY = "appliance"
DEFAULT_SETTINGS: dict[str, Any] = {
    "appliance_name": "Backup appliance",
    "timezone": "UTC",
    "scheduler_paused": False,
    "gc_grace_seconds": 3600,
    "verify_max_bytes": None,
}
#: How long a measured store size is reused (walking a big store on every request is wasteful).
STORE_SIZE_TTL = 30.0
#: How long a checked token or session cookie is trusted without asking the catalog again. Any
#: change made through the service clears it at once; a change made from outside the process
#: (the CLI) shows within this time.
AUTH_TTL = 2.0
#: How long the answer to ``GET /api/jobs/{id}`` is reused: the runner writes progress twice a
#: second, so a fresher answer could not show more.
JOB_ANSWER_TTL = 0.5
#: How long the answer to a points list is reused; new points appear within this time.
POINTS_ANSWER_TTL = 1.0
#: Without the device monitor, how long one scan of the disks answers the API.
INVENTORY_TTL = 2.0
#: How long ``POST /api/disks/rescan`` waits for the monitor's rescan.
RESCAN_WAIT = 15.0
#: The job kind that makes a USB disk appliance media (see :func:`initialise_job`).
INITIALISE_KIND = "usb_initialise"


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (text + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


# --- hardware: the initialise job, and the test-only USB overlay ---------------------------------


def initialise_job(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    """The ``usb_initialise`` job: make the disk ``p["device"]`` (a record of the scan the
    request was checked against; ``p["related"]``: its partitions in that scan) a USB medium of
    set ``p["set"]`` labelled ``p["label"]`` (:func:`hardware.usb.initialise_medium`, which
    checks the disk again first). Not resumed after a restart: the disk holds a new filesystem
    by then and is refused ("scan again"), so an interrupted one stays interrupted."""
    device = device_from_params(p["device"])
    related = [device_from_params(d) for d in p.get("related") or []]
    inventory = Inventory(block={d.identity: d for d in (device, *related)})
    ctx.progress({"phase": "initialising"})
    ctx.log("info", f"erasing {device.devnode} ({device.identity}) and making it appliance media")
    state = initialise_medium(
        app, device, p.get("label") or None, p.get("set") or DEFAULT_SET, inventory=inventory
    )
    ctx.log("info", f"USB disk {state.label} (set {state.set_name}) is ready and safe to remove")
    return {**state.to_dict(), "medium": state.identity}


def register_initialise_job() -> None:
    register_job_kind(
        INITIALISE_KIND,
        JobKind(
            initialise_job,
            lambda p: [(f"disk:{p['device']['identity']}", True)],
            False,
            lambda p: f"initialise USB disk {p.get('label') or p['device']['identity']}",
        ),
    )


def overlay_usb_properties(inventory: Inventory, overlay: Path) -> Inventory:
    """TESTS ONLY (``Settings.test_usb_overlay``): the loop devices of the backing files named in
    ``overlay`` (JSON ``{"<backing file>": {udev property: value, "attr:<sysfs name>": value}}``,
    as recorded from a real USB disk) reported as that disk: the recorded properties with the
    loop device's node, size and filesystem go through discovery's own converter
    (:func:`hardware.udev.record_from_properties`, under the recorded node name: it takes a
    ``loop`` node without a backing file for a free one), then the record gets the loop
    device's node. A host without USB can then play a USB disk being plugged in (``losetup``)
    and pulled (``losetup -d``)."""
    try:
        overlays = json.loads(overlay.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return inventory
    except (OSError, ValueError) as exc:
        log.warning("the test USB overlay %s cannot be read: %s", overlay, exc)
        return inventory
    block: dict[str, BlockDevice] = {}
    for device in inventory.block.values():
        recorded = overlays.get(device.backing_file or "") if device.kind == "loop" else None
        if isinstance(recorded, dict):
            properties = {
                k: str(v)
                for k, v in recorded.items()
                if not k.startswith(("ID_FS_", "attr:", "DEV"))
            }
            # The recorded disk's own filesystem links name another filesystem: left out.
            links = [
                link
                for link in str(recorded.get("DEVLINKS", "")).split()
                if link.startswith(("/dev/disk/by-id/", "/dev/disk/by-path/"))
            ]
            own = {
                "ID_FS_TYPE": device.fs_type,
                "ID_FS_UUID": device.fs_uuid,
                "ID_FS_LABEL": device.fs_label,
                "DEVLINKS": " ".join(links),
            }
            properties.update({k: v for k, v in own.items() if v})
            node = str(recorded.get("DEVNAME") or "/dev/sdz")
            properties.update(SUBSYSTEM="block", DEVTYPE="disk", DEVNAME=node)
            attributes = {
                "size": str(device.size_bytes // 512),
                "ro": "1" if device.read_only else "0",
                "removable": str(recorded.get("attr:removable", "0")),
            }
            record = record_from_properties(properties, attributes)
            if isinstance(record, BlockDevice):
                device = replace(record, devnode=device.devnode)
        block[device.identity] = device
    return replace(inventory, block=block)


class Service:
    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock: Clock = clock or utcnow
        self.appliance: Appliance | None = None
        self.runner: JobRunner | None = None
        self.scheduler: Scheduler | None = None
        self.failover: FailoverManager | None = None
        self.alerts: AlertService | None = None
        # Imported here: api.takeover reads api.identity, which reads this module's settings.
        from api.takeover import Takeovers

        #: Source stores this peer took over (docs/replication.md, "Take over").
        self.takeovers = Takeovers(self)
        from api.tape_recovery import TapeRecovery

        #: A fresh appliance made the lost one's store from its tapes (docs/tape.md).
        self.tape_recovery = TapeRecovery(self)
        #: Set on the view of a taken-over store (``api.takeover``): the store's id.
        self.store_taken_over: str | None = None
        self.setup_code: str | None = None
        #: The backup clients' upload sessions (made on first use, for the store in service).
        self.ingest_sessions: IngestSessions | None = None
        self.throttle = LoginThrottle(
            settings.login_throttle, client_free_failures=settings.login_throttle_per_client
        )
        self.auth_cache: TtlCache[Principal] = TtlCache(AUTH_TTL)
        self.job_answers: TtlCache[bytes] = TtlCache(JOB_ANSWER_TTL)
        self.points_answers: TtlCache[bytes] = TtlCache(POINTS_ANSWER_TTL, max_entries=256)
        #: The newest 50 jobs as JSON by id, which every ``/api/events`` stream compares.
        self.recent_jobs: TtlCache[dict[str, str]] = TtlCache(JOB_ANSWER_TTL, max_entries=1)
        self._store_size: tuple[float, int, int] | None = None  # (when, bytes, jobs ended)
        self._store_size_lock = threading.Lock()
        self.monitor: DeviceMonitor | None = None
        #: The latest scan of the disks: (inventory, when, monotonic time), and how many so far.
        self._scan: tuple[Inventory, datetime, float] | None = None
        self._scans = 0
        self._scan_lock = threading.Lock()
        self._rescan_lock = threading.Lock()

    @property
    def jobs_finished(self) -> int:
        """How many jobs have ended in this process (a key part of cached answers)."""
        return self.runner.finished_count if self.runner is not None else 0

    def changed(self) -> None:
        """Forget cached credentials and answers: a request that may have changed them ran."""
        self.auth_cache.clear()
        self.job_answers.clear()
        self.points_answers.clear()
        self.recent_jobs.clear()

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        app = open_appliance(s, self.clock, announce=log.warning)
        tightened = tighten_data_dir(str(s.data_dir))
        if tightened:
            log.warning(
                "took access for other users away from %d file(s) in %s", tightened, s.data_dir
            )
        restores = Path(default_restore_area(str(s.data_dir)))
        restores.mkdir(mode=0o700, exist_ok=True)
        self.appliance = app
        try:
            self._ensure_default_pool()
            register_policy_jobs()
            register_tiering_jobs()
            register_pool_jobs()
            register_usb_jobs()
            register_tape_jobs()
            register_initialise_job()
            register_source_jobs()
            register_libvirt_jobs()
            # After the policy kinds: the backup kinds (policy_backup too) queue replication.
            register_replication_jobs()
            self._mount_pools()
            # isolate: backups and restores fork workers, unsafe in this many-threaded process.
            self.runner = JobRunner(app, max_parallel=s.max_parallel_jobs, isolate=True)
            # Failover sessions: reconcile VMs a previous process left, bind the job kinds.
            self.failover = FailoverManager(app)
            register_failover_jobs(self.failover)
            self.alerts = AlertService(
                app,
                s.secrets_dir,
                clock=self.clock,
                appliance_name=lambda: str(self.settings_document()["appliance_name"]),
                tz=lambda: timezone_named(str(self.settings_document()["timezone"])),
                certificate=s.cert_path if s.tls else None,
            )
            self.runner.end_listeners.append(self.alerts.job_ended)
            requeued = self.runner.start()
            if requeued:
                log.warning("resuming %d interrupted job(s): %s", len(requeued), requeued)
            self.takeovers.reopen()
            doc = self.settings_document()
            self.scheduler = Scheduler(
                app,
                self.runner,
                interval=s.scheduler_interval,
                clock=self.clock,
                tz=timezone_named(str(doc["timezone"])),
            )
            self.scheduler.extra_ticks.append(tiering_tick(app, self.runner))
            self.scheduler.extra_ticks.append(pool_tick(app, self.runner))
            self.scheduler.extra_ticks.append(replication_tick(app, self.runner))
            self.scheduler.extra_ticks.append(takeover_tick(app))
            self.scheduler.extra_ticks.append(self.alerts.tick)
            self.scheduler.extra_ticks.append(plan_test_tick(app, self.scheduler.tz))
            self.scheduler.extra_ticks.append(tape_backup_tick(app, self.scheduler.tz))
            self.scheduler.paused = bool(doc["scheduler_paused"])
            if s.scheduler_enabled:
                self.scheduler.start()
            if s.device_monitor:
                self._start_monitor()
            app.catalog.purge_sessions()
            self._prepare_setup_code()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.appliance is not None:
            self.takeovers.shutdown()  # their VMs and jobs stop; reopened at the next start
        if self.runner is not None:
            self.runner.shutdown()
        if self.failover is not None:
            # VMs still running from the backup export are stopped; migrated ones run on.
            self.failover.shutdown()
            self.failover = None
        if self.appliance is not None:
            self.appliance.close()
            self.appliance = None

    def _ensure_default_pool(self) -> None:
        app = self.app
        if not any(p.name == "default" for p in app.catalog.list_pools()):
            with contextlib.suppress(Conflict):  # another process added it meanwhile
                app.catalog.add_pool("default", app.data_dir.store_path, app.repo.store_id)

    def _mount_pools(self) -> None:
        """Mount every disk pool; one that will not mount is logged (its health says why) and
        the others still mount."""
        try:
            reports = mount_pools(self.app)
        except Exception:
            log.exception("mounting the disk pools failed; each is mounted when it is used")
            return
        for report in reports:
            if report["error"]:
                log.warning("pool %s is not mounted: %s", report["pool"], report["error"])
            elif report["degraded"]:
                log.warning("pool %s is mounted degraded: a disk is missing", report["pool"])

    # --- disks --------------------------------------------------------------------------------

    def _scan_disks(self) -> Inventory:
        """Scan the disks (the monitor's scanner too), remembering the result for the API."""
        inventory = scan()
        overlay = self.settings.test_usb_overlay
        if overlay is not None:
            inventory = overlay_usb_properties(inventory, overlay)
        with self._scan_lock:
            self._scan = (inventory, self.now(), time.monotonic())
            self._scans += 1
        return inventory

    def _devices_changed(self, change: DeviceDiff, inventory: Inventory) -> None:
        """A scan differed from the one before: USB media plugged in or pulled, disks offered."""
        if self.appliance is None or self.runner is None:
            return
        for outcome in on_devices_changed(self.appliance, self.runner, change, inventory):
            log.info(
                "disk %s: %s (%s)",
                outcome.get("label") or outcome.get("device"),
                outcome.get("action"),
                outcome.get("reason", ""),
            )

    def _start_monitor(self) -> None:
        s = self.settings
        monitor = DeviceMonitor(
            self._devices_changed, interval=s.device_monitor_interval, scanner=self._scan_disks
        )
        try:
            first = monitor.start()
        except Exception:
            log.exception("the device monitor did not start; disks are scanned on request only")
            return
        self.monitor = monitor
        try:
            for outcome in reconcile_media(self.app, self.jobs, first):
                log.info("disk %s: %s", outcome.get("label") or outcome.get("device"), outcome)
        except Exception:
            log.exception("reconciling the USB media with the disks found failed")

    def inventory(self) -> tuple[Inventory, datetime]:
        """The latest scan of the disks and when it was made: the monitor's, or (without the
        monitor) one made now, reused for ``INVENTORY_TTL`` seconds."""
        with self._scan_lock:
            last = self._scan
        if last is not None and (
            self.monitor is not None or time.monotonic() - last[2] < INVENTORY_TTL
        ):
            return last[0], last[1]
        return self.rescan()

    def rescan(self) -> tuple[Inventory, datetime]:
        """Scan the disks now. With the monitor, its thread rescans (and acts on what changed)
        and this waits for it; without, the scan is made here and what changed since the last
        one is acted on the same way."""
        if self.monitor is not None:
            with self._scan_lock:
                before = self._scans
            self.monitor.rescan_soon()
            deadline = time.monotonic() + RESCAN_WAIT
            while self._scans == before and time.monotonic() < deadline:
                time.sleep(0.02)
            with self._scan_lock:
                assert self._scan is not None
                return self._scan[0], self._scan[1]
        with self._rescan_lock:
            with self._scan_lock:
                old = self._scan[0] if self._scan is not None else None
            inventory = self._scan_disks()
            if old is not None:
                change = diff(old, inventory)
                if not change.empty:
                    self._devices_changed(change, inventory)
            with self._scan_lock:
                assert self._scan is not None
                return self._scan[0], self._scan[1]

    def _prepare_setup_code(self) -> None:
        if self.admin_exists():
            self.setup_code = None
            self._mark_setup_done()
            return
        self.setup_code = secrets.token_hex(4)
        path = self.setup_code_path
        path.unlink(missing_ok=True)
        _write_secret(path, self.setup_code)
        log.warning(
            "no admin account yet: open the admin page to create one with the set-up code %s "
            "(also in %s, readable by root only), or run `appliance admin create`",
            self.setup_code,
            path,
        )

    @property
    def setup_code_path(self) -> Path:
        return self.settings.secrets_dir / "setup-code"

    def setup_done(self) -> None:
        self.setup_code = None
        self.setup_code_path.unlink(missing_ok=True)
        self._mark_setup_done()

    def _mark_setup_done(self) -> None:
        # The console banner says "set-up done" only on this mark: no code file alone would
        # also be true while the service is still starting.
        path = self.settings.secrets_dir / SETUP_DONE_MARK
        if not path.exists():
            _write_secret(path, "")

    # --- accessors ------------------------------------------------------------------------------

    @property
    def app(self) -> Appliance:
        if self.appliance is None:
            if self.tape_recovery.state().state == "switching":
                raise ServiceRestarting(
                    "the appliance is restarting on the store recovered from tapes; "
                    "ask again in a moment"
                )
            raise RuntimeError("the service is not running")
        return self.appliance

    @property
    def jobs(self) -> JobRunner:
        if self.runner is None:
            raise RuntimeError("the service is not running")
        return self.runner

    @property
    def failovers(self) -> FailoverManager:
        if self.failover is None:
            raise RuntimeError("the service is not running")
        return self.failover

    def passphrase(self) -> str:
        """The passphrase the store is opened with (configured, or generated at first start)."""
        return _passphrase(self.settings)[0]

    def admin_exists(self) -> bool:
        return any(u.role == "admin" for u in self.app.catalog.list_users())

    def settings_document(self) -> dict[str, Any]:
        stored = self.app.catalog.get_settings(SETTINGS_KEY)
        return {**DEFAULT_SETTINGS, **{k: v for k, v in stored.items() if k in DEFAULT_SETTINGS}}

    def apply_settings(self, document: dict[str, Any]) -> dict[str, Any]:
        tz = timezone_named(str(document["timezone"]))
        stored = self.app.catalog.put_settings(SETTINGS_KEY, document)
        if self.scheduler is not None:
            self.scheduler.tz = tz
            self.scheduler.paused = bool(document["scheduler_paused"])
        return {**DEFAULT_SETTINGS, **stored}

    def store_bytes(self) -> int:
        """Bytes the default pool's store occupies (measured at most every 30 s, and again
        once a job has ended: a backup or GC just changed it)."""
        with self._store_size_lock:
            now, jobs = time.monotonic(), self.jobs_finished
            if (
                self._store_size is None
                or now - self._store_size[0] > STORE_SIZE_TTL
                or self._store_size[2] != jobs
            ):
                self._store_size = (now, directory_bytes(self.app.data_dir.store_path), jobs)
            return self._store_size[1]

    def now(self) -> datetime:
        return self.clock().astimezone(UTC)


def _passphrase(s: Settings) -> tuple[str, bool]:
    """(passphrase, generated now)."""
    if s.passphrase is not None and s.passphrase.get_secret_value():
        return s.passphrase.get_secret_value(), False
    for path in (s.passphrase_file, s.generated_passphrase_path):
        if path is not None and path.exists():
            try:
                return path.read_text(encoding="utf-8").rstrip("\n"), False
            except OSError as exc:
                raise InvalidInput(f"cannot read passphrase file {path}: {exc}") from exc
    if s.passphrase_file is not None:
        raise InvalidInput(f"passphrase file {s.passphrase_file} does not exist")
    if _store_config(s).exists():
        raise PassphraseRequired(
            "the store exists but no passphrase is configured: set APPLIANCE_PASSPHRASE "
            "or APPLIANCE_PASSPHRASE_FILE"
        )
    passphrase = secrets.token_urlsafe(32)
    _write_secret(s.generated_passphrase_path, passphrase)
    return passphrase, True


def open_appliance(
    s: Settings, clock: Clock | None = None, *, announce: Callable[..., Any] = log.warning
) -> Appliance:
    """The appliance of ``s``, its store created on first use (the service's first start and
    ``appliance demo seed`` alike): with the configured passphrase, else one generated into
    ``<data>/secrets/passphrase``. A new store is announced (``announce(fmt, *args)``) with
    where its recovery key can be printed."""
    s.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(s.data_dir, 0o700)
    clock = clock or utcnow
    passphrase, generated = _passphrase(s)
    if _store_config(s).exists():
        return Appliance.open(
            str(s.data_dir), passphrase=passphrase, clock=clock, catalog_url=s.catalog_url
        )
    app, _recovery = Appliance.init(
        str(s.data_dir), passphrase, clock=clock, catalog_url=s.catalog_url
    )
    passphrase_file = s.passphrase_file or (s.generated_passphrase_path if generated else None)
    announce(
        "created a new store in %s%s. Print its recovery key now and keep it apart from "
        "the appliance: admin page (recovery key), or `appliance --data-dir %s "
        "--passphrase-file %s key export --paper`",
        app.data_dir.store_path,
        f"; its passphrase was generated into {passphrase_file}" if generated else "",
        s.data_dir,
        passphrase_file or "<file holding the passphrase>",
    )
    return app


def _store_config(settings: Settings) -> Path:
    """The store's config object: present once the store was created."""
    return Path(DataDir(str(settings.data_dir.absolute())).store_path) / "config"
