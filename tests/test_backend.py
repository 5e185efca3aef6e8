"""The backend contract (see ``appliance/store/backend.py``), one suite over every backend.

Each backend is exercised through the same tests; the local-directory backend has a few more for
what only a filesystem can get wrong (temporary files, atomic replacement, descriptors across a
fork).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.errors import IntegrityError, InvalidName, ObjectMissing, StoreError, StoreFull
from appliance.store.backend import Backend, LocalDirectoryBackend, MemoryBackend, check_name

INVALID_NAMES = [
    "",  # empty
    "/abs/name",  # absolute
    "a/../b",  # parent reference
    "..",
    "../escape",
    "Upper",  # uppercase
    "data/Pack",
    "a//b",  # empty segment
    "a/",  # trailing empty segment
    "a b",  # space
    ".hidden",  # segments start with a letter or digit
    "data/ab.tmp-123456",  # reserved for temporary files
    "x" * 513,  # too long
]


@pytest.fixture(params=["local", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    store: LocalDirectoryBackend | MemoryBackend
    if request.param == "local":
        store = LocalDirectoryBackend(str(tmp_path / "store"))
    else:
        store = MemoryBackend()
    yield store
    store.close()


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalDirectoryBackend]:
    store = LocalDirectoryBackend(str(tmp_path / "store"))
    yield store
    store.close()


# --- the contract, for every backend -----------------------------------------------------------


def test_put_get_and_ranged_get(backend: Backend) -> None:
    data = bytes(range(256)) * 40
    backend.put("data/ab/object", data)
    assert backend.get("data/ab/object") == data
    assert backend.get("data/ab/object", 100, 50) == data[100:150]
    assert backend.get("data/ab/object", 0, len(data)) == data
    assert backend.get("data/ab/object", len(data) - 1, 1) == data[-1:]
    assert backend.get("data/ab/object", 10) == data[10:]
    assert backend.get("data/ab/object", 5, 0) == b""
    info = backend.stat("data/ab/object")
    assert (info.name, info.size) == ("data/ab/object", len(data))


def test_put_accepts_bytearray_and_memoryview(backend: Backend) -> None:
    backend.put("one", bytearray(b"abc"))
    backend.put("two", memoryview(b"0123456789")[2:5])
    assert backend.get("one") == b"abc"
    assert backend.get("two") == b"234"


def test_empty_object(backend: Backend) -> None:
    backend.put("empty", b"")
    assert backend.get("empty") == b""
    assert backend.stat("empty").size == 0


def test_get_and_stat_of_missing_object(backend: Backend) -> None:
    with pytest.raises(ObjectMissing) as info:
        backend.get("data/xx/missing")
    assert info.value.code == "object_missing"
    assert info.value.details["name"] == "data/xx/missing"
    with pytest.raises(ObjectMissing):
        backend.get("data/xx/missing", 0, 10)
    with pytest.raises(ObjectMissing):
        backend.stat("data/xx/missing")


@pytest.mark.parametrize(("offset", "length"), [(0, 11), (5, 6), (10, 1), (100, 1)])
def test_range_past_the_end_is_damage(backend: Backend, offset: int, length: int) -> None:
    backend.put("obj", b"0123456789")
    with pytest.raises(IntegrityError):
        backend.get("obj", offset, length)


def test_delete_is_idempotent(backend: Backend) -> None:
    backend.put("keys/k1", b"key")
    backend.delete("keys/k1")
    with pytest.raises(ObjectMissing):
        backend.get("keys/k1")
    backend.delete("keys/k1")  # again: not an error
    backend.delete("keys/never-existed")
    assert [i.name for i in backend.list("keys/")] == []


def test_overwrite_replaces_content(backend: Backend) -> None:
    backend.put("config", b"first version")
    assert backend.get("config", 0, 5) == b"first"  # a cached descriptor must not survive
    backend.put("config", b"second")
    assert backend.get("config") == b"second"
    assert backend.stat("config").size == 6
    assert [i.name for i in backend.list()].count("config") == 1


def test_list_yields_each_object_once(backend: Backend) -> None:
    names = {
        "config",
        "keys/0011",
        "data/00/aa",
        "data/00/bb",
        "data/ff/cc",
        "meta/12/dd",
        "index/ee",
    }
    for name in sorted(names):
        backend.put(name, name.encode())
    everything = [info.name for info in backend.list()]
    assert sorted(everything) == sorted(names)
    data = [info.name for info in backend.list("data/")]
    assert sorted(data) == ["data/00/aa", "data/00/bb", "data/ff/cc"]
    assert sorted(info.name for info in backend.list("data/00/")) == ["data/00/aa", "data/00/bb"]
    sizes = {info.name: info.size for info in backend.list()}
    assert sizes == {name: len(name) for name in names}
    assert list(backend.list("nothing-here/")) == []


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_names_are_refused(backend: Backend, name: str) -> None:
    with pytest.raises(InvalidName):
        check_name(name)
    with pytest.raises(InvalidName):
        backend.put(name, b"x")
    with pytest.raises(InvalidName):
        backend.get(name)
    with pytest.raises(InvalidName):
        backend.delete(name)
    # Nothing was written under any spelling of the name.
    assert list(backend.list()) == []


@pytest.mark.parametrize("name", ["config", "keys/0a1b", "data/ab/" + "c" * 64, "a_b.c-d/e"])
def test_valid_names_are_accepted(backend: Backend, name: str) -> None:
    assert check_name(name) == name
    backend.put(name, b"ok")
    assert backend.get(name) == b"ok"


def test_describe_names_the_location(backend: Backend) -> None:
    assert isinstance(backend.describe(), str) and backend.describe()


# --- local directory ------------------------------------------------------------------------------


def test_local_layout_maps_slashes_to_directories(local: LocalDirectoryBackend) -> None:
    local.put("data/ab/cd", b"pack")
    assert (Path(local.root) / "data" / "ab" / "cd").read_bytes() == b"pack"


def test_local_leftover_temporary_file_is_not_listed(local: LocalDirectoryBackend) -> None:
    local.put("data/ab/real", b"real")
    leftover = Path(local.root) / "data" / "ab" / "partial.tmp-0123456789ab"
    leftover.write_bytes(b"half a pa")
    assert [i.name for i in local.list()] == ["data/ab/real"]
    assert [i.name for i in local.list("data/")] == ["data/ab/real"]
    # ... but maintenance can find it once it is old enough.
    assert list(local.temporary_files(older_than=0)) == []
    assert list(local.temporary_files(older_than=leftover.stat().st_mtime + 1)) == [str(leftover)]


def _failing_write(fail_after: int, error: int) -> object:
    """An os.write that writes ``fail_after`` bytes and then fails with ``error``."""
    real_write = os.write
    state = {"written": 0}

    def write(fd: int, data: bytes | memoryview) -> int:
        if state["written"] >= fail_after:
            raise OSError(error, os.strerror(error))
        n = real_write(fd, bytes(data)[: max(1, fail_after - state["written"])])
        state["written"] += n
        return n

    return write


def _files_under(root: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _s, files in os.walk(root) for f in files
    )


def test_local_put_is_atomic_when_the_write_fails(
    local: LocalDirectoryBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    local.put("data/ab/kept", b"old content")
    with monkeypatch.context() as m:
        m.setattr(os, "write", _failing_write(4, errno.EIO))
        with pytest.raises(StoreError) as info:
            local.put("data/ab/new", b"x" * 100)
        assert not isinstance(info.value, StoreFull)
        with pytest.raises(StoreError):
            local.put("data/ab/kept", b"new content that never lands")
    # No partial object, no temporary file, the old object intact.
    with pytest.raises(ObjectMissing):
        local.get("data/ab/new")
    assert local.get("data/ab/kept") == b"old content"
    assert _files_under(local.root) == ["data/ab/kept"]


def test_local_put_out_of_space_is_store_full(
    local: LocalDirectoryBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as m:
        m.setattr(os, "write", _failing_write(10, errno.ENOSPC))
        with pytest.raises(StoreFull) as info:
            local.put("data/ab/big", b"y" * 1000)
    assert info.value.code == "store_full"
    assert _files_under(local.root) == []


def test_local_put_failure_at_rename_leaves_nothing(
    local: LocalDirectoryBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_replace(src: str, dst: str) -> None:
        raise OSError(errno.EIO, "rename failed")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", no_replace)
        with pytest.raises(StoreError):
            local.put("index/abc", b"index file")
    assert _files_under(local.root) == []


def test_local_fd_cache_is_bounded_and_correct(tmp_path: Path) -> None:
    store = LocalDirectoryBackend(str(tmp_path / "s"), fd_cache=2)
    try:
        for i in range(6):
            store.put(f"obj/{i}", f"content {i}".encode())
        for _round in range(2):
            for i in range(6):
                assert store.get(f"obj/{i}", 8) == str(i).encode()
        assert len(store._fds) <= 2
        store.delete("obj/5")
        with pytest.raises(ObjectMissing):
            store.get("obj/5")
    finally:
        store.close()


def test_local_fd_cache_survives_fork(local: LocalDirectoryBackend) -> None:
    local.put("data/aa/one", b"1" * 1000)
    local.put("data/aa/two", b"2" * 1000)
    assert local.get("data/aa/one", 10, 5) == b"11111"  # the parent caches a descriptor
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: read through the inherited backend, report, exit without cleanup
        status = 1
        try:
            os.close(read_end)
            got = local.get("data/aa/one", 0, 3) + local.get("data/aa/two", 997, 3)
            local.put("data/aa/three", b"from child")
            got += local.get("data/aa/three")
            local.close()  # closes only the child's descriptors
            os.write(write_end, got)
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        reported = pipe.read()
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert reported == b"111222from child"
    # The parent's cached descriptors still work after the child closed its own.
    assert local.get("data/aa/one", 0, 4) == b"1111"
    assert local.get("data/aa/three") == b"from child"


def test_local_list_ignores_objects_deleted_while_listing(local: LocalDirectoryBackend) -> None:
    for i in range(5):
        local.put(f"data/ab/{i}", b"x")
    seen = []
    for info in local.list("data/"):
        seen.append(info.name)
        local.delete("data/ab/4")  # removed before the walk reaches it (or after)
    assert len(seen) == len(set(seen))
    assert set(seen) >= {f"data/ab/{i}" for i in range(4)}
