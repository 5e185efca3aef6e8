"""File-tree backups race against the users who own the source (the service runs as root).

A user who owns a folder of the source can swap its entries while a backup runs. Each test makes
the swap happen at one exact point of the backup: it wraps the walk (``files_mod.walk``), whose
consumer asks for the next entry only after it has handled the previous one, so an action placed
after a ``yield`` runs after the backup has seen that entry and before the walk goes on. Files are
read by the workers only after the walk has finished with their batch (a few files: one batch,
sent at the end), so a swap during the walk always precedes the read.

The outside folder stands for ``/etc``: a root-only file named like one of the source's, whose
content must never reach a point.
"""

from __future__ import annotations

import base64
import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from engine_support import new_appliance, set_engine_env

from appliance.backup import files as files_mod
from appliance.backup import walk as walk_mod
from appliance.backup.files import Warnings
from appliance.backup.tree import iter_tree
from appliance.engine import Appliance

SECRET = b"root:$6$the-shadow-file:19000:0:99999:7:::\n"
CHANGED_DIR = "changed while it was backed up: not the directory that was listed"
CHANGED_FILE = "changed while it was backed up: not the file that was listed"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Appliance]:
    appliance, _recovery = new_appliance(tmp_path / "appliance")
    yield appliance
    appliance.close()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.txt").write_bytes(b"alice's notes\n")
    (root / "sub" / "b.txt").write_bytes(b"alice's drafts\n")
    (root / "top.txt").write_bytes(b"top\n")
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A root-only folder outside the source, holding files named like those in ``sub``."""
    folder = tmp_path / "etc"
    folder.mkdir(mode=0o700)
    for name in ("a.txt", "b.txt"):
        (folder / name).write_bytes(SECRET)
        os.chmod(folder / name, 0o600)
    return folder


def after_listing(
    monkeypatch: pytest.MonkeyPatch, trigger: str, action: Callable[[Path], None]
) -> list[str]:
    """Run ``action(root)`` once the backup has handled the walk's entry ``trigger``, before the
    walk goes on; return the entries the walk listed."""
    original = files_mod.walk
    listed: list[str] = []

    def walk(root: str, warnings: Any) -> Iterator[tuple[str, os.stat_result]]:
        for rel, st in original(root, warnings):
            listed.append(rel)
            yield rel, st
            if rel == trigger:
                action(Path(root))

    monkeypatch.setattr(files_mod, "walk", walk)
    return listed


def point_files(app: Appliance, point_id: str) -> dict[str, bytes]:
    """Every regular file of a point and its content, through a tar stream (no path limits)."""
    buffer = io.BytesIO()
    app.restore_tar(point_id, buffer)
    buffer.seek(0)
    out = {}
    with tarfile.open(fileobj=buffer) as tar:
        for member in tar.getmembers():
            if member.isfile():
                data = tar.extractfile(member)
                assert data is not None
                out[member.name.removeprefix("./")] = data.read()
    return out


def assert_no_secret(app: Appliance, point_id: str) -> dict[str, bytes]:
    contents = point_files(app, point_id)
    leaked = [name for name, data in contents.items() if SECRET in data]
    assert not leaked, f"the point holds the outside file's content as {leaked}"
    return contents


def swap_folder_for_symlink(outside: Path) -> Callable[[Path], None]:
    def swap(root: Path) -> None:
        os.rename(root / "sub", root / "sub.moved")
        os.symlink(outside, root / "sub")

    return swap


def test_parent_swapped_before_the_walk_enters_it_is_not_followed(
    app: Appliance, source: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `sub` is listed in the root, then replaced by a symlink to the outside folder before the
    # walk lists it: the walk opens it relative to the root without following symlinks.
    after_listing(monkeypatch, "sub", swap_folder_for_symlink(outside))
    outcome = app.backup_files(str(source), "alice", workers=1)

    contents = assert_no_secret(app, outcome.point.id)
    assert contents == {"top.txt": b"top\n"}
    assert {"path": "sub", "message": CHANGED_DIR} in outcome.warnings, outcome.warnings


def test_parent_swapped_before_its_files_are_read_is_not_followed(
    app: Appliance, source: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `sub` has been listed (its files are in the batch); it is swapped before the worker reads.
    listed = after_listing(monkeypatch, "sub/a.txt", swap_folder_for_symlink(outside))
    outcome = app.backup_files(str(source), "alice", workers=1)

    # The walk goes on in the folder it opened (now sub.moved), never in the outside one.
    assert listed == ["", "sub", "sub/a.txt", "sub/b.txt", "top.txt"]
    contents = assert_no_secret(app, outcome.point.id)
    assert contents == {"top.txt": b"top\n"}
    messages = {w["path"]: w["message"] for w in outcome.warnings}
    assert messages == {"sub/a.txt": CHANGED_DIR, "sub/b.txt": CHANGED_DIR}


def _replace_with_new_file(outside: Path, target: Path) -> None:
    fresh = target.with_name("fresh")
    fresh.write_bytes(SECRET)
    os.replace(fresh, target)


def _replace_with_symlink(outside: Path, target: Path) -> None:
    target.unlink()
    os.symlink(outside / "a.txt", target)


def _replace_with_hardlink(outside: Path, target: Path) -> None:
    target.unlink()
    os.link(outside / "a.txt", target)  # root may; a user may where protected_hardlinks is off


@pytest.mark.parametrize(
    "replace",
    [_replace_with_new_file, _replace_with_symlink, _replace_with_hardlink],
    ids=["new-file", "symlink", "hardlink"],
)
def test_file_replaced_after_listing_is_a_warning_not_content(
    app: Appliance,
    source: Path,
    outside: Path,
    monkeypatch: pytest.MonkeyPatch,
    replace: Callable[[Path, Path], None],
) -> None:
    after_listing(monkeypatch, "top.txt", lambda root: replace(outside, root / "sub" / "a.txt"))
    outcome = app.backup_files(str(source), "alice", workers=1)

    contents = assert_no_secret(app, outcome.point.id)
    assert contents == {"sub/b.txt": b"alice's drafts\n", "top.txt": b"top\n"}
    assert outcome.warnings == [{"path": "sub/a.txt", "message": CHANGED_FILE}]


def test_replaced_file_is_read_again_by_the_next_backup(
    app: Appliance, source: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    after_listing(
        monkeypatch, "top.txt", lambda root: _replace_with_new_file(outside, root / "sub" / "a.txt")
    )
    first = app.backup_files(str(source), "alice", workers=1)
    assert [w["path"] for w in first.warnings] == ["sub/a.txt"]
    monkeypatch.undo()
    set_engine_env(monkeypatch)
    second = app.backup_files(str(source), "alice", workers=1)
    assert second.warnings == []
    # Now the new file is the one listed: a file of the folder's owner, backed up as usual.
    assert "sub/a.txt" in point_files(app, second.point.id)


def point_records(app: Appliance, point_id: str) -> dict[str, dict[str, Any]]:
    return {r["path"]: r for r in iter_tree(app.repo, app.repo.get_manifest(point_id))}


def test_symlink_read_after_its_folder_was_swapped_is_the_listed_one(
    app: Appliance, source: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.symlink("../top.txt", source / "sub" / "link")
    os.setxattr(source / "sub" / "link", "trusted.note", b"mine", follow_symlinks=False)
    os.symlink("/etc/shadow", outside / "link")
    # `sub` is swapped after its files are listed, before the backup reads the symlink.
    after_listing(monkeypatch, "sub/b.txt", swap_folder_for_symlink(outside))
    outcome = app.backup_files(str(source), "alice", workers=1)

    link = point_records(app, outcome.point.id)["sub/link"]
    assert link["target"] == "../top.txt"
    assert link["xattrs"] == {"trusted.note": base64.b64encode(b"mine").decode()}
    assert_no_secret(app, outcome.point.id)


# --- the walk itself -------------------------------------------------------------------------------


def reference_walk(root: Path) -> list[tuple[str, tuple[int, int, int]]]:
    """Canonical order by paths (fine for trees that fit PATH_MAX)."""
    out = []

    def visit(rel: str) -> None:
        st = os.lstat(root / rel if rel else root)
        out.append((rel, (st.st_dev, st.st_ino, st.st_mode)))
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(root / rel if rel else root)):
                visit(f"{rel}/{name}" if rel else name)

    visit("")
    return out


def walked(root: Path, warnings: Warnings) -> list[tuple[str, tuple[int, int, int]]]:
    return [
        (rel, (st.st_dev, st.st_ino, st.st_mode)) for rel, st in walk_mod.walk(str(root), warnings)
    ]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def build_ladder(root: Path, depth: int, name: str) -> None:
    """``depth`` nested folders ``name``, each also holding a file ``f`` and a folder ``z`` with a
    file (``z`` sorts after ``name``: the walk needs each folder again on its way back up); made
    with descriptors, since the paths may pass PATH_MAX."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(depth):
            os.mkdir("z", dir_fd=fd)
            for rel in ("f", "z/f"):
                out = os.open(rel, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
                os.write(out, b"level %d %s\n" % (level, rel.encode()))
                os.close(out)
            os.mkdir(name, dir_fd=fd)
            fd, parent = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(parent)
    finally:
        os.close(fd)


def remove_ladder(root: Path, name: str) -> None:
    """Remove what build_ladder made, deepest first (shutil.rmtree recurses once per level)."""
    fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    while name in os.listdir(fds[-1]):
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1])
        if len(fds) > 50:  # stay well within the descriptor limit: re-open on the way back
            os.close(fds[-50])
            fds[-50] = -1
        fds.append(fd)
    depth = len(fds) - 1
    for level in range(depth, -1, -1):
        if fds[level] < 0:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            for _ in range(level):
                fd, parent = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
                os.close(parent)
            fds[level] = fd
        fd = fds[level]
        for entry in ("z/f", "f"):
            if os.path.lexists(f"/proc/self/fd/{fd}/{entry}"):
                os.unlink(entry, dir_fd=fd)
        if "z" in os.listdir(fd):
            os.rmdir("z", dir_fd=fd)
        if level < depth:
            os.rmdir(name, dir_fd=fd)
        os.close(fd)
    os.rmdir(root)


