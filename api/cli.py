"""``appliance serve``, ``appliance admin ...`` and ``appliance demo seed``: the service's commands.

The core CLI (:mod:`appliance.cli`) loads :func:`register` through the ``appliance.cli_plugins``
entry point group, so ``appliance --help`` lists these commands while ``appliance`` never imports
``api``. This module imports only the standard library at load time; FastAPI, uvicorn and
argon2 are imported when a command runs, so other commands stay fast.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
import time
from typing import Any

from appliance.errors import InvalidInput

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MIN_PASSWORD = 8


def _settings(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from api.settings import Settings

    overrides: dict[str, Any] = {"data_dir": args.data_dir}
    for field in ("host", "port", "cert_file", "key_file"):
        value = getattr(args, field, None)
        if value is not None:
            overrides[field] = value
    if args.tls is not None:
        overrides["tls"] = args.tls
    if args.no_scheduler:
        overrides["scheduler_enabled"] = False
    if args.passphrase_file:
        overrides["passphrase_file"] = args.passphrase_file
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidInput(f"invalid settings: {first['msg']}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from api.serve import serve

    return serve(_settings(args))


def _password(confirm: bool = True) -> str:
    password = os.environ.get("APPLIANCE_ADMIN_PASSWORD")
    if not password:
        if not sys.stdin.isatty():
            raise InvalidInput("set APPLIANCE_ADMIN_PASSWORD or run on a terminal to be asked")
        password = getpass.getpass("Password: ")
        if confirm and getpass.getpass("Repeat password: ") != password:
            raise InvalidInput("the passwords differ")
    if len(password) < MIN_PASSWORD:
        raise InvalidInput(f"a password needs at least {MIN_PASSWORD} characters")
    return password


def _catalog(args: argparse.Namespace) -> Any:
    from appliance.catalog import Catalog
    from appliance.engine import DataDir

    data_dir = DataDir(os.path.abspath(args.data_dir))
    os.makedirs(data_dir.path, mode=0o700, exist_ok=True)
    return Catalog.open(data_dir.catalog_url)


def cmd_admin_create(args: argparse.Namespace) -> int:
    from api.security import hash_password

    if not NAME_PATTERN.match(args.name):
        raise InvalidInput("a user name is 1-64 letters, digits, '.', '_' or '-'")
    password = _password()
    with _catalog(args) as catalog:
        user = catalog.add_user(args.name, args.role, hash_password(password))
        catalog.audit("cli", "user.create", user.name, {"role": user.role})
    print(f"User {user.name} ({user.role}) created; sign in on the admin page.")
    return 0


def cmd_admin_password(args: argparse.Namespace) -> int:
    """Set a user's password (the way back in when the only admin forgot theirs)."""
    from api.security import hash_password

    password = _password()
    with _catalog(args) as catalog:
        catalog.update_user(args.name, password_hash=hash_password(password))
        catalog.audit("cli", "user.password", args.name)
    print(f"Password of {args.name} changed.")
    return 0


def _open_or_create_store(settings: Any) -> Any:
    """The appliance of ``settings``, its store created as the service's first start creates it
    (same passphrase rules), so that `serve` afterwards opens what this created."""
    from api.service import open_appliance

    def announce(fmt: str, *args: object) -> None:
        text = fmt % args
        print(text[:1].upper() + text[1:], file=sys.stderr)  # a sentence; paths keep their case

    return open_appliance(settings, announce=announce)


