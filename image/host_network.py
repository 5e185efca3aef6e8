"""The appliance's own network, read from iproute2: its bridges, their ports, its addresses.

A bridged failover puts the VM's NIC on a LAN bridge of the appliance (a tap made by
``qemu-bridge-helper``), so the bridges must be listed from the host, and a bridge that is not
there refuses the failover (and the setting) before anything runs.

Pure parsers turn ``ip -d -j link``, ``ip -j addr`` and ``ip -j neigh`` output into frozen
dataclasses; they are tested on output recorded on a test machine and on hand-written fixtures
in the same JSON format (``tests/fixtures/ipnet``). :func:`read_host_network` and
:func:`read_neighbours` are the only functions that run ``ip``; a missing ``ip`` or one that
fails is reported as a reason, not raised, so a page listing bridges still answers.

A bridge also has to be allowed in ``qemu-bridge-helper``'s access list (``/etc/qemu/bridge.conf``:
``allow br0``; a matching ``deny`` wins, and no rule means no), else QEMU would fail to start
with the helper's terse message; :func:`check_bridge` says which line to add instead.

A link is a bridge when iproute2's details say so (``linkinfo.info_kind == "bridge"``); a port
of a bridge names it in ``master`` and has ``info_slave_kind == "bridge"`` (a bond's slaves name
their bond in ``master`` too, so ``master`` alone is not enough).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from appliance.errors import ApplianceError

IP_TIMEOUT = 5.0
#: qemu-bridge-helper's access list: which bridges QEMU may put a tap on.
BRIDGE_CONF = "/etc/qemu/bridge.conf"


class BridgeMissing(ApplianceError):
    """The network bridge a bridged failover needs is not on this appliance."""

    code = "bridge_missing"
    kind = "conflict"


class BridgeNotAllowed(ApplianceError):
    """qemu-bridge-helper's access list does not let VMs join this bridge."""

    code = "bridge_not_allowed"
    kind = "conflict"


@dataclass(frozen=True)
class BridgePort:
    name: str
    up: bool
    #: "tap" for a VM's tap device, else the link's kind ("" for a physical NIC).
    kind: str


@dataclass(frozen=True)
class Bridge:
    name: str
    up: bool
    mac: str
    mtu: int
    ports: tuple[BridgePort, ...] = ()
    #: The appliance's own addresses on the bridge (IPv4 and global IPv6).
    addresses: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "up": self.up,
            "mac": self.mac,
            "mtu": self.mtu,
            "ports": [{"name": p.name, "up": p.up, "kind": p.kind} for p in self.ports],
            "addresses": list(self.addresses),
        }


@dataclass(frozen=True)
class HostAddress:
    interface: str
    address: str


@dataclass(frozen=True)
class HostNetwork:
    """What the host's network looks like; ``error`` says why it could not be read."""

    bridges: tuple[Bridge, ...] = ()
    addresses: tuple[HostAddress, ...] = ()
    error: str | None = None
    #: qemu-bridge-helper's rules, ``(("allow", "br0"), ("deny", "all"), ...)`` in order.
    bridge_acl: tuple[tuple[str, str], ...] = ()
    bridge_names: tuple[str, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bridge_names", tuple(b.name for b in self.bridges))

    def to_dict(self) -> dict[str, Any]:
        return {
            "bridges": [
                {**b.to_dict(), "helper_allowed": bridge_allowed(self.bridge_acl, b.name)}
                for b in self.bridges
            ],
            "addresses": [{"interface": a.interface, "address": a.address} for a in self.addresses],
            "error": self.error,
        }


# --- pure parsers ------------------------------------------------------------------------------


def _is_up(link: dict[str, Any]) -> bool:
    # A tap's operstate is UNKNOWN while it carries traffic; the flags say whether it is up.
    state = str(link.get("operstate") or "")
    flags = link.get("flags") or []
    return state == "UP" or (state == "UNKNOWN" and "UP" in flags and "LOWER_UP" in flags)


def _link_kind(link: dict[str, Any]) -> str:
    info = link.get("linkinfo") or {}
    kind = str(info.get("info_kind") or "")
    if kind == "tun" and (info.get("info_data") or {}).get("type") == "tap":
        return "tap"
    return kind


def parse_addresses(addr_json: Sequence[dict[str, Any]]) -> dict[str, tuple[str, ...]]:
    """Interface name -> its IPv4 and global IPv6 addresses, from ``ip -j addr``."""
    out: dict[str, tuple[str, ...]] = {}
    for link in addr_json:
        found = []
        for info in link.get("addr_info") or []:
            local = info.get("local")
            if not local:
                continue
            if info.get("family") == "inet" or info.get("scope") == "global":
                found.append(str(local))
        out[str(link.get("ifname"))] = tuple(found)
    return out


def host_addresses(addr_json: Sequence[dict[str, Any]]) -> tuple[HostAddress, ...]:
    """The appliance's IPv4 addresses other than loopback: where NAT port forwards may listen."""
    out = []
    for link in addr_json:
        for info in link.get("addr_info") or []:
            if info.get("family") != "inet" or not info.get("local"):
                continue
            address = str(info["local"])
            if ipaddress.ip_address(address).is_loopback:
                continue
            out.append(HostAddress(str(link.get("ifname")), address))
    return tuple(out)


def parse_bridges(
    link_json: Sequence[dict[str, Any]], addr_json: Sequence[dict[str, Any]] = ()
) -> tuple[Bridge, ...]:
    """The bridges in ``ip -d -j link`` output, with their ports and addresses, by name."""
    addresses = parse_addresses(addr_json)
    ports: dict[str, list[BridgePort]] = {}
    for link in link_json:
        info = link.get("linkinfo") or {}
        master = link.get("master")
        if master and info.get("info_slave_kind") == "bridge":
            ports.setdefault(str(master), []).append(
                BridgePort(str(link["ifname"]), _is_up(link), _link_kind(link))
            )
    bridges = [
        Bridge(
            name=str(link["ifname"]),
            up=_is_up(link),
            mac=str(link.get("address") or ""),
            mtu=int(link.get("mtu") or 0),
            ports=tuple(sorted(ports.get(str(link["ifname"]), []), key=lambda p: p.name)),
            addresses=addresses.get(str(link["ifname"]), ()),
        )
        for link in link_json
        if (link.get("linkinfo") or {}).get("info_kind") == "bridge"
    ]
    return tuple(sorted(bridges, key=lambda b: b.name))


def bridge_missing(bridge: str, bridges: Sequence[str], error: str | None = None) -> BridgeMissing:
    """The refusal of a bridged failover (or setting) whose bridge is not on this host."""
    known = ", ".join(sorted(bridges)) or "none"
    why = f" (the bridges could not be read: {error})" if error else ""
    return BridgeMissing(
        f"there is no bridge {bridge} on this appliance; bridges: {known}{why}",
        bridge=bridge,
        bridges=sorted(bridges),
    )


def parse_bridge_acl(
    text: str, read: Callable[[str], str] | None = None, depth: int = 0
) -> tuple[tuple[str, str], ...]:
    """qemu-bridge-helper's ``bridge.conf``: ``allow NAME``, ``deny NAME``, ``allow all``,
    ``deny all`` and ``include FILE`` (read with ``read``), ``#`` comments."""
    rules: list[tuple[str, str]] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) != 2:
            continue
        verb, arg = words
        if verb in ("allow", "deny"):
            rules.append((verb, arg))
        elif verb == "include" and read is not None and depth < 8:
            with contextlib.suppress(OSError):
                rules += parse_bridge_acl(read(arg), read, depth + 1)
    return tuple(rules)


