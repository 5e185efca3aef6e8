"""The failover settings screen (headless Chromium against a real service on 127.0.0.1; no VM
boots): reached from the VM's row, it stores the boot proof and the network (NAT with a
forwarded port), says why "Bridged" cannot be chosen on a machine without a bridge, refuses a
port that is not a number beside its field without saving anything, and is read-only for a
viewer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_support import ADMIN, PASSWORDS, LiveServer, bootstrapped_server
from web_support import expect, signed_in

ASSET = "web"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("web-fo-settings")) as live:
        yield live


@pytest.fixture(scope="module")
def vm(admin: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> str:
    disk = tmp_path_factory.mktemp("web-fo-settings-disk") / "web.raw"
    disk.write_bytes(b"\0" * 1024 * 1024)
    r = admin.post("/api/assets", json={"name": ASSET, "kind": "vm", "disks": [str(disk)]})
    assert r.status_code == 201, r.text
    return ASSET


def stored(client: httpx.Client) -> dict[str, Any]:
    r = client.get(f"/api/assets/{ASSET}/failover-settings")
    assert r.status_code == 200, r.text
    return r.json()


def test_an_admin_sets_the_proof_and_a_nat_network(
    browser: Any, server: LiveServer, admin: httpx.Client, vm: str
) -> None:
    with signed_in(browser, server, *ADMIN) as page:
        page.goto(server.url + "/#/assets")
        page.get_by_role(
            "link", name=f"Failover settings of {ASSET}: boot proof and network"
        ).click()
        expect(page.get_by_role("heading", level=1)).to_have_text(f"Failover settings of {ASSET}")
        expect(page.locator(".fs-network-now")).to_have_text(
            "Saved now: Isolated: nothing reaches the VM."
        )

        # no bridge on this machine: "Bridged" cannot be chosen, and the page says why
        bridged = page.get_by_role("radio", name="Bridged")
        expect(bridged).to_be_disabled()
        expect(page.locator(".np-bridged-note")).to_contain_text(
            "This appliance has no network bridge"
        )

        page.get_by_label("The serial console prints").fill("login:")
        page.get_by_role("radio", name="NAT").check()
        expect(page.get_by_label("Forwarded ports listen on")).to_have_value("127.0.0.1")
        page.get_by_role("button", name="Add a forwarded port").click()
        page.get_by_label("Port in the VM").fill("eighty")
        before = stored(admin)
        page.get_by_role("button", name="Save settings").click()
        expect(page.get_by_role("alert")).to_contain_text("is not a port")
        expect(page.get_by_label("Port in the VM")).to_have_attribute("aria-invalid", "true")
        assert stored(admin) == before  # nothing was saved

        page.get_by_label("Port in the VM").fill("80")
        page.get_by_role("button", name="Save settings").click()
        expect(page.locator(".toast")).to_contain_text(f"Saved the failover settings of {ASSET}")
        expect(page.locator(".fs-network-now")).to_contain_text(
            "NAT through the appliance; 1 forwarded port (a free port → guest port 80)"
        )
        after = stored(admin)
        assert after["network"] == {
            "mode": "nat",
            "port_forwards": [[0, 80]],
            "address": "127.0.0.1",
        }
        assert after["proof"]["serial"] == "login:"

        # a proof check that is not a port is refused beside its field, nothing saved
        web_port = page.get_by_label("A web page answers on VM port")
        web_port.fill("99999")
        page.get_by_role("button", name="Save settings").click()
        expect(page.get_by_role("alert")).to_contain_text(
            "The web port must be a number from 1 to 65535"
        )
        expect(web_port).to_have_attribute("aria-invalid", "true")
        assert stored(admin) == after
        web_port.fill("")

        # opened again, the screen starts from what was stored
        page.reload()
        expect(page.get_by_role("radio", name="NAT")).to_be_checked()
        expect(page.get_by_label("Port in the VM")).to_have_value("80")
        expect(page.get_by_label("The serial console prints")).to_have_value("login:")


def test_a_viewer_reads_but_cannot_change(browser: Any, server: LiveServer, vm: str) -> None:
    with signed_in(browser, server, "viewer", PASSWORDS["viewer"]) as page:
        page.goto(server.url + f"/#/assets/{ASSET}/failover-settings")
        expect(page.get_by_role("heading", level=1)).to_have_text(f"Failover settings of {ASSET}")
        expect(page.get_by_text("Only an administrator can change these settings.")).to_be_visible()
        expect(page.get_by_role("button", name="Save settings")).to_be_disabled()
        expect(page.get_by_label("The serial console prints")).to_be_disabled()
        # the bridges route is for operators and administrators: the picker says so, calmly
        expect(page.locator(".np-bridged-note")).to_contain_text(
            "only operators and administrators may see them"
        )
