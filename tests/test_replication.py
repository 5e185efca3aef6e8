"""Replication, the source's side (docs/replication.md), between two live appliances on 127.0.0.1.

The source is a plain service (``api_support.bootstrapped_server``); the peer runs the very
configuration ``appliance serve`` runs (TLS with its generated certificate, ``api.serve``) on a
port of its own, so it can be stopped and started again on the same data directory and port. The
peer side is the real one (``api/routers/replication.py``): nothing is faked.

One scenario walks the feature in order: pair with a code; a backup replicates by itself; the
peer holds ciphertext only; a small change sends only its new packs; the peer stopped mid-transfer
makes the job wait, and the peer back makes it resume and finish; every copy verifies at the peer;
a restore reads from the peer byte for byte. Then: the scheduler's catch-up; a copy asking a
peer-shaped target in batches instead of listing it; a replaced certificate refused, never
re-pinned; a replication killed with SIGKILL in a child process, resumed by the next start; the
backend's error mapping on its own; a pack damaged at the source named as such; pairing again (a new certificate, an adopted replica) and
unpairing. The tests run in file order and share the pair (each still passes alone).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import (
    LiveServer,
    bootstrapped_server,
    free_port,
    wait_job,
    weak_kdf_env,
)
from replication_support import (
    Pairing,
    Peer,
    data_packs,
    digest_tree,
    files_of,
    packs_of,
    running_peer,
    until,
)

from api.identity import certificate_fingerprint
from api.peer_backend import (
    PeerCertificateChanged,
    PeerTokenRefused,
    PeerUnreachable,
    open_peer,
    pinned_context,
)
from api.tls import ensure_certificate
from appliance.catalog.records import home_location_id
from appliance.errors import IntegrityError, InvalidInput, ObjectMissing
from appliance.locations import copy as copy_module
from appliance.locations.copy import copy_point
from appliance.store.backend import BackendCapabilities, MemoryBackend, ObjectInfo
from appliance.store.wrappers import compose

pytestmark = pytest.mark.slow

MIB = 1 << 20
#: A line no ciphertext contains by chance: the replica is searched for it.
MARKER = b"replication-plaintext-marker-4f1c9e"


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


def _backup(pairing: Pairing) -> tuple[str, dict[str, Any]]:
    """Back up the tree on the source; returns the point and the replicate job it queued."""
    with pairing.source.as_role("operator") as operator:
        r = operator.post(f"/api/assets/{pairing.asset}/backup", json={})
        assert r.status_code == 202, r.text
        backup = wait_job(operator, r.json()["id"])
        assert backup["state"] == "succeeded", backup
        jobs = backup["result"].get("replication_jobs") or []
        assert len(jobs) == 1, backup["result"]
        return backup["result"]["point"], operator.get(f"/api/jobs/{jobs[0]}").json()


def _peer_public(pairing: Pairing) -> dict[str, Any]:
    with pairing.source.as_role("viewer") as viewer:
        peers = viewer.get("/api/peers").json()
    return next(p for p in peers if p["id"] == pairing.location_id)


@pytest.fixture(scope="module")
def paired(source: LiveServer, peer: Peer, tmp_path_factory: pytest.TempPathFactory) -> Pairing:
    """The source paired with the peer, with an asset to back up."""
    with peer.admin() as peer_admin:
        offered = peer_admin.post("/api/replication/pairing-codes")
        assert offered.status_code == 201, offered.text
    code, peer_fingerprint = offered.json()["code"], offered.json()["fingerprint"]
    tree = tmp_path_factory.mktemp("tree") / "projects"
    (tree / "docs").mkdir(parents=True)
    (tree / "docs" / "secret.txt").write_bytes(MARKER + b"\n" + b"confidential " * 4000)
    (tree / "base.bin").write_bytes(os.urandom(2 * MIB))
    with source.as_role("admin") as admin:
        wrong = admin.post(
            "/api/peers", json={"address": peer.address, "code": "WRONG234", "label": "x"}
        )
        assert wrong.status_code == 400 and wrong.json()["code"] == "peer_pairing_refused"
        assert "refused to pair" in wrong.json()["message"]
        r = admin.post("/api/peers", json={"address": peer.address, "code": code, "label": "dr"})
        assert r.status_code == 201, r.text
        public = r.json()
        r = admin.post("/api/assets", json={"name": "projects", "kind": "files", "path": str(tree)})
        assert r.status_code == 201, r.text
    # Both pages show both fingerprints, and they agree.
    assert public["fingerprint"] == peer_fingerprint
    with peer.admin() as peer_admin:
        sources = peer_admin.get("/api/replication/sources").json()
    own = certificate_fingerprint(source.settings.cert_path)
    assert [s["fingerprint"] for s in sources] == [own]
    return Pairing(source, peer, public["id"], tree)


def test_pairing_keeps_the_token_apart_and_pins_the_certificate(paired: Pairing) -> None:
    app = paired.app
    location = app.catalog.get_location(paired.location_id)
    assert location.kind == "peer" and location.address == paired.peer.address
    options = location.details["options"]
    assert "token" not in options and options["replicate_new"] is True
    assert options["cert_pem"] == paired.peer.data_dir.joinpath("tls", "cert.pem").read_text()
    secrets = Path(app.data_dir.secrets_path) / f"{location.id}.json"
    assert secrets.stat().st_mode & 0o077 == 0
    assert "token" in secrets.read_text()
    # The identity file went through the backend: the replica is this store's location.
    identity = (paired.replica / "location.json").read_text()
    assert app.repo.store_id in identity and location.id in identity
    with paired.source.as_role("admin") as admin:
        listed = admin.get("/api/locations").json()
        assert options["fingerprint"] in str(admin.get("/api/peers").json())
    assert "token" not in str(listed)


def test_backups_replicate_by_themselves_resume_after_the_peer_returns_and_restore_from_it(
    paired: Pairing, tmp_path: Path
) -> None:
    app, source, peer = paired.app, paired.source, paired.peer
    store = Path(app.data_dir.store_path)

    # 1. A backup replicates by itself; the peer holds the point, and no plaintext.
    first, job = _backup(paired)
    with source.as_role("operator") as operator:
        job = wait_job(operator, job["id"])
    assert job["state"] == "succeeded", job
    assert job["result"]["replicated"] == [first]
    assert (paired.replica / "manifests" / first).is_file()
    for path in paired.replica.rglob("*"):
        if path.is_file():
            assert MARKER not in path.read_bytes(), path
    copies = {c.location_id: c.state for c in app.catalog.copies_of(first)}
    assert copies[paired.location_id] == "present"
    status = _peer_public(paired)
    assert status["points_at_peer"] == 1 and status["points_pending"] == 0
    assert status["rpo"].startswith("newest point at the peer is ")
    assert status["last_replication"]["outcome"] == "succeeded"

    # 2. A small change sends only its new packs.
    packs_before, replica_before = packs_of(store), files_of(paired.replica)
    (paired.tree / "docs" / "new.bin").write_bytes(os.urandom(300 * 1024))
    second, job = _backup(paired)
    with source.as_role("operator") as operator:
        job = wait_job(operator, job["id"])
    assert job["state"] == "succeeded", job
    new_packs = {n: s for n, s in packs_of(store).items() if n not in packs_before}
    arrived = {n: s for n, s in files_of(paired.replica).items() if n not in replica_before}
    assert {n: s for n, s in arrived.items() if n.startswith(("data/", "meta/"))} == new_packs
    others = sum(s for n, s in arrived.items() if not n.startswith(("data/", "meta/")))
    new_bytes, sent = sum(new_packs.values()), job["result"]["bytes_sent"]
    # The index file and the manifest (``others``) go too, and each request has its headers.
    allowance = others + 600 * job["result"]["requests"]
    print(
        f"\nincremental point: {sent} bytes sent for {new_bytes} bytes of new packs "
        f"({len(new_packs)} pack(s)) + {others} bytes of index and manifest, "
        f"{job['result']['requests']} requests: {sent / new_bytes:.3f}x the new packs"
    )
    assert sent <= 1.05 * new_bytes + allowance

    # 3. The peer stops mid-transfer (the link held to 2 MiB/s): the job waits, then resumes.
    with source.as_role("admin") as admin:
        changed = admin.patch(f"/api/peers/{paired.location_id}", json={"bandwidth_mib_s": 2})
        assert changed.json()["bandwidth_mib_s"] == 2
    (paired.tree / "big.bin").write_bytes(os.urandom(20 * MIB))
    data_before = data_packs(paired.replica)
    third, job = _backup(paired)
    until(
        lambda: data_packs(paired.replica) > data_before,
        what="a first pack of the big point at the peer",
    )
    peer.stop()
    with source.as_role("operator") as operator:
        waiting = until(
            lambda: (
                (j := operator.get(f"/api/jobs/{job['id']}").json())["state"] == "waiting" and j
            ),
            what="the replication waiting for the peer",
        )
        assert "unreachable" in waiting["wait_reason"], waiting
        assert _peer_public(paired)["job"]["state"] == "waiting"
        assert app.catalog.get_location(paired.location_id).online is False
        peer.start()
        source.service.scheduler.tick()  # the peer answers again: its waiting job is woken
        done = wait_job(operator, job["id"], timeout=180)
        log = [line["message"] for line in operator.get(f"/api/jobs/{job['id']}/log").json()]
    assert done["state"] == "succeeded", done
    assert done["result"]["replicated"] == [third]
    assert done["result"]["packs_present"] >= 1  # what arrived before the stop is not sent again
    assert any("resuming" in line for line in log), log
    with source.as_role("admin") as admin:
        admin.patch(f"/api/peers/{paired.location_id}", json={"bandwidth_mib_s": None})

    # 4. Every copy at the peer verifies (read back from the peer, decrypted, checked).
    for point in (first, second, third):
        verified = app.verify_copy(point, paired.location_id)
        assert verified["ok"], verified
    assert _peer_public(paired)["points_at_peer"] == 3

    # 5. A restore reads the point from the peer, byte for byte, once the home copy is gone.
    home = home_location_id(app.repo.store_id)
    app.catalog.set_copy(first, home, "deleted")
    target = source.settings.data_dir / "restores" / "from-peer"
    with source.as_role("operator") as operator:
        r = operator.post(f"/api/points/{first}/restore", json={"target": str(target)})
        assert r.status_code == 202, r.text
        restored = wait_job(operator, r.json()["id"], timeout=180)
        assert restored["state"] == "succeeded", restored
    original = digest_tree(paired.tree)
    assert digest_tree(target) == {
        k: v for k, v in original.items() if k in ("docs/secret.txt", "base.bin")
    }


def test_catch_up_sends_what_no_backup_sent(paired: Pairing) -> None:
    """A peer without "replicate new points" gets them from the scheduler's catch-up tick."""
    source = paired.source
    with source.as_role("admin") as admin:
        r = admin.patch(f"/api/peers/{paired.location_id}", json={"replicate_new": False})
        assert r.json()["replicate_new"] is False
    (paired.tree / "caught-up.txt").write_text("sent by the catch-up")
    with source.as_role("operator") as operator:
        r = operator.post(f"/api/assets/{paired.asset}/backup", json={})
        backup = wait_job(operator, r.json()["id"])
        assert backup["state"] == "succeeded" and "replication_jobs" not in backup["result"]
        point = backup["result"]["point"]
        assert _peer_public(paired)["points_pending"] >= 1
        later = source.clock() + timedelta(minutes=16)  # past any catch-up interval
        created = source.service.scheduler.tick(later)
        assert len(created) == 1
        job = wait_job(operator, created[0])
        assert job["state"] == "succeeded", job
        assert point in job["result"]["replicated"]
        assert source.service.scheduler.tick(later) == []  # nothing is due again so soon
    assert _peer_public(paired)["points_pending"] == 0
    with source.as_role("admin") as admin:
        admin.patch(f"/api/peers/{paired.location_id}", json={"replicate_new": True})


