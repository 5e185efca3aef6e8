"""The failover network through the HTTP API (a real service on 127.0.0.1, no QEMU boot):
the bridges route, the settings' network and its refusals, and a failover refused before a job
is queued when its bridge is missing. These machines have no bridge (none may be created)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_support import LiveServer, bootstrapped_server, wait_job

from image.host_network import read_host_network

ASSET = "web"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("failover-network")) as live:
        yield live


@pytest.fixture(scope="module")
def vm(
    server: LiveServer,
    admin: httpx.Client,
    operator: httpx.Client,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """A VM asset with one image point (a small blank disk: nothing here boots it)."""
    disk = tmp_path_factory.mktemp("failover-network-disk") / "web.raw"
    disk.write_bytes(b"\0" * 1024 * 1024)
    r = admin.post("/api/assets", json={"name": ASSET, "kind": "vm", "disks": [str(disk)]})
    assert r.status_code == 201, r.text
    r = operator.post(f"/api/assets/{ASSET}/backup", json={"mode": "full"})
    assert r.status_code == 202, r.text
    job = wait_job(operator, r.json()["id"])
    assert job["state"] == "succeeded", job
    return {"point": job["result"]["point"]}


def settings(client: httpx.Client) -> dict[str, Any]:
    r = client.get(f"/api/assets/{ASSET}/failover-settings")
    assert r.status_code == 200, r.text
    return r.json()


def test_the_bridges_route_lists_the_hosts_network(
    server: LiveServer, operator: httpx.Client, admin: httpx.Client, viewer: httpx.Client
) -> None:
    r = operator.get("/api/network/bridges")
    assert r.status_code == 200, r.text
    body = r.json()
    host = read_host_network()
    assert [b["name"] for b in body["bridges"]] == list(host.bridge_names)
    assert {a["address"] for a in body["addresses"]} == {a.address for a in host.addresses}
    assert body["error"] is None
    assert admin.get("/api/network/bridges").status_code == 200
    assert viewer.get("/api/network/bridges").status_code == 403
    with server.client() as anonymous:
        assert anonymous.get("/api/network/bridges").status_code == 401


def test_a_missing_bridge_is_refused_when_saving_and_nothing_is_lost(
    admin: httpx.Client, viewer: httpx.Client, vm: dict[str, Any]
) -> None:
    r = admin.put(
        f"/api/assets/{ASSET}/failover-settings",
        json={"network": {"mode": "nat", "port_forwards": [{"host": 18080, "guest": 80}]}},
    )
    assert r.status_code == 200, r.text
    stored = settings(viewer)
    assert stored["network"] == {
        "mode": "nat",
        "port_forwards": [[18080, 80]],
        "address": "127.0.0.1",
    }
    r = admin.put(
        f"/api/assets/{ASSET}/failover-settings",
        json={"network": {"mode": "bridged", "bridge": "br0"}},
    )
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "bridge_missing"
    assert r.json()["message"] == "there is no bridge br0 on this appliance; bridges: none"
    assert settings(viewer) == stored


@pytest.mark.parametrize(
    ("network", "status", "words"),
    [
        ({"mode": "isolated", "port_forwards": [{"host": 1, "guest": 0}]}, 422, None),
        ({"mode": "isolated", "port_forwards": [{"host": 70000, "guest": 80}]}, 422, None),
        ({"mode": "routed"}, 422, None),
        ({"mode": "bridged", "bridge": "br0;reboot"}, 422, None),
        ({"mode": "nat", "address": "not-an-address"}, 422, None),
        (
            {"mode": "nat", "address": "10.9.9.9"},
            400,
            "10.9.9.9 is not an address of this appliance",
        ),
        (
            {
                "mode": "isolated",
                "port_forwards": [{"host": 8080, "guest": 80}, {"host": 8080, "guest": 22}],
            },
            400,
            "forwarded twice",
        ),
        ({"mode": "bridged"}, 400, "needs the name of a host bridge"),
    ],
)
def test_bad_networks_are_refused(
    admin: httpx.Client,
    viewer: httpx.Client,
    vm: dict[str, Any],
    network: dict[str, Any],
    status: int,
    words: str | None,
) -> None:
    before = settings(viewer)
    r = admin.put(f"/api/assets/{ASSET}/failover-settings", json={"network": network})
    assert r.status_code == status, r.text
    if words:
        assert words in r.json()["message"], r.text
    assert settings(viewer) == before


def test_only_an_admin_sets_the_network_and_the_change_is_audited(
    admin: httpx.Client, operator: httpx.Client, vm: dict[str, Any]
) -> None:
    network = {"mode": "isolated", "port_forwards": [{"host": 0, "guest": 80}]}
    r = operator.put(f"/api/assets/{ASSET}/failover-settings", json={"network": network})
    assert r.status_code == 403, r.text
    r = admin.put(f"/api/assets/{ASSET}/failover-settings", json={"network": network})
    assert r.status_code == 200, r.text
    assert r.json()["network"] == {"mode": "isolated", "port_forwards": [[0, 80]]}
    entry = next(
        a for a in admin.get("/api/audit").json() if a["action"] == "asset.failover_settings"
    )
    assert entry["target"] == ASSET
    assert entry["details"]["network"] == {"mode": "isolated", "port_forwards": [[0, 80]]}


def test_a_bridged_failover_is_refused_before_a_job_is_queued(
    operator: httpx.Client, vm: dict[str, Any]
) -> None:
    jobs_before = len(operator.get("/api/jobs").json())
    r = operator.post(
        f"/api/assets/{ASSET}/failover", json={"network": {"mode": "bridged", "bridge": "br0"}}
    )
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "bridge_missing"
    assert "there is no bridge br0 on this appliance; bridges: none" in r.json()["message"]
    r = operator.post(
        f"/api/assets/{ASSET}/failover",
        json={"network": {"mode": "nat", "address": "10.9.9.9"}},
    )
    assert r.status_code == 400, r.text
    assert len(operator.get("/api/jobs").json()) == jobs_before
