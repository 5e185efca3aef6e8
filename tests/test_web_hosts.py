"""The Hosts screen (Playwright driving Debian's Chromium, headless) on a live appliance over TLS
as ``appliance serve`` runs it (``replication_support.tls_server``: the install command names its
certificate's pin), with a real ``sshd`` on a loopback port (``sshd_support.TestSshd``).

- An administrator adds a client host in the dialog: the install command appears once with the
  token (which the client routes accept), and the table says "never" for its last contact.
- An administrator adds an SSH host pointing at the sshd (the appliance's public key in its
  ``authorized_keys``): the page shows the offered fingerprint, the very one ``ssh-keygen -lf``
  prints for the sshd's host key; **Trust this key** makes the host "Trusted"; **Back up now**
  runs a job and the host's asset then shows its point.
- A libvirt host's **VMs…**, with libvirt's answers served in the browser (``page.route``),
  lists the VMs (the reason of one that cannot be backed up live) and **Protect** posts
  ``{domain, allow_offline}``.
- An operator restores a client host's folder from the page; the client (run in this process)
  pulls exactly that folder.
- A viewer sees the hosts without the add, trust or remove buttons.

The tests share the appliance; each still passes alone.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_support import ADMIN, PASSWORDS, bootstrap_accounts, free_port, wait_job, weak_kdf_env
from client_support import add_client_host, enroll, run_client
from replication_support import TlsServer, digest_tree, tls_server
from sshd_support import TestSshd
from web_support import SCREENSHOTS_ENV, Screenshots, expect, signed_in

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    with pytest.MonkeyPatch.context() as mp:
        weak_kdf_env(mp, keep=(SCREENSHOTS_ENV,))
        with tls_server(tmp_path_factory.mktemp("appliance") / "data", free_port()) as live:
            bootstrap_accounts(live)
            yield live


@pytest.fixture(scope="module")
def sshd(server: TlsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestSshd]:
    """A real sshd that lets the appliance's own key in (stopped by its pid at the end)."""
    with server.as_role("viewer") as viewer:
        key = viewer.get("/api/hosts/ssh-key").json()
    daemon = TestSshd(tmp_path_factory.mktemp("sshd"), key["public_key"]).start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Screenshots:
    return Screenshots(tmp_path_factory.mktemp("screenshots"))


def _fingerprint(public_key: Path) -> str:
    out = subprocess.run(
        ["ssh-keygen", "-lf", str(public_key)], capture_output=True, text=True, check=True
    )
    return out.stdout.split()[1]


def _hosts(server: TlsServer) -> dict[str, dict[str, Any]]:
    with server.as_role("viewer") as viewer:
        r = viewer.get("/api/hosts")
        assert r.status_code == 200, r.text
        return {h["name"]: h for h in r.json()}


def _forget(server: TlsServer, name: str) -> None:
    if name in _hosts(server):
        with server.as_role("admin") as admin:
            assert admin.delete(f"/api/hosts/{name}").status_code == 204


def test_an_admin_adds_a_client_host_and_sees_the_install_command_once(
    browser: Any, server: TlsServer, shots: Screenshots
) -> None:
    _forget(server, "laptop")
    with signed_in(browser, server, *ADMIN, path="/#/hosts") as page:
        expect(page.get_by_role("heading", level=1)).to_have_text("Hosts")
        page.get_by_role("button", name="Add a host").first.click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_label("Name").fill("Lap Top")
        expect(dialog.get_by_label("Backup client")).to_be_checked()
        dialog.get_by_role("button", name="Add host").click()
        expect(dialog.get_by_role("alert")).to_contain_text("Please check the details.")
        assert "Lap Top" not in _hosts(server)
        dialog.get_by_label("Name").fill("laptop")
        dialog.get_by_label("Also its block devices").check()
        dialog.get_by_role("button", name="Add host").click()

        shown = page.get_by_role("dialog", name="Install the client on laptop")
        expect(shown).to_contain_text("The token is shown only now.")
        expect(shown).to_contain_text("Block devices go to laptop-disks")
        command = shown.locator("[data-install-command]").input_value()
        token = shown.locator("[data-token]").input_value()
        assert len(token) > 20
        assert token in command and "appliance-client enroll" in command
        assert "--pinnedpubkey sha256//" in command
        expect(shown.get_by_role("button", name="Copy install command")).to_be_visible()
        shots.take(page, "hosts-client-install")
        shown.get_by_role("button", name="Done").click()
        expect(page.get_by_role("dialog")).to_have_count(0)

        row = page.locator("tr[data-host=laptop]")
        expect(row).to_contain_text("Backup client")
        expect(row.locator("[data-contact]")).to_have_text("never")
        expect(row).to_contain_text("Waiting for the client")
        expect(row.locator("[data-asset=laptop]")).to_contain_text("no point yet")
        expect(row.locator("[data-asset=laptop-disks]")).to_contain_text("no point yet")
        # The token shown is the one the appliance made: its client routes accept it.
        with server.client(headers={"Authorization": f"Bearer {token}"}) as host:
            hello = host.get("/api/client/hello")
            assert hello.status_code == 200
            assert hello.json()["assets"] == ["laptop", "laptop-disks"]
        # The token is not shown again: the page and the API list no token.
        page.reload()
        expect(page.locator("tr[data-host=laptop]")).to_be_visible()
        assert token not in page.content()
        assert "token" not in _hosts(server)["laptop"]


