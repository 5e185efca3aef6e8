"""The appliance OS through the API (api.routers.system): the recovery key shown once, the network,
time and security-update files written exactly under a temporary OS root, checks in words, roles,
and 409 when the service runs from a checkout. The pure parts (api.system_config) are tested
directly at the end."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import LiveServer, bootstrapped_server

from api import system_config as osc
from appliance.errors import InvalidInput
from appliance.store.crypto import MasterKey


@pytest.fixture(scope="module")
def os_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("os-root")
    (root / "etc/appliance").mkdir(parents=True)
    (root / "etc/appliance/first-pool.json").write_text(
        json.dumps({"disks": ["serial:A1", "serial:B2"]})
    )
    (root / "etc/hostname").write_text("backup-1\n")
    for name in ("lo", "eth1", "enp3s0"):
        (root / "sys/class/net" / name).mkdir(parents=True)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, os_root: Path) -> Iterator[LiveServer]:
    with bootstrapped_server(
        tmp_path_factory.mktemp("system"), device_monitor=False, os_root=os_root
    ) as live:
        yield live


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    return str(r.json()["message"])


def _audit(admin: httpx.Client, action: str) -> list[dict[str, Any]]:
    """The audit entries of ``action``, newest first."""
    r = admin.get("/api/audit", params={"limit": 1000})
    assert r.status_code == 200, r.text
    return [e for e in r.json() if e["action"] == action]


def test_system_says_what_the_box_is(
    server: LiveServer, viewer: httpx.Client, os_root: Path
) -> None:
    r = viewer.get("/api/system")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["appliance_os"] is True
    assert body["hostname"] == "backup-1"
    assert body["first_pool_disks"] == ["serial:A1", "serial:B2"]
    assert body["version"] == server.client().get("/api/health").json()["version"]


def test_the_recovery_key_is_shown_until_confirmed_then_gone(
    server: LiveServer, admin: httpx.Client, operator: httpx.Client, viewer: httpx.Client
) -> None:
    assert operator.get("/api/system/recovery-key").status_code == 403
    assert viewer.post("/api/system/recovery-key/confirm").status_code == 403
    assert admin.get("/api/system").json()["recovery_key_confirmed"] is False

    r = admin.get("/api/system/recovery-key")
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    shown = r.json()
    repo = server.service.app.repo
    assert shown["store_id"] == repo.store_id
    # the key really opens the store: it decodes to the store's master key
    assert MasterKey.from_recovery_key(shown["recovery_key"]).material == repo.key.material
    # shown again while nobody has confirmed (a reload of the wizard's first step)
    assert admin.get("/api/system/recovery-key").json() == shown

    r = admin.post("/api/system/recovery-key/confirm")
    assert r.status_code == 200, r.text
    assert r.json()["confirmed_by"] == "admin"
    again = admin.post("/api/system/recovery-key/confirm")
    assert again.json() == r.json()  # a second confirmation changes nothing

    gone = admin.get("/api/system/recovery-key")
    message = _error(gone, 410)
    assert gone.json()["code"] == "recovery_key_confirmed"
    assert gone.headers["cache-control"] == "no-store"
    assert "admin confirmed" in message and "key export --paper" in message
    assert shown["recovery_key"] not in gone.text
    assert admin.get("/api/system").json()["recovery_key_confirmed"] is True
    # The Settings card's route says the same: shown once means once, wherever it was asked.
    older = admin.get("/api/recovery-key")
    assert _error(older, 410) == message and shown["recovery_key"] not in older.text

    shows = _audit(admin, "recovery_key.show")
    confirms = _audit(admin, "recovery_key.confirm")
    assert len(shows) == 2 and len(confirms) == 1
    assert all(shown["recovery_key"] not in json.dumps(e) for e in shows + confirms)


def test_network_is_written_as_a_networkd_file(
    server: LiveServer, admin: httpx.Client, viewer: httpx.Client, os_root: Path
) -> None:
    path = os_root / osc.NETWORK_FILE
    # before anything is written: the image's default, DHCP on any wired interface
    r = viewer.get("/api/system/network")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "mode": "dhcp",
        "interface": "en* eth*",
        "address": None,
        "gateway": None,
        "dns": [],
        "apply_errors": [],
    }
    static = {
        "mode": "static",
        "address": "192.168.10.20/24",
        "gateway": "192.168.10.1",
        "dns": ["192.168.10.1", "2001:db8::53"],
    }
    assert viewer.put("/api/system/network", json=static).status_code == 403
    r = admin.put("/api/system/network", json=static)
    assert r.status_code == 200, r.text
    # no interface given: the first wired one the OS has
    assert r.json()["interface"] == "enp3s0"
    assert path.read_text() == (
        osc.NETWORK_HEADER + "[Match]\nName=enp3s0\n\n[Network]\nAddress=192.168.10.20/24\n"
        "Gateway=192.168.10.1\nDNS=192.168.10.1\nDNS=2001:db8::53\n"
    )
    got = viewer.get("/api/system/network").json()
    assert got["mode"] == "static" and got["address"] == "192.168.10.20/24"
    assert got["gateway"] == "192.168.10.1" and got["dns"] == static["dns"]
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp file left

    r = admin.put(
        "/api/system/network",
        json={
            "mode": "static",
            "address": "2001:db8:1::5/64",
            "gateway": "2001:db8:1::1",
            "interface": "eth1",
        },
    )
    assert r.status_code == 200, r.text
    assert "Address=2001:db8:1::5/64\nGateway=2001:db8:1::1\n" in path.read_text()

    r = admin.put("/api/system/network", json={"mode": "dhcp", "interface": "eth1"})
    assert r.status_code == 200, r.text
    assert path.read_text() == osc.NETWORK_HEADER + "[Match]\nName=eth1\n\n[Network]\nDHCP=yes\n"
    entries = _audit(admin, "network.update")
    assert [e["details"]["mode"] for e in entries] == ["dhcp", "static", "static"]


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"mode": "static", "address": "192.168.10.20"}, "address", "prefix length"),
        ({"mode": "static", "address": "300.1.1.1/24"}, "address", "not an address"),
        ({"mode": "static", "address": "224.0.0.5/24"}, "address", "multicast"),
        ({"mode": "static", "address": "127.0.0.2/8"}, "address", "loopback"),
        ({"mode": "static", "address": "192.168.10.0/24"}, "address", "network address"),
        ({"mode": "static", "address": "10.0.0.5/24", "gateway": "10.0.1.1"}, "gateway", "outside"),
        (
            {"mode": "static", "address": "10.0.0.5/24", "gateway": "2001:db8::1"},
            "gateway",
            "outside",
        ),
        (
            {"mode": "static", "address": "10.0.0.5/24", "gateway": "10.0.0.5"},
            "gateway",
            "own address",
        ),
        ({"mode": "static", "address": "10.0.0.5/24", "dns": ["dns.example"]}, "dns", "not an IP"),
        ({"mode": "dhcp", "address": "10.0.0.5/24"}, "address", "static address only"),
        ({"mode": "dhcp", "interface": "eth0;rm"}, "interface", "not an interface"),
    ],
)
def test_network_refusals_say_why(
    admin: httpx.Client, os_root: Path, body: dict[str, object], field: str, words: str
) -> None:
    before = (
        (os_root / osc.NETWORK_FILE).read_bytes() if (os_root / osc.NETWORK_FILE).exists() else None
    )
    r = admin.put("/api/system/network", json=body)
    assert words in _error(r, 400)
    assert r.json()["details"]["field"] == field
    after = (
        (os_root / osc.NETWORK_FILE).read_bytes() if (os_root / osc.NETWORK_FILE).exists() else None
    )
    assert after == before


def test_network_shape_errors_are_422(admin: httpx.Client) -> None:
    assert admin.put("/api/system/network", json={"mode": "bridge"}).status_code == 422
    r = admin.put("/api/system/network", json={"mode": "dhcp", "interface": "eth0\nDHCP=no"})
    assert "interface" in _error(r, 422)


def test_time_writes_the_zone_link_and_timesyncd(
    server: LiveServer, admin: httpx.Client, viewer: httpx.Client, os_root: Path
) -> None:
    r = viewer.get("/api/system/time")
    assert r.status_code == 200, r.text
    assert r.json()["timezone"] == "UTC" and r.json()["ntp"] is True
    body = {
        "timezone": "Europe/Berlin",
        "ntp": True,
        "ntp_servers": ["ntp.example.org", "192.0.2.123", "NTP.example.org"],
    }
    assert viewer.put("/api/system/time", json=body).status_code == 403
    r = admin.put("/api/system/time", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["ntp_servers"] == ["ntp.example.org", "192.0.2.123"]
    assert (os_root / "etc/timezone").read_text() == "Europe/Berlin\n"
    assert os.readlink(os_root / "etc/localtime") == "/usr/share/zoneinfo/Europe/Berlin"
    assert (os_root / osc.TIMESYNCD_FILE).read_text() == "[Time]\nNTP=ntp.example.org 192.0.2.123\n"
    # the appliance's schedules follow the box's time zone
    assert admin.get("/api/settings").json()["timezone"] == "Europe/Berlin"

    r = admin.put("/api/system/time", json={"timezone": "UTC", "ntp": False, "ntp_servers": []})
    assert r.status_code == 200, r.text
    got = viewer.get("/api/system/time").json()
    assert got["timezone"] == "UTC" and got["ntp"] is False and got["ntp_servers"] == []
    assert abs(datetime.fromisoformat(got["now"]) - server.clock()) < timedelta(minutes=1)
    assert (os_root / osc.TIMESYNCD_FILE).read_text() == "[Time]\nNTP=\n"
    assert _audit(admin, "time.update")

    r = admin.put("/api/system/time", json={"timezone": "Mars/Olympus", "ntp": True})
    assert "not a time zone" in _error(r, 400) and r.json()["details"]["field"] == "timezone"
    r = admin.put("/api/system/time", json={"timezone": "UTC", "ntp_servers": ["bad_name!"]})
    assert "neither a host name" in _error(r, 400)
    assert (os_root / "etc/timezone").read_text() == "UTC\n"


def test_security_updates_switch(admin: httpx.Client, viewer: httpx.Client, os_root: Path) -> None:
    path = os_root / osc.AUTO_UPGRADES_FILE
    assert viewer.get("/api/system/security-updates").json() == {"enabled": False}
    assert viewer.put("/api/system/security-updates", json={"enabled": True}).status_code == 403
    r = admin.put("/api/system/security-updates", json={"enabled": True})
    assert r.status_code == 200 and r.json() == {"enabled": True}
    assert path.read_text() == (
        'APT::Periodic::Update-Package-Lists "1";\nAPT::Periodic::Unattended-Upgrade "1";\n'
    )
    assert viewer.get("/api/system/security-updates").json() == {"enabled": True}
    admin.put("/api/system/security-updates", json={"enabled": False})
    assert path.read_text() == (
        'APT::Periodic::Update-Package-Lists "0";\nAPT::Periodic::Unattended-Upgrade "0";\n'
    )
    assert admin.put("/api/system/security-updates", json={"enabled": "maybe"}).status_code == 422
    assert [e["details"]["enabled"] for e in _audit(admin, "security_updates.update")] == [
        False,
        True,
    ]


def test_a_checkout_manages_no_os_settings(tmp_path: Path) -> None:
    with (
        bootstrapped_server(tmp_path, device_monitor=False) as live,
        live.as_role("admin") as admin,
    ):
        assert live.settings.effective_os_root is None, "this host looks like the appliance OS"
        system = admin.get("/api/system").json()
        assert system["appliance_os"] is False and system["first_pool_disks"] == []
        for path, body in (
            ("/api/system/network", {"mode": "dhcp"}),
            ("/api/system/time", {"timezone": "UTC"}),
            ("/api/system/security-updates", {"enabled": True}),
        ):
            assert "managed by the host's own tools" in _error(admin.get(path), 409)
            assert "from a checkout" in _error(admin.put(path, json=body), 409)
        # the recovery key does not depend on the OS
        assert admin.get("/api/system/recovery-key").status_code == 200


# --- the pure parts ------------------------------------------------------------------------------


def test_the_image_default_and_hand_edits_parse() -> None:
    assert osc.parse_network(osc.DEFAULT_NETWORK) == osc.NetworkConfig("dhcp", "en* eth*")
    edited = "[Match]\nName=eno1\n[Network]\n# by hand\nAddress=10.1.2.3/16\nGateway=10.1.0.1\nDNS=1.1.1.1 9.9.9.9\n"
    assert osc.parse_network(edited) == osc.NetworkConfig(
        "static", "eno1", "10.1.2.3/16", "10.1.0.1", ("1.1.1.1", "9.9.9.9")
    )
    config = osc.NetworkConfig("static", "eth0", "10.0.0.2/8", "10.0.0.1", ("10.0.0.1",))
    assert osc.parse_network(osc.render_network(config)) == config
    assert osc.parse_timesyncd("[Time]\nNTP=a b\n") == ("a", "b")
    assert osc.parse_auto_upgrades(osc.render_auto_upgrades(True)) is True
    assert osc.parse_auto_upgrades(osc.render_auto_upgrades(False)) is False
    assert osc.parse_first_pool("not json") == [] and osc.parse_first_pool(
        '{"disks": [1, "x"]}'
    ) == ["x"]


def test_checks_normalise() -> None:
    checked = osc.check_network(
        osc.NetworkConfig(
            "static", " eth0 ", "2001:0db8::0005/64", "2001:db8::1", ("2001:0db8::53",)
        )
    )
    assert checked == osc.NetworkConfig(
        "static", "eth0", "2001:db8::5/64", "2001:db8::1", ("2001:db8::53",)
    )
    assert osc.default_interface(["lo", "wlan0", "eth2", "enp1s0"]) == "enp1s0"
    assert osc.default_interface(["lo"]) == "en*"
    time = osc.check_time(osc.TimeConfig("UTC", True, ("Pool.NTP.org.",)), {"UTC"})
    assert time.ntp_servers == ("pool.ntp.org",)
    with pytest.raises(InvalidInput, match="loopback"):
        osc.check_time(osc.TimeConfig("UTC", True, ("::1",)), {"UTC"})
    with pytest.raises(InvalidInput, match="broadcast"):
        osc.check_network(osc.NetworkConfig("static", "eth0", "10.0.0.255/24"))
