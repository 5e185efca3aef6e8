"""``appliance usb``: USB rotation media from the command line.

Registered through the ``appliance.cli_plugins`` entry point; each command calls one work
function of :mod:`hardware.usb` or :mod:`hardware.usb_jobs` (the same ones the API and the udev
handler call). ``usb import`` restores on a freshly installed appliance: it makes an empty data
directory's pool belong to the store on the disk and adds the disk's points to the catalog, so
that ``appliance restore POINT ... --from LABEL`` reads them from the disk.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from appliance.cli import emit, open_from_args, run_logged
from appliance.errors import InvalidInput, NotFound
from hardware.mounts import filesystem_uuid
from hardware.rotation import DEFAULT_SET
from hardware.usb import (
    adopt_medium,
    configure_set,
    eject,
    initialise_medium,
    media_overview,
    offered_disks,
    rotation_overview,
    seed_from_medium,
)
from hardware.usb_jobs import export_to_medium


def register(sub: Any) -> None:
    usb = sub.add_parser("usb", help="USB disks rotated off-site: initialise, export, eject")
    actions = usb.add_subparsers(dest="action")
    usb.set_defaults(func=cmd_list)
    actions.add_parser("list", help="the USB media and the disks offered").set_defaults(
        func=cmd_list
    )
    init = actions.add_parser("init", help="make a USB disk appliance media (ERASES it)")
    init.add_argument("devnode", help="the disk's device node now (/dev/sdb)")
    init.add_argument("--label", help="its label (default appl-<set>-<n>, 16 characters at most)")
    init.add_argument("--set", dest="rotation_set", default=DEFAULT_SET, help="its rotation set")
    init.add_argument("--yes", action="store_true", help="erase what the disk holds")
    init.set_defaults(func=cmd_init)
    export = actions.add_parser("export", help="export the disk's rotation set to it now")
    export.add_argument("medium", help="label or filesystem UUID")
    export.set_defaults(func=cmd_export)
    ejected = actions.add_parser("eject", help="flush and unmount a disk: safe to remove")
    ejected.add_argument("medium", help="label or filesystem UUID")
    ejected.set_defaults(func=cmd_eject)
    sets = actions.add_parser("sets", help="the rotation sets: which disk is out, which overdue")
    sets.add_argument("--set", dest="rotation_set", help="change (or create) this set")
    sets.add_argument("--assets", help="comma-separated assets to export ('': every asset)")
    sets.add_argument("--keep-newest", type=int, help="newest points of each asset exported")
    sets.add_argument("--rotate-days", type=int, help="a disk should come back this often")
    sets.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None)
    sets.set_defaults(func=cmd_sets)
    imported = actions.add_parser(
        "import",
        help="add the points on a USB disk to this appliance (also a fresh data directory)",
    )
    imported.add_argument("disk", help="the disk's device node, or its filesystem UUID")
    imported.add_argument("--set", dest="rotation_set", default=DEFAULT_SET)
    imported.set_defaults(func=cmd_import)


def cmd_list(args: argparse.Namespace) -> int:
    with open_from_args(args) as app:
        document = {"media": media_overview(app), "offered": offered_disks(app)}

    def text() -> str:
        lines = [f"{'LABEL':16}  {'SET':12}  {'STATE':15}  {'LAST WRITTEN':20}  {'POINTS':6}  UUID"]
        for m in document["media"]:
            state = "safe to remove" if m["safe_to_remove"] else m["state"]
            written = (m["last_written"] or "never")[:19]
            lines.append(
                f"{m['label']:16}  {m['set_name'][:12]:12}  {state:15}  {written:20}  "
                f"{m['points']:6}  {m['identity']}"
            )
            if m["message"]:
                lines.append(f"  ! {m['message']}")
        for d in document["offered"]:
            lines.append(
                f"offered: {d['devnode']} {d.get('model') or ''} {d.get('serial') or ''} "
                f"({d['size_bytes']} bytes): not appliance media; `usb init` would erase it"
            )
        return "\n".join(lines)

    emit(args, document, text)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from hardware.udev import scan  # pyudev: only when a disk is chosen

    inventory = scan()
    node = os.path.realpath(args.devnode)
    device = next((d for d in inventory.block.values() if d.devnode == node), None)
    if device is None:
        raise NotFound(f"no disk {args.devnode} was found (scan again after plugging it in)")
    if (device.fs_type or device.fs_uuid) and not args.yes:
        raise InvalidInput(
            f"{node} holds a {device.fs_type or 'filesystem'}; initialising erases it: add --yes"
        )
    with open_from_args(args) as app:
        state = initialise_medium(app, device, args.label, args.rotation_set, inventory=inventory)
    document = state.to_dict()
    emit(
        args,
        document,
        f"{node} is USB disk {state.label} of set {state.set_name} ({state.identity}); "
        "it is safe to remove",
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Run the export in this process (the service runs it as the ``usb_export`` job)."""
    result = run_logged(args, lambda app, log: export_to_medium(app, args.medium, log=log))
    emit(
        args,
        result,
        lambda: (
            result.get("waiting")
            or f"{len(result['copied'])} point(s) copied to {result['label']}"
            + ("; it is safe to remove" if result["safe_to_remove"] else "")
        ),
    )
    return 1 if "waiting" in result else 0


def cmd_eject(args: argparse.Namespace) -> int:
    with open_from_args(args) as app:
        state = eject(app, args.medium)
    emit(args, state.to_dict(), f"USB disk {state.label} is safe to remove")
    return 0


def cmd_sets(args: argparse.Namespace) -> int:
    with open_from_args(args) as app:
        if args.rotation_set:
            assets = None
            if args.assets is not None:
                assets = [a.strip() for a in args.assets.split(",") if a.strip()]
            configure_set(
                app,
                args.rotation_set,
                assets=assets,
                keep_newest=args.keep_newest,
                rotate_days=args.rotate_days,
                verify=args.verify,
            )
        sets = rotation_overview(app)

    def text() -> str:
        lines = []
        for s in sets:
            status = s["status"]
            assets = ", ".join(s["assets"]) or "every asset"
            lines.append(
                f"{s['name']}: newest {s['keep_newest']} of {assets}, back every "
                f"{s['rotate_days']} day(s){', verified' if s['verify'] else ''}"
            )
            for m in status["media"]:
                where = "in" if m["present"] else "out"
                written = (m["last_written"] or "never")[:10]
                late = f", OVERDUE by {m['overdue_days']} day(s)" if m["overdue_days"] else ""
                lines.append(f"  {m['label']:16}  {where:3}  last written {written}{late}")
            if status["next_to_insert"]:
                lines.append(f"  next to plug in: {status['next_to_insert']}")
        return "\n".join(lines) or "no rotation sets (usb init creates one)"

    emit(args, sets, text)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    disk = args.disk
    fs_uuid = filesystem_uuid(os.path.realpath(disk)) if disk.startswith("/dev/") else disk
    if not fs_uuid:
        raise NotFound(f"{disk} holds no filesystem")
    seeded = seed_from_medium(args.data_dir, fs_uuid)
    with open_from_args(args) as app:
        adopted = adopt_medium(app, fs_uuid, seeded["label"], args.rotation_set)
    emit(
        args,
        {**adopted, "seeded": seeded["seeded"]},
        lambda: (
            f"USB disk {adopted['label']}: {adopted['copies']} point(s) there, "
            f"{adopted['points_added']} added to the catalog, "
            f"{len(adopted['damaged_points'])} unreadable; it is safe to remove "
            f"(restore with --from {adopted['label']})"
        ),
    )
    return 0
