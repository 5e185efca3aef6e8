"""A failed-over VM's network, and the QEMU arguments for it (pure: no I/O).

Three modes, each a frozen dataclass:

- :class:`Isolated` (test boots; the default): user-mode networking with ``restrict=on``. The
  guest gets an address from QEMU's own DHCP but no packet leaves QEMU; only the chosen TCP
  ports are forwarded into it, from 127.0.0.1.
- :class:`Nat`: user-mode networking without the restriction, so the guest reaches out through
  the appliance (QEMU opens the connections as the appliance's process). Forwards listen on the
  address given (the appliance's LAN address, a setting; 127.0.0.1 in tests) and exist only when
  asked for.
- :class:`Bridged` (a real failover): a tap device on a LAN bridge of the appliance, made by
  ``qemu-bridge-helper``; the guest keeps its original MAC, so DHCP reservations and ARP caches
  on the LAN find it as before.

Forwards go to the first NIC only; every user-mode NIC of an isolated VM is restricted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

BRIDGE_HELPER = "/usr/lib/qemu/qemu-bridge-helper"


@dataclass(frozen=True)
class PortForward:
    """A TCP port of the guest reachable on ``host_address:host_port``."""

    host_port: int
    guest_port: int
    host_address: str = "127.0.0.1"


@dataclass(frozen=True)
class Isolated:
    """User-mode networking, restricted: no traffic leaves, except the forwarded ports."""

    port_forwards: tuple[PortForward, ...] = ()
    mode: str = field(default="isolated", init=False)


@dataclass(frozen=True)
class Nat:
    """User-mode networking the guest reaches out through; forwards on ``address`` only."""

    port_forwards: tuple[PortForward, ...] = ()
    address: str = "127.0.0.1"
    mode: str = field(default="nat", init=False)


@dataclass(frozen=True)
class Bridged:
    """NICs attached to a host bridge (the LAN) through qemu-bridge-helper."""

    bridge: str
    helper: str = BRIDGE_HELPER
    mode: str = field(default="bridged", init=False)


Network = Isolated | Nat | Bridged


def _opt(value: str) -> str:
    """A value inside a ``key=value,...`` option: commas are doubled (QEMU's escaping)."""
    return value.replace(",", ",,")


def netdev_argv(network: Network, index: int) -> list[str]:
    """The ``-netdev`` arguments of NIC ``index`` (its id is ``net<index>``)."""
    netdev = f"net{index}"
    if isinstance(network, Bridged):
        return [
            "-netdev",
            f"bridge,id={netdev},br={_opt(network.bridge)},helper={_opt(network.helper)}",
        ]
    options = [f"user,id={netdev}"]
    if isinstance(network, Isolated):
        options.append("restrict=on")
    if index == 0:
        for fwd in network.port_forwards:
            options.append(f"hostfwd=tcp:{fwd.host_address}:{fwd.host_port}-:{fwd.guest_port}")
    return ["-netdev", ",".join(options)]


def stand_in_mac(vm_name: str, index: int) -> str:
    """A MAC for a bridged NIC whose VM definition has none.

    QEMU would give every such NIC 52:54:00:12:34:56, so two failed-over VMs on one LAN would
    collide; this one is stable per VM and NIC (a locally administered address in QEMU's range).
    """
    digest = hashlib.sha256(f"{vm_name}/{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])
