"""The failover network modes without QEMU: argv, parsing, host checks, the boot test's network,
and the address report parsed from the monitor output QEMU 7.2 printed on this machine."""

from __future__ import annotations

import json

import pytest

from appliance.errors import InvalidInput
from image.boot_proof import BootProofSpec
from image.failover.addresses import (
    describe_addresses,
    nic_macs,
    parse_info_network,
    parse_usernet,
)
from image.failover.network import (
    boot_test_network,
    check_network_on_host,
    network_from_dict,
    network_to_dict,
    resolve_forwards,
)
from image.host_network import Bridge, BridgeMissing, HostAddress, HostNetwork
from image.qemu import (
    Bridged,
    DiskAttachment,
    Isolated,
    Nat,
    PortForward,
    QemuFiles,
    build_qemu_argv,
)
from image.qemu_network import netdev_argv, stand_in_mac

FILES = QemuFiles(qmp_socket="/run/s/qmp.sock", serial_log="/run/s/serial.log")
SPEC = {
    "name": "web",
    "memory_mib": 256,
    "disks": [{"name": "root", "bus": "virtio"}],
    "nics": [{"model": "virtio", "mac": "52:54:00:3a:7e:01"}, {"model": "e1000"}],
}
#: What ``info usernet`` / ``info network`` answered through QMP for an isolated NIC with one
#: forward and an unrestricted second NIC (QEMU 7.2, recorded on a test machine).
USERNET = (
    "Hub -1 (net0):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ"
    " SendQ\r\n  TCP[HOST_FORWARD]   8       127.0.0.1 45678       10.0.2.15    80     0     0\r\n"
    "Hub -1 (net1):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ"
    " SendQ\r\n"
)
INFO_NETWORK = (
    "virtio-net-pci.0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:aa:bb:cc\r\n"
    " \\ net0: index=0,type=user,net=10.0.2.0,restrict=on\r\n"
    "e1000.0: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:56\r\n"
    " \\ net1: index=0,type=user,net=10.0.2.0,restrict=off\r\n"
)
HOST = HostNetwork(
    bridges=(Bridge("br0", True, "3c:ec:ef:12:34:56", 1500, (), ("192.168.10.5",)),),
    addresses=(HostAddress("br0", "192.168.10.5"),),
    bridge_acl=(("allow", "br0"),),
)


def argv(network):
    return build_qemu_argv(
        SPEC, [DiskAttachment("/s/root.qcow2")], accel="tcg", network=network, files=FILES
    )


def netdevs(args):
    return [args[i + 1] for i, a in enumerate(args) if a == "-netdev"]


def nics(args):
    devices = [
        json.loads(args[i + 1])
        for i, a in enumerate(args)
        if a == "-device" and args[i + 1].startswith("{")
    ]
    return [d for d in devices if "netdev" in d]


def test_isolated_is_restricted_on_every_nic_and_forwards_from_loopback():
    args = argv(Isolated((PortForward(8080, 80),)))
    assert netdevs(args) == [
        "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:8080-:80",
        "user,id=net1,restrict=on",
    ]


def test_nat_is_unrestricted_and_forwards_only_what_was_asked_on_its_address():
    args = argv(Nat((PortForward(8080, 80, "192.168.10.5"),), "192.168.10.5"))
    assert netdevs(args) == [
        "user,id=net0,hostfwd=tcp:192.168.10.5:8080-:80",
        "user,id=net1",
    ]
    assert netdev_argv(Nat(), 0) == ["-netdev", "user,id=net0"]  # no forward unless asked
    assert all("restrict" not in n for n in netdevs(args))


