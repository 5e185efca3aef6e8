"""Fault injection: damaged stores, hostile manifests, full disks, vanishing sources, locks and
kill -9.

Every case ends in three checks: the error names what is wrong; the store still verifies (or, when
the damage is the point of the case, verify names the damaged object and exactly the points it
affects); and every recovery point made before the fault still restores byte-exact.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import appliance.backup.files as files_mod
from appliance.backup.tree import TreeWriter
from appliance.engine import Appliance
from appliance.errors import (
    IntegrityError,
    LockHeld,
    ObjectMissing,
    SourceError,
    StoreFull,
    UnsafeRestorePath,
    WrongPassphrase,
)
from appliance.maintenance import collect_garbage, verify_point, verify_store
from appliance.point_packs import point_blobs
from appliance.points import new_manifest, new_point_id, record_from_manifest
from appliance.store import format as fmt
from appliance.store.backend import LocalDirectoryBackend
from appliance.store.crypto import unwrap_key
from appliance.store.packs import pack_object_name
from appliance.store.repository import Repository

PASSPHRASE = "correct horse battery staple"
APPLIANCE_BIN = Path(sys.executable).with_name("appliance")

Digest = dict[str, tuple[Any, ...]]


# --- environment and helpers ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _weak_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_TEST_WEAK_KDF", "1")
    for name in ("APPLIANCE_CATALOG_URL", "APPLIANCE_RECOVERY_KEY", "APPLIANCE_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)


def cli_env(passphrase: str = PASSPHRASE) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("APPLIANCE_CATALOG_URL", "APPLIANCE_RECOVERY_KEY", "APPLIANCE_DATA_DIR")
    }
    env.update(APPLIANCE_TEST_WEAK_KDF="1", APPLIANCE_PASSPHRASE=passphrase)
    return env


def cli(
    data_dir: Path, *args: str, passphrase: str = PASSPHRASE, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    assert APPLIANCE_BIN.exists(), f"{APPLIANCE_BIN} is missing: install the package in the venv"
    return subprocess.run(
        [str(APPLIANCE_BIN), "--data-dir", str(data_dir), *args],
        env=cli_env(passphrase),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def new_app(tmp_path: Path, **store_config: Any) -> Appliance:
    app, _recovery = Appliance.init(str(tmp_path / "data"), PASSPHRASE, **store_config)
    return app


def reopen(app: Appliance) -> Appliance:
    """A fresh process's view of the data directory (no cached descriptors or connections)."""
    path = app.data_dir.path
    app.close()
    return Appliance.open(path, passphrase=PASSPHRASE)


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def digest(root: Path) -> Digest:
    """Everything a restore must reproduce: type, mode, contents (hashed) and link targets."""
    out: Digest = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    sha = hashlib.file_digest(f, "sha256").hexdigest()
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, sha)
            else:
                out[rel] = ("other", stat.S_IFMT(st.st_mode))
    return out


def restored(app: Appliance, point_id: str, target: Path) -> Digest:
    if target.exists():
        shutil.rmtree(target)
    app.restore(point_id, str(target), workers=2)
    return digest(target)


def assert_restores(app: Appliance, expected: dict[str, Digest], scratch: Path) -> None:
    for point_id, want in expected.items():
        got = restored(app, point_id, scratch / f"restore-{point_id}")
        assert got == want, f"point {point_id} does not restore byte-exact"
        shutil.rmtree(scratch / f"restore-{point_id}")


def assert_verifies(app: Appliance) -> None:
    report = verify_store(app.repo)
    assert report.ok, f"verify found damage: {report.to_dict()}"


def blob_points(app: Appliance) -> dict[str, set[bytes]]:
    """point ID -> every blob ID it needs."""
    return {
        pid: set(point_blobs(app.repo, app.repo.get_manifest(pid)))
        for pid in app.repo.manifest_ids()
    }


def store_objects(app: Appliance) -> set[str]:
    return {info.name for info in app.repo.backend.list("")}


