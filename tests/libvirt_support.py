"""A libvirt host on loopback for the libvirt tests: sshd, virtlogd, libvirtd and a TCG domain.

- :class:`TestSshd`: ``/usr/sbin/sshd`` on a free 127.0.0.1 port with its own host key and an
  ``authorized_keys`` file the test fills with the appliance's public key (sshd reads it at
  each login, so it can be written after start).
- :class:`LibvirtDaemons`: ``virtlogd`` and ``libvirtd`` started by hand in system mode, as
  ``../shared/testbed/p2_libvirt.sh`` does (no service manager). A libvirtd already answering on
  ``qemu:///system`` is used as it is and left running; daemons started here are stopped by the
  pid they wrote, nothing else.
- :func:`define_guest`: the failover test guest (``image.testguest``), converted to qcow2 (the
  format checkpoints need), defined as a ``type='qemu'`` domain with no network, its serial
  console in a file so the test can wait for the boot marker. Domains are named
  ``appliance-test-<random>`` and only those are undefined.

Missing tools FAIL (never skip) with the install step: the host prep is ``scripts/setup``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

SYSTEM = "qemu:///system"
SETUP = (
    "run scripts/setup as root (apt-get install --no-install-recommends libvirt-daemon "
    "libvirt-daemon-driver-qemu libvirt-clients openssh-server openssh-client, plus the "
    "libvirt-qemu user, /var/lib/libvirt folders and qemu.conf it writes)"
)
QEMU_DRIVER = "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so"


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def require_libvirt() -> None:
    """Fail the test, with the install step, when anything the libvirt host needs is missing."""
    missing = [
        tool
        for tool in (
            "virsh",
            "/usr/sbin/libvirtd",
            "/usr/sbin/virtlogd",
            "/usr/sbin/sshd",
            "ssh",
            "ssh-keygen",
            "qemu-img",
            "qemu-nbd",
            "qemu-system-x86_64",
        )
        if shutil.which(tool) is None
    ]
    if not os.path.exists(QEMU_DRIVER):
        missing.append("libvirt-daemon-driver-qemu")
    conf = "/etc/libvirt/qemu.conf"
    if not os.path.exists(conf) or 'security_driver = "none"' not in _read(conf):
        missing.append(f"{conf} prepared for the tests")
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: {SETUP}", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["virsh", "-q", "-c", SYSTEM, *args], capture_output=True, text=True, timeout=120
    )
    if check and done.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {done.stderr or done.stdout}")
    return done


class TestSshd:
    """sshd on 127.0.0.1:``port`` (see the module docstring)."""

    __test__ = False

    def __init__(self, folder: str) -> None:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        self.folder = folder
        self.host_key = os.path.join(folder, "host_ed25519")
        self.authorized_keys = os.path.join(folder, "authorized_keys")
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.host_key], check=True
        )
        open(self.authorized_keys, "w").close()
        os.chmod(self.authorized_keys, 0o600)
        self.port = free_port()
        config = os.path.join(folder, "sshd_config")
        with open(config, "w") as f:
            f.write(
                f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
                f"PidFile {folder}/sshd.pid\nAuthorizedKeysFile {self.authorized_keys}\n"
                "StrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nUsePAM no\nAllowStreamLocalForwarding yes\n"
                "LogLevel VERBOSE\n"
            )
        os.makedirs("/run/sshd", exist_ok=True)  # sshd refuses to start without it
        self.log = os.path.join(folder, "sshd.log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["/usr/sbin/sshd", "-D", "-e", "-f", config], stdout=log, stderr=log
            )
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"sshd did not start: {_read(self.log)}")
            time.sleep(0.05)

    def authorize(self, public_line: str) -> None:
        with open(self.authorized_keys, "a") as f:
            f.write(public_line.strip() + "\n")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # our own child, by pid
            self.proc.wait(timeout=10)


class LibvirtDaemons:
    """virtlogd and libvirtd for ``qemu:///system`` (see the module docstring)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.started: list[str] = []  # pid files of the daemons started here
        for path in (
            "/var/log/libvirt/qemu",
            "/var/lib/libvirt/qemu",
            "/var/lib/libvirt/images",
            "/var/cache/libvirt",
            "/run/libvirt",
        ):
            os.makedirs(path, exist_ok=True)
        if virsh("version", check=False).returncode == 0:
            return  # a libvirtd already serves: use it, leave it running
        if not os.path.exists("/run/libvirt/virtlogd-sock"):
            self._start("/usr/sbin/virtlogd", "virtlogd.pid")
        self._start("/usr/sbin/libvirtd", "libvirtd.pid")
        deadline = time.monotonic() + 60
        while virsh("version", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise AssertionError("libvirtd did not answer within 60 s")
            time.sleep(0.2)

    def _start(self, daemon: str, pid_name: str) -> None:
        pid_file = os.path.join(self.folder, pid_name)
        subprocess.run([daemon, "-d", "-p", pid_file], check=True, timeout=30)
        deadline = time.monotonic() + 10
        while not os.path.exists(pid_file):
            if time.monotonic() > deadline:
                raise AssertionError(f"{daemon} wrote no pid file")
            time.sleep(0.05)
        self.started.append(pid_file)

    def stop(self) -> None:
        for pid_file in reversed(self.started):
            try:
                with open(pid_file) as f:
                    pid = int(f.read().strip())
                os.kill(pid, 15)  # the daemon we started, by the pid it wrote
            except (OSError, ValueError):
                continue
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)


@dataclass
class Guest:
    name: str
    uuid: str
    disk: str
    serial: str

    def wait_for(self, text: str, timeout: float = 120) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if os.path.exists(self.serial) and text in _read(self.serial):
                return time.monotonic() - started
            time.sleep(0.2)
        raise AssertionError(f"{self.name} did not print {text!r} within {timeout:.0f} s")

    def hmp(self, command: str) -> str:
        return virsh("qemu-monitor-command", self.name, "--hmp", command).stdout

    def guest_write(self, offset: int, length: int, pattern: int) -> None:
        """A write through the running guest's virtio disk (as if the guest made it)."""
        out = self.hmp(
            "qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "
            f'"write -P {pattern:#x} {offset} {length}"'
        )
        assert "error" not in out.lower(), out


def domain_xml(name: str, disk: str, fmt: str, serial: str) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='{fmt}'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    <console type='file'><source path='{serial}'/><target type='serial' port='0'/></console>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@contextmanager
def defined_guest(folder: str, source_raw: str, *, fmt: str = "qcow2") -> Iterator[Guest]:
    """The test guest as a defined (not started) domain; destroyed and undefined on leaving."""
    os.makedirs(folder, exist_ok=True)
    name = f"appliance-test-{secrets.token_hex(3)}"
    disk = os.path.join(folder, f"{name}.{fmt}")
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, source_raw, disk], check=True
    )
    serial = os.path.join(folder, f"{name}.serial.log")
    xml = os.path.join(folder, f"{name}.xml")
    with open(xml, "w") as f:
        f.write(domain_xml(name, disk, fmt, serial))
    virsh("define", xml)
    try:
        uuid = virsh("domuuid", name).stdout.strip()
        yield Guest(name, uuid, disk, serial)
    finally:
        virsh("destroy", name, check=False)
        virsh("undefine", name, "--checkpoints-metadata", check=False)
