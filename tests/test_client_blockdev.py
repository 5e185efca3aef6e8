"""Block devices through the backup client, against a real service over TLS on 127.0.0.1: a
loop device backed up whole as an image point, an incremental that sends only the changed
chunks (counted), several disks in one point, a killed client resumed, and hostile image
uploads refused."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
import zstandard
from api_support import bootstrap_accounts, free_port, wait_job, weak_kdf_env
from client_support import enroll, kill_client_mid_upload, run_client
from guest_support import guest_image_path
from loop_support import attached
from replication_support import TlsServer, tls_server

from appliance.client import wire
from image.testguest import MARKER, copy_sparse

REPO = Path(__file__).resolve().parents[1]
CHUNK = 64 * 1024

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    with pytest.MonkeyPatch.context() as mp:
        weak_kdf_env(mp)
        with tls_server(tmp_path_factory.mktemp("appliance") / "data", free_port()) as live:
            bootstrap_accounts(live)
            yield live


@pytest.fixture(scope="module")
def db1(server: TlsServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    with server.as_role("admin") as admin:
        r = admin.post("/api/hosts", json={"name": "db1", "kind": "client", "disks": True})
        assert r.status_code == 201, r.text
        added = r.json()
    assert added["host"]["assets"] == ["db1", "db1-disks"]
    config = tmp_path_factory.mktemp("db1") / "config.json"
    enroll(server, added["token"], config)
    return {**added, "config": config}


def _disk(path: Path, size: int, seed: int) -> bytes:
    """Random data, a long run of zeros and compressible text: each kind of disk chunk."""
    rng = random.Random(seed)
    third = size // 3
    text = b"".join(rng.choice([b"alpha ", b"beta ", b"gamma "]) for _ in range(third // 5))
    data = (rng.randbytes(third) + bytes(third) + text)[:size]
    data += rng.randbytes(size - len(data))
    path.write_bytes(data)
    return data


def _restored(server: TlsServer, point: str, into: Path, disk: str | None = None) -> bytes:
    server.service.app.restore(point, str(into), disk=disk)
    return into.read_bytes()


def _backup(config: Path, capsys: Any, *args: str) -> dict[str, Any]:
    code, result, err = run_client(config, "backup", "--quiet", *args, capsys=capsys)
    assert code == 0, err
    return result


def test_a_block_device_full_then_incremental_sends_only_changed_chunks(
    server: TlsServer, db1: dict[str, Any], tmp_path: Path, capsys: Any
) -> None:
    image = tmp_path / "disk.img"
    size = 24 * 1024 * 1024 + 25 * 512  # a partial last chunk (loop devices count sectors)
    before = _disk(image, size, seed=1)
    state = str(tmp_path / "state")
    with attached(image) as device:
        name = os.path.basename(device)
        first = _backup(db1["config"], capsys, device, "--state-dir", state)
        assert first["kind"] == "image" and first["mode"] == "full"
        chunks = (size + CHUNK - 1) // CHUNK
        zero_chunks = sum(
            1 for i in range(chunks) if before[i * CHUNK : (i + 1) * CHUNK].count(0) == CHUNK
        )
        assert first["zero_chunks"] == zero_chunks > 100
        assert first["bytes_read"] == size
        assert first["chunks_new"] + first["chunks_known"] + zero_chunks == chunks
        manifest = server.service.app.repo.get_manifest(first["point"])
        assert manifest["kind"] == "image"
        assert [d["name"] for d in manifest["disks"]] == [name]
        assert manifest["disks"][0]["size"] == size
        assert manifest["source"] == f"client://db1{device}"
        assert _restored(server, first["point"], tmp_path / "r1.raw") == before

        # Rewrite scattered 4 KiB blocks and one 1 MiB run, through the device.
        rng = random.Random(7)
        touched: set[int] = set()
        with open(device, "r+b", buffering=0) as f:
            for _ in range(20):
                offset = rng.randrange(0, size - 4096) // 4096 * 4096
                f.seek(offset)
                f.write(rng.randbytes(4096))
                touched.update({offset // CHUNK, (offset + 4095) // CHUNK})
            f.seek(3 * 1024 * 1024)
            f.write(rng.randbytes(1024 * 1024))
            touched.update(range(3 * 1024 * 1024 // CHUNK, 4 * 1024 * 1024 // CHUNK))
            os.fsync(f.fileno())
        after = image.read_bytes()
        second = _backup(db1["config"], capsys, device, "--state-dir", state)
    assert second["mode"] == "incremental"
    assert second["chunks_new"] == len(touched)
    assert second["chunk_bytes_sent"] <= len(touched) * (CHUNK + wire.FRAME.size)
    manifest = server.service.app.repo.get_manifest(second["point"])
    assert manifest["parent"] == first["point"]
    assert manifest["stats"]["changed_chunks"] == len(touched)
    # Each point restores on its own.
    assert _restored(server, second["point"], tmp_path / "r2.raw") == after
    assert _restored(server, first["point"], tmp_path / "r1b.raw") == before
    report = server.service.app.verify(second["point"])
    assert report.ok, report
    assert not list(Path(state).glob("session-*.json"))


def test_several_disks_make_one_point_and_wrong_paths_are_refused(
    server: TlsServer, db1: dict[str, Any], tmp_path: Path, capsys: Any
) -> None:
    a = _disk(tmp_path / "a.img", 4 * 1024 * 1024, seed=2)
    b_path = tmp_path / "data.raw"
    b = _disk(b_path, 3 * 1024 * 1024, seed=3)
    state = str(tmp_path / "state")
    with attached(tmp_path / "a.img") as device:
        # A plain file is an image only when asked.
        code, _, err = run_client(
            db1["config"], "backup", device, str(b_path), "--asset", "db1", capsys=capsys
        )
        assert code == 1 and "add --image" in err
        folder = tmp_path / "folder"
        folder.mkdir()
        code, _, err = run_client(
            db1["config"], "backup", device, str(folder), "--asset", "db1", capsys=capsys
        )
        assert code == 1 and "separate runs" in err
        code, _, err = run_client(
            db1["config"], "backup", device, "--exclude", "*.tmp", "--asset", "db1", capsys=capsys
        )
        assert code == 1 and "apply to folders" in err
        code, _, err = run_client(
            db1["config"], "backup", device, "--asset", "other", capsys=capsys
        )
        assert code == 1 and "not to other" in err
        code, _, err = run_client(db1["config"], "backup", device, "--asset", "db1", capsys=capsys)
        assert code == 1 and "holds files points" in err
        result = _backup(
            db1["config"],
            capsys,
            device,
            str(b_path),
            "--image",
            "--state-dir",
            state,
        )
        name = os.path.basename(device)
    assert result["devices"] == {name: device, "data.raw": str(b_path)}
    manifest = server.service.app.repo.get_manifest(result["point"])
    assert [d["name"] for d in manifest["disks"]] == [name, "data.raw"]
    assert [d["name"] for d in manifest["vm"]["disks"]] == [name, "data.raw"]
    assert _restored(server, result["point"], tmp_path / "ra.raw", disk=name) == a
    assert _restored(server, result["point"], tmp_path / "rb.raw", disk="data.raw") == b


def test_a_killed_client_resumes_its_block_device_upload(
    server: TlsServer, db1: dict[str, Any], tmp_path: Path
) -> None:
    """kill -9 of the client mid-upload of a device: run again, it reopens the session, sends
    only what the appliance did not acknowledge, and the point is whole."""
    image = tmp_path / "big.img"
    image.write_bytes(os.urandom(96 * 1024 * 1024))
    state = tmp_path / "state"
    ingest = Path(server.settings.data_dir) / "ingest"
    with attached(image) as device:
        argv = [
            sys.executable,
            "-m",
            "appliance.client.cli",
            "--config",
            str(db1["config"]),
            "backup",
            device,
            "--asset",
            "db1-raw",
            "--state-dir",
            str(state),
            "--threads",
            "1",
        ]
        # The host's token may add points to db1 only: another asset needs its own grant.
        code, _, _ = run_client(db1["config"], "backup", device, "--asset", "db1-raw")
        assert code == 1
        argv[argv.index("db1-raw")] = "db1-disks"
        acknowledged = kill_client_mid_upload(argv, ingest, 300, REPO)
        assert list(state.glob("session-*.json")), "the session is remembered for the next run"
        done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert "resuming session" in done.stderr
    chunks = 96 * 1024 * 1024 // CHUNK
    assert result["chunks_known"] >= acknowledged > 0
    assert result["chunks_new"] == chunks - result["chunks_known"] > 0
    assert _restored(server, result["point"], tmp_path / "r.raw") == image.read_bytes()
    report = server.service.app.verify(result["point"])
    assert report.ok, report


def _id_key(server: TlsServer) -> bytes:
    return server.service.app.repo.key.id_key


def test_hostile_image_uploads_are_refused(server: TlsServer, db1: dict[str, Any]) -> None:
    token = json.loads(db1["config"].read_text())["token"]
    key = _id_key(server)
    chunk = os.urandom(CHUNK)
    chunk_id = blake3.blake3(chunk, key=key).digest()
    with server.client(headers={"Authorization": f"Bearer {token}"}) as c:

        def open_image(disks: list[dict[str, Any]]) -> Any:
            return c.post(
                "/api/client/sessions",
                json={
                    "asset": "db1-disks",
                    "source": "client://db1/dev/hostile",
                    "kind": "image",
                    "disks": disks,
                },
            )

        for disks in (
            [{"name": "../etc", "size": CHUNK}],
            [{"name": "a", "size": 0}],
            [{"name": "a", "size": CHUNK}, {"name": "a", "size": CHUNK}],
            [],
        ):
            r = open_image(disks)
            assert r.status_code in (400, 422), (disks, r.text)
        opened = open_image([{"name": "sda", "size": 3 * CHUNK}])
        assert opened.status_code == 201, opened.text
        assert opened.json()["kind"] == "image"
        sid = opened.json()["session"]
        assert c.get(f"/api/client/sessions/{sid}/base", params={"disk": "sdb"}).status_code == 400
        assert c.get(f"/api/client/sessions/{sid}/base", params={"disk": "sda"}).content == b""
        # A chunk larger than a disk chunk.
        big = os.urandom(CHUNK + 1)
        frame = wire.encode_frame(
            blake3.blake3(big, key=key).digest(), wire.COMPRESSION_NONE, len(big), big
        )
        r = c.post(f"/api/client/sessions/{sid}/chunks", content=frame)
        assert r.status_code == 400 and "impossible size" in r.json()["message"]
        frame = wire.encode_frame(chunk_id, wire.COMPRESSION_NONE, CHUNK, chunk)
        assert c.post(f"/api/client/sessions/{sid}/chunks", content=frame).status_code == 200
        foreign = blake3.blake3(b"someone else's data", key=key).digest()
        zero = bytes(32)
        cases = [
            (chunk_id + foreign + zero, "neither uploaded nor at this place"),
            (chunk_id + zero, "shorter than the declared disks"),
            (chunk_id + zero + zero + chunk_id, "longer than the declared disks"),
        ]
        for table, why in cases:
            body = zstandard.ZstdCompressor().compress(table)
            r = c.post(f"/api/client/sessions/{sid}/records?seq=0", content=body)
            assert r.status_code == 204
            r = c.post(f"/api/client/sessions/{sid}/finish", json={"batches": 1})
            assert r.status_code == 400, r.text
            assert why in r.json()["message"]
        # The same session still makes a point from an honest table.
        body = zstandard.ZstdCompressor().compress(chunk_id + zero + chunk_id)
        assert c.post(f"/api/client/sessions/{sid}/records?seq=0", content=body).status_code == 204
        r = c.post(f"/api/client/sessions/{sid}/finish", json={"batches": 1})
        assert r.status_code == 200, r.text
    point = r.json()["point"]
    restored = Path(server.settings.data_dir).parent / "hostile.raw"
    server.service.app.restore(point, str(restored))
    assert restored.read_bytes() == chunk + bytes(CHUNK) + chunk


@pytest.mark.qemu
@pytest.mark.slow
def test_a_hosts_disk_sent_by_the_client_fails_over_on_the_appliance(
    server: TlsServer, db1: dict[str, Any], tmp_path: Path, capsys: Any
) -> None:
    """The failover test guest's disk, as a host's block device, backed up through the client:
    the point boots on the appliance and the guest's marker is seen (a physical machine's
    disk failing over as a VM)."""
    disk = tmp_path / "host-disk.raw"
    copy_sparse(guest_image_path(), str(disk))
    with attached(disk) as device:
        result = _backup(
            db1["config"], capsys, device, "--state-dir", str(tmp_path / "state"), "--mode", "full"
        )
    with server.as_role("admin") as admin:
        r = admin.put(
            "/api/assets/db1-disks/failover-settings",
            json={"proof": {"serial": MARKER, "timeout": 150}, "network": {"mode": "isolated"}},
        )
        assert r.status_code == 200, r.text
    with server.as_role("operator") as operator:
        r = operator.post("/api/assets/db1-disks/failover", json={"point": result["point"]})
        assert r.status_code == 202, r.text
        job = wait_job(operator, r.json()["id"], timeout=240)
        assert job["state"] == "succeeded", job
        session = operator.get(f"/api/failover/{job['result']['session']}").json()
        assert session["state"] == "running" and session["live"], session
        assert session["point_id"] == result["point"]
        r = operator.post(f"/api/failover/{session['id']}/stop", json={"discard": True})
        assert r.status_code == 202, r.text
        assert wait_job(operator, r.json()["id"], timeout=120)["state"] == "succeeded"
    # Only the host starts its backups, disks included.
    with server.as_role("operator") as operator:
        r = operator.post("/api/assets/db1-disks/backup", json={})
        assert r.status_code == 400 and "backed up by its host's client" in r.json()["message"]
    # The client pulls files only: a disk point is not offered to it.
    with server.as_role("operator") as operator:
        r = operator.post(
            "/api/hosts/db1/restores", json={"point": result["point"], "target": "/restore"}
        )
        assert r.status_code == 400 and "holds disks" in r.json()["message"]
