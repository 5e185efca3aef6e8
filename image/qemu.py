"""QEMU for failover: the command line (a pure function), overlays, firmware and the accelerator.

``build_qemu_argv`` turns a VM definition (``appliance.vmspec``: vCPUs, memory, firmware, machine,
disk buses, NIC models and MACs) plus the session's files into QEMU's argv. It does no I/O, so
every choice it makes is tested as a plain function. The disk chain is wired explicitly with
``-blockdev`` (JSON syntax, so paths need no escaping)::

    d0-nbd   nbd over the export's unix socket, read-only       (the recovery point)
    d0       qcow2 overlay file, "backing": "d0-nbd"             (takes every guest write)

An overlay's header also names its backing (``nbd+unix:///<disk>?socket=...``), but QEMU is never
left to open a chain from a header string: the command line says what backs what. The header
string exists for ``qemu-img``/``qemu-nbd`` reading the chain during failback.

Networking (``Isolated``, ``Nat`` or ``Bridged``) and its ``-netdev`` arguments live in
:mod:`image.qemu_network`; the names are re-exported here.

The accelerator is chosen once per host by a canary boot of the test guest under KVM (a
``/dev/kvm`` that opens is not proof that guests run: on nested hosts they may fail or hang) and
remembered in ``accelerator.json``; without a working KVM it is TCG.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from appliance.errors import ApplianceError, InvalidInput
from image.qemu_network import BRIDGE_HELPER as BRIDGE_HELPER  # re-exported
from image.qemu_network import Bridged, Isolated, Network, netdev_argv, stand_in_mac
from image.qemu_network import Nat as Nat  # re-exported
from image.qemu_network import PortForward as PortForward  # re-exported

INSTALL_HINT = "apt-get install -y qemu-system-x86 qemu-utils"
QEMU_SYSTEM = "qemu-system-x86_64"
#: (code, variables template) pairs of OVMF builds, preferred first.
OVMF_CANDIDATES = (
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
)
NIC_DEVICES = {
    "virtio": "virtio-net-pci",
    "virtio-net-pci": "virtio-net-pci",
    "e1000": "e1000",
    "e1000e": "e1000e",
    "rtl8139": "rtl8139",
    "vmxnet3": "vmxnet3",
}
ACCELERATORS = ("kvm", "tcg")
ACCEL_FILE = "accelerator.json"
#: How long the KVM canary may take to print the test guest's marker.
CANARY_TIMEOUT = 20.0


# --- what the argv is built from ---------------------------------------------------------------


@dataclass(frozen=True)
class DiskAttachment:
    """One disk of the VM: ``path`` is the overlay (qcow2), a migrated copy or a local raw file.

    With ``nbd_socket`` the disk's backing is that NBD export, wired by ``-blockdev``.
    """

    path: str
    nbd_socket: str | None = None
    export_name: str = ""
    fmt: str = "qcow2"


@dataclass(frozen=True)
class Firmware:
    """UEFI firmware: OVMF code (read-only) and this VM's own copy of the variable store."""

    code: str
    vars: str


@dataclass(frozen=True)
class QemuFiles:
    """Per-session control files."""

    qmp_socket: str
    serial_log: str
    pidfile: str | None = None
    agent_socket: str | None = None
    #: QEMU's VNC server on a unix socket (the console relay); None: no VNC at all.
    vnc_socket: str | None = None


