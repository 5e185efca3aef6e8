"""The CLI's location commands: ``locations`` (list, add, remove), ``copy POINT --to LOCATION``
and ``catalog rebuild --from LOCATION``. Thin: each calls one work function of the engine."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from appliance.engine import Appliance, DataDir
from appliance.store.backend import LocalDirectoryBackend
from appliance.store.registry import open_backend

Opener = Callable[[argparse.Namespace], Appliance]
Emitter = Callable[[argparse.Namespace, Any, Any], None]


def register(sub: Any, open_app: Opener, emit: Emitter) -> None:
    locations = sub.add_parser("locations", help="places that hold copies of the store")
    actions = locations.add_subparsers(dest="action")
    locations.set_defaults(func=lambda a: _list(a, open_app, emit))
    actions.add_parser("list", help="list locations").set_defaults(
        func=lambda a: _list(a, open_app, emit)
    )
    add = actions.add_parser(
        "add", help="add a directory location (a mounted disk, a share) or a bucket (s3://...)"
    )
    add.add_argument("path", help="a folder, or s3://BUCKET[/PREFIX]")
    add.add_argument("--label", default="")
    add.add_argument(
        "--require-mount",
        action="store_true",
        help="the path must be a mountpoint (an unmounted disk is then unavailable, never empty)",
    )
    add.add_argument("--offsite", action="store_true", help="the location is kept off-site")
    add_bucket_arguments(add)
    add.set_defaults(func=lambda a: _add(a, open_app, emit))
    remove = actions.add_parser("remove", help="forget a location (its data is left alone)")
    remove.add_argument("location")
    remove.set_defaults(func=lambda a: _remove(a, open_app, emit))

    copy = sub.add_parser("copy", help="copy a point to a location (only what it lacks)")
    copy.add_argument("point")
    copy.add_argument("--to", required=True, dest="location")
    copy.set_defaults(func=lambda a: _copy(a, open_app, emit))

    recall = sub.add_parser(
        "recall",
        help="ask a cold copy to make a point (or one path of it) readable; says how far it is",
    )
    recall.add_argument("point")
    recall.add_argument("--path", help="only what restoring this path needs")
    recall.add_argument("--location", help="recall from this location")
    recall.set_defaults(func=lambda a: _recall(a, open_app, emit))


def _list(args: argparse.Namespace, open_app: Opener, emit: Emitter) -> int:
    with open_app(args) as app:
        locations = app.catalog.list_locations(app.repo.store_id)
        rows: list[dict[str, Any]] = []
        for loc in locations:
            copies = app.catalog.copies_at(loc.id, state="present")
            rows.append(
                {
                    "id": loc.id,
                    "label": loc.label,
                    "kind": loc.kind,
                    "address": loc.address,
                    "access": loc.access,
                    "online": loc.online,
                    "offsite": loc.offsite,
                    "copies": len(copies),
                }
            )

    def table() -> str:
        lines = [f"{'ID':10}  {'LABEL':16}  {'KIND':9}  {'STATE':11}  {'COPIES':6}  ADDRESS"]
        for r in rows:
            state = "online" if r["online"] else "unavailable"
            lines.append(
                f"{r['id'][:10]:10}  {r['label'][:16]:16}  {r['kind']:9}  {state:11}  "
                f"{r['copies']:6}  {r['address']}"
            )
        return "\n".join(lines)

    emit(args, rows, table)
    return 0


def add_bucket_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of a bucket location (``s3://``). Credentials come from the environment
    (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``) and are kept in
    the data directory's secrets, never in the catalog."""
    group = parser.add_argument_group("buckets (s3://BUCKET[/PREFIX])")
    group.add_argument("--endpoint", help="an S3-compatible endpoint URL (default: AWS)")
    group.add_argument("--region")
    group.add_argument("--addressing-style", choices=["auto", "path", "virtual"])
    group.add_argument(
        "--cold", action="store_true", help="data packs go to a cold class (read after a recall)"
    )
    group.add_argument(
        "--data-class",
        help="storage class of data packs (GLACIER, DEEP_ARCHIVE, GLACIER_IR, STANDARD, ...)",
    )
    group.add_argument("--lock-mode", choices=["COMPLIANCE", "GOVERNANCE"])
    group.add_argument("--lock-days", type=int, help="Object Lock retention of each copy")
    group.add_argument("--restore-tier", choices=["Expedited", "Standard", "Bulk"])


