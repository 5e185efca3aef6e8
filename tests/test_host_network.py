"""The appliance's bridges and addresses, parsed from iproute2's JSON (``image.host_network``).

The parsers are pure and run on recorded output: ``testbed-*`` was recorded on a test machine
(no bridge), ``bridged-*`` is an appliance with a LAN bridge, written by hand in iproute2's
format (tests/fixtures/ipnet/README.md). The adapter runs the real ``ip`` of this machine.
"""

from __future__ import annotations

import json
import os

import pytest

from image.host_network import (
    BridgeMissing,
    BridgeNotAllowed,
    HostAddress,
    HostNetwork,
    bridge_allowed,
    bridge_missing,
    check_bridge,
    host_addresses,
    neighbour_address,
    parse_addresses,
    parse_bridge_acl,
    parse_bridges,
    read_bridge_acl,
    read_host_network,
    read_neighbours,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "ipnet")


def load(name: str) -> list[dict]:
    with open(os.path.join(FIXTURES, name)) as f:
        return json.load(f)


def test_a_bridge_with_its_ports_and_address():
    bridges = parse_bridges(load("bridged-link.json"), load("bridged-addr.json"))
    assert [b.name for b in bridges] == ["br-lab", "br0"]
    br0 = bridges[1]
    assert br0.up and br0.mtu == 1500 and br0.mac == "3c:ec:ef:12:34:56"
    assert [(p.name, p.up, p.kind) for p in br0.ports] == [
        ("eno1", True, ""),
        ("tap-fo1", True, "tap"),  # a tap's operstate is UNKNOWN; its flags say it is up
    ]
    assert br0.addresses == ("192.168.10.5",)  # link-local IPv6 left out
    lab = bridges[0]
    assert not lab.up and lab.ports == () and lab.addresses == ()


def test_a_bonds_slave_is_no_bridge_port_and_a_bond_no_bridge():
    bridges = parse_bridges(load("bridged-link.json"))
    names = {p.name for b in bridges for p in b.ports}
    assert "eno2" not in names  # its master is bond0
    assert "bond0" not in {b.name for b in bridges}


def test_the_test_machine_has_no_bridge():
    assert parse_bridges(load("testbed-link.json"), load("testbed-addr.json")) == ()
    assert host_addresses(load("testbed-addr.json")) == (HostAddress("eth0", "192.0.2.2"),)


def test_addresses_per_interface():
    addrs = parse_addresses(load("testbed-addr.json"))
    assert addrs["lo"] == ("127.0.0.1",)
    assert addrs["eth0"] == ("192.0.2.2", "fd00::2")  # global IPv6 kept, fe80:: not
    assert addrs["ifb0"] == ()
    assert host_addresses(load("bridged-addr.json")) == (
        HostAddress("br0", "192.168.10.5"),
        HostAddress("bond0", "10.20.0.5"),
    )


def test_a_missing_bridge_is_refused_with_the_bridges_there_are():
    none = HostNetwork()
    with pytest.raises(BridgeMissing) as caught:
        check_bridge("br0", none)
    assert caught.value.code == "bridge_missing"
    assert caught.value.message == "there is no bridge br0 on this appliance; bridges: none"
    host = HostNetwork(
        bridges=parse_bridges(load("bridged-link.json")), bridge_acl=(("allow", "all"),)
    )
    check_bridge("br0", host)  # there, and allowed: no error
    with pytest.raises(
        BridgeMissing, match="no bridge br1 on this appliance; bridges: br-lab, br0"
    ):
        check_bridge("br1", host)
    unreadable = bridge_missing("br0", [], "the ip tool is missing")
    assert unreadable.message.endswith(
        "bridges: none (the bridges could not be read: the ip tool is missing)"
    )


def test_the_vms_address_from_the_neighbour_table():
    neigh = load("bridged-neigh.json")
    assert neighbour_address(neigh, "52:54:00:3A:7E:01") == "192.168.10.57"  # IPv4 before IPv6
    assert neighbour_address(neigh, "52:54:00:3a:7e:02") is None  # incomplete
    assert neighbour_address(load("testbed-neigh.json"), "52:54:00:3a:7e:01") is None
    only_v6 = [e for e in neigh if ":" in e["dst"]]
    assert neighbour_address(only_v6, "52:54:00:3a:7e:01") == "fe80::5054:ff:fe3a:7e01"


def test_the_hosts_real_network_is_read():
    host = read_host_network()
    assert host.error is None
    # No bridge may be created on these machines; whatever is there is listed consistently.
    assert host.bridge_names == tuple(b.name for b in host.bridges)
    assert all(a.address != "127.0.0.1" for a in host.addresses)
    as_dict = host.to_dict()
    assert set(as_dict) == {"bridges", "addresses", "error"}
    assert isinstance(read_neighbours(), list)


def test_a_missing_ip_tool_is_a_reason_not_a_crash(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    host = read_host_network()
    assert host.bridges == () and "ip tool is missing" in (host.error or "")
    assert read_neighbours() == []


def test_qemu_bridge_helpers_access_list():
    included = {"/etc/qemu/lab.conf": "allow br-lab\n"}

    def read_included(path: str) -> str:
        if path not in included:
            raise FileNotFoundError(path)
        return included[path]

    acl = parse_bridge_acl(
        "# bridges VMs may join\nallow br0\ninclude /etc/qemu/lab.conf\ninclude /missing.conf\n"
        "deny br-guest\nnonsense line here\n",
        read_included,
    )
    assert acl == (("allow", "br0"), ("allow", "br-lab"), ("deny", "br-guest"))
    assert bridge_allowed(acl, "br0") and bridge_allowed(acl, "br-lab")
    assert not bridge_allowed(acl, "br1")  # no rule: denied
    assert not bridge_allowed((("allow", "all"), ("deny", "br0")), "br0")  # deny wins
    assert bridge_allowed((("allow", "all"),), "br9")
    assert not bridge_allowed((), "br0")


def test_a_bridge_the_helper_may_not_use_is_refused_with_the_line_to_add():
    bridges = parse_bridges(load("bridged-link.json"))
    with pytest.raises(BridgeNotAllowed) as caught:
        check_bridge("br0", HostNetwork(bridges=bridges, bridge_acl=(("allow", "br-lab"),)))
    assert caught.value.code == "bridge_not_allowed"
    assert "add the line `allow br0` to /etc/qemu/bridge.conf" in caught.value.message
    host = HostNetwork(bridges=bridges, bridge_acl=(("allow", "br0"),))
    check_bridge("br0", host)
    listed = {b["name"]: b["helper_allowed"] for b in host.to_dict()["bridges"]}
    assert listed == {"br-lab": False, "br0": True}
    # this machine has no bridge.conf: nothing is allowed, and reading it is no error
    assert read_bridge_acl("/nonexistent/bridge.conf") == ()
