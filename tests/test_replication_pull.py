"""Failback from a peer (docs/replication.md, "Failback: pulling points back"), on 127.0.0.1.

A VM asset is backed up from a raw disk image on the source and replicated to the peer (the real
peer service of tests/replication_support.py, over TLS). Then the test plays the peer's failback
the way a take-over does it: the replica folder opened as a store with the source's recovery key,
an appliance over it with a catalog of its own rebuilt from the store, and an incremental point
of the same asset from a copy of the image in which a few MiB changed, written into the replica.
The source then pulls it back (``POST /api/peers/{id}/pull``): only the new packs travel, the
point is home and restores byte for byte, it is the asset's newest point, and a second pull sends
nothing. Then: a pull killed with SIGKILL in a child process resumes after a restart, and a peer
that holds a damaged manifest and another store's one has those refused with words while the
other points come home. The tests run in file order and share the pair.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from api_support import LiveServer, bootstrapped_server, wait_job, weak_kdf_env
from replication_support import Peer, data_packs, files_of, packs_of, pair, running_peer, until

from appliance.catalog import Catalog
from appliance.catalog.records import home_location_id
from appliance.engine import Appliance, DataDir
from appliance.errors import NotFound
from appliance.store.backend import LocalDirectoryBackend
from appliance.store.repository import Repository
from image.failover.admission import pick_point

pytestmark = pytest.mark.slow

MIB = 1 << 20
ASSET = "web"


@pytest.fixture(scope="module")
def env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        weak_kdf_env(mp)
        yield


@pytest.fixture(scope="module")
def peer(env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    with running_peer(tmp_path_factory.mktemp("peer")) as started:
        yield started


@pytest.fixture(scope="module")
def source(env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("source")) as live:
        yield live


def change_image(original: Path, changed: Path, regions: list[tuple[int, int]]) -> None:
    """A copy of ``original`` with random bytes over each ``(offset, length)``."""
    changed.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(original, changed)
    with changed.open("r+b") as f:
        for offset, length in regions:
            f.seek(offset)
            f.write(os.urandom(length))


def fail_back_on_the_peer(
    replica: Path, recovery_key: str, work: Path, image: Path, asset: str
) -> str:
    """What a failback on the peer leaves in the replica: a new incremental point of ``asset``
    from ``image``, written with the source's key by an appliance over the replica whose catalog
    is rebuilt from the store. Returns the point's id."""
    work.mkdir(parents=True, exist_ok=True)
    repo = Repository.open(
        LocalDirectoryBackend(str(replica)), str(work / "cache"), recovery_key=recovery_key
    )
    data_dir = DataDir(str(work / "takeover"))
    os.makedirs(data_dir.store_path, exist_ok=True)  # its free space is checked before a backup
    catalog = Catalog.open("sqlite:///" + str(work / "catalog.sqlite"))
    with Appliance(data_dir, repo, catalog) as taken:
        assert taken.rebuild_catalog()["points"] >= 1
        outcome = taken.backup_image([str(image)], asset, threads=2, own_disks=True)
    assert outcome.point.mode == "incremental"
    return outcome.point.id


@dataclass
class Failback:
    source: LiveServer
    peer: Peer
    location_id: str
    disk: Path
    work: Path
    replicated: str

    @property
    def app(self) -> Any:
        return self.source.service.app

    @property
    def replica(self) -> Path:
        return self.peer.replica(self.app.repo.store_id)

    @property
    def store(self) -> Path:
        return Path(self.app.data_dir.store_path)

    def fail_back(self, name: str, regions: list[tuple[int, int]]) -> tuple[str, Path]:
        """A failback point on the peer from the disk with ``regions`` changed; the image made."""
        # The same file name as the source's disk: the point's disk has the same name.
        image = self.work / name / self.disk.name
        change_image(self.disk, image, regions)
        key = self.app.repo.key.recovery_key()
        return fail_back_on_the_peer(self.replica, key, self.work / name, image, ASSET), image

    def pull(self) -> dict[str, Any]:
        with self.source.as_role("operator") as operator:
            r = operator.post(f"/api/peers/{self.location_id}/pull")
            assert r.status_code == 202, r.text
            assert r.json()["kind"] == "pull_back"
            job = wait_job(operator, r.json()["id"], timeout=300)
        assert job["state"] == "succeeded", job
        return dict(job["result"])