def test_walk_of_a_1000_level_tree_holds_few_descriptors(
    app: Appliance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "deep"
    name = "level-" + "x" * 10  # 1000 levels: a 17 kB path, four times PATH_MAX
    build_ladder(root, 1000, name)
    try:
        warnings = Warnings()
        before = open_fds()
        most = 0
        count = 0
        for _rel, _st in walk_mod.walk(str(root), warnings):
            count += 1
            most = max(most, open_fds() - before)
        assert warnings.items == []
        assert count == 1 + 1000 * 4  # the root; per level: the nested folder, f, z, z/f
        assert most <= walk_mod.OPEN_DIRS + 2

        outcome = app.backup_files(str(root), "deep", workers=2)
        assert outcome.warnings == []
        assert outcome.stats["files"] == 2000
        contents = point_files(app, outcome.point.id)
        deepest = "/".join([name] * 999)
        assert contents[f"{deepest}/f"] == b"level 999 f\n"
        assert contents[f"{deepest}/z/f"] == b"level 999 z/f\n"
        assert len(contents) == 2000
    finally:
        remove_ladder(root, name)


def test_walk_reopens_folders_beyond_the_descriptor_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(walk_mod, "OPEN_DIRS", 2)
    root = tmp_path / "tree"
    build_ladder(root, 12, "n")
    warnings = Warnings()
    assert walked(root, warnings) == reference_walk(root)
    assert warnings.items == []


def test_a_folder_swapped_while_its_descriptor_was_closed_is_not_walked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With two descriptors, the walk closes n/n's before it comes back for n/n/z; the folder is
    # swapped meanwhile for a real one (its owner may): re-opening it must notice, and the walk
    # goes on with what is left above it.
    monkeypatch.setattr(walk_mod, "OPEN_DIRS", 2)
    root = tmp_path / "tree"
    build_ladder(root, 8, "n")
    warnings = Warnings()
    listed = []
    for rel, _st in walk_mod.walk(str(root), warnings):
        listed.append(rel)
        if rel == "n/n/n/n/n/n/n/z/f":
            os.rename(root / "n" / "n", root / "n" / "other")
            (root / "n" / "n" / "z").mkdir(parents=True)
            (root / "n" / "n" / "f").write_bytes(SECRET)
    assert warnings.items == [{"path": "n/n", "message": CHANGED_DIR}]
    after = listed[listed.index("n/n/n/n/n/n/n/z/f") + 1 :]
    assert after == ["n/z", "n/z/f", "z", "z/f"]
