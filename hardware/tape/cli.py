"""``appliance tape``: media pools, cartridges, tape backup, restore, scan and erase.

Registered through the ``appliance.cli_plugins`` entry point; each command calls one work
function of :mod:`hardware.tape.jobs` or :mod:`hardware.tape.scan` (the ones the jobs run).
A drive is named by identity (``virtual:<library>-drive<N>``, or ``/dev/nstN``); ``--library
DIR`` names a virtual library's directory instead (registered in the catalog if it is not yet).

``tape scan --library DIR`` on a **fresh** data directory first gives it the store of the tapes
(config and key files read from tape), then opens it with ``APPLIANCE_RECOVERY_KEY`` (or the
passphrase) and rebuilds the catalog's sets, tapes and points; ``tape restore POINT`` then
brings a point back from tape, and the normal ``restore`` works.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from appliance.cli import emit, open_from_args, run_logged
from appliance.errors import InvalidInput
from hardware.tape.deck import Deck, library_deck, open_deck
from hardware.tape.jobs import backup_to_tape, erase_tape
from hardware.tape.library import VirtualLibrary, register_library, registered
from hardware.tape.restore import restore_from_tape
from hardware.tape.scan import scan_tapes, seed_store_from_tape
from hardware.tape.st import open_st


def register(sub: Any) -> None:
    tape = sub.add_parser("tape", help="tape media pools, backups to tape, restores, scans")
    actions = tape.add_subparsers(dest="action")
    tape.set_defaults(func=cmd_media)
    actions.add_parser("media", help="every known cartridge: set, state, place").set_defaults(
        func=cmd_media
    )
    pools = actions.add_parser("pools", help="list media pools, or create/change one")
    pools.add_argument("--pool", help="the pool to create or change")
    pools.add_argument("--allocation", choices=["continue", "new_set"], default="continue")
    pools.add_argument("--retention-days", type=int, default=365)
    pools.set_defaults(func=cmd_pools)

    def drive_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--drive", help="the drive's identity (virtual:NAME-driveN, /dev/nstN)")
        parser.add_argument("--library", help="a virtual library's directory (its drive 0)")

    backup = actions.add_parser("backup", help="write points to a media pool's set")
    backup.add_argument("--pool", required=True)
    backup.add_argument("--points", default="newest", help="comma-separated ids, or 'newest'")
    backup.add_argument("--verify", action="store_true", help="read everything back afterwards")
    drive_options(backup)
    backup.set_defaults(func=cmd_backup)
    restore = actions.add_parser("restore", help="read a point (or one path) back from tape")
    restore.add_argument("point")
    restore.add_argument("--path", help="only this path of a files point (read via the set)")
    restore.add_argument("--set", dest="set_id", help="the media set to read (default: newest)")
    drive_options(restore)
    restore.set_defaults(func=cmd_restore)
    scan = actions.add_parser("scan", help="rebuild the catalog from the tapes within reach")
    drive_options(scan)
    scan.set_defaults(func=cmd_scan)
    erase = actions.add_parser("erase", help="make a tape blank (refused while it is needed)")
    erase.add_argument("barcode")
    erase.add_argument("--force", action="store_true", help="even if its points are needed")
    drive_options(erase)
    erase.set_defaults(func=cmd_erase)
    place = actions.add_parser("place", help="record where a tape is (library, shelf, offsite)")
    place.add_argument("barcode")
    place.add_argument("place", choices=["library", "shelf", "offsite"])
    place.add_argument("--slot", type=int)
    place.set_defaults(func=cmd_place)


def _deck(app: Any, args: argparse.Namespace) -> Deck:
    if args.library:
        path = Path(args.library).resolve()
        if not any(Path(e["path"]).resolve() == path for e in registered(app.catalog)):
            register_library(app.catalog, path)
        return library_deck(VirtualLibrary(path), 0, app.catalog)
    if not args.drive:
        raise InvalidInput("name the drive (--drive) or a virtual library (--library)")
    return open_deck(app.catalog, args.drive)


def cmd_media(args: argparse.Namespace) -> int:
    with open_from_args(args) as app:
        media = [
            {
                **m.__dict__,
                "created_at": str(m.created_at),
                "last_written_at": str(m.last_written_at),
            }
            for m in app.catalog.list_tape_media()
        ]

    def text() -> str:
        lines = [f"{'BARCODE':10}  {'POOL':10}  {'SET':10}  {'SEQ':3}  {'STATE':8}  PLACE"]
        for m in media:
            lines.append(
                f"{m['barcode']:10}  {m['pool'] or '-':10}  {(m['media_set_id'] or '-')[:10]:10}  "
                f"{m['sequence'] or '-'!s:3}  {m['state']:8}  {m['place']}"
                + (f" slot {m['slot']}" if m["slot"] else "")
                + (f", {m['point_count']} point(s)" if m["point_count"] else "")
            )
        return "\n".join(lines)

    emit(args, media, text)
    return 0


def cmd_pools(args: argparse.Namespace) -> int:
    with open_from_args(args) as app:
        if args.pool:
            app.catalog.put_tape_pool(
                args.pool, allocation=args.allocation, retention_days=args.retention_days
            )
        pools = [
            {"name": p.name, "allocation": p.allocation, "retention_days": p.retention_days}
            for p in app.catalog.list_tape_pools()
        ]
    emit(
        args,
        pools,
        lambda: (
            "\n".join(
                f"{p['name']}: {p['allocation']}, kept {p['retention_days']} day(s)" for p in pools
            )
            or "no media pools (tape pools --pool NAME creates one)"
        ),
    )
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    points: str | list[str] = args.points
    if args.points != "newest":
        points = [p.strip() for p in args.points.split(",") if p.strip()]
    result = run_logged(
        args,
        lambda app, log: backup_to_tape(
            app, _deck(app, args), args.pool, points, log=log, verify=args.verify
        ),
    )
    emit(
        args,
        result,
        lambda: (
            result.get("waiting")
            or f"{len(result['points_written'])} point(s) written to set {result['set']} "
            f"(tapes {', '.join(result['tapes'])})"
        ),
    )
    return 1 if "waiting" in result else 0


def cmd_restore(args: argparse.Namespace) -> int:
    result = run_logged(
        args,
        lambda app, log: restore_from_tape(
            app, _deck(app, args), args.point, subpath=args.path, set_id=args.set_id, log=log
        ),
    )
    emit(
        args,
        result,
        lambda: (
            result.get("waiting")
            or (
                f"point {result['point']} is back in the home pool"
                if result["home"]
                else f"{result['path']} is readable: restore {result['point']} --from {result['read_from']}"
            )
            + f" ({result['objects_read']} object(s) read, {result['positions']} tape position(s))"
        ),
    )
    return 1 if "waiting" in result else 0


def cmd_scan(args: argparse.Namespace) -> int:
    seeded: dict[str, Any] = {"seeded": False}
    # A fresh data directory gets the tapes' store before it can be opened (a virtual library
    # registered in its catalog cannot be found yet: name its directory, or a real drive); a
    # recovery key is proven on the tapes before anything is written.
    key = os.environ.get("APPLIANCE_RECOVERY_KEY") or None
    if args.library:
        deck = library_deck(VirtualLibrary(args.library))
        seeded = seed_store_from_tape(args.data_dir, deck, recovery_key=key)
    elif args.drive and args.drive.startswith("/dev/"):
        deck = Deck(args.drive, lambda: open_st(args.drive, args.drive))
        seeded = seed_store_from_tape(args.data_dir, deck, recovery_key=key)
    result = run_logged(args, lambda app, log: scan_tapes(app, _deck(app, args), log=log))
    result["seeded"] = seeded["seeded"]
    emit(
        args,
        result,
        lambda: (
            "\n".join(
                f"set {s['set']} ({s['pool']}): {len(s['points'])} point(s) on {', '.join(s['tapes'])}"
                f", {s['points_added']} new to the catalog"
                for s in result.get("sets", [])
            )
            or "no set of this store on the tapes within reach"
        ),
    )
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    result = run_logged(
        args,
        lambda app, log: erase_tape(app, _deck(app, args), args.barcode, force=args.force, log=log),
    )
    emit(args, result, f"tape {args.barcode} is blank")
    return 0


def cmd_place(args: argparse.Namespace) -> int:
    with open_from_args(args) as app:
        medium = app.catalog.set_tape_medium_place(args.barcode, args.place, args.slot)
    emit(
        args,
        {"barcode": medium.barcode, "place": medium.place},
        f"{medium.barcode}: {medium.place}",
    )
    return 0
