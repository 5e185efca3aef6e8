"""Failover: boot a protected VM straight from a recovery point, prove it, migrate off, fail back.

A :class:`FailoverSession` goes through these states (recorded in the catalog's
``failover_sessions`` table, with everything measured in its ``details``)::

    starting -> booting -> running -> stopping -> stopped
                   |          |  \\-> migrating -> running (on local storage)
                   \\-> failed \\-> failed (QEMU died)

- **starting**: the point's data must be in the local store (every chunk-table and data blob in
  the index, every pack present), else the session fails before anything runs and says what must
  happen first ("recall the point from the cold tier first"). The VM's memory must fit in
  ``MemAvailable`` minus a reserve and what other sessions may still claim. Each disk is exported
  read-only over NBD (:mod:`image.nbd_export`) on a unix socket, and gets a qcow2 overlay that
  takes all writes; the store's shared lock is held while any export runs, so GC waits.
- **booting**: QEMU runs (argv from :func:`image.qemu.build_qemu_argv`, pid file and QMP socket
  per session) until every configured boot proof passes (:mod:`image.boot_proof`). The RTO is the
  time from the request (the job's creation: the click) to the proof. A screenshot is taken on
  success and on failure; a failed proof names the checks that failed and keeps its screenshot.
  A read error of the export (a damaged pack) fails the boot at once, naming the point.
  The chunks a proven boot read are kept as the asset's boot profile; the next boot's exports
  decode them ahead (:meth:`image.nbd_export.NbdExport.warm`) while QEMU starts.
- **running**: a watcher thread notices QEMU exiting on its own (the guest powered off, or a
  crash). ``migrate`` mirrors each disk (overlay plus backing) onto a local qcow2 file with
  ``blockdev-mirror``, pivots with ``block-job-complete``, removes the NBD nodes and stops the
  exports: the VM keeps running without the backup.
- **stopping/stopped**: ACPI power-down, then QMP ``quit``, then SIGKILL, and only ever to the pid
  this session started, after checking the process's command line names this session's socket.
  The overlays stay until :meth:`FailoverManager.discard`, for failback.

Failback: (a) the disks' current state becomes a new incremental recovery point; the disks are read
through ``qemu-nbd`` over the overlay chain, and when the session's point is the asset's newest,
only the ranges the guest wrote (the overlay's allocated clusters) are read at all; (b) the disks
are written, byte-exact, to their original image paths or to new files (``qemu-img convert`` of
the chain, into a temp file renamed into place).

The manager keeps live sessions in memory (one process owns QEMU children and exports). When the
appliance restarts, sessions left active are reconciled: a VM already migrated to local storage
whose QEMU still runs is adopted; one that still needed the backup export is stopped and marked
failed, its overlay kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from appliance.catalog.records import ACTIVE_FAILOVER_STATES, FailoverSessionRecord, PointRecord
from appliance.engine import Appliance
from appliance.errors import ApplianceError, Conflict, InvalidInput, LockHeld, NotFound
from appliance.jobs import JobContext, JobKind, register_job_kind
from image.boot_proof import (
    AgentCheck,
    BootProofSpec,
    Check,
    HttpCheck,
    ScreenStableCheck,
    SerialCheck,
    TcpCheck,
    poll_checks,
)
from image.nbd_export import NbdExport, export_image_over_nbd, missing_blobs
from image.qemu import (
    Bridged,
    DiskAttachment,
    Firmware,
    Isolated,
    Network,
    PortForward,
    QemuFiles,
    build_qemu_argv,
    choose_accelerator,
    convert_argv,
    create_overlay_argv,
    find_ovmf,
    free_port,
    load_accelerator,
    mem_available_mib,
    overlay_map_argv,
    process_is_ours,
    process_rss_mib,
    qemu_binary,
    run_tool,
)
from image.qemu_img import parse_map
from image.qmp import QmpClient, QmpError

#: Memory kept free for the appliance itself, by default.
MEMORY_RESERVE_MIB = 512
#: What QEMU needs beyond the guest's RAM (device models, TCG translation cache, buffers).
QEMU_OVERHEAD_MIB = 160
#: How long a guest may take to power off after the ACPI button before QEMU is told to quit.
STOP_GRACE = 30.0
SCREENSHOT_INTERVAL = 2.0
POLL_INTERVAL = 0.1
SETTINGS_KEY = "failover"
#: Unix socket paths are limited to 108 bytes; longer session dirs put sockets under /tmp.
MAX_SOCKET_DIR = 90
#: Asset names usable as file names as they are (others are hashed).
SAFE_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

ProgressCallback = Callable[[dict[str, Any]], None]


class FailoverFailed(ApplianceError):
    """The failover could not be completed."""

    code = "failover_failed"


class BootProofFailed(FailoverFailed):
    """The VM started but its boot could not be proven."""

    code = "boot_proof_failed"


class InsufficientMemory(ApplianceError):
    """There is not enough free memory on the appliance to run this VM."""

    code = "insufficient_memory"
    kind = "conflict"


class PointNotLocal(ApplianceError):
    """The recovery point's data is not in the local store; bring it back first."""

    code = "point_not_local"
    kind = "conflict"


# --- pure decisions ------------------------------------------------------------------------------


