"""What only the local-directory backend can get wrong: temporary files, atomic replacement,
descriptors across a fork, and a root that is missing or not mounted.

The contract every backend keeps is checked by one suite, ``tests/test_backend_conformance.py``.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.errors import LocationUnavailable, ObjectMissing, StoreError, StoreFull
from appliance.store.backend import LocalDirectoryBackend, open_pool_directory
from appliance.store.identity import IDENTITY_NAME, check_identity, write_identity


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalDirectoryBackend]:
    store = LocalDirectoryBackend(str(tmp_path / "store"))
    yield store
    store.close()


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
    def no_replace(src: str, dst: str, **_dir_fds: int) -> None:
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


# --- a location whose root must be there ---------------------------------------------------------


def _try_everything(store: LocalDirectoryBackend) -> None:
    """Every operation on an unavailable location raises LocationUnavailable (list included)."""
    with pytest.raises(LocationUnavailable) as info:
        store.put("data/ab/pack", b"never lands")
    assert info.value.code == "location_unavailable"
    with pytest.raises(LocationUnavailable):
        store.put("config", b"never lands")
    with pytest.raises(LocationUnavailable):
        store.get("data/ab/pack")
    with pytest.raises(LocationUnavailable):
        store.get("config", 0, 1)
    with pytest.raises(LocationUnavailable):
        store.stat("config")
    with pytest.raises(LocationUnavailable):
        list(store.list())
    with pytest.raises(LocationUnavailable):
        list(store.list("data/"))
    with pytest.raises(LocationUnavailable):
        store.delete("config")
    with pytest.raises(LocationUnavailable):
        list(store.temporary_files(older_than=0))
    with pytest.raises(LocationUnavailable):
        check_identity(store, "store-a")


def test_default_store_creates_its_missing_root(tmp_path: Path) -> None:
    """The appliance's own pool store keeps its behaviour: empty until the first put creates it."""
    store = LocalDirectoryBackend(str(tmp_path / "new" / "store"))
    assert list(store.list()) == []
    with pytest.raises(ObjectMissing):
        store.get("config")
    store.put("data/ab/pack", b"x")
    assert (tmp_path / "new" / "store" / "data" / "ab" / "pack").read_bytes() == b"x"


def test_required_root_missing_is_unavailable(tmp_path: Path) -> None:
    store = LocalDirectoryBackend(str(tmp_path / "absent"), require_root=True)
    _try_everything(store)
    assert list(tmp_path.iterdir()) == []  # nothing created, not even the root
    (tmp_path / "absent").mkdir()
    store.put("data/ab/pack", b"now it works")
    assert [i.name for i in store.list()] == ["data/ab/pack"]


def test_required_root_that_is_a_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"not a folder")
    store = open_pool_directory(str(tmp_path / "file"))
    _try_everything(store)


def test_require_mount_on_a_plain_directory_is_unavailable(tmp_path: Path) -> None:
    plain = tmp_path / "mnt"
    plain.mkdir()
    store = LocalDirectoryBackend(str(plain), require_mount=True)
    assert store.require_root
    _try_everything(store)
    assert list(plain.iterdir()) == []  # no stray data/ in the bare mountpoint


def test_root_removed_after_open_is_unavailable(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    root.mkdir()
    store = open_pool_directory(str(root))
    store.put("data/ab/pack", b"x")
    assert store.get("data/ab/pack") == b"x"  # a descriptor is cached now
    store.close()
    (root / "data" / "ab" / "pack").unlink()
    (root / "data" / "ab").rmdir()
    (root / "data").rmdir()
    root.rmdir()
    _try_everything(store)
    assert not root.exists()


# --- a real disk, unmounted under the backend (root) -----------------------------------------------


class LoopDisk:
    """A 16 MiB ext4 filesystem on a loop device of our own, mounted at ``mountpoint``."""

    def __init__(self, tmp_path: Path) -> None:
        image = tmp_path / "disk.img"
        with open(image, "wb") as f:
            f.truncate(16 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
        self.device = subprocess.run(
            ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
        ).stdout.strip()
        self.mountpoint = tmp_path / "mnt"
        self.mountpoint.mkdir()
        self.mounted = False

    def mount(self) -> None:
        subprocess.run(["mount", self.device, str(self.mountpoint)], check=True)
        self.mounted = True

    def unmount(self) -> None:
        subprocess.run(["umount", str(self.mountpoint)], check=True)
        self.mounted = False

    def remove(self) -> None:
        """Unmount and detach this disk's own loop device; fail if something kept it busy."""
        busy = self.mounted and subprocess.run(["umount", str(self.mountpoint)]).returncode != 0
        if busy:  # a descriptor left open: detach lazily, the device goes once it closes
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)
        subprocess.run(["losetup", "-d", self.device], check=False)
        if busy:
            pytest.fail(f"{self.mountpoint} was still busy at the end of the test")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[LoopDisk]:
    if os.geteuid() != 0:
        pytest.skip("needs root (losetup, mount)")
    loop = LoopDisk(tmp_path)
    try:
        loop.mount()
        (loop.mountpoint / "lost+found").rmdir()  # empty, so "nothing created" is exact
        yield loop
    finally:
        loop.remove()


@pytest.mark.root
def test_unmounted_disk_is_unavailable_never_empty(disk: LoopDisk) -> None:
    names = ["data/aa/1", "data/bb/2", "index/cc", "keys/k", IDENTITY_NAME]
    store = LocalDirectoryBackend(str(disk.mountpoint), require_mount=True)
    try:
        write_identity(store, "store-a", "usb-1")
        for name in names[:-1]:
            store.put(name, name.encode())
        assert check_identity(store, "store-a") == "usb-1"
        with pytest.raises(LocationUnavailable, match="another store"):
            check_identity(store, "store-b")

        # Unmounted in the middle of a listing: the listing fails rather than ending early.
        listing = store.list()
        assert next(listing).name in names
        store.close()  # cached read descriptors would keep the filesystem busy
        disk.unmount()
        with pytest.raises(LocationUnavailable, match="nothing is mounted"):
            list(listing)

        _try_everything(store)
        assert list(disk.mountpoint.iterdir()) == []  # the bare mountpoint got nothing

        # Back again: everything is where it was, and nothing written while it was away.
        disk.mount()
        assert sorted(i.name for i in store.list()) == sorted(names)
        assert store.get("data/bb/2") == b"data/bb/2"
        assert check_identity(store, "store-a", "usb-1") == "usb-1"
    finally:
        store.close()


@pytest.mark.root
def test_identity_refuses_a_disk_of_another_store(disk: LoopDisk) -> None:
    store = open_pool_directory(str(disk.mountpoint), require_mount=True)
    try:
        write_identity(store, "store-b", "usb-7")
        with pytest.raises(LocationUnavailable, match=r"belongs to another store \(store-b"):
            check_identity(store, "store-a")
        assert check_identity(store, "store-b") == "usb-7"
    finally:
        store.close()
