"""The appliance OS settings the page manages: network, time and security updates, as files.

Every setting lives in one file of the OS under ``os_root`` (``Settings.effective_os_root``), in
the format of the OS tool that reads it, so what an admin changes on the console shows on the
page and the other way round:

- network: the systemd-networkd unit :data:`NETWORK_FILE` (the image writes
  :data:`DEFAULT_NETWORK`: DHCP on every wired interface);
- time: ``/etc/timezone`` with the ``/etc/localtime`` link, and the systemd-timesyncd drop-in
  :data:`TIMESYNCD_FILE`;
- security updates: APT's periodic switch :data:`AUTO_UPGRADES_FILE` (unattended-upgrades).

The module has three layers: pure checks, renderers and parsers (the decisions; unit-tested), the
file reads and atomic writes under a root (tests use a temporary folder), and
:func:`apply_live`, which runs the OS tool that takes a change in at once, only when the root is
``/`` (the service runs on the appliance OS). Checks raise :class:`InvalidInput` with the field,
in words; no value reaches a file unless it passed them (a newline could add a directive).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from appliance.errors import InvalidInput

NETWORK_FILE = "etc/systemd/network/10-appliance.network"
TIMEZONE_FILE = "etc/timezone"
LOCALTIME_LINK = "etc/localtime"
ZONEINFO_DIR = "/usr/share/zoneinfo"
TIMESYNCD_FILE = "etc/systemd/timesyncd.conf.d/appliance.conf"
AUTO_UPGRADES_FILE = "etc/apt/apt.conf.d/20auto-upgrades"
FIRST_POOL_FILE = "etc/appliance/first-pool.json"
HOSTNAME_FILE = "etc/hostname"
INTERFACES_DIR = "sys/class/net"

#: The image's network file: DHCP on any wired interface (``en*`` predictable names, ``eth*``).
DEFAULT_NETWORK = "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n"
DEFAULT_MATCH = "en*"
NETWORK_HEADER = "# Written by the appliance (Settings > Network on its page).\n"

MAX_DNS = 3
MAX_NTP_SERVERS = 8
#: A networkd ``Name=`` match: interface names or globs, separated by spaces.
_MATCH_WORD = re.compile(r"^[A-Za-z0-9_.:*?-]{1,15}$")
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_DHCP_ON = {"yes", "true", "on", "1", "ipv4", "ipv6"}

Mode = Literal["dhcp", "static"]


@dataclass(frozen=True)
class NetworkConfig:
    """One interface's addressing: ``mode`` dhcp (address and gateway None) or static."""

    mode: Mode
    interface: str
    address: str | None = None
    gateway: str | None = None
    dns: tuple[str, ...] = ()


@dataclass(frozen=True)
class TimeConfig:
    timezone: str
    ntp: bool
    ntp_servers: tuple[str, ...] = ()


# --- checks (pure) -----------------------------------------------------------------------------


def check_interface(value: str) -> str:
    words = value.split()
    if not words or not all(_MATCH_WORD.match(w) for w in words):
        raise InvalidInput(
            f"{value!r} is not an interface name (like eth0 or enp3s0; * matches any ending)",
            field="interface",
        )
    return " ".join(words)


def _usable(address: ipaddress.IPv4Address | ipaddress.IPv6Address, what: str, field: str) -> None:
    for bad, words in (
        (address.is_multicast, "a multicast address"),
        (address.is_loopback, "a loopback address"),
        (address.is_unspecified, "the unspecified address"),
    ):
        if bad:
            raise InvalidInput(f"the {what} {address} is {words}", field=field)


