"""A real OpenSSH server on 127.0.0.1 for the SFTP tests (recipe: ../shared/testbed/p1_sshd.sh).

:class:`TestSshd` runs ``/usr/sbin/sshd -D -e -f CONF -p PORT`` on a free loopback port with its
own host key and ``authorized_keys``, ``StrictModes no`` (the files live under /tmp) and ``UsePAM
no``; it logs in as the user running the tests. It is stopped by its own pid. A missing
``openssh-server`` fails the test loudly: a skipped SFTP suite would hide that pulls were never
tested against a real server.
"""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
INSTALL = "apt-get install openssh-server"


def require_openssh() -> None:
    for tool in (SSHD, SFTP_SERVER, "/usr/bin/ssh-keygen"):
        if not os.path.exists(tool):
            pytest.fail(f"{tool} is missing: {INSTALL}", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_host_key(path: Path) -> Path:
    """A fresh ed25519 host key at ``path`` (``path.pub`` beside it)."""
    for old in (path, path.with_name(path.name + ".pub")):
        if old.exists():
            old.unlink()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test-host", "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


class TestSshd:
    """One sshd; ``authorized`` is the public line allowed to log in."""

    __test__ = False  # not a test class, despite its name

    def __init__(self, folder: Path, authorized: str) -> None:
        require_openssh()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        self.user = getpass.getuser()
        self.port = free_port()
        self.host_key = new_host_key(folder / "host_ed25519")
        self.authorized_keys = folder / "authorized_keys"
        self.authorized_keys.write_text(authorized.strip() + "\n")
        os.chmod(self.authorized_keys, 0o600)
        self.config = folder / "sshd_config"
        self.log = folder / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> None:
        self.config.write_text(
            f"ListenAddress 127.0.0.1\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.folder / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\n"
            "StrictModes no\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            f"Subsystem sftp {SFTP_SERVER}\n"
            "LogLevel VERBOSE\n"
        )

    def start(self) -> TestSshd:
        self._write_config()
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", exist_ok=True)  # privilege separation; sshd needs it
        check = subprocess.run([SSHD, "-t", "-f", str(self.config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config), "-p", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sshd exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"sshd did not listen on {self.port}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.kill_sessions()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self, *, new_key: bool = False) -> None:
        """Stop and start again on the same port; ``new_key``: as a reinstalled host would."""
        self.stop()
        if new_key:
            new_host_key(self.host_key)
        self.start()

    def kill_sessions(self) -> int:
        """SIGKILL every process below the listener (the connections' sshd and sftp-server):
        the links drop as if the host went away; the listener keeps accepting."""
        if self.proc is None:
            return 0
        pending = _children(self.proc.pid)
        killed = 0
        while pending:
            pid = pending.pop()
            pending.extend(_children(pid))
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        return killed

    def host_public_line(self) -> tuple[str, str]:
        """(key type, base64) of the current host key."""
        parts = Path(str(self.host_key) + ".pub").read_text().split()
        return parts[0], parts[1]
