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
