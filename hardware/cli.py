"""``appliance pool``: create, list, status, scrub, replace a disk, import.

Registered through the ``appliance.cli_plugins`` entry point; each command calls one work
function of :mod:`hardware.pools` or :mod:`hardware.pool_jobs`, in this process. Disks are named
by device node on the command line and turned into records here (:func:`describe_block_device`,
from sysfs and ``blkid``); the service and the page take them from discovery's inventory.
"""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys
from typing import Any

from appliance.cli import Progress, emit, open_from_args
from appliance.errors import InvalidInput
from hardware.pool_backend import list_pool_status, pool_status, probe
from hardware.pool_jobs import replace_disk, scrub_pool
from hardware.pools import (
    create_pool,
    find_importable,
    import_pool,
    mount_pools,
    seed_from_pool,
)
from hardware.records import BlockDevice, BlockKind, Inventory


def register(sub: Any) -> None:
    pool = sub.add_parser("pool", help="disk pools: filesystems on the appliance's own disks")
    actions = pool.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a pool of one disk or a mirror of several")
    create.add_argument("name")
    create.add_argument("--disk", action="append", required=True, help="a disk (repeat for more)")
    create.add_argument(
        "--fs",
        default=None,
        choices=["ext4", "xfs", "btrfs"],
        help="the filesystem (default: ext4 on one disk, btrfs on several)",
    )
    create.add_argument(
        "--profile",
        choices=["single", "raid1", "raid10"],
        help="btrfs layout (default: single on one disk, raid1 on several)",
    )
    create.add_argument(
        "--force", action="store_true", help="erase disks that hold another pool's filesystem"
    )
    create.set_defaults(func=cmd_create)
    actions.add_parser("list", help="pools with capacity and health").set_defaults(func=cmd_list)
    status = actions.add_parser("status", help="one pool: capacity, health, forecast")
    status.add_argument("name")
    status.set_defaults(func=cmd_status)
    scrub = actions.add_parser("scrub", help="check every block of a btrfs pool, repair copies")
    scrub.add_argument("name")
    scrub.set_defaults(func=cmd_scrub)
    replace = actions.add_parser("replace", help="rebuild a missing or failing disk onto a new one")
    replace.add_argument("name")
    replace.add_argument("member", help="the disk's identity (see pool status) or device id")
    replace.add_argument("--disk", required=True, help="the new disk")
    replace.set_defaults(func=cmd_replace)
    imp = actions.add_parser(
        "import",
        help="take over a pool found on attached disks (on a fresh data directory: its store "
        "too); without a UUID, list the pools found",
    )
    imp.add_argument("fs_uuid", nargs="?")
    imp.add_argument("--name", help="the pool's name here (default: the one it had)")
    imp.set_defaults(func=cmd_import)
    actions.add_parser("mount", help="mount every pool (the service does at start)").set_defaults(
        func=cmd_mount
    )


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def describe_block_device(devnode: str) -> BlockDevice:
    """A disk named on the command line, as a record keyed by its stable identity (WWN, serial
    or a loop device's backing file, as discovery keys it)."""
    real = os.path.realpath(devnode)
    try:
        is_block = stat.S_ISBLK(os.stat(real).st_mode)
    except OSError:
        is_block = False
    if not is_block:
        raise InvalidInput(f"{devnode} is not a block device")
    sysfs = os.path.join("/sys/class/block", os.path.basename(real))
    backing = _read(os.path.join(sysfs, "loop", "backing_file"))
    wwn = _read(os.path.join(sysfs, "device", "wwid")) or _read(os.path.join(sysfs, "wwid"))
    serial = _read(os.path.join(sysfs, "device", "serial"))
    kind: BlockKind = "disk"
    if backing:
        kind, identity = "loop", f"loop:{backing}"
    elif wwn:
        identity = f"wwn:{wwn}"
    elif serial:
        identity = f"serial:{serial}"
    else:
        identity = f"devnode:{real}"  # nothing stable to go by
    if os.path.exists(os.path.join(sysfs, "partition")):
        kind = "partition"
    fs = probe(real)
    return BlockDevice(
        identity=identity,
        devnode=real,
        kind=kind,
        size_bytes=int(_read(os.path.join(sysfs, "size")) or 0) * 512,
        read_only=_read(os.path.join(sysfs, "ro")) == "1",
        serial=serial,
        wwn=wwn,
        fs_type=fs.get("TYPE"),
        fs_uuid=fs.get("UUID"),
        fs_label=fs.get("LABEL"),
        backing_file=backing,
    )


def filesystems_inventory() -> Inventory:
    """The block devices ``blkid`` finds a filesystem on (for listing importable pools)."""
    done = subprocess.run(
        ["blkid", "-o", "device"], capture_output=True, text=True, timeout=120, check=False
    )
    found = {}
    for line in done.stdout.splitlines():
        try:
            device = describe_block_device(line.strip())
        except InvalidInput:
            continue
        found[device.identity] = device
    return Inventory(block=found)