def test_an_admin_adds_an_ssh_host_trusts_its_key_and_backs_it_up(
    browser: Any, server: TlsServer, sshd: TestSshd, tmp_path: Path, shots: Screenshots
) -> None:
    _forget(server, "web2")
    tree = tmp_path / "srv"
    (tree / "www").mkdir(parents=True)
    (tree / "www" / "index.html").write_text("<h1>web2</h1>")
    with signed_in(browser, server, *ADMIN, path="/#/hosts") as page:
        page.get_by_role("button", name="Add a host").first.click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_label("Name").fill("web2")
        dialog.get_by_label("SSH (agentless)").check()
        expect(dialog.get_by_label("Asset")).to_be_hidden()
        dialog.get_by_label("Address").fill("127.0.0.1")
        dialog.get_by_label("Port").fill(str(sshd.port))
        dialog.get_by_label("User").fill(sshd.user)
        dialog.get_by_role("textbox", name="Folders").fill(str(tree))
        dialog.get_by_role("textbox", name="Excludes").fill("*.tmp")
        shots.take(page, "hosts-add-ssh")
        dialog.get_by_role("button", name="Add host").click()

        trust = page.get_by_role("dialog", name="Trust web2's host key")
        offered = trust.locator("[data-offered-fingerprint]")
        expect(offered).to_have_text(_fingerprint(Path(f"{sshd.host_key}.pub")))
        with server.as_role("viewer") as viewer:
            key = viewer.get("/api/hosts/ssh-key").json()["public_key"]
        assert trust.locator("[data-appliance-key]").input_value() == key
        shots.take(page, "hosts-trust-key")
        # Until trusted, the table says so and offers no backup.
        row = page.locator("tr[data-host=web2]")
        expect(row.locator("[data-state]")).to_contain_text("Key not trusted yet")
        trust.get_by_role("button", name="Trust this key").click()
        expect(page.get_by_role("dialog")).to_have_count(0)

        expect(row.locator("[data-state]")).to_contain_text("Trusted")
        expect(row.locator("[data-asset=web2]")).to_contain_text("no point yet")
        expect(row).to_contain_text(f"{sshd.user}@127.0.0.1:{sshd.port}")
        row.get_by_role("button", name="Back up web2 now").click()
        job_link = row.get_by_role("link", name="its job")
        expect(job_link).to_be_visible()
        job_id = (job_link.get_attribute("href") or "").rsplit("/", 1)[-1]
        with server.as_role("operator") as operator:
            done = wait_job(operator, job_id)
        assert done["state"] == "succeeded", done
        point = done["result"]["point"]
        # The page follows the job it started: the asset shows its point, the host its contact.
        expect(row.locator(f"[data-point='{point}']")).to_contain_text("last point just now")
        expect(row.locator("[data-contact]")).to_have_text("just now")
        expect(row.get_by_role("link", name="its job")).to_have_count(0)
        shots.take(page, "hosts", tablet=True)


