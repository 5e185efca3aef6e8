"""The QEMU process of a session: start it, know it by pid and control socket, stop it.

A :class:`QemuProcess` is one QEMU child with its per-session files (:class:`image.qemu.QemuFiles`:
QMP socket, serial log, pid file, guest-agent socket, VNC socket) and a log of its
stdout/stderr. It is either started by this process (:meth:`QemuProcess.launch`, in a session of
its own, so a terminal's Ctrl-C to the service does not reach the VM) or adopted after a restart,
known only by its pid.

Invariants:

- Signals only ever go to the pid this session started, and only after checking that the
  process's command line names this session's QMP socket (:func:`image.qemu.process_is_ours`):
  a recycled pid is never killed.
- Stopping escalates: ACPI power-down (for ``grace`` seconds), then QMP ``quit``, then SIGKILL.
- QEMU leaves its listening sockets behind when it is killed; they are removed once it is gone.
- Unix socket paths are limited to 108 bytes: a session directory too deep for them gets its
  sockets under the temporary directory (:func:`socket_dir`).

Nothing here knows about failover states or the catalog; an OS-image boot test can run a QEMU of
its own with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time

from image.qemu import QemuFiles, process_is_ours
from image.qmp import QmpClient, QmpError

#: How long a guest may take to power off after the ACPI button before QEMU is told to quit.
STOP_GRACE = 30.0
#: Unix socket paths are limited to 108 bytes; longer session dirs put sockets under /tmp.
MAX_SOCKET_DIR = 90


def socket_dir(session_dir: str, session_id: str) -> str:
    """Where a session's sockets go: ``<session dir>/run``, or a temp dir when that is too long."""
    run = os.path.join(session_dir, "run")
    if len(run) <= MAX_SOCKET_DIR:
        return run
    return os.path.join(tempfile.gettempdir(), f"appliance-failover-{session_id}")


class QemuProcess:
    """One QEMU, started here (``proc``) or adopted by ``pid``, with its QMP connection."""

    def __init__(self, files: QemuFiles, log_path: str, pid: int | None = None) -> None:
        self.files = files
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = pid
        self.qmp: QmpClient | None = None

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and process_is_ours(self.pid, self.files.qmp_socket)

    def launch(self, argv: list[str]) -> int:
        """Start QEMU with ``argv`` (its output to the log); returns its pid."""
        with open(self.log_path, "wb") as log:
            # A session of its own: a terminal's Ctrl-C to the service must not kill the VM.
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        self.pid = self.proc.pid
        return self.pid

    def connect(self, wait: float) -> QmpClient:
        """Connect to QMP, waiting up to ``wait`` seconds for the socket (raises QmpError)."""
        self.qmp = QmpClient.connect(self.files.qmp_socket, wait=wait)
        return self.qmp

    def poll(self) -> int | None:
        """The exit status of a QEMU started here once it has exited, else None."""
        return self.proc.poll() if self.proc is not None else None

    def wait(self) -> int:
        """Block until QEMU exits; its status (0 for an adopted one, whose status is unknown)."""
        if self.proc is not None:
            return self.proc.wait()
        while self.pid is not None and process_is_ours(self.pid, self.files.qmp_socket):
            time.sleep(1.0)
        return 0

    def log_tail(self, limit: int = 400) -> str:
        """The end of QEMU's own output, on one line (for error messages)."""
        try:
            with open(self.log_path, errors="replace") as f:
                text = " ".join(f.read().split())
        except OSError:
            return ""
        return text[-limit:]

    def screenshot(self, path: str) -> str | None:
        """A PNG of the console at ``path`` (written beside it and renamed); None if not running."""
        if self.qmp is None or not self.alive():
            return None
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp.png"
        try:
            self.qmp.screendump(tmp)
            os.replace(tmp, path)
        except (QmpError, OSError):
            return None
        return path

    def close_qmp(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if not self.alive():
            # QEMU leaves its listening sockets behind when it is killed.
            for path in (self.files.qmp_socket, self.files.agent_socket, self.files.vnc_socket):
                if path:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)

    def terminate(self, grace: float) -> str:
        """Power-down (for ``grace`` seconds), quit, kill: only our own QEMU. Returns how."""
        if not self.alive():
            self.close_qmp()
            return "already stopped"
        how = "killed"
        if self.qmp is not None and grace > 0:
            with contextlib.suppress(QmpError):
                self.qmp.system_powerdown()
                if self.wait_exit(grace):
                    how = "powered off"
        if self.alive() and self.qmp is not None:
            with contextlib.suppress(QmpError):
                self.qmp.quit()
                if self.wait_exit(10.0):
                    how = "quit"
        if self.alive():
            pid = self.proc.pid if self.proc is not None else self.pid
            if pid is not None and process_is_ours(pid, self.files.qmp_socket):
                os.kill(pid, signal.SIGKILL)
            self.wait_exit(10.0)
        self.close_qmp()
        return how

    def wait_exit(self, timeout: float) -> bool:
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True
