"""What the box's console says: where the page is, how to trust its certificate, the set-up code.

A new appliance has no screen of its own to set it up with: the user reads the page's address on
the console, opens it, compares the certificate's fingerprint with the one the browser shows and
types the set-up code. ``appliance-banner.service`` runs :func:`main`, which keeps
``/run/issue.d/appliance.issue`` current (every getty shows it above its login prompt, and
``agetty --reload`` redraws the prompts) and prints the same lines on the console whenever they
change: a DHCP lease arrives, the certificate is generated, the administrator is created.

Only the standard library: it reads files and ``ip -j address`` and nothing else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from image.appliance_os.layout import SETUP_DONE_MARK

ISSUE_FILE = Path("/run/issue.d/appliance.issue")
#: The first line of the block, which tests and people look for on a serial log.
HEADLINE = "Backup appliance"


@dataclass(frozen=True)
class Facts:
    version: str
    addresses: tuple[str, ...]
    port: int
    fingerprint: str | None
    setup_code: str | None
    admin_created: bool


def fingerprint(pem: str) -> str:
    """The certificate's SHA-256 as browsers show it: colon-separated upper-case hex pairs."""
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def global_addresses(ip_json: str) -> tuple[str, ...]:
    """The addresses a user on the network can reach (``ip -j address``): IPv4 first, no
    loopback, no link-local, no interfaces that are down."""
    v4: list[str] = []
    v6: list[str] = []
    for link in json.loads(ip_json or "[]"):
        if "UP" not in link.get("flags", []) or "LOOPBACK" in link.get("flags", []):
            continue
        for info in link.get("addr_info", []):
            if info.get("scope") != "global":
                continue
            (v4 if info.get("family") == "inet" else v6).append(info["local"])
    return tuple(v4 + v6)


def page_url(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"https://{host}/" if port == 443 else f"https://{host}:{port}/"


def render(facts: Facts) -> str:
    lines = [f"{HEADLINE} {facts.version}"]
    if facts.addresses:
        lines += [f"  Page:         {page_url(a, facts.port)}" for a in facts.addresses]
    else:
        lines.append("  Page:         waiting for a network address (DHCP)")
    if facts.fingerprint:
        lines.append(f"  Certificate:  SHA-256 {facts.fingerprint}")
        lines.append("                (the browser shows the same fingerprint for this page)")
    else:
        lines.append("  Certificate:  not generated yet: the service is starting")
    if facts.setup_code:
        lines.append(f"  Set-up code:  {facts.setup_code}")
        lines.append("                (the page asks for it once, to create the administrator)")
    elif facts.admin_created:
        lines.append("  Set-up:       done; sign in on the page")
    return "\n".join(lines) + "\n"


def issue_text(banner: str) -> str:
    """agetty expands backslash escapes in issue files: the banner must show literally."""
    return banner.replace("\\", "\\\\") + "\n"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except (FileNotFoundError, PermissionError, UnicodeDecodeError):
        return None


def _version() -> str:
    try:
        return metadata.version("backup-appliance")
    except metadata.PackageNotFoundError:
        return "(version unknown)"


def gather(data_dir: Path, port: int) -> Facts:
    try:
        ip_json = subprocess.run(
            ["ip", "-j", "address"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        ip_json = "[]"
    pem = _read(data_dir / "tls" / "cert.pem")
    try:
        fp = fingerprint(pem) if pem else None
    except ValueError:
        fp = None
    code = _read(data_dir / "secrets" / "setup-code")
    # The service deletes the code once the administrator exists and leaves its mark; while
    # it starts there is neither (the certificate comes first), which is not "done".
    done = (data_dir / "secrets" / SETUP_DONE_MARK).exists()
    return Facts(
        version=_version(),
        addresses=global_addresses(ip_json),
        port=port,
        fingerprint=fp,
        setup_code=code,
        admin_created=done and code is None,
    )


def publish(banner: str, issue_file: Path) -> None:
    issue_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = issue_file.with_suffix(".tmp")
    tmp.write_text(issue_text(banner), encoding="utf-8")
    os.replace(tmp, issue_file)
    # Redraws the login prompts that are already showing, so the new lines appear at once.
    subprocess.run(["agetty", "--reload"], capture_output=True, check=False, timeout=10)
    sys.stdout.write("\n" + banner + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("APPLIANCE_DATA_DIR", "/var/lib/appliance")),
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("APPLIANCE_PORT", "443")))
    parser.add_argument("--issue-file", type=Path, default=ISSUE_FILE)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--once", action="store_true", help="print the banner once and exit")
    args = parser.parse_args(argv)
    shown = ""
    while True:
        banner = render(gather(args.data_dir, args.port))
        if banner != shown:
            publish(banner, args.issue_file)
            shown = banner
        if args.once:
            return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    raise SystemExit(main())