@pytest.fixture(scope="module")
def failback(source: LiveServer, peer: Peer, tmp_path_factory: pytest.TempPathFactory) -> Failback:
    """A VM asset on the source, backed up in full and replicated to the peer."""
    root = tmp_path_factory.mktemp("vm")
    disk = root / "web.raw"
    disk.write_bytes(os.urandom(32 * MIB))
    location = pair(source, peer)["id"]
    with source.as_role("admin") as admin:
        r = admin.post("/api/assets", json={"name": ASSET, "kind": "vm", "disks": [str(disk)]})
        assert r.status_code == 201, r.text
    with source.as_role("operator") as operator:
        r = operator.post(f"/api/assets/{ASSET}/backup", json={"mode": "full"})
        assert r.status_code == 202, r.text
        backup = wait_job(operator, r.json()["id"], timeout=300)
        assert backup["state"] == "succeeded", backup
        (replication,) = backup["result"]["replication_jobs"]
        replicated = wait_job(operator, replication, timeout=300)
        assert replicated["state"] == "succeeded", replicated
    point = backup["result"]["point"]
    assert replicated["result"]["replicated"] == [point]
    return Failback(source, peer, location, disk, root / "peer-side", point)


def test_a_failback_point_comes_home_with_only_its_new_packs(failback: Failback) -> None:
    app, replica, store = failback.app, failback.replica, failback.store
    before_replica, before_home = files_of(replica), packs_of(store)
    # The VM ran on the peer and wrote 3 MiB in three places.
    point, image = failback.fail_back("first", [(1 * MIB, MIB), (9 * MIB, MIB), (20 * MIB, MIB)])
    arrived = {n: s for n, s in files_of(replica).items() if n not in before_replica}
    new_packs = {n: s for n, s in arrived.items() if n.startswith(("data/", "meta/"))}
    others = sum(s for n, s in arrived.items() if n not in new_packs)
    assert f"manifests/{point}" in arrived and new_packs

    result = failback.pull()
    assert result["points"] == [point] and result["refused"] == [] and result["failed"] == []

    # In the catalog with a present, verified home copy and the peer's.
    home = home_location_id(app.repo.store_id)
    copies = {c.location_id: c for c in app.catalog.copies_of(point)}
    assert copies[home].state == "present" and copies[home].verified_at is not None
    assert copies[failback.location_id].state == "present"
    # Only what the home pool lacked came, and all of it: the new packs, byte for byte.
    came = {n: s for n, s in packs_of(store).items() if n not in before_home}
    assert came == new_packs
    assert result["packs_copied"] == len(new_packs)
    assert result["bytes_copied"] == sum(new_packs.values())
    received, requests = result["bytes_received"], result["requests"]
    new_bytes = sum(new_packs.values())
    print(
        f"\nfailback point pulled: {received} bytes received for {new_bytes} bytes of new packs "
        f"({len(new_packs)} pack(s)) + {others} bytes of index and manifest, {requests} "
        f"requests: {received / new_bytes:.3f}x the new packs"
    )
    assert received <= 1.05 * new_bytes + others + 600 * requests

    # The asset's newest point, and the one a failover picks (the newest verified).
    assert app.catalog.latest_point(ASSET, kind="image").id == point
    picked = pick_point(app.catalog.list_points(asset=ASSET))
    assert picked is not None and picked.id == point
    with failback.source.as_role("viewer") as viewer:
        listed = viewer.get("/api/points", params={"asset": ASSET}).json()
    assert listed[0]["id"] == point and {p["id"] for p in listed} == {point, failback.replicated}

    # It restores locally (from the home pool) byte for byte the image the VM left on the peer.
    target = failback.source.settings.data_dir / "restores" / "failback.raw"
    with failback.source.as_role("operator") as operator:
        r = operator.post(
            f"/api/points/{point}/restore", json={"target": str(target), "location": "default"}
        )
        assert r.status_code == 202, r.text
        restored = wait_job(operator, r.json()["id"], timeout=300)
    assert restored["state"] == "succeeded", restored
    assert target.read_bytes() == image.read_bytes()  # one disk: restored as the file named
    # And back over the VM's own disk: the point read its disk from the peer's copy, so where
    # the disk lives here is what its ancestor (the point replicated from here) recorded.
    with failback.source.as_role("operator") as operator:
        r = operator.post(
            f"/api/points/{point}/restore",
            json={"destination": "source", "on_conflict": "overwrite"},
        )
        assert r.status_code == 202, r.text
        restored = wait_job(operator, r.json()["id"], timeout=300)
    assert restored["state"] == "succeeded", restored
    assert failback.disk.read_bytes() == image.read_bytes()

    # Asked again: nothing is missing, nothing travels but the listing.
    again = failback.pull()
    assert again["points"] == [] and again["packs_copied"] == 0
    assert again["bytes_received"] < 16 * 1024 and again["requests"] <= 3, again


