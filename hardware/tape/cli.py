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
from appliance.cron import check_cron
from appliance.errors import InvalidInput, NotFound
from hardware.tape.deck import Deck, library_deck, open_deck
from hardware.tape.jobs import backup_to_tape, erase_tape
from hardware.tape.library import VirtualLibrary, open_registered, register_library, registered
from hardware.tape.restore import restore_from_tape
from hardware.tape.scan import scan_tapes, seed_store_from_tape
from hardware.tape.schedule import GFS_KEYS, check_rule, rule_words
from hardware.tape.st import open_st


def register(sub: Any) -> None:
    tape = sub.add_parser("tape", help="tape media pools, backups to tape, restores, scans")
    actions = tape.add_subparsers(dest="action")
    tape.set_defaults(func=cmd_media)
    actions.add_parser("media", help="every known cartridge: set, state, place").set_defaults(
        func=cmd_media
    )
    pools = actions.add_parser(
        "pools", help="list media pools, create/change one and its schedule, or delete one"
    )
    which = pools.add_mutually_exclusive_group()
    which.add_argument("--pool", help="the pool to create or change")
    which.add_argument("--delete", metavar="NAME", help="delete a pool without tapes or sets")
    # None: a new pool gets continue / 365 days, an existing one keeps what it has.
    pools.add_argument("--allocation", choices=["continue", "new_set"])
    pools.add_argument("--retention-days", type=int)
    when = pools.add_mutually_exclusive_group()
    when.add_argument("--schedule", metavar="CRON", help="back up to the pool on this schedule")
    when.add_argument("--no-schedule", action="store_true", help="back up only when asked")
    pools.add_argument("--drive", help="the drive the scheduled backups write with (identity)")
    pools.add_argument("--points", choices=["newest", "gfs"], help="which points they write")
    for key in GFS_KEYS:
        pools.add_argument(f"--{key.replace('_', '-')}", type=int, help="with --points gfs")
    pools.add_argument(
        "--asset", action="append", dest="assets", help="only this asset's points (repeatable)"
    )
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


def _schedule_asked(args: argparse.Namespace) -> bool:
    return bool(
        args.schedule
        or args.no_schedule
        or args.drive
        or args.points
        or args.assets
        or any(getattr(args, key) is not None for key in GFS_KEYS)
    )


def _points_rule(args: argparse.Namespace, current: dict[str, Any]) -> dict[str, Any]:
    """The points rule the options give (``check_rule`` checks it, as for the API): the
    current one where no option names points."""
    keeps = {key: getattr(args, key) for key in GFS_KEYS if getattr(args, key) is not None}
    if not (args.points or keeps or args.assets):
        return check_rule(current or "newest")
    rule: dict[str, Any] = {"rule": args.points or ("gfs" if keeps else "newest"), **keeps}
    if args.assets:
        rule["assets"] = args.assets
    return check_rule(rule)


def _check_drive(catalog: Any, identity: str) -> str:
    """``identity`` if it names a drive of a registered virtual library or a tape device that
    exists (the API also asks udev; a drive that does not exist never gets a schedule)."""
    known = {
        library.drive_identity(d.index)
        for library in open_registered(catalog)
        if isinstance(library, VirtualLibrary)
        for d in library.status().drives
    }
    if identity in known or (identity.startswith("/dev/") and Path(identity).exists()):
        return identity
    raise NotFound(f"no tape drive {identity} is attached or registered", drive=identity)


def _set_pool(app: Any, args: argparse.Namespace) -> None:
    """Create or change ``args.pool`` and, if asked, its schedule: everything is checked
    before anything is written, so a refusal leaves the pool as it was."""
    catalog = app.catalog
    existing = next((p for p in catalog.list_tape_pools() if p.name == args.pool), None)
    allocation = args.allocation or (existing.allocation if existing else "continue")
    retention = (
        args.retention_days
        if args.retention_days is not None
        else (existing.retention_days if existing else 365)
    )
    schedule_asked = _schedule_asked(args)
    if schedule_asked:
        if args.no_schedule:
            schedule, drive = None, None
        else:
            current = existing.schedule if existing else None
            schedule = check_cron(args.schedule) if args.schedule else current
            drive = args.drive or (existing.schedule_drive if existing else None)
            if schedule is None:
                raise InvalidInput("name the schedule (--schedule CRON) the pool backs up on")
            if drive is None:
                raise InvalidInput("a scheduled tape backup needs the drive it writes with")
        rule = _points_rule(args, existing.points_rule if existing else {})
        for asset in rule.get("assets", []):
            catalog.get_asset(asset)  # NotFound in words
        if drive is not None:
            _check_drive(catalog, drive)
    if existing is None or args.allocation is not None or args.retention_days is not None:
        catalog.put_tape_pool(args.pool, allocation=allocation, retention_days=retention)
    if schedule_asked:
        catalog.set_tape_pool_schedule(args.pool, schedule=schedule, drive=drive, points_rule=rule)


def _pool_words(p: dict[str, Any]) -> str:
    words = f"{p['name']}: {p['allocation']}, kept {p['retention_days']} day(s); "
    if p["schedule"] is None:
        return words + "backed up only when asked"
    return words + f"backs up on {p['schedule']!r} with {p['drive']}, {p['points_words']}"


def cmd_pools(args: argparse.Namespace) -> int:
    if args.delete and (
        args.allocation is not None or args.retention_days is not None or _schedule_asked(args)
    ):
        raise InvalidInput("--delete takes no other pool option")
    if not args.pool and (
        args.allocation is not None or args.retention_days is not None or _schedule_asked(args)
    ):
        raise InvalidInput("name the pool these options are for (--pool NAME)")
    with open_from_args(args) as app:
        if args.delete:
            app.catalog.delete_tape_pool(args.delete)
            app.catalog.audit("cli", "tape.pool.delete", args.delete, {"pool": args.delete})
        elif args.pool:
            _set_pool(app, args)
        pools = []
        for p in app.catalog.list_tape_pools():
            rule = check_rule(p.points_rule or "newest")
            pools.append(
                {
                    "name": p.name,
                    "allocation": p.allocation,
                    "retention_days": p.retention_days,
                    "schedule": p.schedule,
                    "drive": p.schedule_drive,
                    "points": rule,
                    "points_words": rule_words(rule),
                }
            )
    deleted = f"pool {args.delete} deleted\n" if args.delete else ""
    emit(
        args,
        pools,
        lambda: (
            deleted
            + (
                "\n".join(_pool_words(p) for p in pools)
                or "no media pools (tape pools --pool NAME creates one)"
            )
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