def check_memory(
    requested_mib: int, available_mib: int, reserve_mib: int, committed_mib: int
) -> str | None:
    """None when a VM of ``requested_mib`` fits, else the reason (for an InsufficientMemory)."""
    need = requested_mib + QEMU_OVERHEAD_MIB
    free = available_mib - reserve_mib - committed_mib
    if need <= free:
        return None
    return (
        f"the VM needs {requested_mib} MiB (+{QEMU_OVERHEAD_MIB} MiB for QEMU) but only "
        f"{max(free, 0)} MiB can be given: {available_mib} MiB available, {reserve_mib} MiB "
        f"reserved for the appliance, {committed_mib} MiB promised to running failovers"
    )


def pick_point(points: list[PointRecord]) -> PointRecord | None:
    """The newest verified image point, else the newest image point."""
    images = sorted((p for p in points if p.kind == "image"), key=lambda p: p.created_at)
    verified = [p for p in images if p.verify_status == "ok"]
    if verified:
        return verified[-1]
    return images[-1] if images else None


def network_from_dict(data: dict[str, Any] | None) -> Network:
    """``{"mode": "isolated", "port_forwards": [[host, guest], ...]}`` or
    ``{"mode": "bridged", "bridge": "br0"}``; host port 0 picks a free port."""
    data = dict(data or {})
    mode = data.get("mode", "isolated")
    if mode == "bridged":
        bridge = data.get("bridge")
        if not bridge or not isinstance(bridge, str):
            raise InvalidInput("a bridged failover needs the name of a host bridge")
        return Bridged(bridge=bridge)
    if mode != "isolated":
        raise InvalidInput(f"network mode must be isolated or bridged, not {mode!r}")
    forwards = []
    for item in data.get("port_forwards") or []:
        raw: tuple[Any, Any] = (
            (item.get("host", 0), item.get("guest")) if isinstance(item, dict) else tuple(item)
        )
        try:
            host, guest = int(raw[0] or 0), int(raw[1])
        except (TypeError, ValueError, IndexError) as exc:
            raise InvalidInput(f"bad port forward {item!r}") from exc
        if not (0 <= host <= 65535 and 1 <= guest <= 65535):
            raise InvalidInput(f"bad port forward {item!r}")
        forwards.append(PortForward(host, guest))
    return Isolated(port_forwards=tuple(forwards))


def resolve_forwards(network: Network, proof: BootProofSpec) -> Network:
    """Add forwards for the proof's guest ports and give host port 0 a free port."""
    if isinstance(network, Bridged):
        return network
    wanted = list(network.port_forwards)
    have = {f.guest_port for f in wanted}
    wanted += [PortForward(0, port) for port in proof.guest_ports() if port not in have]
    resolved = tuple(
        PortForward(f.host_port or free_port(f.host_address), f.guest_port, f.host_address)
        for f in wanted
    )
    return Isolated(port_forwards=resolved)


def network_to_dict(network: Network) -> dict[str, Any]:
    if isinstance(network, Bridged):
        return {"mode": "bridged", "bridge": network.bridge}
    return {
        "mode": "isolated",
        "port_forwards": [[f.host_port, f.guest_port] for f in network.port_forwards],
    }


def changed_ranges_from_map(text: str) -> list[tuple[int, int]]:
    """Ranges an overlay holds itself (allocated data or zeros), from its map without backing."""
    ranges: list[tuple[int, int]] = []
    for entry in parse_map(text):
        if entry.depth != 0 or not entry.present:
            continue  # not in the overlay itself: the guest never wrote there
        if ranges and ranges[-1][0] + ranges[-1][1] == entry.start:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + entry.length)
        else:
            ranges.append((entry.start, entry.length))
    return ranges


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class _Disk:
    name: str
    size: int
    source: str
    fmt: str
    socket: str
    overlay: str
    export: NbdExport | None = None
    local_copy: str | None = None


# --- one session -------------------------------------------------------------------------------


