"""One live failover of a VM: its exports, overlays, QEMU, boot proof and state.

A :class:`FailoverSession` goes through these states (recorded in the catalog's
``failover_sessions`` table, with everything measured in its ``details``)::

    starting -> booting -> running -> stopping -> stopped
                   |          |  \\-> migrating -> running (on local storage)
                   \\-> failed \\-> failed (QEMU died)

- **starting** (the manager's admission checks passed): each disk is exported read-only over NBD
  (:mod:`image.nbd_export`) on a unix socket, and gets a qcow2 overlay that takes all writes;
  the store's shared lock is held while any export runs, so GC waits.
- **booting**: QEMU runs (argv from :func:`image.qemu.build_qemu_argv`, pid file and QMP socket
  per session: :mod:`image.failover.process`) until every configured boot proof passes
  (:mod:`image.failover.proof`). A screenshot is taken on success and on failure; a failed boot
  kills QEMU, stops the exports, deletes the overlays and keeps its screenshot. The chunks a
  proven boot read are kept as the asset's boot profile; the next boot's exports decode them
  ahead (:meth:`image.nbd_export.NbdExport.warm`) while QEMU starts.
- **running**: a watcher thread notices QEMU exiting on its own (the guest powered off: stopped;
  a crash: failed). Migration to local disks: :mod:`image.failover.migrate`.
- **stopping/stopped**: the process is stopped (:meth:`QemuProcess.terminate`) and the exports
  end. The overlays stay until :meth:`FailoverSession.discard`, for failback
  (:mod:`image.failover.failback`).

Every state change goes through :meth:`FailoverSession.update`, which writes the catalog record
and the in-memory copy together. ``lock`` serialises stop, migrate, failback and the watcher.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from appliance.catalog.records import ACTIVE_FAILOVER_STATES, FailoverSessionRecord
from appliance.errors import ApplianceError, Conflict
from appliance.store.repository import Repository
from image.boot_proof import BootProofSpec
from image.failover.errors import FailoverFailed
from image.failover.network import network_to_dict, resolve_forwards
from image.failover.process import STOP_GRACE, QemuProcess, socket_dir
from image.failover.proof import build_checks, failed_checks, proof_timings, prove_boot
from image.failover.records import epoch_iso, now_iso
from image.nbd_export import NbdExport, export_image_over_nbd
from image.qemu import (
    DiskAttachment,
    Firmware,
    Network,
    QemuFiles,
    build_qemu_argv,
    create_overlay_argv,
    find_ovmf,
    qemu_binary,
    run_tool,
)
from image.qmp import QmpError

if TYPE_CHECKING:
    from image.failover.manager import FailoverManager

#: Receives a job's progress reports (``{"phase": ...}``, bytes done and total).
ProgressCallback = Callable[[dict[str, Any]], None]


@dataclass
class SessionDisk:
    """One disk of the failed-over VM: its export, overlay and (after migration) local copy."""

    name: str
    size: int
    source: str
    fmt: str
    socket: str
    overlay: str
    export: NbdExport | None = None
    local_copy: str | None = None


class FailoverSession:
    """A live failover of one VM (see the module docstring for its lifecycle)."""

    def __init__(
        self,
        manager: FailoverManager,
        record: FailoverSessionRecord,
        manifest: dict[str, Any],
        repo: Repository | None = None,
    ) -> None:
        self.manager = manager
        self.app = manager.app
        #: Where the exports read the point: its best copy, falling back to the others.
        self.repo = repo if repo is not None else manager.app.repo
        self.id = record.id
        self.asset = record.asset
        self.point_id = record.point_id
        self.manifest = manifest
        self.spec: dict[str, Any] = dict(manifest.get("vm") or {})
        self.dir = os.path.join(manager.state_dir, "sessions", self.id)
        self.run_dir = socket_dir(self.dir, self.id)
        self.screens_dir = os.path.join(manager.state_dir, "screenshots")
        self.details: dict[str, Any] = dict(record.details)
        self.state = record.state
        self.lock = threading.RLock()
        self.process = QemuProcess(
            QemuFiles(
                qmp_socket=os.path.join(self.run_dir, "qmp.sock"),
                serial_log=os.path.join(self.dir, "serial.log"),
                pidfile=os.path.join(self.dir, "qemu.pid"),
                agent_socket=None,
                # The console: QEMU's VNC on a socket only the service reaches (no TCP port).
                vnc_socket=os.path.join(self.run_dir, "vnc.sock"),
            ),
            log_path=os.path.join(self.dir, "qemu.log"),
            pid=self.details.get("pid"),
        )
        self._stack = ExitStack()  # the store's shared lock while exports run
        self._stack_holds_lock = False
        self._stopping = False
        self._watcher: threading.Thread | None = None
        self.disks = [
            SessionDisk(
                name=str(d["name"]),
                size=int(d["size"]),
                source=str(d.get("source") or ""),
                fmt=str(d.get("format") or "raw"),
                socket=os.path.join(self.run_dir, f"{i}.sock"),
                overlay=os.path.join(self.dir, f"{d['name']}.qcow2"),
                local_copy=(self.details.get("local_disks") or {}).get(str(d["name"])),
            )
            for i, d in enumerate(manifest.get("disks", []))
        ]

    # --- bookkeeping ---

    def update(self, state: str | None = None, **details: Any) -> FailoverSessionRecord:
        """Record a state change and/or details, in the catalog and in this object."""
        self.details.update(details)
        if state is not None:
            self.state = state
        return self.manager.app.catalog.update_failover_session(
            self.id, state=state, details=details or None
        )

    @property
    def record(self) -> FailoverSessionRecord:
        return self.manager.app.catalog.get_failover_session(self.id)

    @property
    def on_local_storage(self) -> bool:
        return self.details.get("storage") == "local"

    def qemu_alive(self) -> bool:
        return self.process.alive()

    def export_stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for disk in self.disks:
            if disk.export is None:
                continue
            for key, value in disk.export.stats.to_dict().items():
                total[key] = total.get(key, 0) + value
        return total

    def export_errors(self) -> list[str]:
        errors: list[str] = []
        for disk in self.disks:
            if disk.export is not None:
                errors += disk.export.errors
        return errors

    # --- exports ---

    def start_exports(self) -> None:
        if all(d.export is not None for d in self.disks):
            return
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        if not self._stack_holds_lock:
            self._stack.enter_context(self.app.locks.shared())
            self._stack_holds_lock = True
        for disk in self.disks:
            if disk.export is None:
                disk.export = export_image_over_nbd(
                    self.repo, self.manifest, disk.name, disk.socket
                )

    def stop_exports(self) -> None:
        stats = self.export_stats()
        if stats:
            # Kept for the page: what the boot (and later reads) cost the store.
            self.details["export_stats"] = stats
        for disk in self.disks:
            if disk.export is not None:
                disk.export.stop()
                disk.export = None
        self._stack.close()
        self._stack = ExitStack()
        self._stack_holds_lock = False
        if not self.qemu_alive():
            with contextlib.suppress(OSError):
                os.rmdir(self.run_dir)  # only when empty: QEMU's sockets may still be there

    # --- screenshots ---

    def screenshot(self, name: str = "latest") -> str | None:
        """A fresh PNG of the console (None when QEMU is not running)."""
        return self.process.screenshot(os.path.join(self.screens_dir, f"{self.id}-{name}.png"))

    def _capture_bytes(self) -> bytes | None:
        path = self.screenshot("latest")
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    # --- boot ---

    def boot(
        self,
        *,
        network: Network,
        proof: BootProofSpec,
        accel: str,
        requested_at: float,
        cancel: threading.Event | None = None,
        progress: ProgressCallback | None = None,
    ) -> FailoverSessionRecord:
        """Export, create overlays, start QEMU and prove the boot; failure cleans up and raises."""
        try:
            return self._boot(network, proof, accel, requested_at, cancel, progress)
        except BaseException as exc:
            self._fail_boot(exc)
            raise

    def _boot(
        self,
        network: Network,
        proof: BootProofSpec,
        accel: str,
        requested_at: float,
        cancel: threading.Event | None,
        progress: ProgressCallback | None,
    ) -> FailoverSessionRecord:
        os.makedirs(self.dir, exist_ok=True)
        report = progress or (lambda info: None)
        report({"phase": "exporting"})
        prepare_started = time.monotonic()
        self.start_exports()
        profile = self.manager.boot_profile(self.asset)
        for disk in self.disks:
            assert disk.export is not None
            # While QEMU and the firmware start, decode what the last boot of this VM read.
            disk.export.warm(profile.get(disk.name) or [])
        for disk in self.disks:
            assert disk.export is not None
            run_tool(
                create_overlay_argv(disk.overlay, disk.size, disk.export.uri()),
                f"creating the overlay of disk {disk.name}",
            )
        firmware = None
        if self.spec.get("firmware") == "uefi":
            code, template = find_ovmf()
            vars_copy = os.path.join(self.dir, "OVMF_VARS.fd")
            shutil.copyfile(template, vars_copy)
            firmware = Firmware(code=code, vars=vars_copy)
        network = resolve_forwards(network, proof)
        agent_socket = os.path.join(self.run_dir, "qga.sock") if proof.agent else None
        files = self.process.files
        files = self.process.files = QemuFiles(
            qmp_socket=files.qmp_socket,
            serial_log=files.serial_log,
            pidfile=files.pidfile,
            agent_socket=agent_socket,
            vnc_socket=files.vnc_socket,
        )
        argv = build_qemu_argv(
            self.spec,
            [DiskAttachment(d.overlay, d.socket, d.name) for d in self.disks],
            accel=accel,
            network=network,
            files=files,
            firmware=firmware,
            name=f"{self.spec.get('name', self.asset)}-failover-{self.id}",
            qemu=qemu_binary(),
        )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(files.serial_log)
        prepare_seconds = round(time.monotonic() - prepare_started, 3)
        report({"phase": "booting"})
        boot_started = time.time()
        pid = self.process.launch(argv)
        self.update(
            "booting",
            pid=pid,
            accel=accel,
            network=network_to_dict(network),
            proof=proof.to_dict(),
            qmp_socket=files.qmp_socket,
            vnc_socket=files.vnc_socket,
            serial_log=files.serial_log,
            qemu_log=self.process.log_path,
            argv=argv,
            boot_started_at=epoch_iso(boot_started),
            prepare_seconds=prepare_seconds,
            storage="backup",
        )
        try:
            self.process.connect(wait=10.0)
        except QmpError as exc:
            raise FailoverFailed(
                f"QEMU did not start: {self.process.log_tail() or exc.message}", session=self.id
            ) from exc
        checks = build_checks(proof, network, files.serial_log, agent_socket, self._capture_bytes)
        proving_started, passed = prove_boot(self, checks, proof, cancel)
        proven = time.time()
        self.manager.save_boot_profile(
            self.asset,
            self.point_id,
            {d.name: list(d.export.source.read_order) for d in self.disks if d.export is not None},
        )
        shot = self.screenshot("proof")
        stats = self.export_stats()
        record = self.update(
            "running",
            proven_at=epoch_iso(proven),
            **proof_timings(
                checks,
                requested_at=requested_at,
                boot_started=boot_started,
                proven=proven,
                proving_started=proving_started,
                passed=passed,
            ),
            screenshot=shot,
            export_stats=stats,
            ports={str(f.guest_port): f.host_port for f in getattr(network, "port_forwards", ())},
        )
        self.watch_in_background()
        return record

    def _fail_boot(self, exc: BaseException) -> None:
        message = exc.message if isinstance(exc, ApplianceError) else f"{type(exc).__name__}: {exc}"
        shot = self.screenshot("failure")
        if shot is None:
            latest = os.path.join(self.screens_dir, f"{self.id}-latest.png")
            shot = latest if os.path.isfile(latest) else None
        self._stopping = True
        self.process.terminate(grace=0.0)
        self.stop_exports()
        for disk in self.disks:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(disk.overlay)
        failed: dict[str, Any] = {}
        if isinstance(exc, ApplianceError) and "failed_checks" in exc.details:
            # The names, so readers need not parse them back out of the message.
            failed["failed_checks"] = failed_checks(exc)
        self.update("failed", error=message, screenshot=shot, failed_at=now_iso(), **failed)
        self.manager._forget(self)

    # --- running ---

    def watch_in_background(self) -> None:
        """Start the thread that notices QEMU exiting on its own."""
        self._watcher = threading.Thread(
            target=self._watch, name=f"failover-{self.id}", daemon=True
        )
        self._watcher.start()

    def _watch(self) -> None:
        """Notice QEMU exiting on its own (guest power-off or crash)."""
        code = self.process.wait()
        with self.lock:
            if self._stopping:
                return
            self._stopping = True
            self.process.close_qmp()
            self.stop_exports()
            if code == 0:
                self.update("stopped", stopped_at=now_iso(), stopped_by="the guest powered off")
            else:
                self.update(
                    "failed",
                    failed_at=now_iso(),
                    error=f"QEMU exited with status {code}: {self.process.log_tail()}",
                )
            self.manager._forget(self)

    def stop(self, *, grace: float = STOP_GRACE) -> FailoverSessionRecord:
        with self.lock:
            if self.state not in ACTIVE_FAILOVER_STATES:
                return self.record
            self._stopping = True
            self.update("stopping")
            how = self.process.terminate(grace)
            self.stop_exports()
            record = self.update("stopped", stopped_at=now_iso(), stopped_by=how)
            self.manager._forget(self)
            return record

    # --- discarding ---

    def discard(self) -> FailoverSessionRecord:
        """Delete a stopped session's overlays and local copies (screenshots are kept)."""
        with self.lock:
            if self.state in ACTIVE_FAILOVER_STATES:
                raise Conflict(f"failover session {self.id} is {self.state}; stop it first")
            shutil.rmtree(self.dir, ignore_errors=True)
            if self.run_dir != os.path.join(self.dir, "run"):
                shutil.rmtree(self.run_dir, ignore_errors=True)
            local = os.path.join(self.manager.state_dir, "local", self.id)
            shutil.rmtree(local, ignore_errors=True)
            return self.update(discarded_at=now_iso())