def test_a_pull_waits_for_an_unreachable_peer_and_goes_on_when_it_answers(
    failback: Failback,
) -> None:
    source, peer = failback.source, failback.peer
    peer.stop()
    point, _image = failback.fail_back("while-down", [(12 * MIB, 2 * MIB)])
    with source.as_role("operator") as operator:
        r = operator.post(f"/api/peers/{failback.location_id}/pull")
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        waiting = until(
            lambda: (j := operator.get(f"/api/jobs/{job}").json())["state"] == "waiting" and j,
            what="the pull waiting for the peer",
        )
        assert (
            "unreachable" in waiting["wait_reason"] and "the pull goes on" in waiting["wait_reason"]
        )
        assert failback.app.catalog.get_location(failback.location_id).online is False
        # Asking again while it waits reuses that job.
        assert operator.post(f"/api/peers/{failback.location_id}/pull").json()["id"] == job
        peer.start()
        source.service.scheduler.tick()  # the peer answers again: the waiting pull is woken
        done = wait_job(operator, job, timeout=180)
    assert done["state"] == "succeeded", done
    assert done["result"]["points"] == [point]
    assert failback.app.catalog.latest_point(ASSET, kind="image").id == point


# --- a pull killed mid-transfer ---------------------------------------------------------------------

#: A source appliance of its own in a child process. ``start`` backs up a VM disk, pairs with
#: the peer (4 MiB/s, so the pull lasts seconds), replicates, prints what the test needs for the
#: peer's failback, waits for a line on stdin (the failback is done), then pulls (to be killed).
#: ``resume`` starts a runner on the same data directory, which re-queues the interrupted job.
CHILD = """
import json, sys
from pathlib import Path
from api.peers import pair_with_peer
from api.replication_jobs import register_replication_jobs
from appliance.catalog.records import home_location_id
from appliance.engine import Appliance
from appliance.jobs import JobRunner

PASSPHRASE = "correct horse battery staple"


def start(data, disk, address, code):
    app, key = Appliance.init(str(data), PASSPHRASE, pack_size=1 << 20)
    point = app.backup_image([disk], "vm", threads=2).point.id
    location = pair_with_peer(
        app, address, code, "dr", name="Killed source", cert_path=data / "tls" / "cert.pem",
        key_path=data / "tls" / "key.pem", bandwidth_mib_s=4,
    )
    runner = JobRunner(app)
    runner.start()
    sent = runner.wait(runner.submit("replicate", {"location": location.id}).id, timeout=300)
    assert sent.state == "succeeded", sent.error
    info = {"point": point, "location": location.id, "store": app.repo.store_id, "key": key}
    print(json.dumps(info), flush=True)
    sys.stdin.readline()
    job = runner.submit("pull_back", {"location": location.id})
    print(json.dumps({"job": job.id}), flush=True)
    runner.wait(job.id, timeout=600)


def resume(data, job_id, location):
    app = Appliance.open(str(data), passphrase=PASSPHRASE)
    runner = JobRunner(app)
    requeued = runner.start()
    job = runner.wait(job_id, timeout=300)
    runner.shutdown()
    home = home_location_id(app.repo.store_id)
    states = {
        p: {c.location_id: c.state for c in app.catalog.copies_of(p)}
        for p in (job.result or {}).get("points", [])
    }
    log = [line.message for line in app.catalog.job_log(job_id)]
    print(json.dumps({"requeued": requeued, "state": job.state, "result": job.result,
                      "error": job.error, "home": home, "copies": states, "log": log}))
    app.close()


if __name__ == "__main__":  # the backup's workers import this file again
    register_replication_jobs()
    mode, data = sys.argv[1], Path(sys.argv[2])
    (start if mode == "start" else resume)(data, *sys.argv[3:])
"""


