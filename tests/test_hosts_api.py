"""Hosts through the API: an SSH host pulled by a real sshd on 127.0.0.1 (add, trust the
offered key, back up as a job, a changed host key refused), client hosts removed."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_support import LiveServer, bootstrapped_server, wait_job
from sshd_support import TestSshd


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("hosts")) as live:
        yield live


@pytest.fixture(scope="module")
def sshd(server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestSshd]:
    with server.as_role("viewer") as viewer:
        key = viewer.get("/api/hosts/ssh-key").json()
    assert key["public_key"].startswith("ssh-ed25519 ")
    daemon = TestSshd(tmp_path_factory.mktemp("sshd"), key["public_key"]).start()
    try:
        yield daemon
    finally:
        daemon.stop()


def _fingerprint(public_key: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(public_key)], capture_output=True, text=True)
    return out.stdout.split()[1]


def test_an_ssh_host_is_added_trusted_and_backed_up(
    server: LiveServer, sshd: TestSshd, tmp_path: Path
) -> None:
    tree = tmp_path / "srv"
    (tree / "www").mkdir(parents=True)
    (tree / "www" / "index.html").write_text("<h1>web2</h1>")
    with server.as_role("admin") as admin:
        r = admin.post(
            "/api/hosts",
            json={
                "name": "web2",
                "kind": "ssh",
                "address": "127.0.0.1",
                "port": sshd.port,
                "user": sshd.user,
                "paths": [str(tree)],
                "excludes": ["*.tmp"],
            },
        )
        assert r.status_code == 201, r.text
        added = r.json()
        offered = added["offered_fingerprint"]
        assert offered == _fingerprint(Path(f"{sshd.host_key}.pub"))
        assert added["host"]["trusted"] is False and added["host"]["assets"] == []
        # Nothing is pulled before the key is trusted.
        assert admin.post("/api/hosts/web2/backup").status_code == 409
        wrong = admin.post("/api/hosts/web2/trust", json={"fingerprint": "SHA256:" + "A" * 43})
        assert wrong.status_code == 400 and offered in wrong.json()["message"]
        trusted = admin.post("/api/hosts/web2/trust", json={"fingerprint": offered})
        assert trusted.status_code == 200, trusted.text
        assert trusted.json()["assets"] == ["web2"] and trusted.json()["fingerprint"] == offered

    with server.as_role("operator") as operator:
        jobs = operator.post("/api/hosts/web2/backup")
        assert jobs.status_code == 202, jobs.text
        done = wait_job(operator, jobs.json()[0]["id"])
        assert done["state"] == "succeeded", done
        point = done["result"]["point"]
        listing = operator.get(f"/api/points/{point}/files", params={"path": "www"}).json()
        names = [e["name"] for e in listing["entries"]] if isinstance(listing, dict) else []
        assert "index.html" in names, listing
        # The asset page's own "Back up now" works for an SSH asset too.
        again = operator.post("/api/assets/web2/backup")
        assert again.status_code == 202, again.text
        second = wait_job(operator, again.json()["id"])
        assert second["state"] == "succeeded" and second["result"]["mode"] == "incremental"
        assert second["result"]["stats"]["files_read"] == 0

    # Hands-off: a policy covers the SSH asset like any other; its run pulls over SSH and
    # prunes with the policy's rules.
    with server.as_role("admin") as admin:
        r = admin.post(
            "/api/policies",
            json={
                "name": "web2-nightly",
                "assets": ["web2"],
                "schedule": {"entries": [{"cron": "0 22 * * *"}]},
                "retention": {"keep_last": 2},
            },
        )
        assert r.status_code == 201, r.text
    (tree / "www" / "new.html").write_text("<p>new</p>")
    with server.as_role("operator") as operator:
        run = operator.post("/api/policies/web2-nightly/run")
        assert run.status_code == 202, run.text
        done = wait_job(operator, run.json()["id"])
        assert done["state"] == "succeeded", done.get("error", {}).get("message")
        assert done["result"]["stats"]["files_read"] == 1, done["result"]
        pruned = wait_job(operator, done["result"]["prune_job"])
        assert pruned["state"] == "succeeded", pruned.get("error")
        points = operator.get("/api/points", params={"asset": "web2"}).json()
        assert [p["id"] for p in points][:1] == [done["result"]["point"]] and len(points) == 2
    with server.as_role("admin") as admin:
        assert admin.delete("/api/policies/web2-nightly").status_code == 204

    # The host is reinstalled: its new key is refused, naming both fingerprints.
    sshd.restart(new_key=True)
    with server.as_role("operator") as operator:
        job = operator.post("/api/assets/web2/backup").json()
        failed = wait_job(operator, job["id"])
        assert failed["state"] == "failed"
        message = str(failed.get("error"))
        assert offered in message and _fingerprint(Path(f"{sshd.host_key}.pub")) in message
    with server.as_role("viewer") as viewer:
        host = next(h for h in viewer.get("/api/hosts").json() if h["name"] == "web2")
        assert host["last_error"] and "web2" not in host.get("token_id", "")


def test_a_client_asset_is_not_started_by_the_appliance_and_removal_revokes(
    server: LiveServer,
) -> None:
    with server.as_role("admin") as admin:
        r = admin.post("/api/hosts", json={"name": "laptop", "kind": "client"})
        assert r.status_code == 201
        token = r.json()["token"]
        backup = admin.post("/api/assets/laptop/backup")
        assert backup.status_code == 400 and "appliance-client backup" in backup.json()["message"]
        assert admin.delete("/api/hosts/laptop").status_code == 204
    with server.client(headers={"Authorization": f"Bearer {token}"}) as host:
        assert host.get("/api/client/hello").status_code == 401


def test_adding_needs_an_admin_and_a_reachable_host(server: LiveServer) -> None:
    with server.as_role("operator") as operator:
        r = operator.post("/api/hosts", json={"name": "x", "kind": "client"})
        assert r.status_code == 403
    with server.as_role("admin") as admin:
        r = admin.post(
            "/api/hosts", json={"name": "gone", "kind": "ssh", "address": "127.0.0.1", "port": 1}
        )
        assert r.status_code >= 400 and "SSH" in r.json()["message"]
        r = admin.post("/api/hosts", json={"name": "Bad Name", "kind": "client"})
        assert r.status_code == 400
        host: dict[str, Any] = {"name": "evil", "kind": "ssh", "address": "-oProxyCommand=x"}
        assert admin.post("/api/hosts", json=host).status_code == 400