def check_network(config: NetworkConfig) -> NetworkConfig:
    """``config`` normalised (canonical address forms), or :class:`InvalidInput` saying why."""
    interface = check_interface(config.interface)
    if len(config.dns) > MAX_DNS:
        raise InvalidInput(f"give at most {MAX_DNS} DNS servers", field="dns")
    dns = []
    for text in config.dns:
        try:
            server = ipaddress.ip_address(text.strip())
        except ValueError:
            raise InvalidInput(
                f"the DNS server {text!r} is not an IP address", field="dns"
            ) from None
        _usable(server, "DNS server", "dns")
        dns.append(str(server))
    if config.mode == "dhcp":
        if config.address or config.gateway:
            raise InvalidInput(
                "an address and a gateway are given with a static address only; with DHCP the "
                "network's DHCP server hands them out",
                field="address",
            )
        return NetworkConfig("dhcp", interface, None, None, tuple(dns))
    if not config.address:
        raise InvalidInput(
            "a static address needs the address with its prefix length, like 192.168.1.20/24",
            field="address",
        )
    if "/" not in config.address:
        raise InvalidInput(
            f"give the prefix length too, like {config.address.strip()}/24", field="address"
        )
    try:
        address = ipaddress.ip_interface(config.address.strip())
    except ValueError:
        raise InvalidInput(
            f"{config.address!r} is not an address with a prefix length (like 192.168.1.20/24 "
            "or 2001:db8::20/64)",
            field="address",
        ) from None
    _usable(address.ip, "address", "address")
    network = address.network
    if (
        isinstance(network, ipaddress.IPv4Network)
        and network.prefixlen < 31
        and address.ip in (network.network_address, network.broadcast_address)
    ):
        which = "network" if address.ip == network.network_address else "broadcast"
        raise InvalidInput(
            f"{address.ip} is the {which} address of {network}; choose a host address",
            field="address",
        )
    gateway_text = None
    if config.gateway:
        try:
            gateway = ipaddress.ip_address(config.gateway.strip())
        except ValueError:
            raise InvalidInput(
                f"the gateway {config.gateway!r} is not an IP address", field="gateway"
            ) from None
        _usable(gateway, "gateway", "gateway")
        if gateway.version != address.version or gateway not in network:
            raise InvalidInput(
                f"the gateway {gateway} is outside the address's network {network}",
                field="gateway",
            )
        if gateway == address.ip:
            raise InvalidInput("the gateway cannot be the appliance's own address", field="gateway")
        gateway_text = str(gateway)
    return NetworkConfig("static", interface, str(address), gateway_text, tuple(dns))


def check_ntp_server(value: str) -> str:
    text = value.strip()
    try:
        server = ipaddress.ip_address(text)
    except ValueError:
        name = text.rstrip(".")
        labels = name.split(".")
        if not name or len(name) > 253 or not all(_HOST_LABEL.match(part) for part in labels):
            raise InvalidInput(
                f"the time server {value!r} is neither a host name nor an IP address",
                field="ntp_servers",
            ) from None
        return name.lower()
    _usable(server, "time server", "ntp_servers")
    return str(server)


def check_time(config: TimeConfig, zones: Iterable[str]) -> TimeConfig:
    """``config`` with its servers normalised; ``zones``: the time zones the OS knows."""
    if config.timezone not in set(zones):
        raise InvalidInput(
            f"{config.timezone!r} is not a time zone this appliance knows (like Europe/Berlin "
            "or UTC)",
            field="timezone",
        )
    if len(config.ntp_servers) > MAX_NTP_SERVERS:
        raise InvalidInput(f"give at most {MAX_NTP_SERVERS} time servers", field="ntp_servers")
    servers: list[str] = []
    for value in config.ntp_servers:
        server = check_ntp_server(value)
        if server not in servers:
            servers.append(server)
    return replace(config, ntp_servers=tuple(servers))


def default_interface(names: Iterable[str]) -> str:
    """The first wired interface (``en*``, ``eth*``) by name, or the ``en*`` match."""
    wired = sorted(n for n in names if n.startswith(("en", "eth")))
    return wired[0] if wired else DEFAULT_MATCH


# --- renderers and parsers (pure) --------------------------------------------------------------


def render_network(config: NetworkConfig) -> str:
    lines = [NETWORK_HEADER.rstrip("\n"), "[Match]", f"Name={config.interface}", "", "[Network]"]
    if config.mode == "dhcp":
        lines.append("DHCP=yes")
    else:
        lines.append(f"Address={config.address}")
        if config.gateway:
            lines.append(f"Gateway={config.gateway}")
    lines.extend(f"DNS={server}" for server in config.dns)
    return "\n".join(lines) + "\n"