def _opt(value: str) -> str:
    """A value inside a ``key=value,...`` option: commas are doubled (QEMU's escaping)."""
    return value.replace(",", ",,")


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _disk_devices(
    index: int, bus: str, node: str, machine: str, counters: dict[str, int]
) -> list[str]:
    """``-device`` arguments attaching block node ``node`` on ``bus`` (controllers once)."""
    boot = {"bootindex": index} if index == 0 else {}
    args: list[str] = []
    if bus == "virtio":
        args += ["-device", _json({"driver": "virtio-blk-pci", "drive": node, **boot})]
    elif bus == "scsi":
        if not counters.get("scsi"):
            args += ["-device", "virtio-scsi-pci,id=scsi0"]
        unit = counters.get("scsi", 0)
        counters["scsi"] = unit + 1
        args += [
            "-device",
            _json({"driver": "scsi-hd", "bus": "scsi0.0", "scsi-id": unit, "drive": node, **boot}),
        ]
    elif bus == "sata":
        if not counters.get("sata"):
            args += ["-device", "ahci,id=sata0"]
        port = counters.get("sata", 0)
        counters["sata"] = port + 1
        args += [
            "-device",
            _json({"driver": "ide-hd", "bus": f"sata0.{port}", "drive": node, **boot}),
        ]
    elif bus == "ide":
        n = counters.get("ide", 0)
        counters["ide"] = n + 1
        if machine.startswith("pc") and "q35" not in machine:
            location: dict[str, Any] = {"bus": f"ide.{n // 2}", "unit": n % 2}
        else:
            location = {"bus": f"ide.{n}"}  # q35: the ICH9 AHCI ports
        args += ["-device", _json({"driver": "ide-hd", **location, "drive": node, **boot})]
    elif bus == "nvme":
        args += [
            "-device",
            _json({"driver": "nvme", "serial": f"disk{index}", "drive": node, **boot}),
        ]
    elif bus == "usb":
        if not counters.get("usb"):
            args += ["-device", "qemu-xhci,id=xhci0"]
        counters["usb"] = counters.get("usb", 0) + 1
        args += [
            "-device",
            _json({"driver": "usb-storage", "bus": "xhci0.0", "drive": node, **boot}),
        ]
    else:
        raise InvalidInput(f"unsupported disk bus {bus!r}")
    return args


def _blockdevs(index: int, disk: DiskAttachment) -> tuple[str, list[str]]:
    """(top node name, ``-blockdev`` arguments) of one disk."""
    node = f"d{index}"
    args: list[str] = []
    top: dict[str, Any] = {
        "driver": disk.fmt,
        "node-name": node,
        "file": {"driver": "file", "filename": disk.path},
    }
    if disk.nbd_socket is not None:
        if disk.fmt != "qcow2":
            raise InvalidInput("a disk backed by an NBD export needs a qcow2 overlay")
        backing = f"{node}-nbd"
        args += [
            "-blockdev",
            _json(
                {
                    "driver": "nbd",
                    "node-name": backing,
                    "server": {"type": "unix", "path": disk.nbd_socket},
                    "export": disk.export_name,
                    "read-only": True,
                }
            ),
        ]
        top["backing"] = backing
    args += ["-blockdev", _json(top)]
    return node, args