def test_a_libvirt_hosts_vms_are_listed_and_protected(
    browser: Any, server: TlsServer, sshd: TestSshd
) -> None:
    """The dialog's states, with libvirt's answers served in the browser (this sshd runs no
    libvirt; tests/test_libvirt.py drives the same dialog against a real libvirtd)."""
    _forget(server, "kvm1")
    with server.as_role("admin") as admin:
        r = admin.post(
            "/api/hosts",
            json={"name": "kvm1", "kind": "libvirt", "address": "127.0.0.1", "port": sshd.port},
        )
        assert r.status_code == 201, r.text
        offered = r.json()["offered_fingerprint"]
        assert admin.post("/api/hosts/kvm1/trust", json={"fingerprint": offered}).is_success
    with signed_in(browser, server, *ADMIN, path="/#/hosts") as page:
        row = page.locator("tr[data-host=kvm1]")
        expect(row).to_contain_text("KVM/libvirt")
        expect(row.locator("[data-state]")).to_contain_text("Trusted")
        listed = [
            {"name": "web", "state": "running", "live_backup": True},
            {"name": "old", "state": "shut off", "live_backup": False, "reason": "no backup API"},
            {"name": "db", "state": "running", "protected": True, "asset": "kvm1-db"},
        ]
        posted: list[Any] = []

        def answer(route: Any) -> None:
            if route.request.method == "POST":
                body = route.request.post_data_json
                posted.append(body)
                vm = next(v for v in listed if v["name"] == body["domain"])
                vm.update(protected=True, asset=f"kvm1-{vm['name']}")
                route.fulfill(status=201, json=vm)
            else:
                route.fulfill(json=listed)

        page.route("**/api/hosts/kvm1/vms", answer)
        row.get_by_role("button", name="Virtual machines on kvm1").click()
        dialog = page.get_by_role("dialog", name="Virtual machines on kvm1")
        expect(dialog.locator("[data-vm=db]")).to_contain_text("Protected as kvm1-db")
        old = dialog.locator("[data-vm=old]")
        expect(old).to_contain_text("No backup API.")
        old.get_by_label("Allow the offline backup of old (shut down, copy, start)").check()
        old.get_by_role("button", name="Protect old").click()
        expect(old).to_contain_text("Protected as kvm1-old")
        dialog.get_by_role("button", name="Protect web").click()
        expect(dialog.locator("[data-vm=web]")).to_contain_text("Protected as kvm1-web")
        assert posted == [
            {"domain": "old", "allow_offline": True},
            {"domain": "web", "allow_offline": False},
        ]


def test_an_operator_starts_a_restore_that_the_client_pulls(
    browser: Any, server: TlsServer, tmp_path: Path, capsys: Any
) -> None:
    """A client host's point restored from the page: the restore waits for the host, whose
    ``appliance-client restore`` then writes the files (the client runs in this process)."""
    _forget(server, "db1")
    added = add_client_host(server, "db1")
    config = tmp_path / "client.json"
    enroll(server, added["token"], config)
    capsys.readouterr()  # what enroll printed
    tree = tmp_path / "src"
    (tree / "docs").mkdir(parents=True)
    (tree / "docs" / "notes.txt").write_text("the notes " * 500)
    (tree / "other.txt").write_text("not restored")
    code, result, err = run_client(
        config,
        "backup",
        "--quiet",
        str(tree),
        "--asset",
        "db1",
        "--state-dir",
        str(tmp_path / "state"),
        capsys=capsys,
    )
    assert code == 0, err
    target = tmp_path / "back"
    with signed_in(browser, server, "operator", PASSWORDS["operator"], path="/#/hosts") as page:
        row = page.locator("tr[data-host=db1]")
        expect(row.locator(f"[data-point='{result['point']}']")).to_contain_text("last point")
        expect(row.locator("[data-contact]")).to_have_text("just now")
        expect(page.get_by_role("button", name="Remove db1")).to_have_count(0)
        row.get_by_role("button", name="Restore files to db1").click()
        dialog = page.get_by_role("dialog", name="Restore to db1")
        expect(dialog.get_by_label("Point", exact=True)).to_have_value(result["point"])
        dialog.get_by_label("Folder or file in the point").fill("docs")
        dialog.get_by_label("Target folder on the host").fill(str(target))
        dialog.get_by_role("button", name="Start restore").click()
        expect(page.get_by_role("dialog")).to_have_count(0)
        expect(page.locator(".toast")).to_contain_text("appliance-client restore")
        expect(row.locator("[data-state]")).to_contain_text("1 restore waiting for the client")
    code, _, err = run_client(config, "restore", capsys=capsys)
    assert code == 0, err
    assert digest_tree(target / "docs") == digest_tree(tree / "docs")
    assert not (target / "other.txt").exists()


def test_a_viewer_sees_the_hosts_without_the_admin_buttons(browser: Any, server: TlsServer) -> None:
    if "laptop" not in _hosts(server):
        with server.as_role("admin") as admin:
            assert admin.post("/api/hosts", json={"name": "laptop", "kind": "client"}).is_success
    with signed_in(browser, server, "viewer", PASSWORDS["viewer"], path="/#/hosts") as page:
        row = page.locator("tr[data-host=laptop]")
        expect(row).to_contain_text("Backup client")
        expect(page.get_by_role("button", name="Add a host")).to_have_count(0)
        expect(page.get_by_role("button", name="Remove laptop")).to_have_count(0)
        expect(page.get_by_role("button", name="Back up now")).to_have_count(0)
        # the appliance's key is for everyone to read (to hand to a host's administrator)
        expect(page.get_by_role("region", name="This appliance's SSH key")).to_be_visible()