def test_bridged_uses_the_helper_and_keeps_the_vms_mac():
    args = argv(Bridged("br0"))
    assert netdevs(args) == [
        "bridge,id=net0,br=br0,helper=/usr/lib/qemu/qemu-bridge-helper",
        "bridge,id=net1,br=br0,helper=/usr/lib/qemu/qemu-bridge-helper",
    ]
    found = nics(args)
    assert found[0]["mac"] == "52:54:00:3a:7e:01"  # the original MAC from the VM definition
    # A NIC without a MAC gets a stable one of its own, not QEMU's shared default.
    assert found[1]["mac"] == stand_in_mac("web", 1) != "52:54:00:12:34:56"
    assert stand_in_mac("web", 1) == stand_in_mac("web", 1) != stand_in_mac("db", 1)
    assert nic_macs(SPEC) == ["52:54:00:3a:7e:01", stand_in_mac("web", 1)]
    # the address lookup looks for the MAC the argv gave: also for a definition without NICs
    bare = {"name": "db", "disks": [{"name": "root"}]}
    bare_argv = build_qemu_argv(
        bare, [DiskAttachment("/s/r.qcow2")], accel="tcg", network=Bridged("br0"), files=FILES
    )
    assert [n["mac"] for n in nics(bare_argv)] == nic_macs(bare) == [stand_in_mac("db", 0)]
    # isolated and NAT leave a MAC-less NIC to QEMU (nothing on a LAN sees it)
    assert "mac" not in nics(argv(Isolated()))[1]


def test_a_bridge_name_with_a_comma_cannot_add_options():
    assert netdev_argv(Bridged("br0,x=y"), 0)[1].startswith("bridge,id=net0,br=br0,,x=y,")


def test_network_settings_parse_and_round_trip():
    nat = network_from_dict(
        {"mode": "nat", "port_forwards": [[8080, 80], {"guest": 22}], "address": "192.168.10.5"}
    )
    assert nat == Nat(
        (PortForward(8080, 80, "192.168.10.5"), PortForward(0, 22, "192.168.10.5")),
        "192.168.10.5",
    )
    assert network_to_dict(nat) == {
        "mode": "nat",
        "port_forwards": [[8080, 80], [0, 22]],
        "address": "192.168.10.5",
    }
    assert network_from_dict({"mode": "nat"}) == Nat()
    assert network_from_dict(network_to_dict(nat)) == nat


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ({"mode": "nat", "address": "lan"}, "not an IPv4 address"),
        ({"mode": "nat", "address": "::1"}, "not an IPv4 address"),
        ({"port_forwards": [[8080, 80], [8080, 81]]}, "forwarded twice"),
        ({"port_forwards": [[70000, 80]]}, "from 1 to 65535"),
        ({"port_forwards": [[1, 0]]}, "from 1 to 65535"),
        ({"port_forwards": [["x", 80]]}, "bad port forward"),
        ({"port_forwards": "80"}, "must be a list"),
        ({"mode": "routed"}, "isolated, nat or bridged"),
        ({"mode": "bridged"}, "name of a host bridge"),
    ],
)
def test_bad_networks_are_refused_clearly(bad, words):
    with pytest.raises(InvalidInput, match=words):
        network_from_dict(bad)


def test_the_host_must_have_the_bridge_and_the_nat_address():
    check_network_on_host(Bridged("br0"), HOST)
    with pytest.raises(BridgeMissing, match="no bridge br1 on this appliance; bridges: br0"):
        check_network_on_host(Bridged("br1"), HOST)
    with pytest.raises(BridgeMissing, match="bridges: none"):
        check_network_on_host(Bridged("br0"), HostNetwork())
    check_network_on_host(Nat(address="192.168.10.5"), HOST)
    check_network_on_host(Nat(), HostNetwork())  # 127.0.0.1 is always the appliance's
    with pytest.raises(InvalidInput, match=r"10\.9\.9\.9 is not an address of this appliance"):
        check_network_on_host(Nat(address="10.9.9.9"), HOST)


