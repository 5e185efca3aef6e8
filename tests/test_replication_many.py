"""Many to one: two source appliances replicate into one peer (a head office's appliance), on
127.0.0.1, every part real (two plain services as sources, the peer over TLS as
``appliance serve`` runs it).

What is proved: each source pairs with a code of its own; each store lands in a replica folder of
its own, holding exactly that source's store (its config byte for byte, none of the other's
packs); the peer's page lists both sources with their own points, bytes and newest point; each
token lists its own store only; unpairing one source on the peer stops that one alone (its next
replication fails with the refusal in words) while the other goes on replicating.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import LiveServer, bootstrapped_server, wait_job, weak_kdf_env
from replication_support import Peer, files_of, pair

from api.peer_backend import pinned_context

pytestmark = pytest.mark.slow


@dataclass
class Source:
    live: LiveServer
    peer_id: str
    tree: Path

    @property
    def store_id(self) -> str:
        return str(self.live.service.app.repo.store_id)

    def backup(self) -> tuple[str, dict[str, Any]]:
        """Back up the source's tree; the point and its replication job, finished."""
        with self.live.as_role("operator") as operator:
            r = operator.post("/api/assets/office/backup", json={})
            assert r.status_code == 202, r.text
            backup = wait_job(operator, r.json()["id"])
            assert backup["state"] == "succeeded", backup
            (job_id,) = backup["result"]["replication_jobs"]
            return backup["result"]["point"], wait_job(operator, job_id)

    def token(self) -> str:
        secrets = self.live.settings.data_dir / "secrets" / f"{self.peer_id}.json"
        return str(json.loads(secrets.read_text())["token"])


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Peer, list[Source]]]:
    with pytest.MonkeyPatch.context() as mp, contextlib.ExitStack() as stack:
        weak_kdf_env(mp)
        peer = Peer(tmp_path_factory.mktemp("head-office"))
        peer.start()
        stack.callback(peer.stop)
        sources = []
        for name in ("branch-a", "branch-b"):
            live = stack.enter_context(bootstrapped_server(tmp_path_factory.mktemp(name)))
            tree = tmp_path_factory.mktemp(f"{name}-tree") / "office"
            tree.mkdir()
            (tree / "ledger.bin").write_bytes(os.urandom(600_000))
            (tree / "who.txt").write_text(f"this is {name}\n")
            with live.as_role("admin") as admin:
                r = admin.post(
                    "/api/assets", json={"name": "office", "kind": "files", "path": str(tree)}
                )
                assert r.status_code == 201, r.text
            sources.append(Source(live, pair(live, peer, label="head office")["id"], tree))
        yield peer, sources


def test_two_sources_replicate_into_one_peer_and_stay_apart(
    site: tuple[Peer, list[Source]],
) -> None:
    peer, sources = site
    points = {}
    for source in sources:
        point, job = source.backup()
        assert job["state"] == "succeeded" and job["result"]["replicated"] == [point], job
        points[source.store_id] = point
    assert len(points) == 2  # two stores, two ids
    packs = {}
    for source in sources:
        replica = peer.replica(source.store_id)
        own = source.live.settings.data_dir / "pools" / "default" / "store"
        assert (replica / "config").read_bytes() == (own / "config").read_bytes()
        assert (replica / "manifests" / points[source.store_id]).is_file()
        packs[source.store_id] = {n for n in files_of(replica) if n.startswith("data/")}
        assert packs[source.store_id] <= set(files_of(own))  # the replica holds its store only
    first, second = packs.values()
    assert first and second and not first & second

    with peer.admin() as admin:
        listed = {s["store_id"]: s for s in admin.get("/api/replication/sources").json()}
    assert set(listed) == set(points)
    for entry in listed.values():
        assert entry["points"]["count"] == 1, entry
        assert entry["bytes_held"] >= 600_000 and entry["points"]["newest_created_at"]

    # Each token lists its own store, and only it.
    for source in sources:
        assert peer.live is not None
        cert = peer.live.settings.cert_path.read_text()
        with httpx.Client(
            base_url=peer.address,
            verify=pinned_context(cert),
            headers={"Authorization": f"Bearer {source.token()}"},
        ) as link:
            r = link.get("/api/replication/store/objects", params={"prefix": "manifests/"})
            assert r.status_code == 200, r.text
            names = {o["name"] for o in r.json()["objects"]}
        assert names == {f"manifests/{points[source.store_id]}"}


def test_unpairing_one_source_leaves_the_other_replicating(
    site: tuple[Peer, list[Source]],
) -> None:
    peer, (gone, kept) = site
    with peer.admin() as admin:
        sources = {s["store_id"]: s for s in admin.get("/api/replication/sources").json()}
        r = admin.delete(f"/api/replication/sources/{sources[gone.store_id]['appliance_id']}")
        assert r.status_code == 204, r.text
    (gone.tree / "later.txt").write_text("after the head office let go\n")
    (kept.tree / "later.txt").write_text("still replicating\n")
    point, job = kept.backup()
    assert job["state"] == "succeeded" and job["result"]["replicated"] == [point], job
    assert (peer.replica(kept.store_id) / "manifests" / point).is_file()
    point, job = gone.backup()
    assert job["state"] == "failed", job
    assert "refused the token" in job["error"]["message"], job
    assert not (peer.replica(gone.store_id) / "manifests" / point).exists()
    with gone.live.as_role("viewer") as viewer:
        (status,) = viewer.get("/api/peers").json()
    assert status["last_replication"]["outcome"] == "failed"
    assert "refused the token" in (status["last_replication"]["error"] or "")
