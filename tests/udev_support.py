"""udev for the discovery tests: recorded devices (umockdev files), a real udevd, loop devices.

* :func:`recorded_devices` parses a umockdev recording into plain properties and attributes,
  following the ``device`` link the way sysfs does (``device/type``), so the pure converter can be
  fed exactly what the real drivers produced.
* :func:`running_udevd` makes sure a udevd runs: it uses one that already runs, or starts
  ``systemd-udevd --daemon`` and later stops exactly the process it started (by pid), removing
  ``/run/udev`` only if it made it (a stale udev database would otherwise outlive the daemon).
* :func:`umockdev_scan` runs :func:`hardware.udev.scan` in a subprocess under ``umockdev-run``.
* :func:`attached_loop` attaches a loop device and detaches that one device afterwards.

A missing tool fails the test with the install step, never skips it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hardware.udev import udevd_running

FIXTURES = Path(__file__).parent / "fixtures" / "udev"
USB_AND_TAPE = FIXTURES / "usb-storage-disk-and-tape-drive.umockdev"
TAPE_LIBRARY = FIXTURES / "tape-library-drive-and-changer.umockdev"
UDEVD = "/lib/systemd/systemd-udevd"
UDEV_CONTROL = "/run/udev/control"
INSTALL = "run scripts/setup (apt-get install umockdev gir1.2-umockdev-1.0 udev)"


def require_tool(path_or_name: str) -> str:
    """The tool's path; fails the test (with the install step) when it is missing."""
    found = shutil.which(path_or_name) or (
        path_or_name if os.access(path_or_name, os.X_OK) else None
    )
    if not found:
        pytest.fail(f"{path_or_name} is not installed: {INSTALL}", pytrace=False)
    return found


# --- recordings ----------------------------------------------------------------------------------


@dataclass
class RecordedDevice:
    sys_path: str
    properties: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, str] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)


def recorded_devices(recording: Path) -> dict[str, RecordedDevice]:
    """The devices of a umockdev recording by sys path (``/devices/...``). Attributes are text
    (``H:`` binary ones decoded as latin-1, as the scanner decodes sysfs); each device also gets
    its ``device`` link's attributes as ``device/<name>``, as sysfs shows them."""
    devices: dict[str, RecordedDevice] = {}
    current: RecordedDevice | None = None
    for line in recording.read_text().splitlines():
        tag, _, value = line.partition(": ")
        if tag == "P":
            current = devices.setdefault(value, RecordedDevice(value))
        elif current is None or not tag:
            continue
        elif tag == "E":
            key, _, val = value.partition("=")
            current.properties[key] = val
        elif tag == "A":
            key, _, val = value.partition("=")
            current.attributes[key] = val.encode().decode("unicode_escape")
        elif tag == "H":
            key, _, val = value.partition("=")
            current.attributes[key] = bytes.fromhex(val).decode("latin-1")
        elif tag == "L":
            key, _, val = value.partition("=")
            current.links[key] = val
    for device in devices.values():
        target = device.links.get("device")
        if target:
            linked = os.path.normpath(os.path.join(device.sys_path, target))
            for key, val in devices.get(linked, RecordedDevice(linked)).attributes.items():
                device.attributes.setdefault(f"device/{key}", val)
    return devices


def umockdev_scan(recording: Path) -> dict[str, dict[str, dict[str, object]]]:
    """:func:`hardware.udev.scan` under ``umockdev-run`` on ``recording``, as plain JSON."""
    runner = require_tool("umockdev-run")
    code = (
        "import dataclasses, json\n"
        "from hardware.udev import scan\n"
        "inventory = scan()\n"
        "print(json.dumps({kind: {k: dataclasses.asdict(v) for k, v in"
        " getattr(inventory, kind).items()} for kind in ('block', 'tapes', 'changers')}))\n"
    )
    done = subprocess.run(
        [runner, "--device", str(recording), "--", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# --- a real udevd --------------------------------------------------------------------------------


def _udevd_pids() -> set[int]:
    done = subprocess.run(["pgrep", "-x", "systemd-udevd"], capture_output=True, text=True)
    return {int(p) for p in done.stdout.split()}


@contextlib.contextmanager
def running_udevd() -> Iterator[int | None]:
    """A running udevd for the block; yields the pid this started, None when one already ran.

    It is started in the foreground as this process's child (not ``--daemon``), so its pid is
    known exactly and it is waited for: PID 1 here reaps no orphans.
    """
    if _udevd_pids():
        yield None
        return
    udevd = require_tool(UDEVD)
    udevadm = require_tool("udevadm")
    made_run_udev = not os.path.exists("/run/udev")
    if os.path.exists(UDEV_CONTROL):
        os.unlink(UDEV_CONTROL)  # left by a udevd that has exited: the new one binds it again
    process = subprocess.Popen(
        [udevd], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not udevd_running():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{udevd} did not start (exit {process.returncode})", pytrace=False)
            time.sleep(0.02)
        subprocess.run([udevadm, "trigger", "--subsystem-match=block"], check=True, timeout=60)
        subprocess.run([udevadm, "settle", "--timeout=30"], check=False, timeout=60)
        yield process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        # udevd leaves its socket and database behind: a stale database would make the next
        # scan without udevd believe old properties.
        if made_run_udev and not _udevd_pids():
            shutil.rmtree("/run/udev", ignore_errors=True)


# --- loop devices --------------------------------------------------------------------------------


def attach_loop(image: Path) -> str:
    return subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()


def detach_loop(device: str) -> None:
    subprocess.run(["losetup", "-d", device], check=False, capture_output=True)


@contextlib.contextmanager
def attached_loop(image: Path, size: int = 64 << 20) -> Iterator[str]:
    """A loop device on a fresh sparse ``image`` of ``size``; detached afterwards."""
    with open(image, "wb") as f:
        f.truncate(size)
    device = attach_loop(image)
    try:
        yield device
    finally:
        detach_loop(device)


# --- a monitor in a process that cannot see udevd ------------------------------------------------

_MONITOR_CHILD = """
import json, sys, dataclasses
from hardware.udev import DeviceMonitor

def said(change, inventory):
    print(json.dumps({
        "added": [dataclasses.asdict(d) for d in change.added],
        "removed": [dataclasses.asdict(d) for d in change.removed],
        "changed": [[dataclasses.asdict(a), dataclasses.asdict(b)] for a, b in change.changed],
    }), flush=True)

monitor = DeviceMonitor(said, interval=float(sys.argv[1]))
monitor.start()
print(json.dumps({"listening": monitor.listening}), flush=True)
sys.stdin.read()  # until the test closes it
monitor.stop()
"""


@contextlib.contextmanager
def monitor_without_udevd(interval: float) -> Iterator[queue.Queue[dict[str, object]]]:
    """A :class:`DeviceMonitor` in a child process whose mount namespace hides ``/run/udev``
    (a tmpfs over it), so it sees the host as if udevd had never run: no control socket, no
    udev database. Yields a queue of what it prints: ``{"listening": ...}``, then each diff."""
    unshare = require_tool("unshare")
    hide = 'if [ -d /run/udev ]; then mount -t tmpfs none /run/udev || exit 3; fi; exec "$@"'
    process = subprocess.Popen(
        [
            unshare,
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            hide,
            "sh",
            sys.executable,
            "-c",
            _MONITOR_CHILD,
            str(interval),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    lines: queue.Queue[dict[str, object]] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(json.loads(line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield lines
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        reader.join(5)