def location_kind(address: str) -> str:
    return "s3_bucket" if address.startswith("s3://") else "pool_dir"


def bucket_options(args: argparse.Namespace) -> dict[str, Any]:
    """The bucket options given on the command line and the credentials in the environment."""
    if location_kind(args.path if hasattr(args, "path") else args.source or "") != "s3_bucket":
        return {}
    flags = {
        "endpoint_url": args.endpoint,
        "region": args.region,
        "addressing_style": args.addressing_style,
        "cold": True if args.cold else None,
        "data_class": args.data_class,
        "lock_mode": args.lock_mode,
        "lock_days": args.lock_days,
        "restore_tier": args.restore_tier,
        "access_key_id": os.environ.get("AWS_ACCESS_KEY_ID"),
        "secret_access_key": os.environ.get("AWS_SECRET_ACCESS_KEY"),
        "session_token": os.environ.get("AWS_SESSION_TOKEN"),
    }
    return {k: v for k, v in flags.items() if v is not None}


def _add(args: argparse.Namespace, open_app: Opener, emit: Emitter) -> int:
    with open_app(args) as app:
        location = app.add_location(
            args.path,
            kind=location_kind(args.path),
            label=args.label,
            require_mount=args.require_mount,
            offsite=args.offsite,
            options=bucket_options(args),
        )
    emit(
        args,
        {"id": location.id, "label": location.label, "address": location.address},
        f"added location {location.label} ({location.id[:10]}) at {location.address}",
    )
    return 0


def _remove(args: argparse.Namespace, open_app: Opener, emit: Emitter) -> int:
    with open_app(args) as app:
        location = app.remove_location(args.location)
    emit(args, {"id": location.id}, f"removed location {location.label}; its data is left alone")
    return 0


def _recall(args: argparse.Namespace, open_app: Opener, emit: Emitter) -> int:
    """Asks and answers at once: run it again (or let a restore job wait) until it is done."""
    with open_app(args) as app:
        status = app.prepare_read(args.point, subpath=args.path, location=args.location)
    document = status.to_dict()
    emit(
        args,
        document,
        lambda: (
            "ready: " + (status.location or "a readable copy exists")
            if status.done
            else status.describe()
        ),
    )
    return 0


def _copy(args: argparse.Namespace, open_app: Opener, emit: Emitter) -> int:
    with open_app(args) as app:
        result = app.copy_point(args.point, args.location)
    emit(
        args,
        result,
        lambda: (
            f"copied point {result['point']} to {result['label']}: {result['packs_copied']} "
            f"pack(s), {result['bytes_copied']} bytes moved, {result['packs_present']} "
            "already there"
        ),
    )
    return 0


def seed_from_location(
    data_dir: str,
    address: str,
    kind: str = "pool_dir",
    options: dict[str, Any] | None = None,
) -> bool:
    """Make a fresh data directory's pool an (empty) location of the store at ``address``: its
    config and key files are copied, so the same passphrase or recovery key opens it. Returns
    False when the data directory already has a store."""
    store_path = DataDir(os.path.abspath(data_dir)).store_path
    if os.path.exists(os.path.join(store_path, "config")):
        return False
    source = open_backend(kind, address, **dict(options or {}))
    try:
        os.makedirs(store_path, exist_ok=True)
        home = LocalDirectoryBackend(store_path)
        try:
            for name in ["config", *(info.name for info in source.list("keys/"))]:
                home.put(name, source.get(name))
        finally:
            home.close()
    finally:
        source.close()
    print(f"the data directory's pool now belongs to the store at {address}", file=sys.stderr)
    return True
