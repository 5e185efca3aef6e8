"""A failover's network: parsed from settings or a job's parameters, resolved at boot.

An isolated VM reaches the host only through port forwards (user-mode networking); a bridged VM
sits on a host bridge. Host port 0 means "pick a free port", resolved just before QEMU starts,
and every guest port a boot proof probes gets a forward of its own.
"""

from __future__ import annotations

from typing import Any

from appliance.errors import InvalidInput
from image.boot_proof import BootProofSpec
from image.qemu import Bridged, Isolated, Network, PortForward, free_port


def network_from_dict(data: dict[str, Any] | None) -> Network:
    """``{"mode": "isolated", "port_forwards": [[host, guest], ...]}`` or
    ``{"mode": "bridged", "bridge": "br0"}``; host port 0 picks a free port."""
    data = dict(data or {})
    mode = data.get("mode", "isolated")
    if mode == "bridged":
        bridge = data.get("bridge")
        if not bridge or not isinstance(bridge, str):
            raise InvalidInput("a bridged failover needs the name of a host bridge")
        return Bridged(bridge=bridge)
    if mode != "isolated":
        raise InvalidInput(f"network mode must be isolated or bridged, not {mode!r}")
    forwards = []
    for item in data.get("port_forwards") or []:
        raw: tuple[Any, Any] = (
            (item.get("host", 0), item.get("guest")) if isinstance(item, dict) else tuple(item)
        )
        try:
            host, guest = int(raw[0] or 0), int(raw[1])
        except (TypeError, ValueError, IndexError) as exc:
            raise InvalidInput(f"bad port forward {item!r}") from exc
        if not (0 <= host <= 65535 and 1 <= guest <= 65535):
            raise InvalidInput(f"bad port forward {item!r}")
        forwards.append(PortForward(host, guest))
    return Isolated(port_forwards=tuple(forwards))


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
    return Isolated(port_forwards=resolved)


def network_to_dict(network: Network) -> dict[str, Any]:
    if isinstance(network, Bridged):
        return {"mode": "bridged", "bridge": network.bridge}
    return {
        "mode": "isolated",
        "port_forwards": [[f.host_port, f.guest_port] for f in network.port_forwards],
    }
