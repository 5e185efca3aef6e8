"""The address a failed-over VM got, and where its forwarded ports listen.

For user-mode networks (isolated, NAT) QEMU itself is the guest's DHCP server and router. QEMU
7.2 has no QMP command for its leases, so the human monitor is asked through QMP
(``human-monitor-command``): ``info usernet`` lists the live forwards (``TCP[HOST_FORWARD]``
rows: appliance address and port, guest address and port) and ``info network`` each netdev's
network and whether it is restricted. The guest's address is the destination of its forwards;
without forwards it is the first address QEMU's DHCP hands out (``.15`` of the netdev's
network, the only lease of a one-NIC guest).

For a bridged VM the LAN's DHCP server decides: the guest agent is asked when the VM runs one
(``guest-network-get-interfaces``), else the appliance's neighbour table (``ip -j neigh``) is
searched for the VM's MAC, else the address is not known yet.

The parsers and :func:`describe_addresses` are pure; :func:`session_addresses` is the adapter.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from image.host_network import neighbour_address, read_neighbours
from image.qemu_network import stand_in_mac
from image.qmp import QmpError

if TYPE_CHECKING:
    from image.failover.session import FailoverSession

#: QEMU's user-mode DHCP hands out addresses from the network's .15 on.
DHCP_FIRST_HOST = 15

_FORWARD_ROW = re.compile(
    r"TCP\[HOST_FORWARD\]\s+\d+\s+(?P<src>\S+)\s+(?P<sport>\d+)\s+(?P<dst>\S+)\s+(?P<dport>\d+)"
)
_HUB = re.compile(r"^Hub\s+-?\d+\s+\((?P<netdev>[^)]+)\):")
_USER_NETDEV = re.compile(r"\\\s+(?P<netdev>[^:\s]+):\s+index=\d+,type=user,(?P<opts>\S+)")


def parse_usernet(text: str) -> dict[str, list[dict[str, Any]]]:
    """``info usernet`` -> netdev id -> its forwards ``{address, host_port, guest_address,
    guest_port}``."""
    out: dict[str, list[dict[str, Any]]] = {}
    netdev: str | None = None
    for line in text.splitlines():
        hub = _HUB.match(line.strip())
        if hub:
            netdev = hub.group("netdev")
            out[netdev] = []
            continue
        row = _FORWARD_ROW.search(line)
        if row and netdev is not None:
            out[netdev].append(
                {
                    "address": row.group("src"),
                    "host_port": int(row.group("sport")),
                    "guest_address": row.group("dst"),
                    "guest_port": int(row.group("dport")),
                }
            )
    return out


def parse_info_network(text: str) -> dict[str, dict[str, Any]]:
    """``info network`` -> user-mode netdev id -> ``{net, restricted}``."""
    out: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        match = _USER_NETDEV.search(line)
        if not match:
            continue
        opts = dict(o.split("=", 1) for o in match.group("opts").split(",") if "=" in o)
        out[match.group("netdev")] = {
            "net": opts.get("net", ""),
            "restricted": opts.get("restrict") == "on",
        }
    return out


def agent_address(interfaces: Sequence[dict[str, Any]], macs: Sequence[str]) -> str | None:
    """The guest's IPv4 (else global IPv6) address on a NIC with one of ``macs``, from the
    guest agent's ``guest-network-get-interfaces``."""
    wanted = {m.lower() for m in macs}
    found: list[str] = []
    for iface in interfaces:
        if str(iface.get("hardware-address") or "").lower() not in wanted:
            continue
        for entry in iface.get("ip-addresses") or []:
            address = str(entry.get("ip-address") or "")
            with contextlib.suppress(ValueError):
                ip = ipaddress.ip_address(address)
                if not (ip.is_loopback or ip.is_link_local):
                    found.append(address)
    found.sort(key=lambda a: ipaddress.ip_address(a).version)
    return found[0] if found else None


