"""Take over on the peer (docs/replication.md, "Take over"), between two live appliances.

The source (``bootstrapped_server``) protects a folder and the busybox test guest, and
replicates both to the peer (``replication_support.Peer``: the configuration ``appliance serve``
runs, TLS). The scenario, in file order (the tests share the pair):

1. without a grant the peer cannot take over (409 ``takeover_not_granted``);
2. the source grants; a revocation while the peer is down stays pending, and is carried out once
   the peer answers; the source grants again;
3. the source stops; the peer takes its store over, lists its points, browses, restores a file
   byte for byte into its own restore area (and refuses what its rules refuse);
4. the replication token is refused on every ``?store=`` route;
5. the VM fails over on the peer through the same route as on the source and boots (the failover
   code's boot proof); the store cannot be closed while it runs; a failback makes a new point in
   the replica; then the store closes;
6. a take-over is reopened when the peer restarts;
7. a tampered grant opens nothing and says so; a revoked grant (the token's DELETE) too.

One VM boot (TCG: ~10 s on a quiet machine).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import LiveServer, bootstrapped_server, weak_kdf_env
from guest_support import PROOF, VM, guest_image_path
from replication_support import Peer, pair, running_peer, until

from api.identity import appliance_id
from api.takeover_grant import takeover_tick
from image.testguest import copy_sparse

pytestmark = [pytest.mark.slow, pytest.mark.qemu]

GUEST_CACHE_ENV = "APPLIANCE_TEST_GUEST_CACHE"
SECRET = b"take-over restore check " * 5000


@pytest.fixture(scope="module")
def env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        weak_kdf_env(mp, keep=(GUEST_CACHE_ENV,))
        yield


@pytest.fixture(scope="module")
def guest_image() -> str:
    return guest_image_path()


@pytest.fixture(scope="module")
def peer(env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    with running_peer(tmp_path_factory.mktemp("peer")) as started:
        yield started


def wait_store_job(client: httpx.Client, job_id: str, store: str, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/api/jobs/{job_id}", params={"store": store}).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['state']}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def world(
    env: None, guest_image: str, peer: Peer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """The source, paired, with a folder asset and a VM asset backed up and replicated. The
    source runs in ``world["stack"]``: closing it stops the source."""
    root = tmp_path_factory.mktemp("takeover-src")
    tree = root / "share"
    (tree / "docs").mkdir(parents=True)
    (tree / "docs" / "report.bin").write_bytes(SECRET)
    disk = root / "web.raw"
    copy_sparse(guest_image, str(disk))
    spec = root / "web.json"
    spec.write_text(json.dumps(VM))
    stack = contextlib.ExitStack()
    source: LiveServer = stack.enter_context(
        bootstrapped_server(root / "src", keep_env=(GUEST_CACHE_ENV,))
    )
    try:
        peer_record = pair(source, peer)
        points: dict[str, str] = {}
        with source.as_role("admin") as admin:
            r = admin.post(
                "/api/assets", json={"name": "share", "kind": "files", "path": str(tree)}
            )
            assert r.status_code == 201, r.text
            r = admin.post(
                "/api/assets",
                json={"name": "web", "kind": "vm", "disks": [str(disk)], "vm_spec": str(spec)},
            )
            assert r.status_code == 201, r.text
            for asset in ("share", "web"):
                r = admin.post(f"/api/assets/{asset}/backup", json={"mode": "full"})
                assert r.status_code == 202, r.text
                job = until(
                    lambda jid=r.json()["id"]: (
                        j
                        if (j := admin.get(f"/api/jobs/{jid}").json())["state"]
                        in ("succeeded", "failed")
                        else None
                    ),
                    300,
                    f"backup of {asset}",
                )
                assert job["state"] == "succeeded", job
                points[asset] = job["result"]["point"]

            def replicated() -> bool:
                peers = admin.get("/api/peers").json()
                mine = next(p for p in peers if p["id"] == peer_record["id"])
                return bool(mine["points_at_peer"] == 2 and mine["points_pending"] == 0)

            until(replicated, 300, "both points at the peer")
        app = source.service.app
        token = json.loads(
            (Path(app.data_dir.secrets_path) / f"{peer_record['id']}.json").read_text()
        )["token"]
        yield {
            "source": source,
            "stack": stack,
            "peer_location": peer_record["id"],
            "store": app.repo.store_id,
            "source_id": appliance_id(app),
            "recovery_key": app.repo.key.recovery_key(),
            "token": token,
            "points": points,
        }
    finally:
        stack.close()


def _source_entry(peer: Peer, world: dict[str, Any]) -> dict[str, Any]:
    with peer.admin() as admin:
        sources = admin.get("/api/replication/sources").json()
    return dict(next(s for s in sources if s["store_id"] == world["store"]))


def _take_over(peer: Peer, world: dict[str, Any]) -> httpx.Response:
    with peer.admin() as admin:
        return admin.post(f"/api/replication/sources/{world['source_id']}/takeover")


def test_1_without_a_grant_the_peer_cannot_take_over(peer: Peer, world: dict[str, Any]) -> None:
    r = _take_over(peer, world)
    assert r.status_code == 409 and r.json()["code"] == "takeover_not_granted", r.text
    assert _source_entry(peer, world)["takeover"] == {
        "granted": False,
        "granted_at": None,
        "open": False,
        "opened_at": None,
    }


def test_2_grant_revoke_while_the_peer_is_down_then_grant_again(
    peer: Peer, world: dict[str, Any]
) -> None:
    source: LiveServer = world["source"]
    route = f"/api/peers/{world['peer_location']}/takeover"
    grant_file = peer.data_dir / "replicas" / f"{world['store']}.grant.json"
    with source.as_role("admin") as admin:
        r = admin.put(route, json={"allow": True})
        assert r.status_code == 200, r.text
        assert r.json()["takeover"]["allowed"] and r.json()["takeover"]["granted_at"]
    assert stat.S_IMODE(grant_file.stat().st_mode) == 0o600
    # The peer holds the key sealed, never as text.
    assert world["recovery_key"].encode() not in grant_file.read_bytes()
    assert _source_entry(peer, world)["takeover"]["granted"] is True

    peer.stop()
    try:
        with source.as_role("admin") as admin:
            r = admin.put(route, json={"allow": False})
            assert r.status_code == 200, r.text
            state = r.json()["takeover"]
            # Not claimed revoked: the peer still holds the grant.
            assert state["allowed"] is False and state["revocation_pending"] is True
            assert state["error"]
    finally:
        peer.start()
    assert grant_file.exists()
    # The scheduler's tick asks again (called here rather than waiting for a tick).
    takeover_tick(source.service.app)(source.service.now())
    with source.as_role("admin") as admin:
        mine = next(p for p in admin.get("/api/peers").json() if p["id"] == world["peer_location"])
        assert mine["takeover"]["revocation_pending"] is False
        assert mine["takeover"]["granted_at"] is None
        assert not grant_file.exists()
        r = admin.put(route, json={"allow": True})
        assert r.status_code == 200 and r.json()["takeover"]["allowed"], r.text
    actions = [e.action for e in source.service.app.catalog.list_audit(limit=50)]
    assert "peer.takeover_allowed" in actions and "peer.takeover_revoked" in actions


def test_3_the_source_stops_and_the_peer_takes_over_lists_browses_restores(
    peer: Peer, world: dict[str, Any]
) -> None:
    world["stack"].close()  # the source is gone
    r = _take_over(peer, world)
    assert r.status_code == 200, r.text
    opened = r.json()
    store = world["store"]
    assert opened["store_id"] == store and opened["points"] == 2 and opened["assets"] == 2
    entry = _source_entry(peer, world)["takeover"]
    assert entry["granted"] and entry["open"] and entry["opened_at"]
    with peer.admin() as admin:
        q = {"store": store}
        assert admin.get("/api/points").json() == []  # the peer's own store: unchanged
        listed = admin.get("/api/points", params=q).json()
        assert {p["id"] for p in listed} == set(world["points"].values())
        assets = {a["name"]: a["kind"] for a in admin.get("/api/assets", params=q).json()}
        assert assets == {"share": "files", "web": "vm"}
        r = admin.get("/api/points", params={"store": "ab" * 16})
        assert r.status_code == 404 and r.json()["code"] == "store_not_open"

        files = world["points"]["share"]
        r = admin.get(f"/api/points/{files}/files", params={**q, "path": "docs"})
        assert r.status_code == 200, r.text
        assert [(e["name"], e["size"]) for e in r.json()["entries"]] == [
            ("report.bin", len(SECRET))
        ]

        target = peer.data_dir / "restores" / "from-source"
        r = admin.post(
            f"/api/points/{files}/restore",
            params=q,
            json={"destination": "area", "target": str(target), "path": "docs/report.bin"},
        )
        assert r.status_code == 202, r.text
        job = wait_store_job(admin, r.json()["id"], store)
        assert job["state"] == "succeeded", job
        restored = next(p for p in target.rglob("report.bin"))
        assert hashlib.sha256(restored.read_bytes()).digest() == hashlib.sha256(SECRET).digest()
        log = admin.get(f"/api/jobs/{job['id']}/log", params=q)
        assert log.status_code == 200 and log.json()
        # The peer's rules: not outside its restore areas, not over the source's own folder.
        r = admin.post(
            f"/api/points/{files}/restore",
            params=q,
            json={"destination": "area", "target": str(peer.data_dir.parent / "elsewhere")},
        )
        assert r.status_code == 403 and r.json()["code"] == "path_refused", r.text
        r = admin.post(
            f"/api/points/{files}/restore",
            params=q,
            json={"destination": "source", "on_conflict": "overwrite"},
        )
        assert r.status_code == 403 and r.json()["code"] == "path_refused", r.text
    catalog = peer.live.service.app.catalog if peer.live else None
    assert catalog is not None
    audited = [e for e in catalog.list_audit(limit=50) if e.action == "point.restore"]
    assert audited and audited[0].details.get("store") == store


def test_4_the_replication_token_is_refused_on_store_routes(
    peer: Peer, world: dict[str, Any]
) -> None:
    store = world["store"]
    assert peer.live is not None
    with peer.live.client(headers={"Authorization": f"Bearer {world['token']}"}) as token:
        for method, path in [
            ("GET", "/api/points"),
            ("GET", f"/api/points/{world['points']['share']}/files"),
            ("GET", "/api/assets"),
            ("GET", "/api/jobs"),
            ("GET", "/api/failover"),
            ("POST", "/api/assets/web/failover"),
        ]:
            r = token.request(method, path, params={"store": store})
            assert r.status_code == 403, (method, path, r.text)
        r = token.post(f"/api/replication/sources/{world['source_id']}/takeover")
        assert r.status_code == 403
        assert token.get("/api/replication/store/takeover-key").status_code == 200


def test_5_the_vm_fails_over_on_the_peer_and_fails_back_into_the_replica(
    peer: Peer, world: dict[str, Any]
) -> None:
    store = world["store"]
    q = {"store": store}
    with peer.admin() as admin:
        r = admin.put(
            "/api/assets/web/failover-settings",
            params=q,
            json={"proof": PROOF, "network": {"mode": "isolated"}},
        )
        assert r.status_code == 200, r.text
        r = admin.post("/api/assets/web/failover", params=q, json={})
        assert r.status_code == 202, r.text
        job = wait_store_job(admin, r.json()["id"], store)
        assert job["state"] == "succeeded", job
        session = job["result"]["session"]
        assert job["result"]["point"] == world["points"]["web"]
        assert job["result"]["rto_seconds"] > 0
        sessions = admin.get("/api/failover", params=q).json()
        assert [(s["id"], s["state"]) for s in sessions] == [(session, "running")]
        assert admin.get("/api/failover").json() == []  # none of the peer's own
        shot = admin.get(f"/api/failover/{session}/screenshot", params=q)
        assert shot.status_code == 200 and shot.content.startswith(b"\x89PNG")

        r = admin.delete(f"/api/replication/sources/{world['source_id']}/takeover")
        assert r.status_code == 409, r.text
        r = admin.post(f"/api/failover/{session}/failback", params=q, json={"write_to": "original"})
        assert r.status_code == 400, r.text

        r = admin.post(f"/api/failover/{session}/failback", params=q, json={"new_point": True})
        assert r.status_code == 202, r.text
        back = wait_store_job(admin, r.json()["id"], store)
        assert back["state"] == "succeeded", back
        new_point = back["result"]["point"]
        assert new_point not in world["points"].values()
        assert (peer.replica(store) / "manifests" / new_point).is_file()
        listed = {p["id"] for p in admin.get("/api/points", params=q).json()}
        assert new_point in listed
        r = admin.post(f"/api/failover/{session}/stop", params=q, json={"discard": True})
        assert r.status_code == 202, r.text
        assert wait_store_job(admin, r.json()["id"], store)["state"] == "succeeded"

        r = admin.delete(f"/api/replication/sources/{world['source_id']}/takeover")
        assert r.status_code == 204, r.text
        r = admin.get("/api/points", params=q)
        assert r.status_code == 404 and r.json()["code"] == "store_not_open"
    world["points"]["failback"] = new_point


def test_6_a_take_over_is_reopened_when_the_peer_restarts(
    peer: Peer, world: dict[str, Any]
) -> None:
    assert _take_over(peer, world).status_code == 200
    peer.stop()
    peer.start()
    assert _source_entry(peer, world)["takeover"]["open"] is True
    with peer.admin() as admin:
        listed = {
            p["id"] for p in admin.get("/api/points", params={"store": world["store"]}).json()
        }
        # The failback's point is in the replica: the source pulls it back from there.
        assert listed == {*world["points"].values()}
        # The replica cannot be deleted from under an open take-over.
        r = admin.delete(
            f"/api/replication/sources/{world['source_id']}", params={"delete_data": "1"}
        )
        assert r.status_code == 409 and r.json()["code"] == "takeover_open", r.text
        assert _source_entry(peer, world)["takeover"]["open"] is True
        r = admin.delete(f"/api/replication/sources/{world['source_id']}/takeover")
        assert r.status_code == 204, r.text


def test_7_a_tampered_or_revoked_grant_opens_nothing(peer: Peer, world: dict[str, Any]) -> None:
    grant_file = peer.data_dir / "replicas" / f"{world['store']}.grant.json"
    original = grant_file.read_bytes()
    document = json.loads(original)
    ct = bytearray(base64.b64decode(document["sealed"]["ct"]))
    ct[0] ^= 1
    document["sealed"]["ct"] = base64.b64encode(bytes(ct)).decode()
    grant_file.write_text(json.dumps(document))
    try:
        r = _take_over(peer, world)
        assert r.status_code == 409 and r.json()["code"] == "takeover_grant_unreadable", r.text
        assert "ask the source to grant again" in r.json()["message"]
        with peer.admin() as admin:
            r = admin.get("/api/points", params={"store": world["store"]})
            assert r.status_code == 404
        assert _source_entry(peer, world)["takeover"]["open"] is False
    finally:
        grant_file.write_bytes(original)

    assert peer.live is not None
    with peer.live.client(headers={"Authorization": f"Bearer {world['token']}"}) as token:
        assert token.delete("/api/replication/store/takeover-grant").status_code == 204
    r = _take_over(peer, world)
    assert r.status_code == 409 and r.json()["code"] == "takeover_not_granted", r.text
    actions = [e.action for e in peer.live.service.app.catalog.list_audit(limit=100)]
    for action in (
        "replication.takeover_granted",
        "replication.takeover_revoked",
        "replication.takeover_opened",
        "replication.takeover_closed",
        "replication.takeover_failed",
    ):
        assert action in actions, action
    assert not os.path.exists(grant_file)