def _unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of a systemd unit-style file, comments and blanks left out."""
    section, entries = "", []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif "=" in line:
            key, value = line.split("=", 1)
            entries.append((section, key.strip(), value.strip()))
    return entries


def parse_network(text: str) -> NetworkConfig:
    """The settings of a networkd file (ours, the image's, or one edited by hand)."""
    interface, dhcp, address, gateway, dns = DEFAULT_MATCH, False, None, None, []
    for section, key, value in _unit_entries(text):
        if section == "Match" and key == "Name" and value:
            interface = value
        elif section == "Network" and key == "DHCP":
            dhcp = value.lower() in _DHCP_ON
        elif section == "Network" and key == "Address" and address is None:
            address = value
        elif section == "Network" and key == "Gateway" and gateway is None:
            gateway = value
        elif section == "Network" and key == "DNS":
            dns.extend(value.split())
    if dhcp or address is None:
        return NetworkConfig("dhcp", interface, None, None, tuple(dns))
    return NetworkConfig("static", interface, address, gateway, tuple(dns))


def render_timesyncd(servers: Sequence[str]) -> str:
    return f"[Time]\nNTP={' '.join(servers)}\n"


def parse_timesyncd(text: str) -> tuple[str, ...]:
    servers: list[str] = []
    for section, key, value in _unit_entries(text):
        if section == "Time" and key == "NTP":
            servers = value.split()  # an empty NTP= resets the list, as in timesyncd
    return tuple(servers)


def render_auto_upgrades(enabled: bool) -> str:
    flag = "1" if enabled else "0"
    return (
        f'APT::Periodic::Update-Package-Lists "{flag}";\n'
        f'APT::Periodic::Unattended-Upgrade "{flag}";\n'
    )


def parse_auto_upgrades(text: str) -> bool:
    match = re.search(r'APT::Periodic::Unattended-Upgrade\s+"(\d+)"', text)
    return bool(match) and match.group(1) != "0"  # type: ignore[union-attr]


def parse_first_pool(text: str) -> list[str]:
    """The disks the installer suggests for the first pool (``{"disks": [...]}``)."""
    try:
        document = json.loads(text)
    except ValueError:
        return []
    disks = document.get("disks") if isinstance(document, dict) else None
    if not isinstance(disks, list):
        return []
    return [d for d in disks if isinstance(d, str) and d]


# --- files under a root ------------------------------------------------------------------------


def write_atomically(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``text``: a reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None


def interface_names(root: Path) -> list[str]:
    try:
        return [entry.name for entry in (root / INTERFACES_DIR).iterdir()]
    except OSError:
        return []


def read_network(root: Path) -> NetworkConfig:
    text = _read(root / NETWORK_FILE)
    return parse_network(DEFAULT_NETWORK if text is None else text)


def write_network(root: Path, config: NetworkConfig) -> None:
    write_atomically(root / NETWORK_FILE, render_network(config))


def read_timezone(root: Path) -> str:
    text = _read(root / TIMEZONE_FILE)
    if text and text.strip():
        return text.strip().splitlines()[0]
    try:
        target = os.readlink(root / LOCALTIME_LINK)
    except OSError:
        return "UTC"
    marker = "zoneinfo/"
    return target.split(marker, 1)[1] if marker in target else "UTC"


def write_timezone(root: Path, timezone: str) -> None:
    write_atomically(root / TIMEZONE_FILE, timezone + "\n")
    link = root / LOCALTIME_LINK
    link.parent.mkdir(parents=True, exist_ok=True)
    temp = link.with_name(f".localtime.{os.getpid()}")
    temp.unlink(missing_ok=True)
    os.symlink(f"{ZONEINFO_DIR}/{timezone}", temp)
    os.replace(temp, link)


def read_ntp_servers(root: Path) -> tuple[str, ...]:
    text = _read(root / TIMESYNCD_FILE)
    return () if text is None else parse_timesyncd(text)


def write_ntp_servers(root: Path, servers: Sequence[str]) -> None:
    write_atomically(root / TIMESYNCD_FILE, render_timesyncd(servers))


def read_security_updates(root: Path) -> bool:
    text = _read(root / AUTO_UPGRADES_FILE)
    return text is not None and parse_auto_upgrades(text)


def write_security_updates(root: Path, enabled: bool) -> None:
    write_atomically(root / AUTO_UPGRADES_FILE, render_auto_upgrades(enabled))


def read_first_pool(root: Path) -> list[str]:
    text = _read(root / FIRST_POOL_FILE)
    return [] if text is None else parse_first_pool(text)


def read_hostname(root: Path | None) -> str:
    if root is not None:
        text = _read(root / HOSTNAME_FILE)
        if text and text.strip():
            return text.strip()
    return socket.gethostname()


# --- the running OS ----------------------------------------------------------------------------


def is_live(root: Path) -> bool:
    """Whether ``root`` is the running OS (changes are applied), not a folder (tests)."""
    return root.resolve() == Path("/")


def apply_live(root: Path, commands: Sequence[Sequence[str]]) -> list[str]:
    """Run ``commands`` when ``root`` is the running OS; what failed, in words (best effort:
    the files are written already and take effect on the next boot in any case)."""
    if not is_live(root):
        return []
    errors = []
    for argv in commands:
        try:
            done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(f"{' '.join(argv)} failed: {exc}")
            continue
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
            errors.append(f"{' '.join(argv)} failed: {detail}")
    return errors


def live_ntp(root: Path) -> bool | None:
    """Whether timesyncd is on, as ``timedatectl`` says (None: not the running OS, or unknown)."""
    if not is_live(root):
        return None
    try:
        done = subprocess.run(
            ["timedatectl", "show", "--property=NTP", "--value"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    value = done.stdout.strip()
    return None if done.returncode != 0 or value not in ("yes", "no") else value == "yes"