def bridge_allowed(acl: Sequence[tuple[str, str]], bridge: str) -> bool:
    """The helper's rule: denied unless allowed, and a matching deny wins over any allow."""
    allowed = any(v == "allow" and a in ("all", bridge) for v, a in acl)
    denied = any(v == "deny" and a in ("all", bridge) for v, a in acl)
    return allowed and not denied


def check_bridge(bridge: str, host: HostNetwork) -> None:
    """Raise :class:`BridgeMissing` unless ``bridge`` is one of the host's bridges, and
    :class:`BridgeNotAllowed` unless qemu-bridge-helper may use it (else QEMU would fail to
    start with the helper's terse message)."""
    if bridge not in host.bridge_names:
        raise bridge_missing(bridge, host.bridge_names, host.error)
    if not bridge_allowed(host.bridge_acl, bridge):
        raise BridgeNotAllowed(
            f"VMs may not join bridge {bridge} yet: add the line `allow {bridge}` to "
            f"{BRIDGE_CONF} (qemu-bridge-helper's access list)",
            bridge=bridge,
        )


def neighbour_address(neigh_json: Sequence[dict[str, Any]], mac: str) -> str | None:
    """The address the host last saw ``mac`` use (``ip -j neigh``): IPv4 first, then IPv6;
    entries whose lookup failed or is still incomplete do not count."""
    wanted = mac.lower()
    found: list[str] = []
    for entry in neigh_json:
        if str(entry.get("lladdr") or "").lower() != wanted:
            continue
        if {"FAILED", "INCOMPLETE"} & set(entry.get("state") or []):
            continue
        found.append(str(entry.get("dst")))
    found.sort(key=lambda a: ipaddress.ip_address(a).version)
    return found[0] if found else None


# --- the adapter -------------------------------------------------------------------------------


def _run_ip(args: list[str]) -> list[dict[str, Any]]:
    tool = shutil.which("ip")
    if tool is None:
        raise ApplianceError("the ip tool is missing (install it with `apt-get install iproute2`)")
    try:
        result = subprocess.run(
            [tool, *args],
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
            timeout=IP_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        raise ApplianceError(f"ip {' '.join(args)} timed out") from exc
    if result.returncode != 0:
        raise ApplianceError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    try:
        data = json.loads(result.stdout or "[]")
    except ValueError as exc:
        raise ApplianceError(f"ip {' '.join(args)} printed no JSON") from exc
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def read_bridge_acl(path: str = BRIDGE_CONF) -> tuple[tuple[str, str], ...]:
    """qemu-bridge-helper's rules (none when the file is missing: the helper then denies)."""
    try:
        return parse_bridge_acl(_read_text(path), _read_text)
    except OSError:
        return ()


def read_host_network() -> HostNetwork:
    """The host's bridges and addresses now (``error`` set, and none listed, if ``ip`` fails)."""
    try:
        links = _run_ip(["-d", "-j", "link"])
        addrs = _run_ip(["-j", "addr"])
    except ApplianceError as exc:
        return HostNetwork(error=exc.message)
    return HostNetwork(
        bridges=parse_bridges(links, addrs),
        addresses=host_addresses(addrs),
        bridge_acl=read_bridge_acl(),
    )


def read_neighbours() -> list[dict[str, Any]]:
    """The host's neighbour table (``ip -j neigh``); empty when it cannot be read."""
    try:
        return _run_ip(["-j", "neigh"])
    except ApplianceError:
        return []