def test_a_boot_test_never_joins_a_bridge_and_says_so():
    network, note = boot_test_network({"mode": "bridged", "bridge": "br0"})
    assert network == Isolated()
    assert note is not None and "never joins a bridge" in note and "br0" in note
    network, note = boot_test_network(
        {"mode": "nat", "port_forwards": [[8080, 80]], "address": "192.168.10.5"}
    )
    assert network == Isolated((PortForward(8080, 80),))  # on 127.0.0.1, restricted
    assert note is not None and "isolated" in note
    assert boot_test_network({"port_forwards": [[0, 80]]}) == (
        Isolated((PortForward(0, 80),)),
        None,
    )
    assert boot_test_network(None) == (Isolated(), None)


def test_proof_forwards_of_a_nat_vm_listen_on_loopback_only():
    nat = Nat((PortForward(8080, 22, "192.168.10.5"),), "192.168.10.5")
    resolved = resolve_forwards(nat, BootProofSpec(http_port=80, tcp=22))
    assert isinstance(resolved, Nat) and resolved.address == "192.168.10.5"
    by_guest = {f.guest_port: f for f in resolved.port_forwards}
    assert by_guest[22] == PortForward(8080, 22, "192.168.10.5")  # asked: on the LAN address
    assert by_guest[80].host_address == "127.0.0.1" and by_guest[80].host_port > 0


def test_the_monitors_answers_are_parsed():
    assert parse_usernet(USERNET) == {
        "net0": [
            {
                "address": "127.0.0.1",
                "host_port": 45678,
                "guest_address": "10.0.2.15",
                "guest_port": 80,
            }
        ],
        "net1": [],
    }
    assert parse_info_network(INFO_NETWORK) == {
        "net0": {"net": "10.0.2.0", "restricted": True},
        "net1": {"net": "10.0.2.0", "restricted": False},
    }


def test_addresses_of_a_user_mode_vm():
    shown = describe_addresses(
        {"mode": "isolated"},
        usernet=parse_usernet(USERNET),
        info_network=parse_info_network(INFO_NETWORK),
    )
    assert shown == {
        "mode": "isolated",
        "guest_address": "10.0.2.15",
        "source": "dhcp",
        "forwards": [{"address": "127.0.0.1", "host_port": 45678, "guest_port": 80}],
        "restricted": True,
    }
    # no forwards: the address is the first lease of the netdev's network
    bare = describe_addresses(
        {"mode": "nat"},
        usernet={"net0": []},
        info_network={"net0": {"net": "10.0.5.0", "restricted": False}},
    )
    assert bare["guest_address"] == "10.0.5.15" and not bare["restricted"]
    assert bare["forwards"] == []


def test_addresses_of_a_bridged_vm_agent_then_neighbours_then_unknown():
    macs = ["52:54:00:3a:7e:01"]
    agent = [
        {
            "name": "lo",
            "hardware-address": "00:00:00:00:00:00",
            "ip-addresses": [{"ip-address": "127.0.0.1"}],
        },
        {
            "name": "eth0",
            "hardware-address": "52:54:00:3a:7e:01",
            "ip-addresses": [{"ip-address": "fe80::1"}, {"ip-address": "192.168.10.60"}],
        },
    ]
    neigh = [
        {"dst": "192.168.10.57", "dev": "br0", "lladdr": "52:54:00:3a:7e:01", "state": ["STALE"]}
    ]
    by_agent = describe_addresses(
        {"mode": "bridged"}, macs=macs, agent_interfaces=agent, neighbours=neigh
    )
    assert (by_agent["guest_address"], by_agent["source"]) == ("192.168.10.60", "agent")
    by_neigh = describe_addresses(
        {"mode": "bridged"}, macs=macs, agent_interfaces=None, neighbours=neigh
    )
    assert (by_neigh["guest_address"], by_neigh["source"]) == ("192.168.10.57", "neighbours")
    unknown = describe_addresses({"mode": "bridged"}, macs=macs, neighbours=[])
    assert (unknown["guest_address"], unknown["source"]) == (None, None)
