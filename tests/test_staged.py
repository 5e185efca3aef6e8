"""Objects written in pieces (``appliance.store.staged``) and the peer's uploads built on them
(``api.replica_store.ReplicaStore.begin``/``commit``): nothing is visible under its name before
it is published, and nothing is left of an upload that was refused or dropped."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import blake3
import pytest

from api.replica_store import ChecksumMismatch, NameMismatch, ObjectExists, ReplicaStore
from appliance.errors import InvalidInput, LocationUnavailable
from appliance.store.backend import LocalDirectoryBackend

STORE_ID = "ab" * 8


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_staged_object_appears_whole_on_publish(tmp_path: Path) -> None:
    backend = LocalDirectoryBackend(str(tmp_path / "store"))
    with backend.stage("data/ab/cd") as staged:
        staged.write(b"first ")
        staged.write(memoryview(b"second"))
        with pytest.raises(Exception):  # noqa: B017 - any error: the name is not there yet
            backend.get("data/ab/cd")
        assert staged.size == 12
        staged.publish()
    assert backend.get("data/ab/cd") == b"first second"
    assert _files(tmp_path / "store") == ["data/ab/cd"]  # no temporary file left
    assert (tmp_path / "store" / "data" / "ab" / "cd").stat().st_mode & 0o777 == 0o600


def test_a_staged_object_left_unpublished_leaves_nothing(tmp_path: Path) -> None:
    backend = LocalDirectoryBackend(str(tmp_path / "store"))
    backend.put("config", b"old")
    with pytest.raises(RuntimeError), backend.stage("config") as staged:
        staged.write(b"new bytes")
        staged.finish()
        raise RuntimeError("the upload broke")
    assert backend.get("config") == b"old"
    assert _files(tmp_path / "store") == ["config"]
    staged.abort()  # harmless when done


def test_staging_on_a_missing_required_root_is_unavailable(tmp_path: Path) -> None:
    backend = LocalDirectoryBackend(str(tmp_path / "gone"), require_root=True)
    with pytest.raises(LocationUnavailable):
        backend.stage("config")
    assert not (tmp_path / "gone").exists()


def _pack(size: int = 300_000) -> tuple[str, bytes]:
    data = os.urandom(size)
    digest = blake3.blake3(data).hexdigest()
    return f"data/{digest[:2]}/{digest}", data


def test_an_upload_is_checked_before_it_is_visible(tmp_path: Path) -> None:
    store = ReplicaStore(str(tmp_path), STORE_ID)
    store.create()
    name, data = _pack()
    # Written in pieces, hashed on the way; published by commit.
    upload = store.begin(name, len(data), None)
    with upload:
        for start in range(0, len(data), 65536):
            upload.write(data[start : start + 65536])
        with pytest.raises(Exception):  # noqa: B017
            store.size(name)
        assert store.commit(upload) is True
    assert Path(store.path(name)).read_bytes() == data
    # The same bytes again: not written, nothing left over.
    assert store.put(name, data, hashlib.sha256(data).hexdigest()) is False
    # Bytes that do not hash to the name, a wrong checksum, a manifest without one, a clash:
    # each refused, and not one temporary file stays.
    other, _ = _pack()
    with pytest.raises(NameMismatch):
        store.put(other, data, None)
    with pytest.raises(ChecksumMismatch):
        store.put(other, data, "0" * 64)
    with pytest.raises(ChecksumMismatch):
        store.begin("manifests/0011223344556677", 10, None)
    manifest = "manifests/0011223344556677"
    assert store.put(manifest, b"first", hashlib.sha256(b"first").hexdigest()) is True
    with pytest.raises(ObjectExists):
        store.put(manifest, b"second", hashlib.sha256(b"second").hexdigest())
    with pytest.raises(InvalidInput, match="too large"):
        store.begin("location.json", 10_000, hashlib.sha256(b"x").hexdigest())
    assert _files(Path(store.root)) == sorted([name, manifest])
    assert Path(store.path(manifest)).read_bytes() == b"first"


def test_write_many_writes_the_pieces_in_order_across_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pieces = [os.urandom(n) for n in (1, 70_000, 0, 5, 300_000, 2)] + [b"x"] * 1500
    real_writev = os.writev

    def short_writev(fd: int, buffers: list[memoryview]) -> int:
        # At most 1024 buffers a call (IOV_MAX) and never more than 50 000 bytes at once, so
        # a piece is cut in the middle and the rest must follow in order.
        assert len(buffers) <= 1024
        budget, taken = 50_000, []
        for view in buffers:
            if budget <= 0:
                break
            taken.append(view[:budget])
            budget -= len(taken[-1])
        return real_writev(fd, taken)

    monkeypatch.setattr(os, "writev", short_writev)
    backend = LocalDirectoryBackend(str(tmp_path / "store"))
    with backend.stage("data/ab/cd") as staged:
        staged.write_many(pieces)
        assert staged.size == sum(len(p) for p in pieces)
        staged.publish()
    assert backend.get("data/ab/cd") == b"".join(pieces)


def test_a_pack_folder_is_synced_before_anything_that_refers_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ReplicaStore(str(tmp_path), STORE_ID)
    store.create()
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            synced.append(os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), store.root))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    packs = [_pack(1000) for _ in range(3)]
    for name, data in packs:
        assert store.put(name, [data[:10], data[10:]], None) is True
    # The packs' bytes are on the disk and readable, their folders not synced yet (only the
    # folders above them, when they were made).
    assert all(Path(store.path(n)).read_bytes() == d for n, d in packs)
    folders = {n.rsplit("/", 1)[0] for n, _ in packs}
    assert not folders & set(synced)
    synced.clear()
    manifest = "manifests/0011223344556677"
    assert store.put(manifest, b"m", hashlib.sha256(b"m").hexdigest()) is True
    # Each pack folder once, before the manifest's name is made durable (its folder's fsync).
    assert synced[-1] == "manifests"
    assert sorted(f for f in synced[:-1] if f.startswith("data/")) == sorted(folders)
    # Nothing left to sync: a point summary syncs no folder again.
    synced.clear()
    store.put_summary("0011223344556677", {"asset": "a"})
    assert [f for f in synced if f in folders] == []