def _log(args: argparse.Namespace) -> Any:
    def log(level: str, message: str) -> None:
        if not args.json:
            print(f"{level}: {message}", file=sys.stderr)

    return log


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _row(status: dict[str, Any]) -> str:
    capacity = status["capacity"]
    space = (
        f"{_human(capacity['used_bytes'])} of {_human(capacity['total_bytes'])}"
        if capacity
        else "-"
    )
    layout = f"{status['fs_type']} {status['profile']}" if status["fs_type"] else "folder"
    days = status["days_until_full"]
    full = f"full in {days:.0f} d" if days is not None else ""
    notes = "; ".join(status["health"]["reasons"] + status["warnings"])
    return (
        f"{status['name'][:16]:16}  {layout:13}  {status['health']['state']:11}  {space:22}  "
        f"{full:12}  {notes}"
    )


def cmd_list(args: argparse.Namespace) -> int:
    with open_from_args(args) as app:
        rows = [s.to_dict() for s in list_pool_status(app)]
    header = f"{'NAME':16}  {'LAYOUT':13}  {'HEALTH':11}  {'USED':22}  {'FORECAST':12}  NOTES"
    emit(args, rows, lambda: "\n".join([header, *(_row(r) for r in rows)]))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with open_from_args(args) as app:
        document = pool_status(app, args.name).to_dict()

    def text() -> str:
        lines = [_row(document)]
        lines += [f"  disk {i + 1}: {m}" for i, m in enumerate(document["members"])]
        if document["health"]["last_scrub"]:
            scrub = document["health"]["last_scrub"]
            lines.append(
                f"  last scrub: {scrub.get('started')}, {scrub.get('corrected', 0)} corrected, "
                f"{scrub.get('uncorrectable', 0)} uncorrectable"
            )
        return "\n".join(lines)

    emit(args, document, text)
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    devices = [describe_block_device(d) for d in args.disk]
    fs_type = args.fs or ("btrfs" if len(devices) > 1 else "ext4")
    with open_from_args(args) as app:
        pool = create_pool(
            app, args.name, devices, fs_type, args.profile, force=args.force, log=_log(args)
        )
        document = pool_status(app, pool.name).to_dict()
    emit(args, document, lambda: _row(document))
    return 0


def cmd_scrub(args: argparse.Namespace) -> int:
    progress = Progress(sys.stderr.isatty() and not args.json)
    with open_from_args(args) as app:
        result = scrub_pool(app, args.name, progress=progress, log=_log(args))
    progress.done()
    scrub = result["scrub"]
    emit(
        args,
        result,
        lambda: (
            f"pool {result['pool']}: {scrub['corrected']} block(s) repaired, "
            f"{scrub['uncorrectable']} beyond repair; health {result['health']['state']}"
        ),
    )
    return 1 if scrub["uncorrectable"] else 0


def cmd_replace(args: argparse.Namespace) -> int:
    device = describe_block_device(args.disk)
    progress = Progress(sys.stderr.isatty() and not args.json)
    with open_from_args(args) as app:
        result = replace_disk(
            app, args.name, args.member, device, progress=progress, log=_log(args)
        )
    progress.done()
    emit(
        args,
        result,
        lambda: (
            f"pool {result['pool']}: {result['replaced']} replaced by {result['by']}; health "
            f"{result['health']['state']}"
        ),
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    if args.fs_uuid is None:
        found = [
            {"fs_uuid": p.fs_uuid, "fs_type": p.fs_type, "name": p.name, "disks": len(p.devices)}
            for p in find_importable(filesystems_inventory())
        ]
        emit(
            args,
            found,
            lambda: (
                "\n".join(
                    f"{p['fs_uuid']}  {p['fs_type']:6}  {p['name']}  ({p['disks']} disk(s))"
                    for p in found
                )
                or "no pool filesystem found on the attached disks"
            ),
        )
        return 0
    seeded = seed_from_pool(args.data_dir, args.fs_uuid, args.name)
    with open_from_args(args) as app:
        result = import_pool(app, args.fs_uuid, seeded or args.name, log=_log(args))
    result["seeded"] = seeded is not None
    emit(
        args,
        result,
        lambda: (
            f"pool {result['pool']} imported: {result['copies']} point(s) there, "
            f"{result['points_added']} added to the catalog"
            + (" (this data directory now belongs to its store)" if seeded else "")
        ),
    )
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    with open_from_args(args) as app:
        report = mount_pools(app)
    emit(
        args,
        report,
        lambda: (
            "\n".join(
                f"{r['pool']}: "
                + (
                    ("mounted (degraded)" if r["degraded"] else "mounted")
                    if r["mounted"]
                    else r["error"]
                )
                for r in report
            )
            or "no block pools"
        ),
    )
    return 0 if all(r["mounted"] for r in report) else 2
