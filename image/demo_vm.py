"""The demo VM: a new appliance gets a VM it can fail over on day one.

:func:`seed_demo_vm` gives an open appliance the asset ``demo-vm``: the busybox test guest
(:mod:`image.testguest`) as its disk, a VM definition beside it, a boot proof (the guest's serial
marker and its HTTP health page through a port forward) and one verified full backup, so the
admin page shows a VM with a recovery point whose "Fail over" works.

Every step first looks whether it was done (disk file, definition file, asset, proof settings,
point), so a run interrupted anywhere is completed by the next one and nothing is duplicated.
The caller (``appliance demo seed``) records a finished seed in :func:`seed_marker_path` and
skips the store entirely next time; an asset the admin deleted is therefore not brought back.

The disk lives outside the data directory (by default ``<data dir>-demo-vm/``): the API refuses
VM disks inside the data directory, so an asset there could not be edited on the page.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.engine import Appliance
from appliance.errors import ApplianceError, Conflict, InvalidInput, NotFound
from appliance.vmspec import parse_vm_source, vm_source
from image.failover import asset_failover_settings, put_asset_failover_settings
from image.qemu import choose_accelerator
from image.testguest import MARKER, PACKAGES, build_test_guest, copy_sparse

DEMO_ASSET = "demo-vm"
DESCRIPTION = (
    "Demo VM (busybox test guest) made by `appliance demo seed`: press Fail over to boot it "
    "from its backup"
)
#: The guest proves its boot by its serial marker and its health page ("OK appliance test guest").
DEMO_PROOF: dict[str, Any] = {
    "serial": MARKER,
    "http_port": 80,
    "http_path": "/",
    "http_expect": "OK",
    "timeout": 180,
}
#: Isolated network; the guest's port 80 is forwarded to a free port of 127.0.0.1.
DEMO_NETWORK: dict[str, Any] = {"mode": "isolated", "port_forwards": [[0, 80]]}
DEMO_VM: dict[str, Any] = {
    "name": DEMO_ASSET,
    "memory_mib": 256,
    "vcpus": 1,
    "firmware": "bios",
    "disks": [{"name": DEMO_ASSET, "bus": "virtio"}],
}
#: Host tools a failover runs, and the Debian package of each.
QEMU_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "qemu-nbd": "qemu-utils",
}


class DemoUnavailable(ApplianceError):
    """The demo VM cannot be set up on this machine (packages are missing)."""

    code = "demo_unavailable"
    kind = "conflict"


@dataclass(frozen=True)
class DemoSeed:
    """What a seed found or did (``created`` lists the steps this run performed)."""

    asset: str
    disk: str
    vm_spec: str
    point: str
    accel: str
    created: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "asset": self.asset,
            "disk": self.disk,
            "vm_spec": self.vm_spec,
            "point": self.point,
            "accel": self.accel,
            "created": list(self.created),
        }


def default_disk_dir(data_dir: str) -> str:
    """``<data dir>-demo-vm``: beside the data directory, never inside it."""
    data_dir = os.path.abspath(data_dir).rstrip(os.sep)
    return f"{data_dir}-demo-vm"


def seed_marker_path(data_dir: str) -> str:
    """Written when a seed finished: later starts skip the seed without opening the store."""
    return os.path.join(os.path.abspath(data_dir), "failover", "demo-vm.json")


def missing_tools() -> list[str]:
    """Debian packages of the QEMU tools a failover needs that are not installed."""
    return sorted({pkg for tool, pkg in QEMU_TOOLS.items() if shutil.which(tool) is None})


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def seed_demo_vm(
    app: Appliance,
    disk_dir: str,
    *,
    state_dir: str | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> DemoSeed:
    """Give ``app`` the demo VM (see the module docstring); raises :class:`DemoUnavailable`
    naming the packages to install when QEMU or the guest's ingredients are missing."""
    missing = missing_tools()
    if missing:
        raise DemoUnavailable(
            f"the demo VM needs QEMU: install it with `apt-get install -y {' '.join(missing)}`",
            packages=missing,
        )
    created: list[str] = []
    try:
        image = build_test_guest()
    except InvalidInput as exc:
        raise DemoUnavailable(
            f"the demo VM's disk cannot be built: {exc.message} (it needs `apt-get install -y "
            f"{PACKAGES}`)",
            packages=PACKAGES.split(),
        ) from exc
    disk_dir = os.path.abspath(disk_dir)
    os.makedirs(disk_dir, exist_ok=True)
    disk = os.path.join(disk_dir, f"{DEMO_ASSET}.raw")
    if not os.path.exists(disk):
        log(f"writing the demo VM's disk {disk}")
        partial = f"{disk}.partial"
        copy_sparse(image, partial)
        os.replace(partial, disk)
        created.append("disk")
    spec_path = os.path.join(disk_dir, f"{DEMO_ASSET}.json")
    if not os.path.exists(spec_path):
        _write_atomic(spec_path, (json.dumps(DEMO_VM, indent=2) + "\n").encode())
        created.append("vm_spec")

    catalog = app.catalog
    try:
        asset = catalog.get_asset(DEMO_ASSET)
    except NotFound:
        source = vm_source([disk], spec_path)
        with contextlib.suppress(Conflict):  # another seed added it meanwhile
            catalog.add_asset(DEMO_ASSET, "vm", source, DESCRIPTION)
            catalog.audit("cli", "asset.create", DEMO_ASSET, {"kind": "vm", "source": source})
            created.append("asset")
        asset = catalog.get_asset(DEMO_ASSET)
    disks, _spec = parse_vm_source(asset.source)
    if asset.kind != "vm" or disks != [disk]:
        raise Conflict(
            f"an asset named {DEMO_ASSET} already exists and is not the demo VM "
            f"(its disks: {' '.join(disks) or 'none'}); it is left alone",
            asset=DEMO_ASSET,
        )

    if "proof" not in asset_failover_settings(catalog, DEMO_ASSET):
        put_asset_failover_settings(catalog, DEMO_ASSET, proof=DEMO_PROOF, network=DEMO_NETWORK)
        created.append("proof")

    point = catalog.latest_point(DEMO_ASSET, kind="image")
    if point is None:
        log("backing up the demo VM")
        point = app.backup_image([disk], DEMO_ASSET, mode="full", vm_spec=spec_path).point
        created.append("point")
    if point.verify_status != "ok":
        # A verified point is the one a failover picks by default, and the page shows it so.
        app.verify(point.id)
        created.append("verified")

    # The canary boot that picks KVM or TCG runs once per host kernel; done here, the first
    # "Fail over" does not pay for it.
    state_dir = state_dir or os.path.join(app.data_dir.path, "failover")
    os.makedirs(state_dir, exist_ok=True)
    accel = choose_accelerator(state_dir, guest_image=image).accel
    return DemoSeed(DEMO_ASSET, disk, spec_path, point.id, accel, tuple(created))