def build_qemu_argv(
    vm_spec: dict[str, Any],
    disks: list[DiskAttachment],
    *,
    accel: str,
    network: Network,
    files: QemuFiles,
    firmware: Firmware | None = None,
    name: str | None = None,
    qemu: str = QEMU_SYSTEM,
) -> list[str]:
    """The full QEMU command line for booting ``vm_spec`` on ``disks`` (no I/O).

    Disk ``i`` uses the bus of the spec's disk ``i`` (virtio when the spec lists fewer); the first
    disk is the boot disk. NICs follow the spec (model, MAC); a spec without NICs gets one virtio
    NIC so that a health check can reach the guest. ``accel`` is "kvm", "tcg" or "kvm:tcg" (try
    KVM, fall back to TCG inside QEMU).
    """
    if not disks:
        raise InvalidInput("a VM needs at least one disk")
    accels = accel.split(":")
    if not accels or any(a not in ACCELERATORS for a in accels):
        raise InvalidInput(f"accelerator must be kvm, tcg or kvm:tcg, not {accel!r}")
    if vm_spec.get("firmware", "bios") == "uefi" and firmware is None:
        raise InvalidInput("the VM boots with UEFI: OVMF firmware files are needed")
    machine = str(vm_spec.get("machine") or "q35")
    argv = [
        qemu,
        "-name",
        f"guest={_opt(name or str(vm_spec.get('name', 'vm')))}",
        "-no-user-config",
        "-nodefaults",
        "-display",
        "none",
    ]
    machine_opts = [machine]
    if firmware is not None:
        argv += [
            "-blockdev",
            _json(
                {
                    "driver": "file",
                    "node-name": "fw-code",
                    "filename": firmware.code,
                    "read-only": True,
                }
            ),
            "-blockdev",
            _json({"driver": "file", "node-name": "fw-vars", "filename": firmware.vars}),
        ]
        machine_opts += ["pflash0=fw-code", "pflash1=fw-vars"]
    argv += ["-machine", ",".join(machine_opts)]
    for a in accels:
        argv += ["-accel", a]
    if accels[0] == "kvm" and len(accels) == 1:
        argv += ["-cpu", "host"]
    argv += [
        "-m",
        str(int(vm_spec.get("memory_mib", 512))),
        "-smp",
        str(int(vm_spec.get("vcpus", 1))),
        "-rtc",
        "base=utc",
        "-device",
        "VGA,id=video0",
        "-chardev",
        f"socket,id=qmp,path={_opt(files.qmp_socket)},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        f"file,id=serial0,path={_opt(files.serial_log)}",
        "-serial",
        "chardev:serial0",
    ]
    if files.pidfile is not None:
        argv += ["-pidfile", files.pidfile]
    if files.vnc_socket is not None:
        argv += ["-vnc", f"unix:{_opt(files.vnc_socket)}"]
    spec_disks = list(vm_spec.get("disks") or [])
    counters: dict[str, int] = {}
    for i, disk in enumerate(disks):
        bus = str(spec_disks[i].get("bus", "virtio")) if i < len(spec_disks) else "virtio"
        node, blockdevs = _blockdevs(i, disk)
        argv += blockdevs
        argv += _disk_devices(i, bus, node, machine, counters)
    nics = list(vm_spec.get("nics") or []) or [{"model": "virtio", "mac": None}]
    for i, nic in enumerate(nics):
        model = str(nic.get("model") or "virtio")
        device = NIC_DEVICES.get(model)
        if device is None:
            raise InvalidInput(f"unsupported NIC model {model!r}")
        argv += netdev_argv(network, i)
        nic_device: dict[str, Any] = {"driver": device, "netdev": f"net{i}", "romfile": ""}
        if nic.get("mac"):
            nic_device["mac"] = str(nic["mac"])
        elif isinstance(network, Bridged):
            nic_device["mac"] = stand_in_mac(str(vm_spec.get("name") or "vm"), i)
        argv += ["-device", _json(nic_device)]
    if files.agent_socket is not None:
        argv += [
            "-chardev",
            f"socket,id=qga0,path={_opt(files.agent_socket)},server=on,wait=off",
            "-device",
            "virtio-serial-pci,id=vser0",
            "-device",
            "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        ]
    return argv


# --- tools -------------------------------------------------------------------------------------


def qemu_binary(name: str = QEMU_SYSTEM) -> str:
    found = shutil.which(name)
    if found is None:
        raise InvalidInput(f"{name} is not installed; install it with `{INSTALL_HINT}`", tool=name)
    return found


def find_ovmf() -> tuple[str, str]:
    """(OVMF code, variables template) or InvalidInput naming the package."""
    for code, template in OVMF_CANDIDATES:
        if os.path.isfile(code) and os.path.isfile(template):
            return code, template
    raise InvalidInput(
        "UEFI firmware (OVMF) is not installed; install it with `apt-get install -y ovmf`"
    )


def create_overlay_argv(overlay: str, size: int, backing_uri: str | None) -> list[str]:
    """qemu-img command creating a qcow2 overlay; the backing is named but not opened (-u)."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing_uri is not None:
        argv += ["-u", "-F", "raw", "-b", backing_uri]
    return [*argv, overlay, str(size)]


def convert_argv(source: str, source_fmt: str, target: str, target_fmt: str) -> list[str]:
    """qemu-img convert of a disk (an overlay follows its header's backing) into ``target``."""
    argv = ["qemu-img", "convert", "-f", source_fmt, "-O", target_fmt]
    if target_fmt == "qcow2":
        argv += ["-o", "compression_type=zlib"]
    return [*argv, source, target]


def overlay_map_argv(overlay: str, *, force_share: bool = False) -> list[str]:
    """qemu-img map of an overlay alone (its backing cut off): what the guest wrote.

    ``force_share`` reads an overlay a running QEMU holds (a snapshot of a moving target)."""
    spec = {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": overlay},
        "backing": None,
    }
    share = ["--force-share"] if force_share else []
    return ["qemu-img", "map", *share, "--output=json", "json:" + _json(spec)]


def run_tool(argv: list[str], what: str, *, timeout: float | None = None) -> str:
    """Run a qemu tool; a failure is an ApplianceError with the tool's message."""
    tool = shutil.which(argv[0])
    if tool is None:
        raise InvalidInput(f"{argv[0]} is not installed; install it with `{INSTALL_HINT}`")
    try:
        result = subprocess.run(
            [tool, *argv[1:]],
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise ApplianceError(f"{what} timed out after {timeout} s") from exc
    if result.returncode != 0:
        message = "; ".join(line.strip() for line in result.stderr.splitlines() if line.strip())
        raise ApplianceError(f"{what} failed: {message or f'exit status {result.returncode}'}")
    return result.stdout


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``address`` (QEMU binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def process_is_ours(pid: int, marker: str) -> bool:
    """True when ``pid`` is alive and its command line contains ``marker`` (a session path).

    A pid from a pid file may have been reused by an unrelated process after a crash; signalling
    it without this check could kill anything.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return marker.encode() in cmdline


def process_rss_mib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return 0


def mem_available_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    raise ApplianceError("MemAvailable is missing from /proc/meminfo")


# --- the accelerator -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AccelChoice:
    accel: str
    reason: str
    checked_at: str
    host_kernel: str

    def to_dict(self) -> dict[str, str]:
        return {
            "accel": self.accel,
            "reason": self.reason,
            "checked_at": self.checked_at,
            "host_kernel": self.host_kernel,
        }


def load_accelerator(state_dir: str) -> AccelChoice | None:
    """The remembered choice, unless the host kernel changed since (then it is checked again)."""
    try:
        with open(os.path.join(state_dir, ACCEL_FILE)) as f:
            data = json.load(f)
        choice = AccelChoice(
            accel=str(data["accel"]),
            reason=str(data["reason"]),
            checked_at=str(data["checked_at"]),
            host_kernel=str(data["host_kernel"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if choice.accel not in ACCELERATORS or choice.host_kernel != os.uname().release:
        return None
    return choice


def _save_accelerator(state_dir: str, choice: AccelChoice) -> None:
    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, ACCEL_FILE)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(choice.to_dict(), f, indent=2)
    os.replace(tmp, path)


def canary_boot(image: str, accel: str, *, timeout: float = CANARY_TIMEOUT) -> tuple[bool, str]:
    """Boot the test guest ``image`` (through a throwaway overlay) and wait for its marker."""
    from image.testguest import MARKER

    with tempfile.TemporaryDirectory(prefix="appliance-canary-") as work:
        overlay = os.path.join(work, "canary.qcow2")
        run_tool(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", image, overlay],
            "creating the canary overlay",
        )
        files = QemuFiles(
            qmp_socket=os.path.join(work, "qmp.sock"), serial_log=os.path.join(work, "serial.log")
        )
        spec = {"name": "canary", "memory_mib": 256, "vcpus": 1, "disks": [{"bus": "virtio"}]}
        argv = build_qemu_argv(
            spec,
            [DiskAttachment(overlay)],
            accel=accel,
            network=Isolated(),
            files=files,
            qemu=qemu_binary(),
        )
        with open(os.path.join(work, "qemu.log"), "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        started = time.monotonic()
        try:
            while time.monotonic() - started < timeout:
                with contextlib.suppress(FileNotFoundError), open(files.serial_log, "rb") as f:
                    if MARKER.encode() in f.read():
                        return (
                            True,
                            f"the test guest booted under {accel} in {time.monotonic() - started:.1f} s",
                        )
                if proc.poll() is not None:
                    with open(os.path.join(work, "qemu.log"), errors="replace") as f:
                        tail = " ".join(f.read().split())[-300:]
                    return False, f"QEMU exited under {accel} ({tail or proc.returncode})"
                time.sleep(0.1)
            return False, f"the test guest did not boot under {accel} within {timeout:.0f} s"
        finally:
            if proc.poll() is None:
                proc.kill()  # our own child, by its handle
            proc.wait()


def choose_accelerator(
    state_dir: str,
    *,
    guest_image: str | None = None,
    force: bool = False,
    timeout: float = CANARY_TIMEOUT,
) -> AccelChoice:
    """KVM if a canary boot of the test guest proves it works, else TCG; remembered."""
    if not force:
        known = load_accelerator(state_dir)
        if known is not None:
            return known
    now = datetime.now(UTC).isoformat(timespec="seconds")
    kernel = os.uname().release
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        choice = AccelChoice("tcg", "/dev/kvm is not available", now, kernel)
    else:
        if guest_image is None:
            from image.testguest import build_test_guest

            guest_image = build_test_guest()
        ok, reason = canary_boot(guest_image, "kvm", timeout=timeout)
        choice = AccelChoice("kvm" if ok else "tcg", reason, now, kernel)
    _save_accelerator(state_dir, choice)
    return choice
