"""Backup and restore of file trees, end to end through ``Appliance``.

One rich source tree holds every kind of entry the engine must handle: empty, small, large
(multi-chunk), compressible and sparse files, nested directories, relative/absolute/dangling
symlinks, hardlinks, special modes, foreign ownership, nanosecond mtimes on files and directories,
extended attributes, a non-UTF-8 name, a FIFO and an unreadable file. A restore must reproduce all
of it exactly (the FIFO and the unreadable file become warnings, never a failed backup).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import multiprocessing
import os
import shutil
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from engine_support import (
    SMALL_PACKS,
    Entry,
    compare_trees,
    digest,
    new_appliance,
    set_engine_env,
    snapshot,
    store_size,
    text_bytes,
)

from appliance import restore_tree as restore_tree_mod
from appliance.backup import files as files_mod
from appliance.backup import walk as walk_mod
from appliance.engine import Appliance
from appliance.errors import NotFound, SourceError

MiB = 1 << 20
NON_UTF8 = b"caf\xe9 \xff.txt"  # Latin-1 bytes: not valid UTF-8
UID, GID = 1234, 5678


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Appliance]:
    appliance, _recovery = new_appliance(tmp_path / "appliance", pack_size=4 * MiB)
    yield appliance
    appliance.close()


def _xattr_dir(tmp_path: Path) -> Path:
    """A directory whose filesystem takes ``user.`` extended attributes (asserted, not skipped)."""
    for candidate in (tmp_path, Path("/var/tmp"), Path("/dev/shm")):
        probe = candidate / f"xattr-probe-{os.getpid()}-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        try:
            os.setxattr(probe, "user.probe", b"1")
            return candidate
        except OSError as exc:
            assert exc.errno in (errno.ENOTSUP, errno.EPERM), exc
        finally:
            probe.unlink()
    raise AssertionError("no test filesystem supports user.* extended attributes")


@dataclass
class RichTree:
    root: Path
    skipped: set[bytes]  # entries that become warnings (the FIFO, the unreadable file)


def build_rich_tree(root: Path) -> RichTree:
    assert os.geteuid() == 0, "these tests run as root (ownership, setuid bits)"
    root.mkdir()
    (root / "empty.txt").write_bytes(b"")
    (root / "small.txt").write_bytes(b"hello, world\n")
    (root / "big.bin").write_bytes(os.urandom(5 * MiB + 512 * 1024))  # several chunks
    (root / "text.txt").write_bytes(text_bytes(2 * MiB))
    (root / "private.txt").write_bytes(b"secret\n")
    os.chmod(root / "private.txt", 0o600)
    (root / "setuid.bin").write_bytes(b"\x7fELF not really\n")
    os.chmod(root / "setuid.bin", 0o4755)
    (root / "owned.txt").write_bytes(b"someone else's\n")
    os.chown(root / "owned.txt", UID, GID)
    with open(root / "sparse.img", "wb") as f:  # 16 MiB with 4 KiB of data in the middle
        f.truncate(16 * MiB)
        f.seek(8 * MiB)
        f.write(b"D" * 4096)
    assert os.stat(root / "sparse.img").st_blocks * 512 < 64 * 1024
    os.symlink("small.txt", root / "link_rel")
    os.symlink("/etc/hostname", root / "link_abs")
    os.symlink("missing/nowhere", root / "link_dangling")
    (root / "nested" / "deeper" / "deepest").mkdir(parents=True)
    (root / "nested" / "top.txt").write_bytes(b"top\n")
    (root / "nested" / "deeper" / "file.txt").write_bytes(b"deeper file\n" * 100)
    (root / "nested" / "deeper" / "deepest" / "leaf.txt").write_bytes(b"leaf\n")
    (root / "hard_a").write_bytes(b"one inode, four names\n")
    os.link(root / "hard_a", root / "hard_c")
    os.link(root / "hard_a", root / "nested" / "deeper" / "hard_b")
    os.link(root / "hard_a", root / "nested" / "deeper" / "deepest" / "hard_d")
    (root / "nested" / "deeper" / "pair1").write_bytes(b"two names inside one folder\n")
    os.link(root / "nested" / "deeper" / "pair1", root / "nested" / "deeper" / "pair2")
    os.chmod(root / "nested", 0o750)
    (root / "shared").mkdir()
    os.chown(root / "shared", UID, GID)
    os.chmod(root / "shared", 0o1777)
    (root / "shared" / "note.txt").write_bytes(b"note\n")
    (root / "xattr.txt").write_bytes(b"with attributes\n")
    os.setxattr(root / "xattr.txt", "user.comment", b"hello")
    os.setxattr(root / "xattr.txt", "user.binary", b"\x00\xff\x10")
    os.setxattr(root / "nested", "user.dir", b"on a directory")
    with open(os.path.join(os.fsencode(root), NON_UTF8), "wb") as f:
        f.write(b"a name that is not UTF-8\n")
    os.mkfifo(root / "fifo")
    (root / "unreadable.txt").write_bytes(b"cannot be opened\n")

    # Nanosecond mtimes, distinct per entry; directories last, deepest first.
    stamp = 1_600_000_000_123_456_789
    all_paths: list[bytes] = []
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        all_paths.extend(os.path.join(dirpath, n) for n in filenames + dirnames)
    entries = [p for p in all_paths if not os.path.isdir(p) or os.path.islink(p)]
    for i, path in enumerate(sorted(entries)):
        os.utime(path, ns=(stamp + i * 1_000_003, stamp + i * 1_000_003), follow_symlinks=False)
    directories = sorted((p for p in all_paths if p not in entries), key=len, reverse=True)
    for i, path in enumerate([*directories, os.fsencode(root)]):
        os.utime(path, ns=(stamp + 7 + i * 997, stamp + 7 + i * 997))
    return RichTree(root, {b"fifo", b"unreadable.txt"})


@pytest.fixture
def rich(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RichTree]:
    root = _xattr_dir(tmp_path) / f"rich-{uuid.uuid4().hex}"
    tree = build_rich_tree(root)
    real_open = walk_mod.open_for_read

    def open_for_read(name: str, dir_fd: int) -> int:
        if name == "unreadable.txt":
            raise PermissionError(errno.EACCES, "Permission denied", name)
        return real_open(name, dir_fd)

    # Workers are forked from this process: patched before the backup, they inherit it.
    monkeypatch.setattr(walk_mod, "open_for_read", open_for_read)
    # Workers normally start from a fork server and would not see the patch: fork them here.
    monkeypatch.setattr(
        files_mod, "worker_context", lambda _has_spec: multiprocessing.get_context("fork")
    )
    yield tree
    if not root.is_relative_to(tmp_path):
        shutil.rmtree(root)


def _expected(tree: RichTree) -> dict[bytes, Entry]:
    return {k: v for k, v in snapshot(tree.root).items() if k not in tree.skipped}


def test_full_backup_and_restore_reproduce_everything(
    app: Appliance, rich: RichTree, tmp_path: Path
) -> None:
    expected = _expected(rich)
    outcome = app.backup_files(str(rich.root), "rich", workers=2)
    assert outcome.point.mode == "full" and outcome.point.kind == "files"
    warnings = {w["path"]: w["message"] for w in outcome.warnings}
    assert set(warnings) == {"fifo", "unreadable.txt"}
    assert "fifo" in warnings["fifo"]
    assert "Permission denied" in warnings["unreadable.txt"]
    stats = outcome.stats
    regular = {k for k, v in expected.items() if v.kind == "file"}
    assert stats["hardlinks"] == 4  # hard_c, hard_b, hard_d, pair2 are further names
    assert stats["files"] == len(regular) - 4
    assert stats["symlinks"] == 3
    assert stats["directories"] == sum(1 for v in expected.values() if v.kind == "dir")
    assert stats["files_read"] == stats["files"] and stats["files_reused"] == 0
    assert stats["cpu"]["worker_processes"] >= 1 and stats["cpu"]["workers_s"] > 0
    manifest = app.manifest(outcome.point.id)
    assert manifest["warning_count"] == 2

    target = tmp_path / "restored"
    counts = app.restore(outcome.point.id, str(target), workers=2)
    assert counts["files"] == stats["files"] and counts["hardlinks"] == 4
    actual = snapshot(target)
    compare_trees(expected, actual)

    # Spot checks of what compare_trees covers, so a failure reads plainly.
    assert os.readlink(target / "link_rel") == "small.txt"
    assert os.readlink(target / "link_abs") == "/etc/hostname"
    assert os.readlink(target / "link_dangling") == "missing/nowhere"
    assert os.stat(target / "setuid.bin").st_mode & 0o7777 == 0o4755
    assert os.stat(target / "shared").st_mode & 0o7777 == 0o1777
    assert os.stat(target / "private.txt").st_mode & 0o7777 == 0o600
    assert (os.stat(target / "owned.txt").st_uid, os.stat(target / "owned.txt").st_gid) == (
        UID,
        GID,
    )
    assert os.stat(target / "shared").st_uid == UID
    a, b, c = (os.stat(target / p) for p in ("hard_a", "nested/deeper/hard_b", "hard_c"))
    assert a.st_ino == b.st_ino == c.st_ino and a.st_nlink == 4
    assert os.getxattr(target / "xattr.txt", "user.binary") == b"\x00\xff\x10"
    assert os.getxattr(target / "nested", "user.dir") == b"on a directory"
    assert os.stat(target / "nested").st_mtime_ns == os.stat(rich.root / "nested").st_mtime_ns
    assert os.stat(target / "nested").st_mtime_ns % 1000 != 0  # real nanoseconds
    sparse = os.stat(target / "sparse.img")
    assert sparse.st_size == 16 * MiB and sparse.st_blocks * 512 <= 64 * 1024
    assert digest(target / "sparse.img") == digest(rich.root / "sparse.img")
    with open(os.path.join(os.fsencode(target), NON_UTF8), "rb") as f:
        assert f.read() == b"a name that is not UTF-8\n"
    assert not (target / "fifo").exists() and not (target / "unreadable.txt").exists()


@pytest.mark.parametrize("kept, reads", [(None, 1), (3, 3)])
def test_a_restore_reads_the_tree_once_unless_it_cannot_keep_the_rest(
    app: Appliance,
    rich: RichTree,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kept: int | None,
    reads: int,
) -> None:
    """Directories and links are kept from the first pass for the later two; past
    KEPT_RECORDS of them the tree is read again, with the same result."""
    expected = _expected(rich)
    outcome = app.backup_files(str(rich.root), "rich", workers=2)
    if kept is not None:
        monkeypatch.setattr(restore_tree_mod, "KEPT_RECORDS", kept)
    real_iter_tree = restore_tree_mod.iter_tree
    calls: list[str] = []

    def iter_tree(repo: Any, manifest: dict[str, Any]) -> Iterator[dict[str, Any]]:
        calls.append(manifest["point_id"])
        return real_iter_tree(repo, manifest)

    monkeypatch.setattr(restore_tree_mod, "iter_tree", iter_tree)
    target = tmp_path / "restored"
    counts = app.restore(outcome.point.id, str(target), workers=2)
    assert len(calls) == reads
    assert counts["hardlinks"] == 4 and counts["symlinks"] == 3
    assert counts["cpu"]["worker_processes"] >= 1
    compare_trees(expected, snapshot(target))


def test_restore_refuses_to_find_a_missing_path(app: Appliance, rich: RichTree, tmp_path: Path):
    point = app.backup_files(str(rich.root), "rich", workers=2).point
    with pytest.raises(NotFound):
        app.restore(point.id, str(tmp_path / "t"), subpath="no/such/thing", workers=1)


def test_restore_a_single_file(app: Appliance, rich: RichTree, tmp_path: Path) -> None:
    point = app.backup_files(str(rich.root), "rich", workers=2).point
    target = tmp_path / "one"
    app.restore(point.id, str(target), subpath="nested/deeper/file.txt", workers=1)
    assert sorted(os.listdir(target)) == ["file.txt"]
    source = os.stat(rich.root / "nested/deeper/file.txt")
    restored = os.stat(target / "file.txt")
    assert (target / "file.txt").read_bytes() == b"deeper file\n" * 100
    assert restored.st_mtime_ns == source.st_mtime_ns
    assert restored.st_mode == source.st_mode


def test_restore_a_folder(app: Appliance, rich: RichTree, tmp_path: Path) -> None:
    point = app.backup_files(str(rich.root), "rich", workers=2).point
    target = tmp_path / "folder"
    app.restore(point.id, str(target), subpath="/nested/deeper/", workers=2)
    assert os.listdir(target) == ["deeper"]
    full = snapshot(rich.root / "nested" / "deeper")
    got = snapshot(target / "deeper")
    # Links whose first name (hard_a) lies outside the folder: the first of them in walk order
    # is restored as the file, the other links to it; nothing inside the folder is lost.
    compare_trees(
        {k: dataclasses.replace(v, link_group=None) for k, v in full.items()},
        {k: dataclasses.replace(v, link_group=None) for k, v in got.items()},
    )
    assert got[b"hard_b"].content == snapshot(rich.root)[b"hard_a"].content
    one, two = os.stat(target / "deeper" / "hard_b"), os.stat(target / "deeper/deepest/hard_d")
    assert one.st_ino == two.st_ino and one.st_nlink == 2
    # Both names of a pair inside the folder share one inode again.
    one, two = os.stat(target / "deeper" / "pair1"), os.stat(target / "deeper" / "pair2")
    assert one.st_ino == two.st_ino and one.st_nlink == 2


def test_tar_stream(app: Appliance, rich: RichTree) -> None:
    expected = _expected(rich)
    point = app.backup_files(str(rich.root), "rich", workers=2).point
    buffer = io.BytesIO()
    count = app.restore_tar(point.id, buffer)
    assert count == len(expected)
    buffer.seek(0)
    with tarfile.open(fileobj=buffer, mode="r:") as tar:
        members = {m.name: m for m in tar.getmembers()}
        names = {"." if k == b"" else os.fsdecode(k) for k in expected}
        assert set(members) == names
        groups: dict[str, str] = {}
        for key, entry in expected.items():
            member = members["." if key == b"" else os.fsdecode(key)]
            assert member.mode == entry.mode, key
            assert (member.uid, member.gid) == (entry.uid, entry.gid), key
            assert abs(member.mtime - entry.mtime_ns / 1e9) < 1e-6, key
            if entry.kind == "dir":
                assert member.isdir(), key
            elif entry.kind == "symlink":
                assert member.issym() and member.linkname == entry.target, key
            elif member.islnk():
                assert entry.link_group is not None
                assert member.linkname == groups[entry.link_group], key
            else:
                assert member.isfile(), key
                if entry.link_group is not None:
                    groups[entry.link_group] = member.name
                data = tar.extractfile(member)
                assert data is not None
                assert member.size == os.lstat(os.path.join(os.fsencode(rich.root), key)).st_size
                assert hashlib.sha256(data.read()).hexdigest() == entry.content, key
        assert members["hard_c"].islnk() and members["hard_c"].linkname == "hard_a"


def test_tar_stream_of_a_folder(app: Appliance, rich: RichTree) -> None:
    point = app.backup_files(str(rich.root), "rich", workers=2).point
    buffer = io.BytesIO()
    app.restore_tar(point.id, buffer, subpath="nested/deeper")
    buffer.seek(0)
    with tarfile.open(fileobj=buffer, mode="r:") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {
            "deeper",
            "deeper/deepest",
            "deeper/deepest/hard_d",
            "deeper/deepest/leaf.txt",
            "deeper/file.txt",
            "deeper/hard_b",
            "deeper/pair1",
            "deeper/pair2",
        }
        # Link names are relative to the archive, like member names.
        assert members["deeper/pair2"].islnk()
        assert members["deeper/pair2"].linkname == "deeper/pair1"
        # A first name outside the folder: its first link carries the contents, later ones
        # link to that member.
        assert members["deeper/deepest/hard_d"].isfile()
        data = tar.extractfile(members["deeper/deepest/hard_d"])
        assert data is not None and data.read() == b"one inode, four names\n"
        assert members["deeper/hard_b"].islnk()
        assert members["deeper/hard_b"].linkname == "deeper/deepest/hard_d"


# --- incremental, differential, dedup -------------------------------------------------------------


def _simple_tree(root: Path, files: int = 10) -> None:
    (root / "dir").mkdir(parents=True)
    for i in range(files):
        parent = root / "dir" if i % 2 else root
        (parent / f"file{i}.bin").write_bytes(os.urandom(40_000 + i * 1000))


def test_incremental_reads_only_changed_files(app: Appliance, tmp_path: Path) -> None:
    source = tmp_path / "src"
    _simple_tree(source)
    full = app.backup_files(str(source), "simple", workers=2)
    assert full.stats["files"] == 10 and full.stats["files_read"] == 10
    old_state = snapshot(source)

    (source / "dir" / "file3.bin").write_bytes(os.urandom(12_345))  # modified
    (source / "dir" / "added.bin").write_bytes(os.urandom(7_000))  # added
    (source / "file4.bin").unlink()  # deleted
    new_state = snapshot(source)

    incr = app.backup_files(str(source), "simple", workers=2)
    assert incr.point.mode == "incremental"
    assert incr.stats["files"] == 10
    assert incr.stats["files_read"] == 2
    assert incr.stats["files_reused"] == 8
    assert incr.stats["bytes_read"] == 12_345 + 7_000
    assert incr.stats["new_bytes"] < 12_345 + 7_000 + 16 * 1024
    manifest = app.manifest(incr.point.id)
    assert manifest["parent"] == full.point.id and manifest["base_full"] == full.point.id

    compare_trees(new_state, snapshot(_restore(app, incr.point.id, tmp_path / "new")))
    compare_trees(old_state, snapshot(_restore(app, full.point.id, tmp_path / "old")))


def _restore(app: Appliance, point_id: str, target: Path) -> Path:
    app.restore(point_id, str(target), workers=2)
    return target


def test_unchanged_rebackup_stores_nothing_and_reads_nothing(
    app: Appliance, tmp_path: Path
) -> None:
    source = tmp_path / "src"
    _simple_tree(source)
    first = app.backup_files(str(source), "simple", workers=2)
    size = store_size(Path(app.data_dir.path))
    again = app.backup_files(str(source), "simple", workers=2)
    assert again.stats["bytes_read"] == 0 and again.stats["files_read"] == 0
    assert again.stats["files_reused"] == 10
    assert again.stats["new_bytes"] < 1024
    assert store_size(Path(app.data_dir.path)) - size < 1024
    assert app.manifest(again.point.id)["tree"] == app.manifest(first.point.id)["tree"]


def test_differential_is_based_on_the_last_full(app: Appliance, tmp_path: Path) -> None:
    source = tmp_path / "src"
    _simple_tree(source)
    full = app.backup_files(str(source), "diff", mode="full", workers=2)
    (source / "file0.bin").write_bytes(b"changed after the full")
    incr1 = app.backup_files(str(source), "diff", mode="incremental", workers=2)
    (source / "file2.bin").write_bytes(b"changed after the first incremental")
    incr2 = app.backup_files(str(source), "diff", mode="incremental", workers=2)
    diff = app.backup_files(str(source), "diff", mode="differential", workers=2)

    assert incr1.stats["files_read"] == 1
    assert incr2.stats["files_read"] == 1
    # Against the full, both files changed since.
    assert diff.point.mode == "differential"
    assert diff.stats["files_read"] == 2 and diff.stats["files_reused"] == 8
    m_incr1, m_incr2, m_diff = (app.manifest(p.point.id) for p in (incr1, incr2, diff))
    assert (m_incr1["parent"], m_incr1["base_full"]) == (full.point.id, full.point.id)
    assert (m_incr2["parent"], m_incr2["base_full"]) == (incr1.point.id, full.point.id)
    assert (m_diff["parent"], m_diff["base_full"]) == (full.point.id, full.point.id)
    assert diff.point.parent_id == full.point.id
    compare_trees(snapshot(source), snapshot(_restore(app, diff.point.id, tmp_path / "d")))


def test_incremental_without_a_base_becomes_full(app: Appliance, tmp_path: Path) -> None:
    source = tmp_path / "src"
    _simple_tree(source, files=2)
    outcome = app.backup_files(str(source), "new-asset", mode="differential", workers=1)
    assert outcome.point.mode == "full"
    assert app.manifest(outcome.point.id)["parent"] is None


def test_another_source_under_the_same_asset_starts_afresh(app: Appliance, tmp_path: Path):
    one, two = tmp_path / "one", tmp_path / "two"
    _simple_tree(one, files=2)
    _simple_tree(two, files=3)
    app.backup_files(str(one), "asset", workers=1)
    outcome = app.backup_files(str(two), "asset", workers=1)
    assert outcome.point.mode == "full" and outcome.stats["files_read"] == 3


def test_identical_files_are_stored_once(tmp_path: Path) -> None:
    app, _recovery = new_appliance(tmp_path / "appliance", pack_size=SMALL_PACKS)
    with app:
        source = tmp_path / "src"
        (source / "copy").mkdir(parents=True)
        data = os.urandom(3 * MiB)
        (source / "original.bin").write_bytes(data)
        (source / "copy" / "duplicate.bin").write_bytes(data)
        outcome = app.backup_files(str(source), "dedup", workers=2)
        assert outcome.stats["bytes_total"] == 6 * MiB
        assert 3 * MiB <= outcome.stats["new_bytes"] < 3 * MiB + 64 * 1024
        assert store_size(Path(app.data_dir.path)) < 3 * MiB + 128 * 1024
        target = tmp_path / "restored"
        app.restore(outcome.point.id, str(target), workers=2)
        assert (target / "copy" / "duplicate.bin").read_bytes() == data
        assert (target / "original.bin").read_bytes() == data


def test_non_utf8_names_round_trip(app: Appliance, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    raw = os.fsencode(source)
    names = [NON_UTF8, b"\xff\xfe", "ünïcödé ✓.txt".encode(), b"new\nline", b"back\\slash"]
    for i, name in enumerate(names):
        with open(os.path.join(raw, name), "wb") as f:
            f.write(b"content %d\n" % i)
    os.mkdir(os.path.join(raw, b"dir \xe9"))
    os.symlink(b"target \xe9", os.path.join(raw, b"dir \xe9", b"link \xfe"))
    point = app.backup_files(str(source), "names", workers=2).point
    target = tmp_path / "restored"
    app.restore(point.id, str(target), workers=2)
    compare_trees(snapshot(source), snapshot(target))
    assert os.readlink(os.path.join(os.fsencode(target), b"dir \xe9", b"link \xfe")) == (
        b"target \xe9"
    )


def test_missing_source_fails_the_backup(app: Appliance, tmp_path: Path) -> None:
    with pytest.raises(SourceError):
        app.backup_files(str(tmp_path / "does-not-exist"), "gone", workers=1)
    (tmp_path / "a-file").write_bytes(b"x")
    with pytest.raises(SourceError):
        app.backup_files(str(tmp_path / "a-file"), "gone", workers=1)
    assert app.catalog.list_points(asset="gone") == []