def cmd_demo_seed(args: argparse.Namespace) -> int:
    """Give the data directory the demo VM (asset, disk, boot proof, one verified backup) and
    the demo tape library with its pool (:mod:`hardware.tape.demo`)."""
    from api.settings import Settings
    from hardware.tape.demo import demo_library_dir, seed_demo_tape
    from image.demo_vm import default_disk_dir, seed_demo_vm, seed_marker_path

    data_dir = os.path.abspath(args.data_dir)
    marker = seed_marker_path(data_dir)
    tape_done = (demo_library_dir(data_dir) / "library.json").is_file()
    if os.path.exists(marker) and tape_done and not args.force:
        # Done before: no store to open, so every start after the first pays nothing for it.
        with open(marker, encoding="utf-8") as f:
            done = json.load(f)
        if args.json:
            print(json.dumps({**done, "created": []}))
        else:
            print(f"Demo VM {done.get('asset')} is set up (point {done.get('point')}).")
        return 0
    overrides: dict[str, Any] = {"data_dir": data_dir}
    if args.passphrase_file:
        overrides["passphrase_file"] = args.passphrase_file
    settings = Settings(**overrides)
    started = time.monotonic()
    log = (lambda line: None) if args.json else (lambda line: print(f"demo: {line}", flush=True))
    with _open_or_create_store(settings) as app:
        seed = seed_demo_vm(app, args.disk_dir or default_disk_dir(data_dir), log=log)
        tape = seed_demo_tape(app, log=log)  # the Tape screen's library and pool
    result = {**seed.to_dict(), "seconds": round(time.monotonic() - started, 2)}
    result["created"] = [*result["created"], *tape]
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(f"{marker}.tmp", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    os.replace(f"{marker}.tmp", marker)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"Demo VM {seed.asset} is set up: point {seed.point}, disk {seed.disk}, accelerator "
            f"{seed.accel} ({', '.join(seed.created) or 'nothing new'}; "
            f"{result['seconds']} s). Open the page and press Fail over."
        )
    return 0


def register(sub: Any) -> None:
    """Add ``serve``, ``admin`` and ``demo`` to the ``appliance`` command's subparsers."""
    serve = sub.add_parser(
        "serve",
        help="run the service: JSON API, admin page, jobs and schedules",
        description="Run the appliance service (HTTPS on 127.0.0.1:8443 by default; settings "
        "also come from APPLIANCE_* variables, see docs/api.md).",
    )
    serve.add_argument("--host", help="address to listen on (APPLIANCE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (APPLIANCE_PORT; 8443 with TLS, else 8080)")
    tls = serve.add_mutually_exclusive_group()
    tls.add_argument("--tls", dest="tls", action="store_true", default=None, help="HTTPS (default)")
    tls.add_argument(
        "--no-tls", dest="tls", action="store_false", help="plain HTTP (loopback addresses only)"
    )
    serve.add_argument("--cert-file", help="TLS certificate (default: generated in the data dir)")
    serve.add_argument("--key-file", help="TLS key (default: generated in the data dir)")
    serve.add_argument("--no-scheduler", action="store_true", help="do not run schedules")
    serve.set_defaults(func=cmd_serve)

    admin = sub.add_parser("admin", help="accounts of the admin page and API").add_subparsers(
        dest="action", required=True
    )
    create = admin.add_parser(
        "create", help="create a user (password from APPLIANCE_ADMIN_PASSWORD or a prompt)"
    )
    create.add_argument("--name", required=True)
    create.add_argument("--role", choices=("admin", "operator", "viewer"), default="admin")
    create.set_defaults(func=cmd_admin_create)
    password = admin.add_parser("password", help="set a user's password")
    password.add_argument("--name", required=True)
    password.set_defaults(func=cmd_admin_password)

    demo = sub.add_parser("demo", help="the demo VM of a new appliance").add_subparsers(
        dest="action", required=True
    )
    seed = demo.add_parser(
        "seed",
        help="add the demo VM (asset demo-vm, a bootable test disk, boot proof, one backup)",
        description="Give the data directory the VM asset demo-vm: the busybox test guest's "
        "disk (beside the data directory), a VM definition, a boot proof (serial marker and HTTP "
        "health page) and one verified full backup, so that Fail over works at once. Creates the "
        "store if needed (as `serve` does). Done once: later runs return at once.",
    )
    seed.add_argument(
        "--disk-dir", help="where the demo disk and definition go (default: <data dir>-demo-vm)"
    )
    seed.add_argument(
        "--force",
        action="store_true",
        help="check every step again even if a seed finished before (nothing is duplicated)",
    )
    seed.set_defaults(func=cmd_demo_seed)