class AskingBackend(MemoryBackend):
    """A hot target whose listing is expensive and which answers ``present_many`` (a peer's
    shape), counting what it is asked."""

    capabilities = BackendCapabilities(listing_cost="expensive")

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[int] = []
        self.listed: list[str] = []

    def present_many(self, names: list[str]) -> dict[str, int]:
        self.asked.append(len(names))
        held = {}
        for name in names:
            with contextlib.suppress(ObjectMissing):
                held[name] = self.stat(name).size
        return held

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self.listed.append(prefix)
        return super().list(prefix)


def test_a_copy_asks_a_peer_shaped_target_in_batches_instead_of_listing(
    paired: Pairing, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = paired.app
    point = app.catalog.list_points(store_id=app.repo.store_id)[-1].id
    monkeypatch.setattr(copy_module, "PRESENT_BATCH", 2)
    target = AskingBackend()
    first = copy_point(app.repo, point, compose(target))  # found below the wrappers
    assert first.packs_copied == first.packs_needed > 0
    assert target.asked and max(target.asked) <= 2
    assert sum(target.asked) == first.packs_needed
    again = copy_point(app.repo, point, compose(target))
    assert again.packs_copied == 0 and again.packs_present == again.packs_needed
    assert not {"data/", "meta/"} & set(target.listed)


def test_a_replaced_certificate_is_refused_and_never_repinned(paired: Pairing) -> None:
    app, peer = paired.app, paired.peer
    pinned = app.catalog.get_location(paired.location_id).details["options"]["fingerprint"]
    peer.stop()
    tls = peer.data_dir / "tls"
    shutil.rmtree(tls)
    assert ensure_certificate(tls / "cert.pem", tls / "key.pem")
    peer.start()
    (paired.tree / "after-the-change.txt").write_text("one more file")
    _point, job = _backup(paired)
    with paired.source.as_role("operator") as operator:
        job = wait_job(operator, job["id"])
    assert job["state"] == "failed", job
    assert job["error"]["code"] == "peer_certificate_changed"
    message = job["error"]["message"]
    assert "the peer's certificate changed (pinned " in message and "re-pair" in message
    assert pinned.split(":")[0] in message
    location = app.catalog.get_location(paired.location_id)
    assert location.details["options"]["fingerprint"] == pinned  # never re-pinned
    assert location.online is False
    assert "certificate changed" in _peer_public(paired)["last_replication"]["error"]


# --- a replication killed mid-transfer -------------------------------------------------------------

#: A source appliance of its own in a child process: ``start`` makes a point, pairs with the peer
#: and runs the replication slowly (to be killed); ``resume`` starts a runner on the same data
#: directory, which re-queues the interrupted job, and reports how it ended.
CHILD = """
import json, sys
from pathlib import Path
from api.peers import pair_with_peer
from api.replication_jobs import register_replication_jobs
from appliance.engine import Appliance
from appliance.jobs import JobRunner

PASSPHRASE = "correct horse battery staple"


def start(data, tree, address, code):
    app, _ = Appliance.init(str(data), PASSPHRASE, pack_size=1 << 20)
    point = app.backup_files(tree, "big").point.id
    location = pair_with_peer(
        app, address, code, "dr", name="Killed source", cert_path=data / "tls" / "cert.pem",
        key_path=data / "tls" / "key.pem", bandwidth_mib_s=2,
    )
    runner = JobRunner(app)
    runner.start()
    job = runner.submit("replicate", {"location": location.id})
    info = {"job": job.id, "point": point, "location": location.id, "store": app.repo.store_id}
    print(json.dumps(info), flush=True)
    runner.wait(job.id, timeout=600)


def resume(data, job_id, point, location):
    app = Appliance.open(str(data), passphrase=PASSPHRASE)
    runner = JobRunner(app)
    requeued = runner.start()
    job = runner.wait(job_id, timeout=300)
    runner.shutdown()
    verified = app.verify_copy(point, location)
    log = [line.message for line in app.catalog.job_log(job_id)]
    print(json.dumps({"requeued": requeued, "state": job.state, "result": job.result,
                      "error": job.error, "verified": verified["ok"], "log": log}))
    app.close()


if __name__ == "__main__":  # the backup's workers import this file again
    register_replication_jobs()
    mode, data = sys.argv[1], Path(sys.argv[2])
    (start if mode == "start" else resume)(data, *sys.argv[3:])
"""


def test_a_replication_killed_mid_transfer_resumes_after_a_restart(
    paired: Pairing, tmp_path: Path
) -> None:
    peer = paired.peer
    with peer.admin() as peer_admin:
        code = peer_admin.post("/api/replication/pairing-codes").json()["code"]
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big.bin").write_bytes(os.urandom(12 * MIB))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    data = tmp_path / "killed-source"
    command = [sys.executable, str(script)]
    child = subprocess.Popen(
        [*command, "start", str(data), str(tree), peer.address, code],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        started = json.loads(child.stdout.readline())  # type: ignore[union-attr]
        replica = peer.replica(started["store"])
        until(lambda: data_packs(replica) >= 3, what="three packs at the peer")
        child.kill()  # SIGKILL: the job is left "running" in the catalog, the copy "copying"
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    arrived = data_packs(replica)
    resumed = subprocess.run(
        [*command, "resume", str(data), started["job"], started["point"], started["location"]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert report["requeued"] == [started["job"]]
    assert report["state"] == "succeeded", report
    assert report["result"]["replicated"] == [started["point"]]
    assert report["result"]["packs_present"] >= arrived >= 3  # not sent again
    assert report["verified"] is True
    assert "re-queued after the interruption" in report["log"]


# --- the backend alone ------------------------------------------------------------------------------


def _token_as_another_source(peer: Peer, store_id: str) -> tuple[str, str]:
    """(certificate PEM, token) of a pairing made straight on the peer's API for a made-up
    source with store ``store_id``."""
    assert peer.live is not None
    cert = peer.live.settings.cert_path.read_text()
    with peer.admin() as peer_admin:
        code = peer_admin.post("/api/replication/pairing-codes").json()["code"]
    other = {
        "appliance_id": "0" * 31 + store_id[-1],
        "name": f"Test source {store_id[:4]}",
        "store_id": store_id,
        "fingerprint": certificate_fingerprint(peer.live.settings.cert_path),
    }
    with httpx.Client(verify=pinned_context(cert), base_url=peer.address) as client:
        answer = client.post("/api/replication/pair", json={"code": code, "source": other})
        assert answer.status_code == 200, answer.text
        return cert, answer.json()["token"]


def test_a_pack_damaged_at_the_source_is_named_as_such(
    paired: Pairing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source does not hash packs before sending them to a peer (the peer checks each
    against its name); when the peer refuses one, the source finds out whose bytes were bad."""
    app = paired.app
    points = app.catalog.list_points(store_id=app.repo.store_id)
    if points:
        point = points[-1].id
    else:  # run alone: a point, and its own replication done before the reads go bad
        point, job = _backup(paired)
        with paired.source.as_role("viewer") as viewer:
            assert wait_job(viewer, job["id"])["state"] == "succeeded"
    cert, token = _token_as_another_source(paired.peer, "cd" * 8)
    backend = open_peer(paired.peer.address, cert_pem=cert, token=token, peer_name="dr")
    read = app.repo.backend.get
    damaged: list[str] = []

    def rotten(name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = read(name, offset, length)
        if name.startswith("data/") and not damaged:
            damaged.append(name)
            return data[:-1] + bytes([data[-1] ^ 1])
        return data

    try:
        with monkeypatch.context() as mp:
            mp.setattr(app.repo.backend, "get", rotten)
            with pytest.raises(IntegrityError, match="damaged at the source"):
                copy_point(app.repo, point, compose(backend))
        assert damaged and damaged[0] not in backend.present_many(damaged)
        done = copy_point(app.repo, point, compose(backend))  # the disk "repaired": all goes
        assert done.packs_copied + done.packs_present == done.packs_needed > 0
        assert damaged[0] in backend.present_many(damaged)
    finally:
        backend.close()


def test_the_backend_maps_what_the_peer_answers(paired: Pairing, tmp_path: Path) -> None:
    """Against the paired peer (whatever its certificate is now: the pin is re-read here) and a
    port nobody listens on."""
    peer = paired.peer
    cert, token = _token_as_another_source(peer, "ab" * 8)
    backend = open_peer(peer.address, cert_pem=cert, token=token, peer_name="dr")
    try:
        data = os.urandom(5000)
        backend.put("config", data)
        backend.put("config", data)  # the same bytes again: fine
        assert backend.get("config") == data
        assert backend.get("config", 100, 50) == data[100:150]
        assert backend.get("config", 4990) == data[4990:]
        assert backend.get("config", 5000) == b""
        assert backend.stat("config").size == 5000
        assert [i.name for i in backend.list()] == ["config"]
        assert list(backend.list("bundles/")) == []
        assert backend.present_many(["config", "keys/00112233aabbccdd"]) == {"config": 5000}
        with pytest.raises(ObjectMissing):
            backend.get("keys/00112233aabbccdd")
        with pytest.raises(InvalidInput, match="cannot delete"):
            backend.delete("config")
        backend.retain("config", paired.app.clock())  # a no-op
        with pytest.raises(Exception, match="other bytes"):
            backend.put("config", os.urandom(10))
        with pytest.raises(IntegrityError, match="do not hash to its name"):
            backend.put(f"data/ab/ab{'0' * 62}", data)  # a pack goes without a SHA-256
    finally:
        backend.close()
    refused = open_peer(peer.address, cert_pem=cert, token="apl_not-a-token")
    with contextlib.closing(refused), pytest.raises(PeerTokenRefused, match=r"unpaired\?"):
        refused.stat("config")
    # Another certificate than the peer's: the handshake fails, and says what it is now.
    stranger = tmp_path / "stranger.pem"
    ensure_certificate(stranger, tmp_path / "stranger.key")
    wrong = open_peer(peer.address, cert_pem=stranger.read_text(), token=token)
    with contextlib.closing(wrong), pytest.raises(PeerCertificateChanged, match="changed"):
        wrong.stat("config")
    # Nobody listening: unreachable, which is both unavailable and transient.
    closed = open_peer(f"https://127.0.0.1:{free_port()}", cert_pem=cert, token=token)
    with contextlib.closing(closed), pytest.raises(PeerUnreachable) as caught:
        closed.stat("config")
    assert caught.value.code == "location_unavailable"
    with pytest.raises(InvalidInput, match="HTTPS"):
        open_peer("http://127.0.0.1:1", cert_pem=cert)


def test_pairing_again_accepts_a_new_certificate_and_unpairing_forgets_the_peer(
    paired: Pairing,
) -> None:
    app, peer, source = paired.app, paired.peer, paired.source
    home = home_location_id(app.repo.store_id)

    def new_code() -> str:
        with peer.admin() as peer_admin:
            return str(peer_admin.post("/api/replication/pairing-codes").json()["code"])

    with source.as_role("admin") as admin:
        # Pairing again (after a new certificate, say) updates the same peer: new pin, new token.
        r = admin.post("/api/peers", json={"address": peer.address, "code": new_code()})
        assert r.status_code == 201, r.text
        assert r.json()["id"] == paired.location_id
        assert r.json()["fingerprint"] == certificate_fingerprint(
            peer.data_dir / "tls" / "cert.pem"
        )
    with source.as_role("operator") as operator:
        r = operator.post(f"/api/peers/{paired.location_id}/replicate")
        assert r.status_code == 202, r.text
        job = wait_job(operator, r.json()["id"])
        assert job["state"] == "succeeded", job
    status = _peer_public(paired)
    assert status["points_pending"] == 0 and status["online"] is True

    # A point held only at the peer keeps it paired.
    point = app.catalog.copies_at(paired.location_id, state="present")[0].point_id
    app.catalog.set_copy(point, home, "deleted")
    with source.as_role("admin") as admin:
        refused = admin.delete(f"/api/peers/{paired.location_id}")
        assert refused.status_code == 409 and "held only at" in refused.json()["message"]
    for copy in app.catalog.copies_at(home, state="deleted"):
        app.catalog.set_copy(copy.point_id, home, "present")  # the home store still has them
    held = len(app.catalog.copies_at(paired.location_id, state="present"))
    secrets = Path(app.data_dir.secrets_path) / f"{paired.location_id}.json"
    with source.as_role("admin") as admin:
        r = admin.delete(f"/api/peers/{paired.location_id}")
        assert r.status_code == 200, r.text
        assert r.json()["token_deleted"] is True and r.json()["revoked_at_peer"] is True
        assert r.json()["next"] is None  # the peer revoked the token: nothing left to do there
        assert admin.get("/api/peers").json() == []
        assert not secrets.exists()
        # The replica still names this store's location: pairing again adopts what it holds.
        r = admin.post("/api/peers", json={"address": peer.address, "code": new_code()})
        assert r.status_code == 201, r.text
    assert r.json()["id"] == paired.location_id
    assert r.json()["points_at_peer"] == held
