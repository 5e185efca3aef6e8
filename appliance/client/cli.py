"""``appliance-client``: enroll a host with its appliance, back it up, restore to it.

    appliance-client enroll --server https://appliance --fingerprint AB:CD:... --token apl_...
    appliance-client backup /etc /srv --asset web1 [--exclude '*.tmp'] [--one-file-system]
                            [--pre 'pg_dump ... > /srv/db.sql'] [--post '...']
    appliance-client backup /dev/vg0/root-snap [--asset web1-disks] [--image] [--pre ...]
    appliance-client restore [--id ID] [--to FOLDER]
    appliance-client status

The configuration (server, pinned certificate, token) is a 0600 JSON file,
``/etc/appliance-client/config.json`` unless ``--config`` or ``APPLIANCE_CLIENT_CONFIG`` says
otherwise. Exit status: 0 done, 1 refused or failed (the message says why), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from typing import Any

from appliance.client.backup import BackupRequest, run_backup
from appliance.client.blockdev import ImageRequest, is_block_device, run_image_backup
from appliance.client.connection import ClientError, Connection
from appliance.client.tls import PinError, pin

DEFAULT_CONFIG = "/etc/appliance-client/config.json"
DEFAULT_STATE = "/var/lib/appliance-client"


def _config_path(args: argparse.Namespace) -> str:
    return str(args.config or os.environ.get("APPLIANCE_CLIENT_CONFIG") or DEFAULT_CONFIG)


def load_config(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            config: dict[str, Any] = json.load(f)
    except FileNotFoundError:
        raise ClientError(
            f"{path} does not exist: run `appliance-client enroll` first", code="not_enrolled"
        ) from None
    return config


def connect(config: dict[str, Any], retry_for: float = 300.0) -> Connection:
    return Connection(
        config["server"],
        config["cert_pem"],
        config["token"],
        retry_for=retry_for,
        log=lambda m: print(f"appliance-client: {m}", file=sys.stderr),
    )


def enroll(args: argparse.Namespace) -> dict[str, Any]:
    cert = pin(args.server, args.fingerprint)
    config = {"server": args.server.rstrip("/"), "cert_pem": cert, "token": args.token}
    conn = connect(config, retry_for=10)
    try:
        hello = conn.get_json("/api/client/hello")
    finally:
        conn.close()
    path = _config_path(args)
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    fd = os.open(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({**config, "host": hello.get("host")}, f)
    os.replace(path + ".new", path)
    return {"enrolled": True, "host": hello.get("host"), "assets": hello.get("assets", [])}


def _hook(command: str | None, what: str, env: dict[str, str]) -> None:
    if not command:
        return
    done = subprocess.run(["/bin/sh", "-c", command], env={**os.environ, **env})
    if done.returncode != 0:
        raise ClientError(
            f"the {what} command exited with {done.returncode}", code=f"{what}_failed"
        )


def _wants_image(args: argparse.Namespace) -> bool:
    """Block devices (or, with --image, files) make an image point; folders a files point.
    One run is one or the other."""
    if not args.image:
        for path in args.paths:
            if os.path.isfile(path):
                raise ClientError(
                    f"{path} is a file: add --image to back it up as a raw disk image",
                    code="not_a_device",
                )
    devices = [p for p in args.paths if is_block_device(p) or (args.image and os.path.isfile(p))]
    if not devices:
        return False
    if len(devices) != len(args.paths):
        raise ClientError(
            "back up folders and block devices in separate runs (and to separate assets)",
            code="mixed_paths",
        )
    if args.exclude or args.one_file_system:
        raise ClientError(
            "--exclude and --one-file-system apply to folders, not to block devices",
            code="usage",
        )
    return True


def backup(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(_config_path(args))
    host = config.get("host") or socket.gethostname()
    image = _wants_image(args)
    # The appliance names a host's assets <host> (folders) and <host>-disks (block devices).
    asset = args.asset or (f"{host}-disks" if image else host)
    conn = connect(config, retry_for=args.retry_for)
    status = "failed"
    try:
        _hook(args.pre, "pre", {"APPLIANCE_ASSET": asset})
        say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
        result: dict[str, Any]
        if image:
            result = run_image_backup(
                conn,
                ImageRequest(
                    paths=args.paths,
                    asset=asset,
                    host=host,
                    mode=args.mode,
                    image_files=args.image,
                    state_dir=args.state_dir,
                    threads=args.threads,
                ),
                say,
            )
        else:
            request = BackupRequest(
                paths=args.paths,
                asset=asset,
                host=host,
                mode=args.mode,
                excludes=tuple(args.exclude),
                one_file_system=args.one_file_system,
                state_dir=args.state_dir,
                threads=args.threads,
            )
            result = run_backup(conn, request, say)
        status = "ok"
        return result
    finally:
        conn.close()
        if args.pre or args.post:
            _hook(args.post, "post", {"APPLIANCE_ASSET": asset, "APPLIANCE_STATUS": status})


def status(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(_config_path(args))
    conn = connect(config, retry_for=10)
    try:
        hello: dict[str, Any] = conn.get_json("/api/client/hello")
    finally:
        conn.close()
    return {"server": config["server"], "fingerprint": conn.fingerprint, **hello, "id_key": "…"}


def restore(args: argparse.Namespace) -> dict[str, Any]:
    from appliance.client.restore import run_restore

    config = load_config(_config_path(args))
    conn = connect(config, retry_for=args.retry_for)
    try:
        return run_restore(conn, restore_id=args.id, target=args.to)
    finally:
        conn.close()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appliance-client", description=__doc__.split("\n")[0])
    p.add_argument("--config", help=f"configuration file (default {DEFAULT_CONFIG})")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("enroll", help="pin the appliance's certificate and keep the token")
    e.add_argument("--server", required=True, help="https://appliance[:port]")
    e.add_argument(
        "--fingerprint", required=True, help="the certificate's SHA-256, as the page shows it"
    )
    e.add_argument("--token", required=True, help="the host's token, as the page shows it once")
    e.set_defaults(func=enroll)
    b = sub.add_parser("backup", help="back up folders or block devices of this host")
    b.add_argument("paths", nargs="+", metavar="PATH")
    b.add_argument(
        "--asset",
        help="the asset (default: the host's name on the appliance; NAME-disks for devices)",
    )
    b.add_argument("--mode", choices=("incremental", "differential", "full"), default="incremental")
    b.add_argument("--exclude", action="append", default=[], metavar="PATTERN")
    b.add_argument("--one-file-system", action="store_true")
    b.add_argument(
        "--image",
        action="store_true",
        help="back up the files named as raw disk images (block devices always are)",
    )
    b.add_argument("--pre", help="shell command run before (a failure stops the backup)")
    b.add_argument("--post", help="shell command run after, with APPLIANCE_STATUS=ok|failed")
    b.add_argument("--state-dir", default=DEFAULT_STATE)
    b.add_argument("--threads", type=int, default=2, help="compression threads")
    b.add_argument("--retry-for", type=float, default=300.0, help="seconds to retry a lost link")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=backup)
    r = sub.add_parser("restore", help="pull a restore started on the appliance's page")
    r.add_argument("--id", help="the restore to pull (default: the oldest waiting one)")
    r.add_argument("--to", help="folder to restore into (default: the one named on the page)")
    r.add_argument("--retry-for", type=float, default=300.0)
    r.set_defaults(func=restore)
    s = sub.add_parser("status", help="check the enrolment")
    s.set_defaults(func=status)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result = args.func(args)
    except (ClientError, PinError) as exc:
        print(f"appliance-client: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"appliance-client: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