class FailoverSession:
    """A live failover of one VM (see the module docstring for its lifecycle)."""

    def __init__(
        self,
        manager: FailoverManager,
        record: FailoverSessionRecord,
        manifest: dict[str, Any],
    ) -> None:
        self.manager = manager
        self.app = manager.app
        self.id = record.id
        self.asset = record.asset
        self.point_id = record.point_id
        self.manifest = manifest
        self.spec: dict[str, Any] = dict(manifest.get("vm") or {})
        self.dir = os.path.join(manager.state_dir, "sessions", self.id)
        self.run_dir = _socket_dir(self.dir, self.id)
        self.screens_dir = os.path.join(manager.state_dir, "screenshots")
        self.details: dict[str, Any] = dict(record.details)
        self.state = record.state
        self.lock = threading.RLock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = self.details.get("pid")
        self.qmp: QmpClient | None = None
        self._stack = ExitStack()  # the store's shared lock while exports run
        self._stack_holds_lock = False
        self._stopping = False
        self._watcher: threading.Thread | None = None
        self.files = QemuFiles(
            qmp_socket=os.path.join(self.run_dir, "qmp.sock"),
            serial_log=os.path.join(self.dir, "serial.log"),
            pidfile=os.path.join(self.dir, "qemu.pid"),
            agent_socket=None,
        )
        self.disks = [
            _Disk(
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

    def _update(self, state: str | None = None, **details: Any) -> FailoverSessionRecord:
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
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and process_is_ours(self.pid, self.files.qmp_socket)

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
                    self.app.repo, self.manifest, disk.name, disk.socket
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
        if self.qmp is None or not self.qemu_alive():
            return None
        os.makedirs(self.screens_dir, exist_ok=True)
        path = os.path.join(self.screens_dir, f"{self.id}-{name}.png")
        tmp = f"{path}.tmp.png"
        try:
            self.qmp.screendump(tmp)
            os.replace(tmp, path)
        except (QmpError, OSError):
            return None
        return path

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
        self.files = QemuFiles(
            qmp_socket=self.files.qmp_socket,
            serial_log=self.files.serial_log,
            pidfile=self.files.pidfile,
            agent_socket=agent_socket,
        )
        argv = build_qemu_argv(
            self.spec,
            [DiskAttachment(d.overlay, d.socket, d.name) for d in self.disks],
            accel=accel,
            network=network,
            files=self.files,
            firmware=firmware,
            name=f"{self.spec.get('name', self.asset)}-failover-{self.id}",
            qemu=qemu_binary(),
        )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.files.serial_log)
        log_path = os.path.join(self.dir, "qemu.log")
        prepare_seconds = round(time.monotonic() - prepare_started, 3)
        report({"phase": "booting"})
        boot_started = time.time()
        with open(log_path, "wb") as log:
            # A session of its own: a terminal's Ctrl-C to the service must not kill the VM.
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        self.pid = self.proc.pid
        self._update(
            "booting",
            pid=self.pid,
            accel=accel,
            network=network_to_dict(network),
            proof=proof.to_dict(),
            qmp_socket=self.files.qmp_socket,
            serial_log=self.files.serial_log,
            qemu_log=log_path,
            argv=argv,
            boot_started_at=_iso(boot_started),
            prepare_seconds=prepare_seconds,
            storage="backup",
        )
        try:
            self.qmp = QmpClient.connect(self.files.qmp_socket, wait=10.0)
        except QmpError as exc:
            raise FailoverFailed(
                f"QEMU did not start: {self._qemu_log_tail() or exc.message}", session=self.id
            ) from exc
        checks = self._checks(proof, network, agent_socket)
        deadline = time.monotonic() + proof.timeout
        last_shot = 0.0
        while True:
            now = time.monotonic()
            errors = self.export_errors()
            if errors:
                raise FailoverFailed(
                    f"{errors[0]}; the VM could not read its disk",
                    session=self.id,
                    point=self.point_id,
                )
            if self.proc.poll() is not None:
                raise FailoverFailed(
                    f"QEMU exited with status {self.proc.returncode} while the VM was booting"
                    + (f": {tail}" if (tail := self._qemu_log_tail()) else ""),
                    session=self.id,
                )
            if cancel is not None and cancel.is_set():
                raise FailoverFailed("the failover was cancelled during the boot", session=self.id)
            pending = poll_checks(checks, now)
            if not pending:
                break
            if now >= deadline:
                raise BootProofFailed(
                    f"boot proof failed after {proof.timeout:g} s: "
                    + "; ".join(c.failure() for c in pending),
                    session=self.id,
                    failed_checks=[c.name for c in pending],
                )
            if now - last_shot >= SCREENSHOT_INTERVAL:
                last_shot = now
                self.screenshot("latest")
            time.sleep(POLL_INTERVAL)
        proven = time.time()
        self.manager.save_boot_profile(
            self.asset,
            self.point_id,
            {d.name: list(d.export.source.read_order) for d in self.disks if d.export is not None},
        )
        shot = self.screenshot("proof")
        stats = self.export_stats()
        record = self._update(
            "running",
            proven_at=_iso(proven),
            rto_seconds=round(proven - requested_at, 2),
            boot_seconds=round(proven - boot_started, 2),
            checks={
                c.name: round((c.passed_at or now) - (deadline - proof.timeout), 2) for c in checks
            },
            screenshot=shot,
            export_stats=stats,
            ports={str(f.guest_port): f.host_port for f in getattr(network, "port_forwards", ())},
        )
        self._watcher = threading.Thread(
            target=self._watch, name=f"failover-{self.id}", daemon=True
        )
        self._watcher.start()
        return record

    def _checks(
        self, proof: BootProofSpec, network: Network, agent_socket: str | None
    ) -> list[Check]:
        checks: list[Check] = []
        forwards = {f.guest_port: f for f in getattr(network, "port_forwards", ())}

        def reach(port: int) -> tuple[str, int]:
            if isinstance(network, Bridged):
                if not proof.address:
                    raise InvalidInput(
                        "a bridged failover's TCP/HTTP boot proof needs the guest's address"
                    )
                return proof.address, port
            forward = forwards[port]
            return forward.host_address, forward.host_port

        if proof.serial is not None:
            checks.append(SerialCheck(self.files.serial_log, proof.serial))
        if proof.tcp is not None:
            host, port = reach(proof.tcp)
            checks.append(TcpCheck(host, port, proof.tcp))
        if proof.http_port is not None:
            host, port = reach(proof.http_port)
            checks.append(
                HttpCheck(host, port, proof.http_port, proof.http_path, proof.http_expect)
            )
        if agent_socket is not None:
            checks.append(AgentCheck(agent_socket))
        if proof.screen_stable is not None:
            checks.append(ScreenStableCheck(self._capture_bytes, proof.screen_stable))
        return checks

    def _qemu_log_tail(self, limit: int = 400) -> str:
        try:
            with open(os.path.join(self.dir, "qemu.log"), errors="replace") as f:
                text = " ".join(f.read().split())
        except OSError:
            return ""
        return text[-limit:]

    def _fail_boot(self, exc: BaseException) -> None:
        message = exc.message if isinstance(exc, ApplianceError) else f"{type(exc).__name__}: {exc}"
        shot = self.screenshot("failure")
        if shot is None:
            latest = os.path.join(self.screens_dir, f"{self.id}-latest.png")
            shot = latest if os.path.isfile(latest) else None
        self._stopping = True
        self._terminate(grace=0.0)
        self.stop_exports()
        for disk in self.disks:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(disk.overlay)
        failed: dict[str, Any] = {}
        if isinstance(exc, ApplianceError) and "failed_checks" in exc.details:
            # The names, so readers need not parse them back out of the message.
            failed["failed_checks"] = _failed_checks(exc)
        self._update("failed", error=message, screenshot=shot, failed_at=_now_iso(), **failed)
        self.manager._forget(self)

    # --- running ---

    def _watch(self) -> None:
        """Notice QEMU exiting on its own (guest power-off or crash)."""
        if self.proc is not None:
            code = self.proc.wait()
        else:
            while self.pid is not None and process_is_ours(self.pid, self.files.qmp_socket):
                time.sleep(1.0)
            code = 0
        with self.lock:
            if self._stopping:
                return
            self._stopping = True
            self._close_qmp()
            self.stop_exports()
            if code == 0:
                self._update("stopped", stopped_at=_now_iso(), stopped_by="the guest powered off")
            else:
                self._update(
                    "failed",
                    failed_at=_now_iso(),
                    error=f"QEMU exited with status {code}: {self._qemu_log_tail()}",
                )
            self.manager._forget(self)

    def _close_qmp(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if not self.qemu_alive():
            # QEMU leaves its listening sockets behind when it is killed.
            for path in (self.files.qmp_socket, self.files.agent_socket):
                if path:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)

    def _terminate(self, grace: float) -> str:
        """Power-down (for ``grace`` seconds), quit, kill: only our own QEMU. Returns how."""
        if not self.qemu_alive():
            self._close_qmp()
            return "already stopped"
        how = "killed"
        if self.qmp is not None and grace > 0:
            with contextlib.suppress(QmpError):
                self.qmp.system_powerdown()
                if self._wait_exit(grace):
                    how = "powered off"
        if self.qemu_alive() and self.qmp is not None:
            with contextlib.suppress(QmpError):
                self.qmp.quit()
                if self._wait_exit(10.0):
                    how = "quit"
        if self.qemu_alive():
            pid = self.proc.pid if self.proc is not None else self.pid
            if pid is not None and process_is_ours(pid, self.files.qmp_socket):
                os.kill(pid, signal.SIGKILL)
            self._wait_exit(10.0)
        self._close_qmp()
        return how

    def _wait_exit(self, timeout: float) -> bool:
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while self.qemu_alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def stop(self, *, grace: float = STOP_GRACE) -> FailoverSessionRecord:
        with self.lock:
            if self.state not in ACTIVE_FAILOVER_STATES:
                return self.record
            self._stopping = True
            self._update("stopping")
            how = self._terminate(grace)
            self.stop_exports()
            record = self._update("stopped", stopped_at=_now_iso(), stopped_by=how)
            self.manager._forget(self)
            return record

    def migrate(
        self,
        target_dir: str | None = None,
        *,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> FailoverSessionRecord:
        """Move the running VM's disks onto local qcow2 files; the backup is then not needed."""
        with self.lock:
            if self.state != "running":
                raise Conflict(f"failover session {self.id} is {self.state}, not running")
            if self.on_local_storage:
                raise Conflict(f"failover session {self.id} already runs on local storage")
            if self.qmp is None:
                raise Conflict(f"failover session {self.id} has no QMP connection")
            target_dir = os.path.abspath(
                target_dir or os.path.join(self.manager.state_dir, "local", self.id)
            )
            os.makedirs(target_dir, exist_ok=True)
            self._update("migrating")
            qmp = self.qmp
            jobs: list[str] = []
            targets: dict[str, str] = {}
            try:
                for i, disk in enumerate(self.disks):
                    target = os.path.join(target_dir, f"{disk.name}.qcow2")
                    if os.path.exists(target):
                        raise Conflict(f"{target} already exists")
                    run_tool(create_overlay_argv(target, disk.size, None), "creating a local disk")
                    targets[disk.name] = target
                    qmp.blockdev_add(
                        {
                            "driver": "qcow2",
                            "node-name": f"m{i}",
                            "file": {"driver": "file", "filename": target},
                        }
                    )
                    qmp.blockdev_mirror(f"mirror{i}", f"d{i}", f"m{i}")
                    jobs.append(f"mirror{i}")
                self._wait_jobs_ready(qmp, jobs, progress, cancel)
                for job in jobs:
                    qmp.block_job_complete(job)
                deadline = time.monotonic() + 60
                while any(j["device"] in jobs for j in qmp.query_block_jobs()):
                    if time.monotonic() > deadline:
                        raise FailoverFailed("the mirror jobs did not complete within 60 s")
                    time.sleep(0.05)
                failed = [
                    e
                    for e in qmp.poll_events()
                    if e.get("event") == "BLOCK_JOB_COMPLETED" and e["data"].get("error")
                ]
                if failed:
                    raise FailoverFailed(f"mirroring failed: {failed[0]['data']['error']}")
            except BaseException as exc:
                for job in jobs:
                    with contextlib.suppress(QmpError):
                        qmp.block_job_cancel(job)
                for i in range(len(targets)):
                    with contextlib.suppress(QmpError):
                        qmp.blockdev_del(f"m{i}")
                for target in targets.values():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(target)
                self._update("running")
                if isinstance(exc, QmpError):
                    raise FailoverFailed(f"migration failed: {exc.message}") from exc
                raise
            # The VM's devices now use m<i>; the old overlay and NBD nodes are unused.
            for i in range(len(self.disks)):
                for node in (f"d{i}", f"d{i}-nbd"):
                    with contextlib.suppress(QmpError):
                        qmp.blockdev_del(node)
            self.stop_exports()
            for disk in self.disks:
                disk.local_copy = targets[disk.name]
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(disk.overlay)
            return self._update(
                "running", storage="local", local_disks=targets, migrated_at=_now_iso()
            )

    def _wait_jobs_ready(
        self,
        qmp: QmpClient,
        jobs: list[str],
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
    ) -> None:
        while True:
            if cancel is not None and cancel.is_set():
                raise FailoverFailed("the migration was cancelled")
            if not self.qemu_alive():
                raise FailoverFailed("QEMU exited during the migration")
            if self.export_errors():
                raise FailoverFailed(self.export_errors()[0])
            running = {j["device"]: j for j in qmp.query_block_jobs() if j["device"] in jobs}
            if len(running) < len(jobs):
                raise FailoverFailed("a mirror job ended early (see the QEMU log)")
            done = sum(int(j.get("offset", 0)) for j in running.values())
            total = sum(int(j.get("len", 0)) for j in running.values())
            if progress is not None:
                progress({"phase": "mirroring", "bytes_done": done, "bytes_total": total})
            if all(j.get("ready") for j in running.values()):
                return
            time.sleep(0.2)

    # --- failback ---

    def guest_disks(self) -> list[tuple[_Disk, str, str]]:
        """(disk, path of its current state, format) for each disk."""
        out = []
        for disk in self.disks:
            if disk.local_copy is not None:
                out.append((disk, disk.local_copy, "qcow2"))
            elif os.path.isfile(disk.overlay):
                out.append((disk, disk.overlay, "qcow2"))
            else:
                raise NotFound(
                    f"failover session {self.id} no longer has the overlay of disk {disk.name}"
                )
        return out

    def failback(
        self,
        *,
        new_point: bool = True,
        write_to: str | None = None,
        target_format: str = "raw",
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> dict[str, Any]:
        if not new_point and not write_to:
            raise InvalidInput("a failback makes a new point, writes the disks back, or both")
        with self.lock:
            if self.state in ACTIVE_FAILOVER_STATES:
                self.stop()
            disks = self.guest_disks()
            needs_export = any(disk.local_copy is None for disk, _, _ in disks)
            result: dict[str, Any] = {"session": self.id}
            try:
                if needs_export:
                    self.start_exports()
                if new_point:
                    result.update(self._failback_point(disks, progress, cancel))
                if write_to:
                    result["written"] = self._write_back(disks, write_to, target_format)
            finally:
                self.stop_exports()
            self._update(failback={**result, "at": _now_iso()})
            return result

    def _failback_point(
        self,
        disks: list[tuple[_Disk, str, str]],
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
    ) -> dict[str, Any]:
        latest = self.app.catalog.latest_point(self.asset, kind="image")
        changed: dict[str, list[tuple[int, int]]] | None = None
        if latest is not None and latest.id == self.point_id:
            # The new point's base is the point the overlays sit on: read only what was written.
            changed = {}
            for disk, path, _ in disks:
                if disk.local_copy is not None:
                    changed = None
                    break
                changed[disk.name] = changed_ranges_from_map(
                    run_tool(overlay_map_argv(path), f"mapping the overlay of {disk.name}")
                )
        paths = [path for _, path, _ in disks]
        outcome = self.app.backup_image(
            paths,
            self.asset,
            mode="incremental",
            vm_spec=self.manifest.get("vm"),
            changed_ranges=changed,
            disk_format="qcow2",
            own_disks=True,  # the session's overlay or local disks, in the failover folder
            progress=progress,
            cancel=cancel,
        )
        return {
            "point": outcome.point.id,
            "stats": outcome.stats,
            "read_only_changes": changed is not None,
        }

    def original_source(self, disk_name: str) -> str:
        """Where the VM's disk lived: the point's recorded source, or, for a point made by a
        failback (whose source is a session file), the source of its nearest ancestor."""
        manifest: dict[str, Any] | None = self.manifest
        state_dir = self.manager.state_dir + os.sep
        for _ in range(1000):
            if manifest is None:
                break
            for disk in manifest.get("disks", []):
                source = str(disk.get("source") or "")
                if disk["name"] == disk_name and source and not source.startswith(state_dir):
                    return source
            parent = manifest.get("parent")
            try:
                manifest = self.app.repo.get_manifest(parent) if parent else None
            except ApplianceError:
                manifest = None
        raise InvalidInput(f"no point of {self.asset} records where disk {disk_name} was")

    def _write_back(
        self, disks: list[tuple[_Disk, str, str]], write_to: str, target_format: str
    ) -> list[str]:
        if target_format not in ("raw", "qcow2"):
            raise InvalidInput("disks are written back as raw or qcow2")
        targets: list[str] = []
        for disk, _, _ in disks:
            if write_to == "original":
                targets.append(self.original_source(disk.name))
            elif os.path.isdir(write_to) or len(disks) > 1:
                os.makedirs(write_to, exist_ok=True)
                suffix = "img" if target_format == "raw" else target_format
                targets.append(os.path.join(write_to, f"{disk.name}.{suffix}"))
            else:
                targets.append(os.path.abspath(write_to))
        for (_disk, path, fmt), target in zip(disks, targets, strict=True):
            write_disk_image(path, fmt, target, target_format)
        return targets

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
            return self._update(discarded_at=_now_iso())


def write_disk_image(source: str, source_fmt: str, target: str, target_format: str) -> None:
    """``qemu-img convert`` the disk (following its chain) to ``target``, byte-exact.

    A regular-file target is written beside it and renamed into place; a block device is written
    in place (raw only).
    """
    try:
        st = os.stat(target)
        is_device = stat.S_ISBLK(st.st_mode)
    except FileNotFoundError:
        is_device = False
    if is_device:
        if target_format != "raw":
            raise InvalidInput("a block device can only be written as raw")
        argv = convert_argv(source, source_fmt, target, "raw")
        argv.insert(2, "-n")
        run_tool(argv, f"writing {target}")
        return
    directory = os.path.dirname(os.path.abspath(target)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".failback-", dir=directory)
    os.close(fd)
    try:
        run_tool(convert_argv(source, source_fmt, tmp, target_format), f"writing {target}")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def _socket_dir(session_dir: str, session_id: str) -> str:
    run = os.path.join(session_dir, "run")
    if len(run) <= MAX_SOCKET_DIR:
        return run
    return os.path.join(tempfile.gettempdir(), f"appliance-failover-{session_id}")


# --- per-asset settings (catalog settings, key "failover") --------------------------------------
# Module functions, not only manager methods: a CLI command (the demo VM's seed) configures an
# asset without starting a manager, which would take the manager lock a running service holds.


def failover_settings(catalog: Any) -> dict[str, Any]:
    get = getattr(catalog, "get_settings", None)
    return dict(get(SETTINGS_KEY)) if get is not None else {}


def asset_failover_settings(catalog: Any, asset: str) -> dict[str, Any]:
    """``{"proof": {...}, "network": {...}}`` configured for ``asset`` (may be empty)."""
    return dict((failover_settings(catalog).get("assets") or {}).get(asset) or {})


def put_asset_failover_settings(
    catalog: Any,
    asset: str,
    *,
    proof: dict[str, Any] | None = None,
    network: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Store the boot proof and network of an asset's failovers (validated first)."""
    put = getattr(catalog, "put_settings", None)
    if put is None:
        raise InvalidInput("this catalog cannot store settings")
    entry: dict[str, Any] = {}
    if proof is not None:
        entry["proof"] = BootProofSpec.from_dict(proof).to_dict()
    if network is not None:
        network_from_dict(network)
        entry["network"] = dict(network)
    settings = failover_settings(catalog)
    assets = dict(settings.get("assets") or {})
    assets[asset] = {**dict(assets.get(asset) or {}), **entry}
    settings["assets"] = assets
    put(SETTINGS_KEY, settings)
    return dict(assets[asset])


# --- the manager ---------------------------------------------------------------------------------


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

    def _profile_path(self, asset: str) -> str:
        safe = asset if SAFE_FILE_NAME.match(asset) else hashlib.sha256(asset.encode()).hexdigest()
        return os.path.join(self.state_dir, "boot-profiles", f"{safe}.json")

    def boot_profile(self, asset: str) -> dict[str, list[int]]:
        """{disk name: chunk indices} the last proven boot of ``asset`` read, in order (or {})."""
        try:
            with open(self._profile_path(asset), encoding="utf-8") as f:
                disks = json.load(f).get("disks") or {}
        except (OSError, ValueError, AttributeError):
            return {}
        if not isinstance(disks, dict):
            return {}
        return {
            str(name): [i for i in indices if isinstance(i, int)]
            for name, indices in disks.items()
            if isinstance(indices, list)
        }

    def save_boot_profile(self, asset: str, point_id: str, disks: dict[str, list[int]]) -> None:
        """Keep what a proven boot read; the next failover of ``asset`` warms its cache with it.
        A profile that cannot be written only costs the next boot its head start."""
        if not any(disks.values()):
            return
        path = self._profile_path(asset)
        document = {"asset": asset, "point": point_id, "recorded_at": _now_iso(), "disks": disks}
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(document, f)
            os.replace(tmp, path)

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
        with self._lock:
            self._sessions.pop(session.id, None)

    def session(self, session_id: str) -> FailoverSession:
        with self._lock:
            live = self._sessions.get(session_id)
        if live is not None:
            return live
        record = self.app.catalog.get_failover_session(session_id)
        manifest = self.app.repo.get_manifest(record.point_id)
        return FailoverSession(self, record, manifest)

    def get(self, session_id: str) -> dict[str, Any]:
        """The session's record as a dict, with live export counters while it runs."""
        with self._lock:
            live = self._sessions.get(session_id)
        record = self.app.catalog.get_failover_session(session_id)
        info = _record_dict(record)
        if live is not None:
            stats = live.export_stats()
            if stats:
                info["details"]["export_stats"] = stats
            info["live"] = True
        else:
            info["live"] = False
        return info

    def list(self, asset: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return [
            _record_dict(r) for r in self.app.catalog.list_failover_sessions(asset, limit=limit)
        ]

    def _committed_mib(self) -> int:
        with self._lock:
            live = list(self._sessions.values())
        total = 0
        for session in live:
            memory = int(session.spec.get("memory_mib", 512)) + QEMU_OVERHEAD_MIB
            rss = process_rss_mib(session.pid) if session.pid else 0
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
    ) -> FailoverSessionRecord:
        """Fail ``asset`` over to ``point`` (default: its newest verified image point).

        Blocks until the boot is proven (returns the running session's record) or failed (raises
        with the session's id in ``details``). ``requested_at`` (epoch seconds) is the click; the
        RTO counts from it.
        """
        requested_at = requested_at or time.time()
        configured = self.asset_settings(asset)
        if not isinstance(proof, BootProofSpec):
            proof = BootProofSpec.from_dict(proof if proof is not None else configured.get("proof"))
        proof = proof.effective()
        if not isinstance(network, Isolated | Bridged):
            network = network_from_dict(
                network if network is not None else configured.get("network")
            )
        if purpose not in ("failover", "boot_test"):
            raise InvalidInput("purpose must be failover or boot_test")
        record = self._pick(asset, point)
        manifest = self.app.repo.get_manifest(record.id)
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
        missing = missing_blobs(self.app.repo, manifest["disks"])
        if missing["tables"] or missing["blobs"] or missing["packs"]:
            parts = []
            if missing["tables"]:
                parts.append(f"{len(missing['tables'])} chunk table(s)")
            if missing["blobs"]:
                parts.append(f"{missing['blobs']} data chunk(s) (e.g. {missing['example'][:16]})")
            if missing["packs"]:
                parts.append(f"pack(s) {', '.join(p[:16] for p in missing['packs'][:5])}")
            raise PointNotLocal(
                f"point {record.id} of {asset} is not in the local store: missing "
                + ", ".join(parts)
                + "; recall the point from the cold tier (or attach its media) first",
                point=record.id,
                missing=missing,
            )
        reserve = (
            self.memory_reserve_mib
            if self.memory_reserve_mib is not None
            else int(self.settings().get("memory_reserve_mib", MEMORY_RESERVE_MIB))
        )
        reason = check_memory(
            int(vm.get("memory_mib", 512)), mem_available_mib(), reserve, self._committed_mib()
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
                    "requested_at": _iso(requested_at),
                    "vm": vm,
                    "check_seconds": round(time.monotonic() - check_started, 3),
                },
            )
            session = FailoverSession(self, created, manifest)
            self._sessions[session.id] = session
        return session.boot(
            network=network,
            proof=proof,
            accel=accel,
            requested_at=requested_at,
            cancel=cancel,
            progress=progress,
        )

    def _pick(self, asset: str, point: str | None) -> PointRecord:
        if point:
            record = self.app.catalog.get_point(point)
            if record.asset != asset:
                raise InvalidInput(f"point {record.id} belongs to {record.asset}, not {asset}")
            if record.kind != "image":
                raise InvalidInput(f"point {record.id} is not a VM image point")
            return record
        chosen = pick_point(self.app.catalog.list_points(asset=asset))
        if chosen is None:
            raise NotFound(f"{asset} has no VM image recovery point to fail over to", asset=asset)
        return chosen

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
        return live.migrate(target_dir, progress=progress, cancel=cancel)

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
        return self.session(session_id).failback(
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
    ) -> dict[str, Any]:
        """Boot a point isolated, record its RTO and screenshot, shut it down, discard it."""
        configured = self.asset_settings(asset)
        forwards = (configured.get("network") or {}).get("port_forwards")
        network = network_from_dict({"mode": "isolated", "port_forwards": forwards or []})
        try:
            record = self.start(
                asset,
                point,
                network=network,
                proof=proof,
                accel=accel,
                purpose="boot_test",
                requested_at=requested_at,
                cancel=cancel,
                progress=progress,
            )
        except ApplianceError as exc:
            session_id = exc.details.get("session")
            return {
                "asset": asset,
                "ok": False,
                "error": exc.message,
                "code": exc.code,
                "session": session_id,
                "failed_checks": _failed_checks(exc),
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
                return _record_dict(record)
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
                    manifest = self.app.repo.get_manifest(record.point_id)
                    session = FailoverSession(self, record, manifest)
                    session.qmp = QmpClient.connect(qmp_socket, wait=1.0)
                except (ApplianceError, QmpError):
                    pass
                else:
                    self._sessions[session.id] = session
                    session._watcher = threading.Thread(
                        target=session._watch, name=f"failover-{session.id}", daemon=True
                    )
                    session._watcher.start()
                    continue
            if alive and pid:
                os.kill(int(pid), signal.SIGKILL)  # checked above: it is this session's QEMU
            catalog.update_failover_session(
                record.id,
                state="failed",
                details={
                    "error": "the appliance restarted while this VM ran from the backup; its "
                    "overlay is kept for a failback",
                    "failed_at": _now_iso(),
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


def _failed_checks(exc: ApplianceError) -> list[str]:
    """The names of the boot-proof checks ``exc`` says did not pass (none for other errors)."""
    checks = exc.details.get("failed_checks")
    return [str(name) for name in checks] if isinstance(checks, list) else []


def _record_dict(record: FailoverSessionRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "asset": record.asset,
        "point_id": record.point_id,
        "state": record.state,
        "started_at": record.started_at.isoformat(),
        "details": dict(record.details),
    }


# --- job kinds -----------------------------------------------------------------------------------


def _requested_at(app: Appliance, ctx: JobContext) -> float:
    try:
        return app.catalog.get_job(ctx.job_id).created_at.timestamp()
    except ApplianceError:
        return time.time()


def boot_test_resources(p: dict[str, Any]) -> list[tuple[str, bool]]:
    """A boot test holds its asset exclusively, as backups of it do (``asset:<name>``).

    So a boot test queued with (after) a backup of the same VM waits for it and tests the point
    it made, and a backup queued while a test boots waits for the test. Boot tests of different
    assets share only the store and run side by side. ``failover_start`` does not take the
    asset: the resource is held for the job (boot, proof, shutdown, discard), never for the life
    of a failed-over VM, and a failover never waits for a backup or a boot test.
    """
    if not p.get("asset"):
        raise InvalidInput("name the VM asset to boot-test")
    return [(f"asset:{p['asset']}", True), ("store", False)]


def register_failover_jobs(manager: FailoverManager) -> None:
    """Register the failover job kinds, bound to ``manager`` (call once at service start-up).

    - ``failover_start`` {asset, point?, network?, proof?, accel?}: export, boot, prove.
    - ``failover_stop`` {session, discard?}: power down (then quit, then kill).
    - ``failover_migrate`` {session, target_dir?}: mirror the disks to local storage and pivot.
    - ``failover_failback`` {session, new_point?=true, write_to?: "original"|path, format?}.
    - ``boot_test`` {asset, point?, proof?}: isolated boot, RTO and screenshot, then discard.
    """

    def start(app: Appliance, p: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        ctx.log(
            "info",
            f"failing over {p['asset']}" + (f" to point {p['point']}" if p.get("point") else ""),
        )
        record = manager.start(
            p["asset"],
            p.get("point"),
            network=p.get("network"),
            proof=p.get("proof"),
            accel=p.get("accel"),
            requested_at=_requested_at(app, ctx),
            cancel=ctx.cancel,
            progress=ctx.progress,
        )
        details = record.details
        ctx.log("info", f"session {record.id} booted; RTO {details.get('rto_seconds')} s")
        return {
            "session": record.id,
            "point": record.point_id,
            "state": record.state,
            "rto_seconds": details.get("rto_seconds"),
            "screenshot": details.get("screenshot"),
            "ports": details.get("ports"),
            "accel": details.get("accel"),
        }

    def stop(app: Appliance, p: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        record = manager.stop(p["session"])
        if p.get("discard"):
            record = manager.discard(p["session"])
        ctx.log("info", f"session {record.id} {record.state} ({record.details.get('stopped_by')})")
        return {"session": record.id, "state": record.state}

    def migrate(app: Appliance, p: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        record = manager.migrate(
            p["session"], p.get("target_dir"), progress=ctx.progress, cancel=ctx.cancel
        )
        ctx.log("info", f"session {record.id} now runs on local storage")
        return {"session": record.id, "local_disks": record.details.get("local_disks")}

    def failback(app: Appliance, p: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        result = manager.failback(
            p["session"],
            new_point=bool(p.get("new_point", True)),
            write_to=p.get("write_to"),
            target_format=p.get("format", "raw"),
            progress=ctx.progress,
            cancel=ctx.cancel,
        )
        if result.get("point"):
            ctx.log("info", f"failback recorded point {result['point']}")
        for target in result.get("written", []):
            ctx.log("info", f"wrote {target}")
        return result

    def boot_test(app: Appliance, p: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        result = manager.boot_test(
            p["asset"],
            p.get("point"),
            proof=p.get("proof"),
            accel=p.get("accel"),
            requested_at=_requested_at(app, ctx),
            cancel=ctx.cancel,
            progress=ctx.progress,
        )
        if result["ok"]:
            ctx.log("info", f"{p['asset']} booted in {result['rto_seconds']} s")
        else:
            ctx.log("error", f"boot test of {p['asset']} failed: {result['error']}")
            raise BootProofFailed(
                result["error"],
                session=result.get("session"),
                failed_checks=result.get("failed_checks") or [],
            )
        return result

    def store_shared(p: dict[str, Any]) -> list[tuple[str, bool]]:
        if not p.get("asset"):
            raise InvalidInput("name the VM asset to fail over")
        # Not the asset: a failover must not wait for a backup of the VM it recovers.
        return [("store", False)]

    def per_session(p: dict[str, Any]) -> list[tuple[str, bool]]:
        if not p.get("session"):
            raise InvalidInput("name the failover session")
        return [(f"failover:{p['session']}", True)]

    def failback_resources(p: dict[str, Any]) -> list[tuple[str, bool]]:
        return [*per_session(p), ("store", False)]

    register_job_kind(
        "failover_start",
        JobKind(start, store_shared, False, lambda p: f"failover of {p.get('asset')}"),
    )
    register_job_kind(
        "failover_stop",
        JobKind(stop, per_session, False, lambda p: f"stop of failover {p.get('session')}"),
    )
    register_job_kind(
        "failover_migrate",
        JobKind(migrate, per_session, False, lambda p: f"migration of failover {p.get('session')}"),
    )
    register_job_kind(
        "failover_failback",
        JobKind(
            failback,
            failback_resources,
            False,
            lambda p: f"failback of failover {p.get('session')}",
        ),
    )
    register_job_kind(
        "boot_test",
        JobKind(boot_test, boot_test_resources, True, lambda p: f"boot test of {p.get('asset')}"),
    )
