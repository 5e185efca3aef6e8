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
   are reconciled, and the failover job kinds are bound to it.
3. The scheduler starts (unless disabled); its first tick catches up on slots missed while the
   service was down.
4. While no admin exists, a one-time set-up code is written to ``<data>/secrets/setup-code``
   (0600) and printed in the log; every first-run request, loopback included, must present it.

Shutdown reverses it: the scheduler stops, running jobs are interrupted (they resume on the next
start), VMs still running from a backup export are stopped (migrated ones run on) and the
appliance closes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from api.cache import TtlCache
from api.security import LoginThrottle, Principal
from api.settings import Settings
from appliance.engine import Appliance, DataDir, utcnow
from appliance.errors import Conflict, InvalidInput, PassphraseRequired
from appliance.file_modes import tighten_data_dir
from appliance.jobs import JobRunner
from appliance.path_rules import default_restore_area
from appliance.policies import register_policy_jobs
from appliance.protection import directory_bytes
from appliance.schedule import Scheduler, timezone_named
from image.failover import FailoverManager, register_failover_jobs
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


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (text + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


class Service:
    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock: Clock = clock or utcnow
        self.appliance: Appliance | None = None
        self.runner: JobRunner | None = None
        self.scheduler: Scheduler | None = None
        self.failover: FailoverManager | None = None
        self.setup_code: str | None = None
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
            # isolate: backups and restores fork workers, unsafe in this many-threaded process.
            self.runner = JobRunner(app, max_parallel=s.max_parallel_jobs, isolate=True)
            # Failover sessions: reconcile VMs a previous process left, bind the job kinds.
            self.failover = FailoverManager(app)
            register_failover_jobs(self.failover)
            requeued = self.runner.start()
            if requeued:
                log.warning("resuming %d interrupted job(s): %s", len(requeued), requeued)
            doc = self.settings_document()
            self.scheduler = Scheduler(
                app,
                self.runner,
                interval=s.scheduler_interval,
                clock=self.clock,
                tz=timezone_named(str(doc["timezone"])),
            )
            self.scheduler.extra_ticks.append(tiering_tick(app, self.runner))
            self.scheduler.paused = bool(doc["scheduler_paused"])
            if s.scheduler_enabled:
                self.scheduler.start()
            app.catalog.purge_sessions()
            self._prepare_setup_code()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
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

    def _prepare_setup_code(self) -> None:
        if self.admin_exists():
            self.setup_code = None
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

    # --- accessors ------------------------------------------------------------------------------

    @property
    def app(self) -> Appliance:
        if self.appliance is None:
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