def flip_byte(path: str | Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        assert byte, f"offset {offset} is past the end of {path}"
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


def random_files(prefix: str, count: int, size: int) -> dict[str, bytes]:
    return {f"{prefix}{i}.bin": os.urandom(size) for i in range(count)}


def three_points(app: Appliance, tmp_path: Path) -> tuple[list[str], dict[str, Digest]]:
    """alpha (p1), beta (p2), alpha again with one more file (p3). One worker, so each backup's
    new data lands in its own data pack and its tree in its own meta pack."""
    src_a, src_b = tmp_path / "src-a", tmp_path / "src-b"
    write_files(src_a, random_files("sub/a", 4, 40_000) | {"notes.txt": b"alpha\n" * 500})
    write_files(src_b, random_files("b", 4, 40_000))
    expected: dict[str, Digest] = {}
    ids = []
    for src, asset in ((src_a, "alpha"), (src_b, "beta"), (src_a, "alpha")):
        if len(ids) == 2:
            write_files(src_a, random_files("sub/new", 1, 40_000))
        point = app.backup_files(str(src), asset, workers=1).point
        expected[point.id] = digest(src)
        ids.append(point.id)
    return ids, expected


# --- 1. wrong passphrase ------------------------------------------------------------------------------


def test_wrong_passphrase(tmp_path: Path) -> None:
    app = new_app(tmp_path)
    src = tmp_path / "src"
    write_files(src, {"a.txt": b"hello\n"})
    point = app.backup_files(str(src), "alpha").point
    data_dir = Path(app.data_dir.path)
    app.close()

    with pytest.raises(WrongPassphrase, match="does not unlock any key"):
        Appliance.open(str(data_dir), passphrase="wrong " + PASSPHRASE)

    result = cli(data_dir, "points", passphrase="not the passphrase")
    assert result.returncode == 2, result
    assert "error [wrong_passphrase]" in result.stderr, result.stderr

    # A well-formed recovery key of another store is a wrong key too, not "damaged data".
    other, other_recovery = Appliance.init(str(tmp_path / "other"), PASSPHRASE)
    other.close()
    with pytest.raises(WrongPassphrase):
        Appliance.open(str(data_dir), recovery_key=other_recovery)

    with Appliance.open(str(data_dir), passphrase=PASSPHRASE) as app:
        assert_verifies(app)
        assert restored(app, point.id, tmp_path / "out") == digest(src)


# --- 2. damaged packs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pack_kind", ["data", "meta"])
@pytest.mark.parametrize("damage", ["truncate", "bitflip", "missing"])
def test_damaged_pack(tmp_path: Path, damage: str, pack_kind: str) -> None:
    app = new_app(tmp_path)
    ids, expected = three_points(app, tmp_path)
    p1 = ids[0]
    needs = blob_points(app)
    manifest1 = app.repo.get_manifest(p1)
    if pack_kind == "data":
        # A chunk of alpha's first files: used by p1 and p3, not by beta's p2.
        victim_blob = next(b for b in needs[p1] if app.repo.locate(b).blob_type == fmt.BLOB_DATA)
    else:
        victim_blob = bytes.fromhex(manifest1["tree"][0])  # p1's tree slice
    pack = app.repo.locate(victim_blob).pack
    kind = fmt.PACK_KIND_DATA if pack_kind == "data" else fmt.PACK_KIND_META
    entries = app.repo.index.pack_entries(pack)
    path = app.repo.backend.path(pack_object_name(pack, kind))  # type: ignore[attr-defined]
    app.close()

    if damage == "missing":
        os.unlink(path)
        damaged_blobs = {e.blob_id for e in entries}
    elif damage == "truncate":
        last = entries[-1]
        os.truncate(path, last.offset + last.length // 2)
        damaged_blobs = {last.blob_id}
    else:
        target = next(e for e in entries if e.blob_id == victim_blob)
        flip_byte(path, target.offset + target.length // 2)
        damaged_blobs = {victim_blob}
    affected = {pid for pid, blobs in needs.items() if blobs & damaged_blobs}
    assert affected and affected != set(ids), "the damage must hit some points, not all"

    app = Appliance.open(str(tmp_path / "data"), passphrase=PASSPHRASE)
    report = verify_store(app.repo)
    assert not report.ok
    assert [d["pack"] for d in report.damaged_packs] == [pack.hex()], report.damaged_packs
    error = report.damaged_packs[0]["error"]
    assert {
        "missing": "missing",
        "truncate": "truncated",
        "bitflip": "does not match its name",
    }[damage] in error, error
    assert set(report.affected_points) == affected, report.affected_points

    for pid in ids:
        single = verify_point(app.repo, pid)
        assert single.ok == (pid not in affected), (pid, single.to_dict())

    names = {b.hex()[:16] for b in damaged_blobs}
    for pid in sorted(affected):
        with pytest.raises((IntegrityError, ObjectMissing)) as caught:
            restored(app, pid, tmp_path / "bad")
        message = str(caught.value)
        assert any(n in message for n in names), f"{message!r} names none of {names}"
        if damage != "bitflip":
            assert pack.hex()[:16] in message, f"{message!r} does not name the pack"
    assert_restores(app, {p: expected[p] for p in ids if p not in affected}, tmp_path)
    app.close()


def test_damaged_pack_cli_verify(tmp_path: Path) -> None:
    app = new_app(tmp_path)
    ids, _expected = three_points(app, tmp_path)
    blob = bytes.fromhex(app.repo.get_manifest(ids[1])["tree"][0])
    entry = app.repo.locate(blob)
    os.unlink(app.repo.backend.path(pack_object_name(entry.pack, entry.pack_kind)))  # type: ignore[attr-defined]
    app.close()
    result = cli(tmp_path / "data", "verify")
    assert result.returncode == 1, result
    assert f"DAMAGED pack {entry.pack.hex()[:16]}" in result.stdout, result.stdout
    assert f"AFFECTED point {ids[1]}" in result.stdout, result.stdout
    assert f"AFFECTED point {ids[0]}" not in result.stdout
    assert "DAMAGE FOUND" in result.stdout


# --- 3. damaged index files -------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_damaged_index_file(tmp_path: Path, damage: str) -> None:
    app = new_app(tmp_path)
    _ids, expected = three_points(app, tmp_path)
    index_files = sorted(info.name for info in app.repo.backend.list("index/"))
    assert len(index_files) >= 3
    victim = index_files[0]
    path = app.repo.backend.path(victim)  # type: ignore[attr-defined]
    size = os.path.getsize(path)
    if damage == "truncate":
        os.truncate(path, size - 7)
    else:
        flip_byte(path, size // 2)

    # A full verify reads the index files too, although the local cache still has this one.
    report = verify_store(app.repo)
    assert not report.ok, "verify did not notice a damaged index file"
    assert victim in json.dumps(report.to_dict()), report.to_dict()

    # A process whose cache lacks the file fails to sync, naming it.
    app.repo.index.forget_index_file(victim)
    with pytest.raises(IntegrityError, match=victim):
        app.repo.sync_index()
    data_dir, cache = app.data_dir.path, app.data_dir.cache_path
    app.close()

    # Without the local cache the store cannot be opened ...
    shutil.rmtree(cache)
    with pytest.raises(IntegrityError, match=f"index file {victim}.*damaged"):
        Appliance.open(data_dir, passphrase=PASSPHRASE)

    # ... until the index is rebuilt from the packs.
    backend = LocalDirectoryBackend(os.path.join(data_dir, "pools", "default", "store"))
    config = Repository.read_config(backend)
    key_file = next(iter(backend.list("keys/"))).name
    key = unwrap_key(backend.get(key_file), PASSPHRASE, config.store_id)
    repo = Repository(backend, config, key, cache)
    packs, blobs = repo.rebuild_index()
    assert packs >= 6 and blobs > 0
    assert victim not in {info.name for info in backend.list("index/")}
    repo.close()

    with Appliance.open(data_dir, passphrase=PASSPHRASE) as app:
        assert_verifies(app)
        assert_restores(app, expected, tmp_path)


# --- 4. damaged manifests ------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_damaged_manifest(tmp_path: Path, damage: str) -> None:
    app = new_app(tmp_path)
    ids, expected = three_points(app, tmp_path)
    p1, p2, p3 = ids
    path = app.repo.backend.path(f"manifests/{p2}")  # type: ignore[attr-defined]
    size = os.path.getsize(path)
    if damage == "truncate":
        os.truncate(path, size // 2)
    else:
        flip_byte(path, size - 20)
    app = reopen(app)

    with pytest.raises(IntegrityError, match=f"manifest of point {p2}"):
        app.repo.get_manifest(p2)
    with pytest.raises(IntegrityError, match=p2):
        app.restore(p2, str(tmp_path / "bad"))

    report = verify_store(app.repo)
    assert set(report.affected_points) == {p2}, report.affected_points
    assert "unreadable" in report.affected_points[p2][0]
    assert not report.damaged_packs

    # GC must not delete anything while a manifest is unreadable (it cannot know what is live).
    before = store_objects(app)
    with pytest.raises(IntegrityError, match=p2):
        collect_garbage(app.repo, grace_seconds=0)
    assert store_objects(app) == before

    result = app.rebuild_catalog()
    assert result["damaged"] == 1 and result["points"] == 2, result
    assert result["damaged_points"] == [p2], result
    assert {p.id for p in app.catalog.list_points()} == {p1, p3}
    assert_restores(app, {p1: expected[p1], p3: expected[p3]}, tmp_path)
    app.close()


# --- 5. full disk -------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(tmp_path: Path, size_mib: int = 64) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("the full-disk test needs root (loop device, mkfs, mount); run it as root")
    image = tmp_path / "pool.img"
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(image)], check=True)
    device = subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mounted = False
    try:
        subprocess.run(["mount", device, str(mountpoint)], check=True)
        mounted = True
        yield mountpoint
    finally:
        if mounted:
            subprocess.run(["umount", str(mountpoint)], check=True)
        subprocess.run(["losetup", "-d", device], check=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.root
def test_full_disk_during_backup(tmp_path: Path) -> None:
    with small_filesystem(tmp_path) as mnt:
        app, _ = Appliance.init(str(mnt / "data"), PASSPHRASE)
        try:
            small = mnt / "small"
            write_files(small, random_files("s", 4, 250_000))
            first = app.backup_files(str(small), "small").point
            expected = {first.id: digest(small)}

            big = mnt / "big"
            big_size = free_bytes(mnt) * 6 // 10  # the source takes 60 %: the rest cannot hold it
            write_files(big, random_files("f", big_size // (2 << 20) + 1, 2 << 20))
            assert sum(f.stat().st_size for f in big.iterdir()) > free_bytes(mnt)
            with pytest.raises(StoreFull, match=r"no space left on .* while writing"):
                app.backup_files(str(big), "big", workers=1)
            assert app.catalog.list_points(asset="big") == []
            assert app.repo.manifest_ids() == [first.id]
            leftovers = [p for p in mnt.rglob("*") if ".tmp-" in p.name]
            assert leftovers == [], f"partial objects left behind: {leftovers}"

            assert_verifies(app)
            assert_restores(app, expected, tmp_path)

            shutil.rmtree(big)
            write_files(small, random_files("more", 2, 300_000))
            second = app.backup_files(str(small), "small").point
            expected[second.id] = digest(small)
            report = collect_garbage(app.repo, grace_seconds=0)
            assert report.packs_orphaned_deleted > 0, report.to_dict()
            assert_verifies(app)
            assert_restores(app, expected, tmp_path)
        finally:
            app.close()


# --- 6. sources that disappear or change ---------------------------------------------------------------


def test_source_root_missing(tmp_path: Path) -> None:
    app = new_app(tmp_path)
    src = tmp_path / "src"
    write_files(src, {"a.txt": b"a\n"})
    first = app.backup_files(str(src), "alpha").point
    expected = {first.id: digest(src)}
    shutil.rmtree(src)
    with pytest.raises(SourceError, match=f"cannot read the source {src}"):
        app.backup_files(str(src), "alpha")
    assert [p.id for p in app.catalog.list_points()] == [first.id]
    assert_verifies(app)
    assert_restores(app, expected, tmp_path)
    app.close()


def test_source_root_removed_during_backup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = new_app(tmp_path)
    src = tmp_path / "src"
    write_files(src, random_files("d/f", 20, 10_000))
    original = files_mod.walk

    def walk(root: str, warnings: Any) -> Iterator[tuple[str, os.stat_result]]:
        for i, item in enumerate(original(root, warnings)):
            if i == 5:
                shutil.rmtree(root)
            yield item

    monkeypatch.setattr(files_mod, "walk", walk)
    with pytest.raises(SourceError, match="disappeared during the backup"):
        app.backup_files(str(src), "alpha")
    assert app.repo.manifest_ids() == []
    assert_verifies(app)
    app.close()


@pytest.mark.timeout(60)
def test_files_vanish_during_backup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = new_app(tmp_path)
    src = tmp_path / "src"
    write_files(src, {f"d{i % 4}/f{i:03}.txt": f"file {i}\n".encode() * 300 for i in range(120)})
    first = app.backup_files(str(src), "alpha").point
    expected = {first.id: digest(src)}
    for i in range(0, 120, 3):  # changed, so they are read again
        (src / f"d{i % 4}/f{i:03}.txt").write_bytes(os.urandom(5000))

    # Only files that must be read (changed ones) can vanish before their read.
    gone_files = {"d0/f000.txt", "d1/f021.txt", "d2/f030.txt", "d3/f063.txt", "d2/f054.txt"}
    gone_dir = "d3"
    gone_dir_mode = stat.S_IMODE((src / gone_dir).stat().st_mode)
    fifo = "d1/f009.txt"  # replaced by a FIFO after the walk saw a regular file
    original = files_mod.walk

    def walk(root: str, warnings: Any) -> Iterator[tuple[str, os.stat_result]]:
        # Delete between the walk (which has seen the entry) and the worker's read.
        for rel, st in original(root, warnings):
            if rel in gone_files:
                os.unlink(os.path.join(root, rel))
            elif rel == gone_dir:
                shutil.rmtree(os.path.join(root, rel))
            elif rel == fifo:
                os.unlink(os.path.join(root, rel))
                os.mkfifo(os.path.join(root, rel))
            yield rel, st

    monkeypatch.setattr(files_mod, "walk", walk)
    outcome = app.backup_files(str(src), "alpha", workers=2)
    messages = {w["path"]: w["message"] for w in outcome.warnings}
    for rel in gone_files - {"d3/f063.txt"}:  # d3's files were never listed
        assert messages.get(rel) == "vanished during the backup", messages
    assert messages.get(gone_dir) == "directory vanished during the backup", messages
    assert "non-regular" in messages.get(fifo, ""), messages
    assert len(messages) == len(gone_files) - 1 + 2, messages

    os.unlink(src / fifo)
    got = restored(app, outcome.point.id, tmp_path / "out")
    want = digest(src) | {gone_dir: ("dir", gone_dir_mode)}
    assert got == want
    assert_verifies(app)
    assert_restores(app, expected, tmp_path)
    app.close()


def test_file_changing_during_read(tmp_path: Path) -> None:
    app = new_app(tmp_path)
    src = tmp_path / "src"
    write_files(src, {"quiet.txt": b"quiet\n" * 1000, "grow.log": os.urandom(6 << 20)})
    first = app.backup_files(str(src), "alpha").point
    expected = {first.id: digest(src)}
    initial = (src / "grow.log").stat().st_size
    stop = threading.Event()

    def writer() -> None:
        with open(src / "grow.log", "ab", buffering=0) as f:
            while not stop.is_set():
                f.write(b"appended line\n" * 100)
                time.sleep(0.0005)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        outcome = app.backup_files(str(src), "alpha", mode="full", workers=1)
    finally:
        stop.set()
        thread.join()
    assert {"path": "grow.log", "message": "changed while being read; stored as last read"} in (
        outcome.warnings
    ), outcome.warnings
    assert outcome.point.warning_count == 1
    out = tmp_path / "out"
    app.restore(outcome.point.id, str(out))
    got = (out / "grow.log").read_bytes()
    final = (src / "grow.log").read_bytes()
    assert initial <= len(got) <= len(final) and final.startswith(got)
    assert (out / "quiet.txt").read_bytes() == b"quiet\n" * 1000
    assert_verifies(app)
    assert_restores(app, expected, tmp_path)
    app.close()


# --- 7. hostile manifests --------------------------------------------------------------------------------


def plant_point(app: Appliance, records: list[dict[str, Any]]) -> str:
    """Store a point whose tree holds exactly ``records`` (file records get real data)."""
    writer = app.repo.writer()
    blob = writer.put(fmt.BLOB_DATA, b"planted by a hostile manifest\n")
    tree = TreeWriter(writer)
    for record in records:
        if record.get("type") == "file":
            record = {"chunks": [[blob.hex(), 30]], "size": 30, **record}
        tree.add({"mode": 0o644, "uid": 0, "gid": 0, "mtime_ns": 0, **record})
    tree_ids = tree.finish()
    app.repo.commit_index(writer.flush())
    created = datetime.now(UTC)
    point_id = new_point_id(created)
    manifest = new_manifest(
        point_id=point_id,
        asset="hostile",
        kind="files",
        mode="full",
        created=created,
        parent=None,
        base_full=None,
        store_id=app.repo.store_id,
        source="/hostile",
    )
    manifest.update(tree=tree_ids, stats={}, warnings=[], warning_count=0)
    app.repo.put_manifest(point_id, manifest)
    app.catalog.add_point(record_from_manifest(manifest), app.repo.store_id)
    return point_id


def _dir(path: str) -> dict[str, Any]:
    return {"path": path, "type": "dir", "mode": 0o755}


def _file(path: str) -> dict[str, Any]:
    return {"path": path, "type": "file"}


#: case -> (records given the outside directory, text the error must contain)
HOSTILE: dict[str, tuple[Callable[[Path], list[dict[str, Any]]], str]] = {
    "absolute": (lambda out: [_dir(""), _file(str(out / "abs-evil"))], "abs-evil"),
    "dotdot": (lambda out: [_dir(""), _file("../escape")], "../escape"),
    "nested-dotdot": (lambda out: [_dir(""), _dir("a"), _file("a/../../x")], "a/../../x"),
    "device": (lambda out: [_dir(""), {"path": "dev", "type": "char", "rdev": 259}], "'dev'"),
    "symlink-then-file": (
        lambda out: [
            _dir(""),
            {"path": "link", "type": "symlink", "target": str(out)},
            _file("link/evil"),
        ],
        "link/evil",
    ),
    "symlink-then-dir": (
        lambda out: [
            _dir(""),
            {"path": "link", "type": "symlink", "target": str(out)},
            _dir("link/sub"),
        ],
        "link/sub",
    ),
    "dir-then-symlink": (
        lambda out: [
            _dir(""),
            _dir("link"),
            _file("link/evil"),
            {"path": "link", "type": "symlink", "target": str(out)},
        ],
        "'link'",
    ),
    "hardlink-dotdot": (
        lambda out: [_dir(""), {"path": "hl", "type": "hardlink", "target": "../../etc/passwd"}],
        "../../etc/passwd",
    ),
    "hardlink-through-symlink": (
        lambda out: [
            _dir(""),
            {"path": "d", "type": "symlink", "target": str(out)},
            {"path": "hl", "type": "hardlink", "target": "d/secret"},
        ],
        "d/secret",
    ),
    "hardlink-to-symlink": (
        lambda out: [
            _dir(""),
            {"path": "s", "type": "symlink", "target": str(out / "secret")},
            {"path": "hl", "type": "hardlink", "target": "s"},
        ],
        "'hl'",
    ),
}
TAR_REFUSES = {"absolute", "dotdot", "nested-dotdot", "device", "hardlink-dotdot"}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_manifest(tmp_path: Path, case: str) -> None:
    app = new_app(tmp_path)
    src = tmp_path / "src"
    write_files(src, {"ok.txt": b"fine\n"})
    honest = app.backup_files(str(src), "honest").point
    expected = {honest.id: digest(src)}

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret\n")
    work = tmp_path / "work"
    target = work / "deep" / "target"
    target.mkdir(parents=True)
    records, needle = HOSTILE[case]
    point_id = plant_point(app, records(outside))
    passwd_links = os.stat("/etc/passwd").st_nlink
    before = digest(work), digest(outside)

    with pytest.raises(UnsafeRestorePath) as caught:
        app.restore(point_id, str(target))
    assert needle in str(caught.value), f"{caught.value} does not name the entry ({needle})"

    around = {k: v for k, v in digest(work).items() if not k.startswith("deep/target/")}
    assert (around, digest(outside)) == before, "the restore wrote outside its target"
    assert os.stat("/etc/passwd").st_nlink == passwd_links

    if case in TAR_REFUSES:
        with pytest.raises(UnsafeRestorePath):
            app.restore_tar(point_id, io.BytesIO())
    assert_restores(app, expected, tmp_path / "restores")
    app.close()


# --- 8. locks ----------------------------------------------------------------------------------------------

LOCK_HOLDER = textwrap.dedent(
    """
    import contextlib
    import sys

    from appliance.store.repository import StoreLocks

    locks = StoreLocks(sys.argv[1], sys.argv[2])
    what = sys.argv[3]
    with contextlib.ExitStack() as stack:
        if what == "exclusive":  # what GC and prune hold
            stack.enter_context(locks.exclusive())
        else:  # what a running backup of asset `what` holds
            stack.enter_context(locks.shared())
            stack.enter_context(locks.asset(what))
        print("held", flush=True)
        sys.stdin.read()
    """
)


@contextlib.contextmanager
def lock_held_elsewhere(app: Appliance, what: str) -> Iterator[None]:
    """Another process holds what a running backup (``what`` = asset) or GC holds."""
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, app.data_dir.lock_path, app.repo.store_id, what],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)


def test_locks(tmp_path: Path) -> None:
    app = new_app(tmp_path)
    src = tmp_path / "src"
    write_files(src, random_files("f", 3, 10_000))
    first = app.backup_files(str(src), "alpha").point
    expected = {first.id: digest(src)}

    with lock_held_elsewhere(app, "alpha"):
        with pytest.raises(LockHeld, match="a backup of asset 'alpha' is already running"):
            app.backup_files(str(src), "alpha")
        other = app.backup_files(str(src), "beta").point  # another asset runs side by side
        expected[other.id] = digest(src)
        with pytest.raises(LockHeld, match="in use by a running backup"), app.locks.exclusive():
            collect_garbage(app.repo, grace_seconds=0)
        result = cli(Path(app.data_dir.path), "gc", "--grace", "0")
        assert result.returncode == 2 and "error [lock_held]" in result.stderr, result

    with (
        lock_held_elsewhere(app, "exclusive"),
        pytest.raises(LockHeld, match="locked by maintenance"),
    ):
        app.backup_files(str(src), "gamma")

    assert {p.id for p in app.catalog.list_points()} == set(expected)
    third = app.backup_files(str(src), "alpha").point  # the lock is gone with its holder
    expected[third.id] = digest(src)
    with app.locks.exclusive():
        collect_garbage(app.repo, grace_seconds=0)
    assert_verifies(app)
    assert_restores(app, expected, tmp_path)
    app.close()


# --- 9. kill -9 during backups ------------------------------------------------------------------------------


def make_tree(root: Path, rng: random.Random) -> None:
    for i in range(320):
        folder = root / f"dir{i % 9}" / f"sub{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        if i % 2:
            (folder / f"blob{i}.bin").write_bytes(os.urandom(rng.randint(60_000, 340_000)))
        else:
            lines = rng.randint(300, 2400)
            text = "".join(f"{i} line {n}: {rng.random():.12f} lorem ipsum\n" for n in range(lines))
            (folder / f"text{i}.txt").write_text(text)
    (root / "dir0" / "link").symlink_to("sub0")
    os.link(root / "dir1" / "sub1" / "blob1.bin", root / "dir1" / "hardlink.bin")


def mutate_tree(root: Path, rng: random.Random, round_: int) -> None:
    blobs = sorted(root.rglob("blob*.bin"))
    for path in rng.sample(blobs, 50):  # ~10 MiB of new data: many 1 MiB packs to write
        path.write_bytes(os.urandom(rng.randint(60_000, 340_000)))
    for path in rng.sample(sorted(root.rglob("text*.txt")), 10):
        with open(path, "a") as f:
            f.write(f"round {round_}\n" * 50)
    (root / f"dir{round_ % 9}" / f"new{round_}.bin").write_bytes(os.urandom(200_000))
    victim = rng.choice(sorted(root.rglob("text*.txt")))
    victim.unlink()


def wait_for_locks(app: Appliance, asset: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            with app.locks.exclusive(), app.locks.asset(asset):
                return
        except LockHeld:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def orphan_packs(app: Appliance) -> set[str]:
    indexed = {pack_object_name(pack, kind) for pack, kind in app.repo.index.packs()}
    on_disk = {info.name for p in ("data/", "meta/") for info in app.repo.backend.list(p)}
    return on_disk - indexed


@pytest.mark.timeout(300)
def test_kill_9_during_backup(tmp_path: Path) -> None:
    rng = random.Random(1234)
    data_dir = tmp_path / "data"
    app = new_app(tmp_path, pack_size=1 << 20)  # small packs: many pack writes to interrupt
    store = Path(app.data_dir.store_path)
    src = tmp_path / "src"
    make_tree(src, rng)
    expected: dict[str, Digest] = {}

    def store_files() -> int:
        return sum(len(names) for _dir, _dirs, names in os.walk(store))

    def run_backup(kill: Callable[[float, float | None], bool]) -> tuple[str, float | None]:
        """Run `appliance backup files`; SIGKILL its process group once ``kill(seconds since
        start, seconds since its first write to the store or None)`` is true."""
        baseline = store_files()
        started = time.monotonic()
        writing: float | None = None
        proc = subprocess.Popen(
            [APPLIANCE_BIN, "--data-dir", data_dir, "backup", "files", src, "--asset", "tree"],
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its worker processes share its process group
        )
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if writing is None and store_files() != baseline:
                    writing = now
                if kill(now - started, None if writing is None else now - writing):
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
                    return "killed", writing and now - writing
                time.sleep(0.003)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # workers left behind, if any
            proc.wait(timeout=30)
            assert proc.stderr is not None
            stderr = proc.stderr.read().decode()
            proc.stderr.close()
        assert proc.returncode == 0, stderr
        return "finished", writing and time.monotonic() - writing

    first = app.backup_files(str(src), "tree").point
    expected[first.id] = digest(src)
    mutate_tree(src, rng, 0)
    _outcome, writing = run_backup(lambda _t, _w: False)
    assert writing is not None
    (second,) = set(app.repo.manifest_ids()) - set(expected)
    expected[second] = digest(src)

    # Kills are timed from the backup's first write to the store (start-up time varies with
    # the load of the machine): one during start-up, the others spread over the writing.
    plans: list[tuple[str, Callable[[float, float | None], bool]]] = [
        ("0.05 s after start", lambda t, _w: t >= 0.05)
    ]
    for k in range(9):
        at = writing * k / 8
        plans.append((f"{at:.2f} s into writing", lambda _t, w, at=at: w is not None and w >= at))
    outcomes = []
    for round_, (label, plan) in enumerate(plans, start=1):
        mutate_tree(src, rng, round_)
        snapshot = digest(src)
        before = set(app.repo.manifest_ids())
        outcome, _ = run_backup(plan)
        wait_for_locks(app, "tree")

        # A killed backup either made its point or left no trace but garbage.
        for point_id in set(app.repo.manifest_ids()) - before:
            expected[point_id] = snapshot
        assert set(app.repo.manifest_ids()) == set(expected)
        report = verify_store(app.repo)
        assert report.ok, f"after a kill {label}: {report.to_dict()}"
        outcomes.append(f"{label}: {outcome}, {len(orphan_packs(app))} orphan packs in all")
        rebuilt = app.rebuild_catalog()
        assert rebuilt["damaged"] == 0 and rebuilt["points"] == len(expected), rebuilt
        assert {p.id for p in app.catalog.list_points()} == set(expected)
        latest = sorted(before)[-1]
        assert restored(app, latest, tmp_path / "out") == expected[latest], label
        point = app.backup_files(str(src), "tree").point
        expected[point.id] = snapshot
        assert restored(app, point.id, tmp_path / "out") == snapshot, label
    print("kills:", "; ".join(outcomes))

    app.close()
    # Whether a kill lands inside a pack write depends on the machine's load; that the kills
    # landed during backups at all does not.
    assert sum(": killed" in o for o in outcomes) >= 5, f"too few kills landed ({outcomes})"
    result = cli(data_dir, "gc", "--grace", "0")
    assert result.returncode == 0, result.stderr
    result = cli(data_dir, "--json", "catalog", "rebuild")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["points"] == len(expected)

    with Appliance.open(str(data_dir), passphrase=PASSPHRASE) as app:
        assert orphan_packs(app) == set()
        assert not [p for p in (data_dir / "pools").rglob("*") if ".tmp-" in p.name]
        assert_verifies(app)
        assert_restores(app, expected, tmp_path)


# --- 10. pre-existing symlinks in the restore target --------------------------------------------------


def test_restore_replaces_symlinks_never_writes_through(tmp_path: Path) -> None:
    app = new_app(tmp_path)
    src = tmp_path / "src"
    write_files(src, {"f.txt": b"restored f\n", "sub/g.txt": b"restored g\n", "h.txt": b"h\n"})
    (src / "dirlink").mkdir()
    point = app.backup_files(str(src), "alpha").point
    want = digest(src)

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"precious\n")
    (outside / "victim2").write_bytes(b"precious too\n")
    target = tmp_path / "target"
    (target / "sub").mkdir(parents=True)
    (target / "f.txt").symlink_to(outside / "victim")
    (target / "sub" / "g.txt").symlink_to(outside / "victim2")
    (target / "h.txt").symlink_to(outside / "dangling")  # O_CREAT would follow it
    before = digest(outside)

    app.restore(point.id, str(target))
    assert digest(target) == want
    assert digest(outside) == before
    assert not (outside / "dangling").exists()

    # A symlink where the point has a directory is refused: its contents would go outside.
    shutil.rmtree(target)
    target.mkdir()
    (target / "dirlink").symlink_to(outside)
    with pytest.raises(UnsafeRestorePath, match="dirlink"):
        app.restore(point.id, str(target))
    assert digest(outside) == before
    assert_verifies(app)
    app.close()
