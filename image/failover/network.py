"""A failover's network: parsed from settings or a job's parameters, checked against the host,
resolved at boot.

Three modes (:mod:`image.qemu_network`): ``isolated`` (the default, and always a boot test's),
``nat`` (the guest reaches out through the appliance; forwards listen on a chosen appliance
address) and ``bridged`` (the guest on a LAN bridge of the appliance). Host port 0 means "pick a
free port", resolved just before QEMU starts, and every guest port a boot proof probes gets a
forward of its own: for NAT that forward listens on 127.0.0.1 only, so the proof never opens a
port to the LAN that nobody asked for.

What must hold on the host (:func:`check_network_on_host`): a bridged failover's bridge exists;
a NAT forward's address is one of the appliance's own. Both are checked when a setting is saved
and again before a failover starts, before anything runs.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from appliance.errors import InvalidInput
from image.boot_proof import BootProofSpec
from image.host_network import HostNetwork, check_bridge
from image.qemu import Bridged, Isolated, Nat, Network, PortForward, free_port

MODES = ("isolated", "nat", "bridged")
LOOPBACK = "127.0.0.1"


def _forwards(items: Any, address: str) -> tuple[PortForward, ...]:
    if items is None:
        return ()
    if not isinstance(items, list | tuple):
        raise InvalidInput("port_forwards must be a list of [appliance port, guest port]")
    forwards = []
    seen: set[int] = set()
    for item in items:
        try:
            raw: tuple[Any, Any] = (
                (item.get("host", 0), item.get("guest"))
                if isinstance(item, dict)
                else (item[0], item[1])
            )
            host, guest = int(raw[0] or 0), int(raw[1])
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise InvalidInput(f"bad port forward {item!r}", field="port_forwards") from exc
        if not (0 <= host <= 65535 and 1 <= guest <= 65535):
            raise InvalidInput(
                f"bad port forward {item!r}: ports are numbers from 1 to 65535",
                field="port_forwards",
            )
        if host and host in seen:
            raise InvalidInput(
                f"appliance port {host} is forwarded twice; each needs a port of its own",
                field="port_forwards",
            )
        seen.add(host)
        forwards.append(PortForward(host, guest, address))
    return tuple(forwards)


def network_from_dict(data: dict[str, Any] | None) -> Network:
    """``{"mode": "isolated", "port_forwards": [[host, guest], ...]}``,
    ``{"mode": "nat", "port_forwards": [...], "address": "192.168.1.5"}`` or
    ``{"mode": "bridged", "bridge": "br0"}``; host port 0 picks a free port."""
    data = dict(data or {})
    mode = data.get("mode") or "isolated"
    if mode == "bridged":
        bridge = data.get("bridge")
        if not bridge or not isinstance(bridge, str):
            raise InvalidInput("a bridged failover needs the name of a host bridge")
        return Bridged(bridge=bridge)
    if mode == "nat":
        address = str(data.get("address") or LOOPBACK)
        try:
            ipaddress.IPv4Address(address)
        except ValueError as exc:
            raise InvalidInput(
                f"{address!r} is not an IPv4 address of the appliance", field="address"
            ) from exc
        return Nat(port_forwards=_forwards(data.get("port_forwards"), address), address=address)
    if mode != "isolated":
        raise InvalidInput(f"network mode must be isolated, nat or bridged, not {mode!r}")
    return Isolated(port_forwards=_forwards(data.get("port_forwards"), LOOPBACK))


def check_network_on_host(network: Network, host: HostNetwork) -> None:
    """Refuse a network this appliance cannot give: a bridge it lacks (``bridge_missing``),
    NAT forwards on an address that is not its own."""
    if isinstance(network, Bridged):
        check_bridge(network.bridge, host)
    elif isinstance(network, Nat) and network.address != LOOPBACK:
        own = sorted({a.address for a in host.addresses})
        if network.address not in own:
            raise InvalidInput(
                f"{network.address} is not an address of this appliance; "
                f"its addresses: {', '.join([LOOPBACK, *own])}",
                field="address",
            )


def boot_test_network(configured: dict[str, Any] | None) -> tuple[Isolated, str | None]:
    """A boot test runs isolated whatever the VM's failovers are set to (it must never put a
    copy of a production VM on the LAN); the configured forwards are kept, on 127.0.0.1.

    Returns the network and, when it differs from the setting, a sentence saying so."""
    data = dict(configured or {})
    mode = data.get("mode") or "isolated"
    forwards = data.get("port_forwards") if mode in ("isolated", "nat") else None
    network = Isolated(port_forwards=_forwards(forwards, LOOPBACK))
    if mode == "bridged":
        return network, (
            f"the VM's failovers join bridge {data.get('bridge')}; a boot test never joins a "
            "bridge, so it runs isolated"
        )
    if mode == "nat":
        return network, (
            "the VM's failovers use NAT; a boot test runs isolated (the VM reaches nothing, "
            "its forwards listen on 127.0.0.1 only)"
        )
    return network, None


def resolve_forwards(network: Network, proof: BootProofSpec) -> Network:
    """Add forwards for the proof's guest ports and give host port 0 a free port."""
    if isinstance(network, Bridged):
        return network
    wanted = list(network.port_forwards)
    have = {f.guest_port for f in wanted}
    wanted += [PortForward(0, port) for port in proof.guest_ports() if port not in have]
    resolved = tuple(
        PortForward(f.host_port or free_port(f.host_address), f.guest_port, f.host_address)
        for f in wanted
    )
    if isinstance(network, Nat):
        return Nat(port_forwards=resolved, address=network.address)
    return Isolated(port_forwards=resolved)


def network_to_dict(network: Network) -> dict[str, Any]:
    if isinstance(network, Bridged):
        return {"mode": "bridged", "bridge": network.bridge}
    forwards = [[f.host_port, f.guest_port] for f in network.port_forwards]
    if isinstance(network, Nat):
        return {"mode": "nat", "port_forwards": forwards, "address": network.address}
    return {"mode": "isolated", "port_forwards": forwards}