def nic_macs(vm_spec: dict[str, Any]) -> list[str]:
    """The MAC each NIC of a bridged VM has (its definition's, else the stand-in QEMU got:
    :func:`image.qemu.build_qemu_argv` keys it on the definition's name the same way)."""
    nics = list(vm_spec.get("nics") or []) or [{}]
    return [
        str(nic.get("mac") or stand_in_mac(str(vm_spec.get("name") or "vm"), i))
        for i, nic in enumerate(nics)
    ]


def describe_addresses(
    network: dict[str, Any],
    *,
    usernet: dict[str, list[dict[str, Any]]] | None = None,
    info_network: dict[str, dict[str, Any]] | None = None,
    macs: Sequence[str] = (),
    agent_interfaces: Sequence[dict[str, Any]] | None = None,
    neighbours: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """What the page shows: ``{mode, guest_address, source, forwards, restricted}``.

    ``source`` says where the address came from: ``dhcp`` (QEMU's user-mode DHCP), ``agent``,
    ``neighbours``, or None when it is not known yet."""
    mode = str(network.get("mode") or "isolated")
    if mode == "bridged":
        address = agent_address(agent_interfaces or [], macs) if agent_interfaces else None
        source = "agent" if address else None
        if address is None:
            for mac in macs:
                address = neighbour_address(neighbours, mac)
                if address:
                    source = "neighbours"
                    break
        return {
            "mode": mode,
            "guest_address": address,
            "source": source,
            "macs": list(macs),
            "forwards": [],
            "restricted": False,
        }
    forwards = (usernet or {}).get("net0", [])
    netinfo = (info_network or {}).get("net0") or {}
    address = forwards[0]["guest_address"] if forwards else None
    if address is None and netinfo.get("net"):
        with contextlib.suppress(ValueError):
            address = str(ipaddress.IPv4Address(netinfo["net"]) + DHCP_FIRST_HOST)
    return {
        "mode": mode,
        "guest_address": address,
        "source": "dhcp" if address else None,
        "forwards": [
            {"address": f["address"], "host_port": f["host_port"], "guest_port": f["guest_port"]}
            for f in forwards
        ],
        "restricted": bool(netinfo.get("restricted")) if netinfo else mode == "isolated",
    }


def _agent_interfaces(socket_path: str, timeout: float = 1.0) -> list[dict[str, Any]] | None:
    """``guest-network-get-interfaces`` through the agent's socket; None when it does not
    answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(socket_path)
            sock.sendall(b'{"execute": "guest-network-get-interfaces"}\n')
            buffer = b""
            while b"\n" not in buffer:
                data = sock.recv(65536)
                if not data:
                    break
                buffer += data
        reply = json.loads(buffer.splitlines()[0]) if buffer else {}
    except (OSError, ValueError, IndexError):
        return None
    result = reply.get("return") if isinstance(reply, dict) else None
    return result if isinstance(result, list) else None


def session_addresses(
    session: FailoverSession,
    *,
    neighbours: Callable[[], list[dict[str, Any]]] = read_neighbours,
) -> dict[str, Any] | None:
    """The running session's addresses (None when its QEMU is not running here)."""
    qmp = session.process.qmp
    if qmp is None or not session.process.alive():
        return None
    network = dict(session.details.get("network") or {})
    if network.get("mode") == "bridged":
        agent = session.process.files.agent_socket
        return describe_addresses(
            network,
            macs=nic_macs(session.spec),
            agent_interfaces=_agent_interfaces(agent) if agent else None,
            neighbours=neighbours(),
        )
    try:
        usernet = qmp.execute("human-monitor-command", {"command-line": "info usernet"})
        netinfo = qmp.execute("human-monitor-command", {"command-line": "info network"})
    except QmpError:
        return None
    return describe_addresses(
        network, usernet=parse_usernet(str(usernet)), info_network=parse_info_network(str(netinfo))
    )
