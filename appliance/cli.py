"""The ``appliance`` command line.

Every command accepts ``--json`` (one JSON document on stdout, for scripts) and shows a progress
line on stderr when stderr is a terminal. Errors print ``error [code]: message`` on stderr and exit
with status 2; a verify that finds damage exits with status 1.

The data directory comes from ``--data-dir`` or ``APPLIANCE_DATA_DIR`` (default
``~/.local/share/appliance``); the passphrase from ``APPLIANCE_PASSPHRASE``, ``--passphrase-file``
or a prompt on a terminal.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from importlib.metadata import entry_points
from typing import Any

from appliance.allocator import tune_allocator
from appliance.cli_locations import (
    add_bucket_arguments,
    bucket_options,
    location_kind,
    seed_from_location,
)
from appliance.cli_locations import register as register_location_commands
from appliance.engine import Appliance
from appliance.errors import ApplianceError, InvalidInput, JobWaiting, PassphraseRequired
from appliance.file_modes import PRIVATE_UMASK
from appliance.locations.work import copies_public
from appliance.maintenance import collect_garbage, repair_store
from appliance.point_check import verify_new_point
from appliance.retention import RetentionRules
from appliance.sources.ingest import session_chunks
from appliance.workers import start_early

EXIT_DAMAGE = 1
EXIT_ERROR = 2


def _size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1] if value and value[-1] in units else ""
    try:
        return int(float(value[: len(value) - len(unit)]) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 2G or 500M") from None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """A one-line progress display on a terminal; silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.monotonic()
        self._last = 0.0

    def __call__(self, info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.2:
            return
        self._last = now
        done = info.get("bytes_done", 0)
        rate = done / max(now - self.started, 1e-6)
        parts = [f"{_human(done)}"]
        total = info.get("bytes_total")
        if total:
            pct = 100 * done / total
            bar = "#" * int(pct / 5)
            parts.insert(0, f"[{bar:<20}] {pct:5.1f}%")
        if "files" in info:
            parts.append(f"{info['files']} files")
        parts.append(f"{_human(rate)}/s")
        sys.stderr.write("\r" + "  ".join(parts) + "\x1b[K")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _passphrase(args: argparse.Namespace, *, confirm: bool = False) -> str:
    if args.passphrase_file:
        try:
            with open(args.passphrase_file, encoding="utf-8") as f:
                return f.read().rstrip("\n")
        except OSError as exc:
            raise InvalidInput(f"cannot read passphrase file: {exc.strerror}") from exc
    env = os.environ.get("APPLIANCE_PASSPHRASE")
    if env:
        return env
    if sys.stdin.isatty():
        first = getpass.getpass("Passphrase: ")
        if confirm and getpass.getpass("Repeat passphrase: ") != first:
            raise InvalidInput("the passphrases differ")
        return first
    raise PassphraseRequired()


def _open(args: argparse.Namespace, *, workers: bool = False) -> Appliance:
    if workers:
        start_early()
    recovery = os.environ.get("APPLIANCE_RECOVERY_KEY")
    if recovery:
        return Appliance.open(args.data_dir, recovery_key=recovery)
    return Appliance.open(args.data_dir, passphrase=_passphrase(args))


def _point_dict(point: Any) -> dict[str, Any]:
    out = asdict(point)
    for key, value in out.items():
        if isinstance(value, datetime):
            out[key] = value.isoformat()
    return out


def _emit(args: argparse.Namespace, document: Any, text: str | Callable[[], str]) -> None:
    if args.json:
        json.dump(document, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(text() if callable(text) else text)


#: For CLI plug-ins (``appliance.cli_plugins``): open the data directory the global options
#: name, and print a result as JSON (``--json``) or as text.
open_from_args = _open
emit = _emit


def run_logged(
    args: argparse.Namespace,
    work: Callable[[Appliance, Callable[[str, str], None]], dict[str, Any]],
) -> dict[str, Any]:
    """Run a job's work function in this process, its log lines on stderr (text mode) and in
    the result's ``log``; a job that would wait answers ``{"waiting": reason}`` instead."""
    lines: list[str] = []

    def log(level: str, message: str) -> None:
        lines.append(f"{level}: {message}")
        if not args.json:
            print(f"{level}: {message}", file=sys.stderr)

    with _open(args) as app:
        try:
            result = work(app, log)
        except JobWaiting as wait:
            result = {"waiting": wait.reason}
    return {**result, "log": lines}


# --- commands -----------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    app, recovery = Appliance.init(args.data_dir, _passphrase(args, confirm=True))
    with app:
        document = {
            "data_dir": app.data_dir.path,
            "store": app.data_dir.store_path,
            "store_id": app.repo.store_id,
            "recovery_key": recovery,
        }
        _emit(
            args,
            document,
            f"Initialised {app.data_dir.path} (store {app.repo.store_id}).\n\n"
            "Recovery key (print it and keep it apart from the appliance; with it a new\n"
            "passphrase can be set if the passphrase is lost):\n\n"
            f"  {recovery}\n",
        )
    return 0


def cmd_backup_files(args: argparse.Namespace) -> int:
    progress = Progress(sys.stderr.isatty() and not args.json)
    with _open(args, workers=True) as app:
        outcome = app.backup_files(
            args.path, args.asset, mode=args.mode, workers=args.workers, progress=progress
        )
    progress.done()
    stats = outcome.stats
    _emit(
        args,
        {"point": _point_dict(outcome.point), "stats": stats, "warnings": outcome.warnings},
        lambda: (
            f"Point {outcome.point.id} ({outcome.point.mode}) of {args.asset}: "
            f"{stats['files']} files, {_human(stats['bytes_total'])}, read "
            f"{_human(stats['bytes_read'])}, stored {_human(stats['new_bytes'])} new, "
            f"{len(outcome.warnings)} warning(s)"
            + "".join(f"\n  warning: {w['path']}: {w['message']}" for w in outcome.warnings[:20])
        ),
    )
    return 0


def _changed_blocks(path: str | None) -> dict[str, list[tuple[int, int]]] | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        return {name: [(int(o), int(n)) for o, n in ranges] for name, ranges in raw.items()}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise InvalidInput(
            f"--changed-blocks must be a JSON object {{disk name: [[offset, length], ...]}}: {exc}"
        ) from exc


def cmd_backup_image(args: argparse.Namespace) -> int:
    progress = Progress(sys.stderr.isatty() and not args.json)
    with _open(args, workers=True) as app:
        outcome = app.backup_image(
            args.disks,
            args.asset,
            mode=args.mode,
            vm_spec=args.vm,
            changed_ranges=_changed_blocks(args.changed_blocks),
            disk_format=args.format,
            threads=args.workers,
            progress=progress,
        )
    progress.done()
    stats = outcome.stats
    _emit(
        args,
        {"point": _point_dict(outcome.point), "stats": stats},
        lambda: (
            f"Point {outcome.point.id} ({outcome.point.mode}) of {args.asset}: "
            f"{stats['disks']} disk(s), {_human(stats['logical_bytes'])}, read "
            f"{_human(stats['bytes_read'])}, stored {_human(stats['new_bytes'])} new"
        ),
    )
    return 0


def cmd_points(args: argparse.Namespace) -> int:
    with _open(args) as app:
        points = app.catalog.list_points(asset=args.asset)
        copies = {p.id: copies_public(app, p.id) for p in points} if args.copies else {}

    def table() -> str:
        if not points:
            return "No recovery points yet."
        rows = [f"{'ID':16}  {'ASSET':16}  {'KIND':5}  {'MODE':12}  {'CREATED (UTC)':19}  SIZE"]
        for p in points:
            rows.append(
                f"{p.id:16}  {p.asset[:16]:16}  {p.kind:5}  {p.mode:12}  "
                f"{p.created_at.strftime('%Y-%m-%d %H:%M:%S')}  {_human(p.logical_bytes)}"
            )
            for c in copies.get(p.id, []):
                rows.append(f"    copy at {c['label']} ({c['kind']}): {c['state']}")
        return "\n".join(rows)

    documents = [_point_dict(p) for p in points]
    if args.copies:
        for document in documents:
            document["copies"] = copies[document["id"]]
    _emit(args, documents, table)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    progress = Progress(sys.stderr.isatty() and not args.json and args.target != "-")
    with _open(args, workers=args.target != "-") as app:
        if args.target == "-":
            count = app.restore_tar(args.point, sys.stdout.buffer, subpath=args.path)
            sys.stdout.buffer.flush()
            print(f"streamed {count} entries as tar", file=sys.stderr)
            return 0
        result = app.restore(
            args.point,
            args.target,
            subpath=args.path,
            disk=args.disk,
            target_format=args.format,
            location=args.location,
            log=lambda message: print(f"note: {message}", file=sys.stderr),
            workers=args.workers,
            progress=progress,
        )
    progress.done()
    _emit(
        args,
        result,
        lambda: (
            f"Restored point {result['point']} to {args.target}: "
            + ", ".join(f"{k} {v}" for k, v in result.items() if isinstance(v, int))
            if "disks" not in result
            else f"Restored {len(result['disks'])} disk(s): " + ", ".join(result["disks"])
        ),
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if args.quick:
        if not args.point or args.location is not None:
            raise InvalidInput("--quick checks one image point of the local pool: name the point")
        with _open(args) as app:
            check = verify_new_point(app, args.point)
        _emit(args, check.to_dict(), check.summary)
        return 0 if check.ok else EXIT_DAMAGE
    if args.location is not None:
        if not args.point:
            raise InvalidInput("--location checks one point's copy: name the point")
        with _open(args) as app:
            copy = app.verify_copy(args.point, args.location)
        _emit(
            args,
            copy,
            lambda: (
                f"copy of {args.point} at {copy['label']}: {copy['blobs_checked']} blobs checked, "
                + ("OK" if not copy["affected_points"] else "DAMAGED: marked lost")
            ),
        )
        return 0 if not copy["affected_points"] else EXIT_DAMAGE
    progress = Progress(sys.stderr.isatty() and not args.json)
    with _open(args) as app:
        report = app.verify(args.point, max_bytes=args.max_bytes, progress=progress)
        progress.done()

    def text() -> str:
        lines = [
            f"Verified {report.packs_checked} of {report.packs_total} packs "
            f"({_human(report.bytes_checked)}, {report.blobs_checked} blobs); "
            f"coverage of this cycle {report.coverage:.0%}."
        ]
        for damaged in report.damaged_packs:
            lines.append(f"DAMAGED pack {damaged['pack'][:16]}: {damaged['error']}")
        for damaged in report.damaged_index_files:
            lines.append(f"DAMAGED {damaged['name']}: {damaged['error']}")
        for point_id, reasons in report.affected_points.items():
            lines.append(f"AFFECTED point {point_id}: " + "; ".join(reasons))
        lines.append("OK" if report.ok else "DAMAGE FOUND")
        return "\n".join(lines)

    _emit(args, report.to_dict(), text)
    return 0 if report.ok else EXIT_DAMAGE


def cmd_prune(args: argparse.Namespace) -> int:
    rules = RetentionRules(
        keep_last=args.keep_last,
        keep_hourly=args.keep_hourly,
        keep_daily=args.keep_daily,
        keep_weekly=args.keep_weekly,
        keep_monthly=args.keep_monthly,
        keep_yearly=args.keep_yearly,
    )
    if rules.empty():
        raise InvalidInput("name at least one --keep-... rule")
    with _open(args) as app:
        decision = app.prune(args.asset, rules, dry_run=args.dry_run)
    document = {
        "keep": decision.keep,
        "remove": decision.remove,
        "held": decision.held,
        "dry_run": args.dry_run,
    }
    verb = "would remove" if args.dry_run else "removed"
    _emit(
        args,
        document,
        lambda: "\n".join(
            [f"keep   {pid}  ({', '.join(r)})" for pid, r in decision.keep.items()]
            + [f"remove {pid}" for pid in decision.remove]
            + [f"{verb} {len(decision.remove)} point(s); run `appliance gc` to free space"]
        ),
    )
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    with _open(args) as app, app.locks.exclusive():
        report = collect_garbage(
            app.repo,
            grace_seconds=args.grace,
            dry_run=args.dry_run,
            keep=session_chunks(app.data_dir.path),
        )
    _emit(
        args,
        report.to_dict(),
        lambda: (
            f"{'Would free' if args.dry_run else 'Freed'} {_human(report.bytes_freed)}: "
            f"{report.packs_deleted} pack(s) deleted, {report.packs_repacked} repacked, "
            f"{report.packs_orphaned_deleted} orphaned; {report.points} point(s) kept intact"
        ),
    )
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    recovery = os.environ.get("APPLIANCE_RECOVERY_KEY")
    if recovery:
        app = Appliance.open(args.data_dir, recovery_key=recovery, sync_index=False)
    else:
        app = Appliance.open(args.data_dir, passphrase=_passphrase(args), sync_index=False)
    with app, app.locks.exclusive():
        report = repair_store(app.repo)

    def text() -> str:
        lines = [
            f"Index rebuilt from {report.packs_scanned} packs ({report.blobs_indexed} blobs); "
            f"{report.blobs_dropped} damaged blob(s) dropped from the index."
        ]
        for damaged in report.damaged_packs:
            lines.append(f"DAMAGED pack {damaged['pack'][:16]}: {damaged['error']}")
        for point_id, reasons in report.affected_points.items():
            lines.append(f"STILL DAMAGED point {point_id}: " + "; ".join(reasons))
        if report.blobs_dropped:
            lines.append("The next backup of the affected assets stores the lost data again.")
        return "\n".join(lines)

    _emit(args, report.to_dict(), text)
    return 0 if not report.affected_points else EXIT_DAMAGE


def cmd_catalog_rebuild(args: argparse.Namespace) -> int:
    if args.source is not None:
        kind, options = location_kind(args.source), bucket_options(args)
        seed_from_location(args.data_dir, args.source, kind, options)
        with _open(args) as app:
            adopted = app.adopt_location(args.source, kind=kind, options=options)
        _emit(
            args,
            adopted,
            lambda: (
                f"Catalog rebuilt from location {adopted['label']}: {adopted['copies']} point(s) "
                f"there, {adopted['points_added']} added, "
                f"{len(adopted['damaged_points'])} unreadable manifest(s)"
            ),
        )
        return 0
    with _open(args) as app:
        result = app.rebuild_catalog()
    _emit(
        args,
        result,
        lambda: (
            f"Catalog rebuilt from the store: {result['points']} point(s), {result['added']} added, "
            f"{result['removed']} removed, {result['damaged']} unreadable manifest(s)"
        ),
    )
    return 0


def cmd_key_export(args: argparse.Namespace) -> int:
    with _open(args) as app:
        if args.paper:
            text = app.repo.key.recovery_key()
            document: dict[str, Any] = {"recovery_key": text, "store_id": app.repo.store_id}
        else:
            name = app.repo.key_files()[0]
            text = app.repo.backend.get(name).decode()
            document = json.loads(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + ("\n" if not text.endswith("\n") else ""))
        os.chmod(args.output, 0o600)
        print(f"written to {args.output}", file=sys.stderr)
        return 0
    _emit(args, document, text)
    return 0


def cmd_key_recover(args: argparse.Namespace) -> int:
    """Set a new passphrase using the printed recovery key."""
    recovery = os.environ.get("APPLIANCE_RECOVERY_KEY")
    if args.recovery_key_file:
        with open(args.recovery_key_file, encoding="utf-8") as f:
            recovery = f.read().strip()
    if not recovery and sys.stdin.isatty():
        recovery = input("Recovery key: ")
    if not recovery:
        raise InvalidInput("give the recovery key (APPLIANCE_RECOVERY_KEY or --recovery-key-file)")
    with Appliance.open(args.data_dir, recovery_key=recovery) as app:
        name = app.repo.add_passphrase(_passphrase(args, confirm=True))
    _emit(args, {"key_file": name}, f"New passphrase set ({name}).")
    return 0


# --- parser ------------------------------------------------------------------------------------------


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; given ``argv`` naming a core command, without the plug-ins'
    commands (importing them cost ~0.1 s of every backup and restore)."""
    parser = argparse.ArgumentParser(prog="appliance", description="Backup appliance")
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("APPLIANCE_DATA_DIR")
        or os.path.join(os.path.expanduser("~"), ".local", "share", "appliance"),
        help="data directory (APPLIANCE_DATA_DIR)",
    )
    parser.add_argument("--passphrase-file", help="read the passphrase from this file")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--workers", type=int, default=None, help="worker processes/threads")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("init", help="create the data directory and its store").set_defaults(
        func=cmd_init
    )

    backup = sub.add_parser("backup", help="make a recovery point").add_subparsers(
        dest="kind", required=True
    )
    files = backup.add_parser("files", help="back up a file tree")
    files.add_argument("path")
    files.add_argument("--asset", required=True)
    files.add_argument(
        "--mode", choices=("full", "incremental", "differential"), default="incremental"
    )
    files.set_defaults(func=cmd_backup_files)
    image = backup.add_parser("image", help="back up VM disk images")
    image.add_argument("disks", nargs="+")
    image.add_argument("--asset", required=True)
    image.add_argument("--vm", help="VM definition: JSON, TOML or libvirt domain XML")
    image.add_argument(
        "--mode", choices=("full", "incremental", "differential"), default="incremental"
    )
    image.add_argument("--changed-blocks", help="JSON {disk: [[offset, length], ...]}")
    image.add_argument("--format", help="disk format (default: detected)")
    image.set_defaults(func=cmd_backup_image)

    points = sub.add_parser("points", help="list recovery points")
    points.add_argument("--asset")
    points.add_argument("--copies", action="store_true", help="with each point's copies")
    points.set_defaults(func=cmd_points)
    register_location_commands(sub, _open, _emit)

    restore = sub.add_parser("restore", help="restore a point (TARGET - streams a tar)")
    restore.add_argument("point")
    restore.add_argument("target")
    restore.add_argument("--path", help="restore only this file or folder")
    restore.add_argument("--disk", help="restore only this disk of an image point")
    restore.add_argument("--format", default="raw", help="image format of restored disks")
    restore.add_argument("--from", dest="location", help="read from this location first")
    restore.set_defaults(func=cmd_restore)

    verify = sub.add_parser("verify", help="check the store (or one point)")
    verify.add_argument("point", nargs="?")
    verify.add_argument("--max-bytes", type=_size, help="budget, e.g. 2G; coverage is remembered")
    verify.add_argument("--location", help="check the point's copy at this location alone")
    verify.add_argument(
        "--quick",
        action="store_true",
        help="the check after an image backup: every chunk indexed, every pack present and "
        "matching its name (no decryption)",
    )
    verify.set_defaults(func=cmd_verify)

    prune = sub.add_parser("prune", help="remove points by retention rules")
    prune.add_argument("--asset", required=True)
    for period in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        prune.add_argument(f"--keep-{period}", type=int, default=0)
    prune.add_argument("--dry-run", action="store_true")
    prune.set_defaults(func=cmd_prune)

    gc = sub.add_parser("gc", help="free space of unreferenced data")
    gc.add_argument("--grace", type=float, default=3600.0, help="seconds (default 3600)")
    gc.add_argument("--dry-run", action="store_true")
    gc.set_defaults(func=cmd_gc)

    sub.add_parser(
        "repair", help="rebuild the index from the packs and drop damaged blobs from it"
    ).set_defaults(func=cmd_repair)

    catalog = sub.add_parser("catalog", help="catalog maintenance").add_subparsers(
        dest="action", required=True
    )
    rebuild = catalog.add_parser("rebuild", help="recreate the catalog from the store")
    rebuild.add_argument(
        "--from",
        dest="source",
        metavar="LOCATION",
        help="from another location of the store (a directory or s3://BUCKET[/PREFIX]), also "
        "on a fresh data directory",
    )
    add_bucket_arguments(rebuild)
    rebuild.set_defaults(func=cmd_catalog_rebuild)

    key = sub.add_parser("key", help="key management").add_subparsers(dest="action", required=True)
    export = key.add_parser("export", help="export the wrapped key file, or --paper recovery key")
    export.add_argument("--paper", action="store_true")
    export.add_argument("--output")
    export.set_defaults(func=cmd_key_export)
    recover = key.add_parser("recover", help="set a new passphrase with the recovery key")
    recover.add_argument("--recovery-key-file")
    recover.set_defaults(func=cmd_key_recover)

    # Outer packages add commands (the service adds `serve` and `admin`) through this entry
    # point group, so the core CLI lists them without importing any outer package.
    core = set(sub.choices)
    plugins = [] if argv is not None and _command(argv) in core else _cli_plugins()
    for plugin in plugins:
        try:
            register = plugin.load()
        except Exception as exc:  # a broken plug-in must not take the core commands down
            print(f"warning: CLI plug-in {plugin.name} not loaded: {exc}", file=sys.stderr)
            continue
        register(sub)
    _accept_global_options_after_subcommands(parser)
    return parser


def _cli_plugins() -> list[Any]:
    return list(entry_points(group="appliance.cli_plugins"))


#: Options before the command that take a value (the value is not the command).
_VALUED_OPTIONS = ("--data-dir", "--passphrase-file", "--workers")


def _command(argv: Sequence[str]) -> str | None:
    """The command a command line names, or None (none, or help asked before it)."""
    tokens = iter(argv)
    for token in tokens:
        if token in ("-h", "--help"):
            return None
        if token in _VALUED_OPTIONS:
            next(tokens, None)
        elif not token.startswith("-"):
            return token
    return None


def _accept_global_options_after_subcommands(parser: argparse.ArgumentParser) -> None:
    """``appliance points --json`` works like ``appliance --json points``: every subcommand
    accepts ``--json`` too. Its default is SUPPRESS, so a subcommand given without it leaves
    the value set before the subcommand alone."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not any("--json" in a.option_strings for a in sub._actions):
                    sub.add_argument(
                        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON"
                    )
                _accept_global_options_after_subcommands(sub)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    tune_allocator()
    # What the appliance creates (catalog, caches, keys) is readable by root only.
    umask = os.umask(PRIVATE_UMASK)
    try:
        result: int = args.func(args)
        return result
    except ApplianceError as exc:
        if getattr(args, "json", False):
            json.dump({"error": exc.to_dict()}, sys.stdout, default=str)
            sys.stdout.write("\n")
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        os.umask(umask)


if __name__ == "__main__":
    sys.exit(main())
