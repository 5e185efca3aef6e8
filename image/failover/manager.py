"""All failover sessions of one appliance process: admission, lookup, restart reconciliation.

:class:`FailoverManager` is created once, at service start-up. It owns the QEMU children and
exports of its sessions, so it keeps live sessions in memory, and there is one per data directory
(an exclusive ``flock`` on ``<state dir>/manager.lock``, released by the kernel if the process
dies): a second manager would take the first one's VMs for leftovers of a crash.

Starting a failover (state **starting**): the point is read from its best copy (the rule of
:mod:`appliance.locations.choice`; a location the user names first), falling back to the next copy
when a read fails, and the job log names the location read from and every switch. Its data must be
readable there (every chunk-table and data blob in the index, every pack present at one of the
copies), else the session fails before anything runs and says what must happen first ("recall the
point from the cold tier first").
The VM's memory must fit (:mod:`image.failover.admission`). One VM has at most one live session.
Then the session boots (:mod:`image.failover.session`); the call blocks until the boot is proven
or failed.

When the appliance restarts, sessions left active are reconciled (:meth:`FailoverManager.recover`):
a VM already migrated to local storage whose QEMU still runs is adopted; one that still needed
the backup export is stopped and marked failed, its overlay kept. On service stop
(:meth:`FailoverManager.shutdown`) VMs that still need the export are stopped; migrated ones run
on, for the next manager to adopt.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from appliance.catalog.records import ACTIVE_FAILOVER_STATES, FailoverSessionRecord, PointRecord
from appliance.engine import Appliance
from appliance.errors import ApplianceError, Conflict, InvalidInput, LockHeld, NotFound
from appliance.point_check import PROBLEMS_KEY, recorded_problems
from appliance.store.repository import Repository
from image.boot_proof import BootProofSpec
from image.failover.addresses import session_addresses
from image.failover.admission import (
    MEMORY_RESERVE_MIB,
    QEMU_OVERHEAD_MIB,
    check_memory,
    choice_reason,
    choose_point,
)
from image.failover.boot_profile import load_boot_profile, save_boot_profile
from image.failover.errors import InsufficientMemory, PointNotLocal
from image.failover.failback import fail_back
from image.failover.migrate import migrate_to_local
from image.failover.network import boot_test_network, check_network_on_host, network_from_dict
from image.failover.process import STOP_GRACE
from image.failover.proof import failed_checks
from image.failover.records import epoch_iso, now_iso, record_dict
from image.failover.session import FailoverSession, ProgressCallback
from image.failover.settings import (
    asset_failover_settings,
    failover_settings,
    put_asset_failover_settings,
)
from image.host_network import read_host_network
from image.nbd_export import missing_blobs
from image.qemu import (
    Bridged,
    Isolated,
    Nat,
    Network,
    choose_accelerator,
    load_accelerator,
    mem_available_mib,
    process_is_ours,
    process_rss_mib,
)
from image.qmp import QmpClient, QmpError


class FailoverManager:
    """All failover sessions of one appliance process (create one, at service start-up).

    ``accel`` forces an accelerator ("kvm" or "tcg"); otherwise the canary choice is used.
    """

    def __init__(
        self,
        app: Appliance,
        *,
        state_dir: str | None = None,
        accel: str | None = None,
        memory_reserve_mib: int | None = None,
        canary_image: str | None = None,
    ) -> None:
        self.app = app
        self.state_dir = os.path.abspath(state_dir or os.path.join(app.data_dir.path, "failover"))
        os.makedirs(self.state_dir, exist_ok=True)
        self.accel_override = accel
        self.memory_reserve_mib = memory_reserve_mib
        self.canary_image = canary_image
        self._sessions: dict[str, FailoverSession] = {}
        self._lock = threading.Lock()
        # One manager per data directory: a second one would take the first one's VMs for
        # leftovers of a crash (flock: released by the kernel if this process dies).
        self._lock_fd = os.open(
            os.path.join(self.state_dir, "manager.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        )
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise LockHeld(f"another failover manager already runs on {self.state_dir}") from None
        self.recover()

    # --- settings ---

    def settings(self) -> dict[str, Any]:
        return failover_settings(self.app.catalog)

    def asset_settings(self, asset: str) -> dict[str, Any]:
        """``{"proof": {...}, "network": {...}}`` configured for ``asset`` (may be empty)."""
        return asset_failover_settings(self.app.catalog, asset)

    def set_asset_settings(
        self,
        asset: str,
        *,
        proof: dict[str, Any] | None = None,
        network: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Store the boot proof and network of an asset's failovers (validated first)."""
        return put_asset_failover_settings(self.app.catalog, asset, proof=proof, network=network)

    # --- boot profiles ---

    def boot_profile(self, asset: str) -> dict[str, list[int]]:
        """{disk name: chunk indices} the last proven boot of ``asset`` read, in order (or {})."""
        return load_boot_profile(self.state_dir, asset)

    def save_boot_profile(self, asset: str, point_id: str, disks: dict[str, list[int]]) -> None:
        """Keep what a proven boot read; the next failover of ``asset`` warms its cache with it."""
        save_boot_profile(self.state_dir, asset, point_id, disks)

    def accelerator(self, *, force: bool = False) -> dict[str, str]:
        """The accelerator failovers use, and why (a canary boot decides, once per host)."""
        if self.accel_override:
            return {"accel": self.accel_override, "reason": "configured"}
        if not force:
            known = load_accelerator(self.state_dir)
            if known is not None:
                return known.to_dict()
        return choose_accelerator(
            self.state_dir, guest_image=self.canary_image, force=force
        ).to_dict()

    # --- sessions ---

    def _forget(self, session: FailoverSession) -> None:
        """The session ended (its exports are stopped): drop it and close its reader, whose
        open files would otherwise keep a pool or USB disk it read from busy."""
        with self._lock:
            self._sessions.pop(session.id, None)
        if session.repo is not self.app.repo:
            session.repo.close()

    def addresses(self, session_id: str) -> dict[str, Any] | None:
        """The running VM's address and forwards (None when it does not run here)."""
        with self._lock:
            live = self._sessions.get(session_id)
        return session_addresses(live) if live is not None else None

    def live_session(self, session_id: str) -> FailoverSession | None:
        """The session while its VM runs in this process (the console needs it), else None."""
        with self._lock:
            return self._sessions.get(session_id)

    def session(self, session_id: str) -> FailoverSession:
        with self._lock:
            live = self._sessions.get(session_id)
        if live is not None:
            return live
        record = self.app.catalog.get_failover_session(session_id)
        repo = self._reader(record.point_id, record.details.get("read_from"))
        return FailoverSession(self, record, repo.get_manifest(record.point_id), repo)

    def _reader(
        self,
        point_id: str,
        location: str | None,
        log: Callable[[str], None] | None = None,
    ) -> Repository:
        """The point's best copy (``location`` first), falling back to the others."""
        try:
            return self.app.reader(point_id, named=location, log=log)
        except NotFound:
            if location is None:
                raise
            return self.app.reader(point_id, log=log)  # that location was since removed

    def get(self, session_id: str) -> dict[str, Any]:
        """The session's record as a dict, with live export counters while it runs."""
        with self._lock:
            live = self._sessions.get(session_id)
        record = self.app.catalog.get_failover_session(session_id)
        info = record_dict(record)
        if live is not None:
            stats = live.export_stats()
            if stats:
                info["details"]["export_stats"] = stats
            info["live"] = True
        else:
            info["live"] = False
        return info

    def list(self, asset: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return [record_dict(r) for r in self.app.catalog.list_failover_sessions(asset, limit=limit)]

    def committed_mib(self) -> int:
        """Memory promised to running failovers that their QEMUs have not touched yet (MiB)."""
        with self._lock:
            live = list(self._sessions.values())
        total = 0
        for session in live:
            memory = int(session.spec.get("memory_mib", 512)) + QEMU_OVERHEAD_MIB
            pid = session.process.pid
            rss = process_rss_mib(pid) if pid else 0
            total += max(0, memory - rss)
        return total

    def start(
        self,
        asset: str,
        point: str | None = None,
        *,
        network: Network | dict[str, Any] | None = None,
        proof: BootProofSpec | dict[str, Any] | None = None,
        accel: str | None = None,
        purpose: str = "failover",
        requested_at: float | None = None,
        cancel: threading.Event | None = None,
        progress: ProgressCallback | None = None,
        memory_mib: int | None = None,
        location: str | None = None,
        log: Callable[[str], None] | None = None,
        network_note: str | None = None,
    ) -> FailoverSessionRecord:
        """Fail ``asset`` over to ``point`` (default: its newest verified image point), read
        from its best copy (``location``: that one first); ``log`` is told where it reads from.

        Blocks until the boot is proven (returns the running session's record) or failed (raises
        with the session's id in ``details``). ``requested_at`` (epoch seconds) is the click; the
        RTO counts from it.
        """
        requested_at = requested_at or time.time()
        configured = self.asset_settings(asset)
        if not isinstance(proof, BootProofSpec):
            proof = BootProofSpec.from_dict(proof if proof is not None else configured.get("proof"))
        proof = proof.effective()
        if not isinstance(network, Isolated | Nat | Bridged):
            network = network_from_dict(
                network if network is not None else configured.get("network")
            )
        if purpose not in ("failover", "boot_test"):
            raise InvalidInput("purpose must be failover or boot_test")
        if network.mode != "isolated":  # a missing bridge refuses before anything runs
            check_network_on_host(network, read_host_network())
        record = self._pick(asset, point, log)
        if self.app.recall_estimate(record.id, location=location)["needed"]:
            self._check_recalled(asset, record.id, location, purpose)
        repo = self._reader(record.id, location, log)
        manifest = repo.get_manifest(record.id)
        if manifest.get("kind") != "image" or not manifest.get("disks"):
            raise InvalidInput(f"point {record.id} is not a VM image point")
        if memory_mib is not None:
            manifest = {
                **manifest,
                "vm": {**dict(manifest.get("vm") or {}), "memory_mib": memory_mib},
            }
        vm = dict(manifest.get("vm") or {})
        # What must be true before anything runs: the data is here, and the memory is free.
        check_started = time.monotonic()
        missing = missing_blobs(repo, manifest["disks"])
        if missing["tables"] or missing["blobs"] or missing["packs"]:
            parts = []
            if missing["tables"]:
                parts.append(f"{len(missing['tables'])} chunk table(s)")
            if missing["blobs"]:
                parts.append(f"{missing['blobs']} data chunk(s) (e.g. {missing['example'][:16]})")
            if missing["packs"]:
                parts.append(f"pack(s) {', '.join(p[:16] for p in missing['packs'][:5])}")
            raise PointNotLocal(
                f"point {record.id} of {asset} cannot be read from any copy online: missing "
                + ", ".join(parts)
                + "; recall the point from the cold tier (or attach its media) first",
                point=record.id,
                missing=missing,
            )
        read_from = self.app.reading_from(repo)  # after the check, which may have moved it on
        if log is not None:
            log(f"reading point {record.id} from location {read_from}")
        reserve = (
            self.memory_reserve_mib
            if self.memory_reserve_mib is not None
            else int(self.settings().get("memory_reserve_mib", MEMORY_RESERVE_MIB))
        )
        reason = check_memory(
            int(vm.get("memory_mib", 512)), mem_available_mib(), reserve, self.committed_mib()
        )
        if reason is not None:
            raise InsufficientMemory(
                f"cannot fail over {asset}: {reason}", asset=asset, memory_mib=vm.get("memory_mib")
            )
        accel = accel or self.accelerator()["accel"]
        with self._lock:
            for live in self._sessions.values():
                if live.asset == asset:
                    raise Conflict(
                        f"VM {asset} is already failed over (session {live.id}, {live.state}); "
                        "stop that session first",
                        asset=asset,
                        session=live.id,
                    )
            created = self.app.catalog.add_failover_session(
                asset,
                record.id,
                {
                    "purpose": purpose,
                    "requested_at": epoch_iso(requested_at),
                    "read_from": read_from,
                    "vm": vm,
                    "check_seconds": round(time.monotonic() - check_started, 3),
                    **({"network_note": network_note} if network_note else {}),
                },
            )
            session = FailoverSession(self, created, manifest, repo)
            self._sessions[session.id] = session
        return session.boot(
            network=network,
            proof=proof,
            accel=accel,
            requested_at=requested_at,
            cancel=cancel,
            progress=progress,
        )

    def _check_recalled(
        self, asset: str, point_id: str, location: str | None, purpose: str
    ) -> None:
        """A point only in cold storage boots once its packs are thawed. A failover asks for
        the thaw (an outage is what recalls are for) and says to come back when it is done; a
        boot test never starts a recall (it would run up retrieval charges unasked)."""
        if purpose == "boot_test":
            estimate = self.app.recall_estimate(point_id, location=location)
            raise PointNotLocal(
                f"point {point_id} of {asset} is only in cold storage at {estimate['location']}; "
                "a boot test does not recall it (recall it first, or test a local point)",
                point=point_id,
                recall=estimate,
            )
        status = self.app.prepare_read(point_id, location=location)
        if not status.done:
            raise PointNotLocal(
                f"point {point_id} of {asset} is only in cold storage: its recall was asked "
                f"({status.describe()}); fail over again when it is done "
                f"(appliance recall {point_id} says how far it is)",
                point=point_id,
                recall=status.to_dict(),
            )

    def _pick(
        self, asset: str, point: str | None, log: Callable[[str], None] | None = None
    ) -> PointRecord:
        if point:
            record = self.app.catalog.get_point(point)
            if record.asset != asset:
                raise InvalidInput(f"point {record.id} belongs to {record.asset}, not {asset}")
            if record.kind != "image":
                raise InvalidInput(f"point {record.id} is not a VM image point")
            return record
        points = self.app.catalog.list_points(asset=asset)
        choice = choose_point(points)
        if choice.point is None:
            raise NotFound(f"{asset} has no VM image recovery point to fail over to", asset=asset)
        problems = recorded_problems(self.app.catalog.get_settings(PROBLEMS_KEY), points)
        reason = choice_reason(choice, now=self.app.clock(), problems=problems)
        if reason and log is not None:
            log(reason)
        return choice.point

    def stop(self, session_id: str, *, grace: float = STOP_GRACE) -> FailoverSessionRecord:
        return self.session(session_id).stop(grace=grace)

    def migrate(
        self,
        session_id: str,
        target_dir: str | None = None,
        *,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> FailoverSessionRecord:
        with self._lock:
            live = self._sessions.get(session_id)
        if live is None:
            raise Conflict(f"failover session {session_id} is not running in this appliance")
        return migrate_to_local(live, target_dir, progress=progress, cancel=cancel)

    def failback(
        self,
        session_id: str,
        *,
        new_point: bool = True,
        write_to: str | None = None,
        target_format: str = "raw",
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> dict[str, Any]:
        return fail_back(
            self.session(session_id),
            new_point=new_point,
            write_to=write_to,
            target_format=target_format,
            progress=progress,
            cancel=cancel,
        )

    def discard(self, session_id: str) -> FailoverSessionRecord:
        return self.session(session_id).discard()

    def screenshot(self, session_id: str) -> str | None:
        """A fresh screenshot of a running session, else the last one kept (or None)."""
        with self._lock:
            live = self._sessions.get(session_id)
        if live is not None:
            path = live.screenshot("latest")
            if path is not None:
                return path
        details = self.app.catalog.get_failover_session(session_id).details
        for candidate in (
            details.get("screenshot"),
            os.path.join(self.state_dir, "screenshots", f"{session_id}-latest.png"),
        ):
            if candidate and os.path.isfile(candidate):
                return str(candidate)
        return None

    def serial_log(self, session_id: str, max_bytes: int = 65536) -> str:
        path = self.app.catalog.get_failover_session(session_id).details.get("serial_log")
        if not path:
            return ""
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - max_bytes))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def boot_test(
        self,
        asset: str,
        point: str | None = None,
        *,
        proof: BootProofSpec | dict[str, Any] | None = None,
        accel: str | None = None,
        requested_at: float | None = None,
        cancel: threading.Event | None = None,
        progress: ProgressCallback | None = None,
        location: str | None = None,
        log: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Boot a point isolated, record its RTO and screenshot, shut it down, discard it."""
        configured = self.asset_settings(asset)
        network, note = boot_test_network(configured.get("network"))
        if note and log is not None:
            log(note)
        try:
            record = self.start(
                asset,
                point,
                network=network,
                proof=proof,
                accel=accel,
                purpose="boot_test",
                network_note=note,
                requested_at=requested_at,
                cancel=cancel,
                progress=progress,
                location=location,
                log=log,
            )
        except ApplianceError as exc:
            session_id = exc.details.get("session")
            return {
                "asset": asset,
                "ok": False,
                "error": exc.message,
                "code": exc.code,
                "session": session_id,
                "failed_checks": failed_checks(exc),
                "screenshot": self.screenshot(str(session_id)) if session_id else None,
            }
        session = self.session(record.id)
        session.stop(grace=5.0)
        session.discard()
        return {
            "asset": asset,
            "ok": True,
            "session": record.id,
            "point": record.point_id,
            "rto_seconds": record.details.get("rto_seconds"),
            "screenshot": record.details.get("screenshot"),
        }

    def last_boot_test(self, asset: str) -> dict[str, Any] | None:
        """The newest boot test of ``asset`` (proven or not)."""
        for record in self.app.catalog.list_failover_sessions(asset, limit=100):
            if record.details.get("purpose") == "boot_test":
                return record_dict(record)
        return None

    # --- service lifecycle ---

    def recover(self) -> None:
        """Reconcile sessions a previous process left active (see the module docstring)."""
        catalog = self.app.catalog
        for record in catalog.list_failover_sessions(states=ACTIVE_FAILOVER_STATES, limit=1000):
            if record.id in self._sessions:
                continue
            pid = record.details.get("pid")
            qmp_socket = str(record.details.get("qmp_socket") or "")
            alive = bool(pid and qmp_socket and process_is_ours(int(pid), qmp_socket))
            if alive and record.details.get("storage") == "local" and record.state == "running":
                try:
                    repo = self._reader(record.point_id, record.details.get("read_from"))
                    manifest = repo.get_manifest(record.point_id)
                    session = FailoverSession(self, record, manifest, repo)
                    session.process.qmp = QmpClient.connect(qmp_socket, wait=1.0)
                except (ApplianceError, QmpError):
                    pass
                else:
                    self._sessions[session.id] = session
                    session.watch_in_background()
                    continue
            if alive and pid:
                os.kill(int(pid), signal.SIGKILL)  # checked above: it is this session's QEMU
            catalog.update_failover_session(
                record.id,
                state="failed",
                details={
                    "error": "the appliance restarted while this VM ran from the backup; its "
                    "overlay is kept for a failback",
                    "failed_at": now_iso(),
                },
            )

    def shutdown(self, *, grace: float = STOP_GRACE) -> None:
        """Service stop: VMs that still need the backup export are stopped; migrated ones run on.

        Releases the manager's lock: a new manager may then adopt the migrated VMs."""
        with self._lock:
            live = list(self._sessions.values())
        for session in live:
            if not session.on_local_storage:
                with contextlib.suppress(ApplianceError):
                    session.stop(grace=grace)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
