"""The failover network modes with real QEMU (TCG here) booting the busybox test guest.

- An isolated boot: QEMU's own monitor reports the guest's NIC restricted (``restrict=on``: no
  packet the guest sends leaves QEMU), the guest got its address from QEMU's DHCP, the one port
  asked for answers on 127.0.0.1 and a port not asked for is refused.
- NAT: unrestricted, and forwards exist only when asked: without one nothing listens for the
  guest; with one, the guest's health page answers on the configured appliance address
  (127.0.0.1 here).
- A boot test of a VM whose failovers are set to a bridge runs isolated and says so (the setting
  is stored as if the bridge existed when it was saved; these machines have no bridge).
- A bridged failover whose bridge is missing is refused before anything runs.

The test guest cannot open a connection of its own (its init only serves HTTP), so "the
isolated guest reaches nothing" is shown by the restriction QEMU reports for the running VM,
not by a packet the guest tried to send. Four boots, ~10-40 s each under TCG on a loaded host.
"""

from __future__ import annotations

import socket

import pytest
from engine_support import PASSPHRASE, StepClock, set_engine_env
from guest_support import VM, failover_jobs, fetch, guest_image_path

from appliance.engine import Appliance
from image.failover.settings import put_asset_failover_settings
from image.host_network import Bridge, BridgeMissing, HostNetwork
from image.qemu import free_port
from image.testguest import HEALTH_TEXT, MARKER, copy_sparse

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

ASSET = "web"
#: The serial marker only: a proof that reaches into the guest would add a forward of its own.
SERIAL_PROOF = {"serial": MARKER, "timeout": 240}


@pytest.fixture(scope="module")
def appliance(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    set_engine_env(mp)
    base = tmp_path_factory.mktemp("fo-net")
    disk = str(base / "web.raw")
    copy_sparse(guest_image_path(), disk)
    app, _ = Appliance.init(str(base / "app"), PASSPHRASE, clock=StepClock())
    app.backup_image([disk], ASSET, vm_spec=VM)
    with failover_jobs(app) as (manager, runner):
        yield app, manager, runner
    app.close()
    mp.undo()


def refused(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(5)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_an_isolated_boot_is_restricted_and_only_the_asked_port_answers(appliance):
    _app, manager, _ = appliance
    asked = free_port()
    record = manager.start(
        ASSET,
        network={"mode": "isolated", "port_forwards": [[asked, 80]]},
        proof=SERIAL_PROOF,
    )
    try:
        shown = manager.addresses(record.id)
        assert shown is not None
        assert shown["mode"] == "isolated"
        assert shown["restricted"] is True  # QEMU's own word for the running NIC
        assert (shown["guest_address"], shown["source"]) == ("10.0.2.15", "dhcp")
        assert shown["forwards"] == [{"address": "127.0.0.1", "host_port": asked, "guest_port": 80}]
        assert fetch(asked).startswith(f"{HEALTH_TEXT} boots=")
        assert refused(free_port())  # nothing else of the guest is reachable
        assert record.details["network"] == {"mode": "isolated", "port_forwards": [[asked, 80]]}
    finally:
        manager.stop(record.id, grace=5)
        manager.discard(record.id)
    assert manager.addresses(record.id) is None  # not running any more
    assert refused(asked)


def test_nat_forwards_exist_only_when_asked(appliance):
    _app, manager, _ = appliance
    record = manager.start(ASSET, network={"mode": "nat"}, proof=SERIAL_PROOF)
    try:
        shown = manager.addresses(record.id)
        assert shown is not None and shown["mode"] == "nat"
        assert shown["restricted"] is False  # the guest may reach out through the appliance
        assert shown["forwards"] == []  # nothing was asked: nothing listens for the guest
        assert shown["guest_address"] == "10.0.2.15"
    finally:
        manager.stop(record.id, grace=5)
        manager.discard(record.id)

    asked = free_port()
    assert refused(asked)
    record = manager.start(
        ASSET,
        network={"mode": "nat", "port_forwards": [[asked, 80]], "address": "127.0.0.1"},
        proof=SERIAL_PROOF,
    )
    try:
        shown = manager.addresses(record.id)
        assert shown is not None and shown["restricted"] is False
        assert shown["forwards"] == [{"address": "127.0.0.1", "host_port": asked, "guest_port": 80}]
        assert fetch(asked).startswith(f"{HEALTH_TEXT} boots=")
        assert record.details["network"]["mode"] == "nat"
    finally:
        manager.stop(record.id, grace=5)
        manager.discard(record.id)


def test_a_boot_test_of_a_bridged_vm_runs_isolated_and_says_so(appliance):
    app, manager, runner = appliance
    # As if br0 existed when the setting was saved; it is not on this machine now.
    put_asset_failover_settings(
        app.catalog,
        ASSET,
        proof=SERIAL_PROOF,
        network={"mode": "bridged", "bridge": "br0"},
        host=HostNetwork(bridges=(Bridge("br0", True, "", 1500),), bridge_acl=(("allow", "br0"),)),
    )
    try:
        job = runner.wait(runner.submit("boot_test", {"asset": ASSET}).id, timeout=400)
        assert job.state == "succeeded", job.error
        lines = [line.message for line in app.catalog.job_log(job.id)]
        assert any("never joins a bridge, so it runs isolated" in line for line in lines), lines
        session = app.catalog.get_failover_session(job.result["session"])
        assert session.details["network"]["mode"] == "isolated"
        assert "never joins a bridge" in session.details["network_note"]

        # A failover with that setting is refused before anything runs.
        before = len(manager.list(ASSET))
        with pytest.raises(BridgeMissing, match="there is no bridge br0 on this appliance"):
            manager.start(ASSET)
        assert len(manager.list(ASSET)) == before  # no session was even created
    finally:
        put_asset_failover_settings(app.catalog, ASSET, network={"mode": "isolated"})
