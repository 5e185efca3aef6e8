"""The offline copy of a libvirt domain: shut down, copy, start (only when the user allows it).

For domains libvirt cannot back up live (a disk format its backup API does not export, a host
without the API, a domain that is not running). Each disk is served read-only by ``qemu-nbd`` on
the host, started in the SSH session of its tunnel: the remote shell line runs qemu-nbd in the
background and waits on its stdin, which the tunnel keeps open; when the tunnel closes (or the
appliance dies) stdin ends and the line kills qemu-nbd, so nothing is left on the host. qemu-nbd
also runs without ``--persistent``: it exits once our last connection goes.

The domain is shut down with ``virsh shutdown`` (the guest's ACPI power button) and waited for;
one that does not stop within ``SHUTDOWN_TIMEOUT`` is not forced off: the backup fails and says
so. A domain that was running is started again whatever happened to the copy.
"""

from __future__ import annotations

import contextlib
import shlex
import threading
import time
from collections.abc import Callable
from typing import Any

from appliance.backup.disks import DiskImage
from appliance.engine import Appliance, BackupOutcome
from appliance.errors import SourceError
from image.libvirt.domains import DomainInfo, vm_definition
from image.libvirt.export import ExportDisk
from image.libvirt.host import LibvirtHost, NbdTunnel
from image.libvirt.inventory import domain_xml

ProgressCallback = Callable[[dict[str, Any]], None]
#: How long a guest may take to shut down cleanly.
SHUTDOWN_TIMEOUT = 300.0
#: Export name qemu-nbd serves.
EXPORT = "disk"


def qemu_nbd_line(source: str, fmt: str, socket_path: str) -> str:
    """The host's shell line: a read-only qemu-nbd that dies with the SSH session's stdin."""
    serve = shlex.join(
        [
            "qemu-nbd",
            "--read-only",
            f"--format={fmt}",
            "--shared=2",
            f"--socket={socket_path}",
            f"--export-name={EXPORT}",
            source,
        ]
    )
    return (
        f"{serve} & pid=$!; cat >/dev/null; kill $pid 2>/dev/null; rm -f {shlex.quote(socket_path)}"
    )


def _state(host: LibvirtHost, uuid: str) -> str:
    return host.virsh(["domstate", uuid]).strip()


def shut_down(host: LibvirtHost, uuid: str, timeout: float = SHUTDOWN_TIMEOUT) -> None:
    host.virsh(["shutdown", uuid])
    deadline = time.monotonic() + timeout
    while _state(host, uuid) != "shut off":
        if time.monotonic() > deadline:
            raise SourceError(
                f"the domain did not shut down within {timeout:.0f} s (it was not forced off); "
                "check that the guest reacts to the ACPI power button"
            )
        time.sleep(1)


def backup_offline(
    app: Appliance,
    host: LibvirtHost,
    info: DomainInfo,
    asset: str,
    *,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> BackupOutcome:
    """Copy the domain's disks while it is shut off; see the module docstring."""
    started = time.monotonic()
    spec = vm_definition(domain_xml(host, info.uuid, inactive=True))
    warnings = [
        {
            "code": "offline_copy",
            "message": f"backed up offline ({info.reason}): the domain was shut off while its "
            "disks were copied",
        }
    ]
    for disk in info.disks:
        if disk.type not in ("file", "block"):
            raise SourceError(f"disk {disk.target} ({disk.type}) cannot be copied offline either")
    was_running = info.state == "running"
    tunnels: list[NbdTunnel] = []
    disks: list[ExportDisk] = []
    try:
        if was_running:
            shut_down(host, info.uuid)
        stopped = time.monotonic()
        images: dict[str, DiskImage] = {}
        for n, disk in enumerate(info.disks):
            remote = f"{host.remote_dir}/appliance-offline-{info.uuid}-{n}.sock"
            tunnel = host.tunnel(remote, command=qemu_nbd_line(disk.source, disk.format, remote))
            tunnels.append(tunnel)
            try:
                export = ExportDisk(tunnel.socket, EXPORT, fmt=disk.format)
            except SourceError as exc:
                raise SourceError(f"{exc}; {tunnel.log_text().strip()[-300:]}") from exc
            disks.append(export)
            images[disk.target] = export
        outcome = app.backup_disk_images(
            images,
            asset,
            source=f"libvirt://{host.label}/{info.name}",
            mode="incremental",
            vm_spec=spec,
            details={
                "kind": "libvirt",
                "host": host.label,
                "domain": info.name,
                "domain_uuid": info.uuid,
                "checkpoint": None,
                "consistency": "offline",
            },
            warnings=warnings,
            progress=progress,
            cancel=cancel,
        )
    finally:
        for export in disks:
            export.close()
        for tunnel in tunnels:
            tunnel.close()
        if was_running:
            with contextlib.suppress(SourceError):
                host.virsh(["start", info.uuid])
    outcome.stats.update(
        source_mode="offline",
        consistency="offline",
        checkpoint=None,
        incremental_since=None,
        changed_bytes=outcome.stats["bytes_read"],
        wire_bytes=sum(d.bytes_read for d in disks),
        downtime_seconds=round(time.monotonic() - stopped, 3) if was_running else 0.0,
        seconds=round(time.monotonic() - started, 3),
    )
    return outcome
