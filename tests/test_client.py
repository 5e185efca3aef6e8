"""The backup client against a real service over TLS on 127.0.0.1: enrolment with the pinned
certificate, first and incremental backups (only new chunks sent), a cut link resumed, a killed
client resumed, scoped tokens refused elsewhere, hostile uploads refused, restores pulled."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
import zstandard
from api_support import bootstrap_accounts, free_port, wait_job, weak_kdf_env
from client_support import (
    add_client_host,
    cutting_relay,
    enroll,
    kill_client_mid_upload,
    make_tree,
    run_client,
)
from replication_support import TlsServer, digest_tree, tls_server

from appliance.client import wire
from appliance.client.zipapp import build_zipapp

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    with pytest.MonkeyPatch.context() as mp:
        weak_kdf_env(mp)
        with tls_server(tmp_path_factory.mktemp("appliance") / "data", free_port()) as live:
            bootstrap_accounts(live)
            yield live


@pytest.fixture(scope="module")
def web1(server: TlsServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    added = add_client_host(server, "web1")
    config = tmp_path_factory.mktemp("web1") / "config.json"
    enroll(server, added["token"], config)
    return {**added, "config": config}


def _restored(server: TlsServer, point: str, into: Path) -> Path:
    out = io.BytesIO()
    server.service.app.restore_tar(point, out)
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        tar.extractall(into, filter="tar")
    return into


def _backup(config: Path, capsys: Any, *args: str) -> dict[str, Any]:
    code, result, err = run_client(config, "backup", "--quiet", *args, capsys=capsys)
    assert code == 0, err
    return result


def test_install_command_names_the_pin_and_the_token(
    server: TlsServer, web1: dict[str, Any]
) -> None:
    command = web1["install_command"]
    assert "--pinnedpubkey sha256//" in command
    assert web1["token"] in command
    assert "appliance-client enroll" in command and "--fingerprint" in command
    with server.as_role("viewer") as viewer:
        hosts = viewer.get("/api/hosts").json()
    host = next(h for h in hosts if h["name"] == "web1")
    assert host["kind"] == "client" and host["assets"] == ["web1"]
    assert "token_id" not in host


def test_first_and_incremental_backup_send_only_new_chunks(
    server: TlsServer, web1: dict[str, Any], tmp_path: Path, capsys: Any
) -> None:
    tree = tmp_path / "srv"
    make_tree(tree)
    config = web1["config"]
    state = str(tmp_path / "state")
    first = _backup(config, capsys, str(tree), "--asset", "web1", "--state-dir", state)
    assert first["mode"] == "full"
    assert first["files"] == 41 and first["chunks_known"] == 0
    restored = _restored(server, first["point"], tmp_path / "r1")
    assert digest_tree(restored) == digest_tree(tree)
    assert os.readlink(restored / "link") == "docs/note-0.txt"
    assert os.stat(restored / "hard").st_ino == os.stat(restored / "docs" / "note-1.txt").st_ino

    # One file changed, one added: only their chunks travel.
    (tree / "bin" / "blob-3.bin").write_bytes(os.urandom(300_000))
    (tree / "docs" / "new.txt").write_text("fresh " * 50_000)
    second = _backup(config, capsys, str(tree), "--asset", "web1", "--state-dir", state)
    assert second["mode"] == "incremental"
    assert second["chunks_new"] == 2, second
    # The files cache: only the two files that changed are read.
    assert second["files_read"] == 2 and second["files_reused"] == second["files"] - 2, second
    point = server.service.app.catalog.get_point(second["point"])
    # Bytes of chunk batches vs what the store added (sealed): framing and the envelope only.
    assert second["chunk_bytes_sent"] <= 1.05 * point.stored_bytes, (second, point.stored_bytes)
    restored = _restored(server, second["point"], tmp_path / "r2")
    assert digest_tree(restored) == digest_tree(tree)

    # The cache is trusted only for chunks the appliance lists: with the points it came from
    # deleted on the appliance, every file is read again, and a damaged cache reads them too.
    server.service.app.delete_points([first["point"], second["point"]])
    third = _backup(config, capsys, str(tree), "--asset", "web1", "--state-dir", state)
    # Only zeros.img is reused: all its chunks are zeros, which name no stored chunk.
    assert third["mode"] == "full" and third["files_reused"] == 1, third
    assert third["files_read"] == third["files"] - 1, third
    (cache,) = Path(state).glob("files-*.zst")
    cache.write_bytes(b"not zstd at all")
    fourth = _backup(config, capsys, str(tree), "--asset", "web1", "--state-dir", state)
    assert fourth["files_read"] == fourth["files"] and fourth["chunks_new"] == 0, fourth
    fifth = _backup(config, capsys, str(tree), "--asset", "web1", "--state-dir", state)
    assert fifth["files_read"] == 0 and fifth["files_reused"] == fifth["files"], fifth
    restored = _restored(server, fifth["point"], tmp_path / "r5")
    assert digest_tree(restored) == digest_tree(tree)


def test_excludes_one_file_system_and_hooks(
    server: TlsServer, web1: dict[str, Any], tmp_path: Path, capsys: Any
) -> None:
    tree = tmp_path / "data"
    (tree / "cache").mkdir(parents=True)
    (tree / "cache" / "big.bin").write_bytes(os.urandom(10_000))
    (tree / "keep.txt").write_text("keep")
    (tree / "skip.tmp").write_text("skip")
    marker = tmp_path / "hook.log"
    result = _backup(
        web1["config"],
        capsys,
        str(tree),
        "--asset",
        "web1",
        "--exclude",
        "*.tmp",
        "--exclude",
        "cache",
        "--one-file-system",
        "--state-dir",
        str(tmp_path / "state"),
        "--pre",
        f"echo dump > {tree}/db.sql && echo pre >> {marker}",
        "--post",
        f'echo "post $APPLIANCE_STATUS" >> {marker}',
    )
    restored = _restored(server, result["point"], tmp_path / "r")
    assert sorted(p.name for p in restored.iterdir()) == ["db.sql", "keep.txt"]
    assert marker.read_text().split("\n")[:2] == ["pre", "post ok"]
    code, _, err = run_client(
        web1["config"],
        "backup",
        str(tree),
        "--asset",
        "web1",
        "--state-dir",
        str(tmp_path / "state"),
        "--pre",
        "exit 3",
        "--post",
        f'echo "post $APPLIANCE_STATUS" >> {marker}',
        capsys=capsys,
    )
    assert code == 1 and "pre command exited with 3" in err
    assert marker.read_text().strip().endswith("post failed")


def test_a_cut_link_is_retried_and_the_backup_completes(
    server: TlsServer, web1: dict[str, Any], tmp_path: Path, capsys: Any
) -> None:
    tree = tmp_path / "big"
    tree.mkdir()
    for n in range(6):
        (tree / f"f{n}.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    port = int(server.url.rsplit(":", 1)[1])
    with cutting_relay(port) as relay:
        config = tmp_path / "relay.json"
        document = json.loads(web1["config"].read_text())
        document["server"] = relay.url
        config.write_text(json.dumps(document))
        relay.cut_after(20 * 1024 * 1024)
        result = _backup(config, capsys, str(tree), "--asset", "web1", "--state-dir", str(tmp_path))
        assert relay.cuts == 1
    assert result["retries"] >= 1
    restored = _restored(server, result["point"], tmp_path / "r")
    assert digest_tree(restored) == digest_tree(tree)


def test_a_killed_client_resumes_its_session(
    server: TlsServer, web1: dict[str, Any], tmp_path: Path
) -> None:
    """kill -9 of the client mid-upload: run again, it reopens the session, sends only what
    the appliance did not acknowledge, and the point is whole."""
    tree = tmp_path / "bulk"
    tree.mkdir()
    for n in range(12):
        (tree / f"f{n}.bin").write_bytes(os.urandom(8 * 1024 * 1024))
    state = tmp_path / "state"
    argv = [
        sys.executable,
        "-m",
        "appliance.client.cli",
        "--config",
        str(web1["config"]),
        "backup",
        str(tree),
        "--asset",
        "web1",
        "--state-dir",
        str(state),
        "--threads",
        "1",
    ]
    ingest = Path(server.settings.data_dir) / "ingest"
    acknowledged = kill_client_mid_upload(argv, ingest, 2 * 8, REPO)
    assert list(state.glob("session-*.json")), "the session is remembered for the next run"
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert "resuming session" in done.stderr
    assert result["chunks_known"] >= acknowledged > 0
    assert result["chunks_new"] > 0
    assert not list(state.glob("session-*.json"))
    restored = _restored(server, result["point"], tmp_path / "r")
    assert digest_tree(restored) == digest_tree(tree)
    report = server.service.app.verify(result["point"])
    assert report.ok, report


def test_the_token_adds_points_to_its_asset_only(server: TlsServer, web1: dict[str, Any]) -> None:
    token = json.loads(web1["config"].read_text())["token"]
    with server.client(headers={"Authorization": f"Bearer {token}"}) as c:
        r = c.post("/api/client/sessions", json={"asset": "other", "source": "client://web1/x"})
        assert r.status_code == 403 and "not to other" in r.json()["message"]
        r = c.post("/api/client/sessions", json={"asset": "web1", "source": "client://db9/x"})
        assert r.status_code == 403
        for method, path in [
            ("GET", "/api/points"),
            ("GET", "/api/assets"),
            ("GET", "/api/jobs"),
            ("GET", "/api/hosts"),
            ("GET", "/api/users"),
            ("POST", "/api/assets/web1/backup"),
            ("DELETE", "/api/assets/web1"),
        ]:
            r = c.request(method, path)
            assert r.status_code == 403, (method, path, r.status_code)
            assert "client token" in r.json()["message"]
        points = server.service.app.catalog.list_points(asset="web1")
        if points:
            r = c.get(f"/api/points/{points[0].id}/download")
            assert r.status_code == 403
    # And an admin's token is not a client token.
    with server.as_role("admin") as admin:
        assert admin.get("/api/client/hello").status_code == 403


def test_hostile_uploads_are_refused(server: TlsServer, web1: dict[str, Any]) -> None:
    token = json.loads(web1["config"].read_text())["token"]
    with server.client(headers={"Authorization": f"Bearer {token}"}) as c:
        opened = c.post(
            "/api/client/sessions", json={"asset": "web1", "source": "client://web1/hostile"}
        )
        assert opened.status_code == 201, opened.text
        sid = opened.json()["session"]
        # A chunk whose content does not hash to its ID (dedup poisoning).
        frame = wire.encode_frame(b"\x01" * 32, wire.COMPRESSION_NONE, 5, b"hello")
        r = c.post(f"/api/client/sessions/{sid}/chunks", content=frame)
        assert r.status_code == 400 and "does not match its content" in r.json()["message"]
        # A zstd bomb claiming a small size.
        bomb = zstandard.ZstdCompressor().compress(bytes(50_000_000))
        r = c.post(
            f"/api/client/sessions/{sid}/chunks",
            content=wire.encode_frame(b"\x02" * 32, wire.COMPRESSION_ZSTD, 1000, bomb),
        )
        assert r.status_code == 400
        cases = [
            [
                {"path": "", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 0},
                {"path": "../etc", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 0},
            ],
            [
                {"path": "", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 0},
                {
                    "path": "f",
                    "type": "file",
                    "mode": 0o644,
                    "uid": 0,
                    "gid": 0,
                    "mtime_ns": 0,
                    "size": 4,
                    "ctime_ns": 0,
                    "ino": 1,
                    "chunks": [["ab" * 32, 4]],
                },
            ],
            [
                {"path": "", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 0},
                {"path": "b", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 0},
                {"path": "a", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 0},
            ],
            [
                {"path": "", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 0},
                {
                    "path": "h",
                    "type": "hardlink",
                    "mode": 0o644,
                    "uid": 0,
                    "gid": 0,
                    "mtime_ns": 0,
                    "target": "/etc/shadow",
                },
            ],
        ]
        expected = [
            "not a plain relative path",
            "neither uploaded nor in the base",
            "out of order",
            "outside the tree",
        ]
        for records, why in zip(cases, expected, strict=True):
            body = zstandard.ZstdCompressor().compress(
                b"".join(json.dumps(r).encode() + b"\n" for r in records)
            )
            assert (
                c.post(f"/api/client/sessions/{sid}/records?seq=0", content=body).status_code == 204
            )
            r = c.post(f"/api/client/sessions/{sid}/finish", json={"batches": 1})
            assert r.status_code == 400, r.text
            assert why in r.json()["message"]
        assert c.delete(f"/api/client/sessions/{sid}").status_code == 204


def test_the_pin_refuses_another_certificate(
    server: TlsServer, web1: dict[str, Any], tmp_path: Path, capsys: Any
) -> None:
    wrong = "AB:" * 31 + "CD"
    code, _, err = run_client(
        tmp_path / "c.json",
        "enroll",
        "--server",
        server.url,
        "--fingerprint",
        wrong,
        "--token",
        "apl_x",
        capsys=capsys,
    )
    assert code == 1 and "refusing to send anything" in err
    # A configuration pinned to another appliance's certificate: no request is made.
    other = json.loads(web1["config"].read_text())
    with tls_server(tmp_path / "other", free_port()) as stranger:
        other["cert_pem"] = stranger.settings.cert_path.read_text()
    config = tmp_path / "pinned-elsewhere.json"
    config.write_text(json.dumps(other))
    tree = tmp_path / "t"
    tree.mkdir()
    code, _, err = run_client(config, "backup", str(tree), "--asset", "web1", capsys=capsys)
    assert code == 1 and "no longer presents the pinned certificate" in err


def test_a_restore_started_on_the_page_is_pulled_by_the_host(
    server: TlsServer, web1: dict[str, Any], tmp_path: Path, capsys: Any
) -> None:
    tree = tmp_path / "src"
    make_tree(tree, files=3, size=50_000)
    point = _backup(
        web1["config"], capsys, str(tree), "--asset", "web1", "--state-dir", str(tmp_path / "s")
    )["point"]
    target = tmp_path / "back"
    with server.as_role("operator") as operator:
        r = operator.post(
            "/api/hosts/web1/restores", json={"point": point, "path": "docs", "target": str(target)}
        )
        assert r.status_code == 201, r.text
    code, result, err = run_client(web1["config"], "restore", capsys=capsys)
    assert code == 0, err
    assert result["entries"] >= 4
    assert digest_tree(target / "docs") == digest_tree(tree / "docs")
    code, _, err = run_client(web1["config"], "restore", capsys=capsys)
    assert code == 1 and "no restore is waiting" in err


def test_the_zipapp_downloads_with_the_pinned_key_and_runs_on_its_own(
    server: TlsServer, tmp_path: Path
) -> None:
    added = add_client_host(server, "db1")
    # The install command's download, as the host runs it: curl trusting only the pinned key.
    pin = re.search(r"--pinnedpubkey (sha256//\S+)", added["install_command"])
    assert pin is not None
    pyz = tmp_path / "appliance-client.pyz"
    curl = [
        "curl",
        "-fsS",
        "-k",
        "--pinnedpubkey",
        pin.group(1),
        "-H",
        f"Authorization: Bearer {added['token']}",
        "-o",
        str(pyz),
        f"{server.url}/api/client/appliance-client.pyz",
    ]
    subprocess.run(curl, check=True, timeout=60)
    assert pyz.read_bytes() == Path(build_zipapp(str(tmp_path / "local.pyz"))).read_bytes()
    wrong = [*curl[:4], "sha256//" + "A" * 43 + "=", *curl[5:]]
    assert subprocess.run(wrong, capture_output=True, timeout=60).returncode != 0
    # Run from an empty folder with only the four libraries on the path (not the checkout).
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-I", str(pyz), "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0 and "enroll" in done.stdout, done.stderr


def test_gc_keeps_the_chunks_of_an_open_session(server: TlsServer, web1: dict[str, Any]) -> None:
    """A GC between two batches of a client's upload must not free what the session sent:
    no point references those chunks until the session finishes."""
    token = json.loads(web1["config"].read_text())["token"]
    hello_key = None
    with server.client(headers={"Authorization": f"Bearer {token}"}) as c:
        hello_key = bytes.fromhex(c.get("/api/client/hello").json()["id_key"])
        sid = c.post(
            "/api/client/sessions",
            json={"asset": "web1", "source": "client://web1/gc", "mode": "full"},
        ).json()["session"]
        data = os.urandom(100_000)
        chunk_id = blake3.blake3(data, key=hello_key).digest()
        frame = wire.encode_frame(chunk_id, wire.COMPRESSION_NONE, len(data), data)
        assert c.post(f"/api/client/sessions/{sid}/chunks", content=frame).json()["stored"] == 1
    with server.as_role("admin") as admin:
        job = admin.post("/api/gc", json={"grace_seconds": 0}).json()
        assert wait_job(admin, job["id"])["state"] == "succeeded"
    records = [
        {"path": "", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 0},
        {
            "path": "f",
            "type": "file",
            "mode": 0o644,
            "uid": 0,
            "gid": 0,
            "mtime_ns": 0,
            "size": len(data),
            "ctime_ns": 0,
            "ino": 1,
            "chunks": [[chunk_id.hex(), len(data)]],
        },
    ]
    body = zstandard.ZstdCompressor().compress(
        b"".join(json.dumps(r).encode() + b"\n" for r in records)
    )
    with server.client(headers={"Authorization": f"Bearer {token}"}) as c:
        assert c.post(f"/api/client/sessions/{sid}/records?seq=0", content=body).status_code == 204
        done = c.post(f"/api/client/sessions/{sid}/finish", json={"batches": 1})
        assert done.status_code == 200, done.text
    out = io.BytesIO()
    server.service.app.restore_tar(done.json()["point"], out, subpath="f")
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        member = tar.extractfile("f")
        assert member is not None and member.read() == data


def test_a_full_pool_refuses_a_batch_and_the_backup_resumes_when_there_is_room(
    server: TlsServer, web1: dict[str, Any], tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    from appliance import space

    tree = tmp_path / "bulk"
    tree.mkdir()
    for n in range(3):
        (tree / f"f{n}.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    state = str(tmp_path / "state")
    real = space.filesystem_space
    calls = {"n": 0}

    def filling_up(path: str) -> tuple[int, int]:
        calls["n"] += 1
        free, total = real(path)
        return (free, total) if calls["n"] == 1 else (0, total)  # room to open, none after

    monkeypatch.setattr(space, "filesystem_space", filling_up)
    code, _, err = run_client(
        web1["config"], "backup", "--quiet", str(tree), "--state-dir", state, capsys=capsys
    )
    assert code == 1 and "pool default is full" in err and "nothing was written" in err, err
    assert calls["n"] >= 2
    monkeypatch.setattr(space, "filesystem_space", real)
    result = _backup(web1["config"], capsys, str(tree), "--state-dir", state)
    restored = _restored(server, result["point"], tmp_path / "r")
    assert digest_tree(restored) == digest_tree(tree)