def test_a_pull_killed_mid_transfer_resumes_after_a_restart(
    failback: Failback, tmp_path: Path
) -> None:
    peer = failback.peer
    with peer.admin() as peer_admin:
        code = peer_admin.post("/api/replication/pairing-codes").json()["code"]
    disk = tmp_path / "vm" / "disk.raw"
    disk.parent.mkdir()
    disk.write_bytes(os.urandom(16 * MIB))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    data = tmp_path / "killed-source"
    home_packs = data / "pools" / "default" / "store"
    command = [sys.executable, str(script)]
    child = subprocess.Popen(
        [*command, "start", str(data), str(disk), peer.address, code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        started = json.loads(child.stdout.readline())
        replica = peer.replica(started["store"])
        # The VM wrote 12 MiB on the peer: twelve new packs of 1 MiB or so, three seconds' worth.
        image = tmp_path / "peer-side" / "changed" / disk.name
        change_image(disk, image, [(2 * MIB, 12 * MIB)])
        point = fail_back_on_the_peer(replica, started["key"], tmp_path / "peer-side", image, "vm")
        before = data_packs(home_packs)
        child.stdin.write("go\n")
        child.stdin.flush()
        job = json.loads(child.stdout.readline())["job"]
        until(lambda: data_packs(home_packs) >= before + 3, what="three packs home")
        child.kill()  # SIGKILL: the job is left "running", the home copy "copying"
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    arrived = data_packs(home_packs) - before
    assert not (home_packs / "manifests" / point).exists()  # cut off before the commit
    resumed = subprocess.run(
        [*command, "resume", str(data), job, started["location"]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert report["requeued"] == [job]
    assert report["state"] == "succeeded", report
    result = report["result"]
    assert result["points"] == [point]
    assert result["packs_present"] >= arrived >= 3  # what came before the kill is not fetched again
    assert report["copies"][point][report["home"]] == "present"
    assert "re-queued after the interruption" in report["log"]
    assert (home_packs / "manifests" / point).is_file()


# --- what the peer should not hold ------------------------------------------------------------------


def test_a_damaged_or_foreign_manifest_is_refused_and_the_others_come_home(
    failback: Failback, tmp_path: Path
) -> None:
    app, replica = failback.app, failback.replica
    damaged = "0000000000000001"
    (replica / "manifests" / damaged).write_bytes(os.urandom(300))
    # Another store's point: it does not open with this store's key either.
    other, _ = Appliance.init(str(tmp_path / "other"), "another passphrase")
    with other:
        tree = tmp_path / "tree"
        tree.mkdir()
        (tree / "a.txt").write_text("another store")
        foreign = other.backup_files(str(tree), "other").point.id
    shutil.copyfile(
        tmp_path / "other" / "pools" / "default" / "store" / "manifests" / foreign,
        replica / "manifests" / foreign,
    )
    point, _image = failback.fail_back("second", [(30 * MIB, MIB)])

    result = failback.pull()
    assert result["points"] == [point]
    reasons = {r["point"]: r["reason"] for r in result["refused"]}
    assert set(reasons) == {damaged, foreign}
    for refused, reason in reasons.items():
        assert reason.startswith(f"point {refused} at dr is refused: its manifest does not open")
        assert "damaged, or another store's point" in reason
        with pytest.raises(NotFound):
            app.point(refused)
    home = home_location_id(app.repo.store_id)
    assert {c.location_id: c.state for c in app.catalog.copies_of(point)}[home] == "present"
