"""Restores into folders that other local users can write to, as root.

A user who can write inside a restore target may swap a directory of the point for a symlink at
any moment, or plant links where restored entries go; the restore must never write, chown or
chmod anything outside the target. Also: the conflict choices (``overwrite``, ``keep_both``),
the target folder's own metadata, and image restores onto a symlinked target.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import stat
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from engine_support import new_appliance, set_engine_env

from appliance.engine import Appliance
from appliance.errors import UnsafeRestorePath
from appliance.restore import restore_disk, restore_tree
from appliance.store.backend import LocalDirectoryBackend
from appliance.store.repository import Repository

FIXTURES = Path(__file__).parent / "fixtures"
NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
KEPT = ".before-restore-20240506T070809"
NOBODY = 65534

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Appliance]:
    appliance, _ = new_appliance(tmp_path / "data")
    yield appliance
    appliance.close()


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def snapshot(root: Path) -> dict[str, Any]:
    """Every entry under ``root``: type, mode, owner and contents or link target."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_mode, st.st_uid)
            else:
                sha = hashlib.sha256(Path(full).read_bytes()).hexdigest()
                out[rel] = ("file", st.st_mode, st.st_uid, sha)
    return out


def back_up(app: Appliance, src: Path) -> dict[str, Any]:
    return app.manifest(app.backup_files(str(src), "tree").point.id)


def restore_module() -> Any:
    """The module whose ``restore_tree`` runs (its workers call its ``write_file_contents``)."""
    return sys.modules[restore_tree.__module__]


def swap_in_workers(
    monkeypatch: pytest.MonkeyPatch, target: Path, outside: Path, after: str
) -> None:
    """Once the file ``after`` (target-relative) is written, replace ``target/d`` by a symlink to
    ``outside``, in the worker process that wrote it (workers are forked from this process)."""
    module = restore_module()
    monkeypatch.setattr(module, "worker_context", lambda _spec: multiprocessing.get_context("fork"))
    write = module.write_file_contents
    trigger = os.path.join(os.path.realpath(target), after)

    def write_then_swap(repo: Any, envelope: Any, fd: int, chunks: Any, blobs: Any = None) -> int:
        size = write(repo, envelope, fd, chunks, blobs)
        if os.readlink(f"/proc/self/fd/{fd}") == trigger:
            os.rename(target / "d", target / "d.moved")
            os.symlink(outside, target / "d")
        return size

    monkeypatch.setattr(module, "write_file_contents", write_then_swap)


# --- a directory swapped for a symlink while the restore runs -----------------------------------


@pytest.mark.parametrize("after", ["a.txt", "d/f1.txt"])
def test_a_directory_swapped_for_a_symlink_is_never_written_through(
    app: Appliance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: str
) -> None:
    # "a.txt": d swapped after it was created, before any of its files is written;
    # "d/f1.txt": swapped between two files of d (after the first one's parent was checked).
    src = tmp_path / "src"
    write_files(src, {"a.txt": b"a\n", **{f"d/f{i}.txt": b"in d %d\n" % i for i in range(1, 5)}})
    os.chmod(src / "d", 0o755)
    manifest = back_up(app, src)
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o750)
    (outside / "f2.txt").write_bytes(b"precious\n")
    before = snapshot(outside), os.stat(outside).st_mode
    target = tmp_path / "target"
    swap_in_workers(monkeypatch, target, outside, after)

    with pytest.raises(UnsafeRestorePath, match=r"'d[/']"):
        restore_tree(app.repo, manifest, str(target), workers=1)
    assert (snapshot(outside), os.stat(outside).st_mode) == before, "written outside the target"
    assert os.readlink(target / "d") == str(outside)


def test_a_symlink_swapped_in_for_the_target_itself_is_refused(
    app: Appliance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    write_files(src, {"a.txt": b"a\n"})
    manifest = back_up(app, src)
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    module = restore_module()
    submit = module.ProcessPoolExecutor.submit

    def swap_then_submit(pool: Any, *args: Any, **kwargs: Any) -> Any:
        os.rename(target, tmp_path / "target.moved")
        os.symlink(outside, target)
        return submit(pool, *args, **kwargs)

    monkeypatch.setattr(module.ProcessPoolExecutor, "submit", swap_then_submit)
    with pytest.raises(UnsafeRestorePath, match="target"):
        restore_tree(app.repo, manifest, str(target), workers=1)
    assert os.listdir(outside) == []


# --- links planted in the target before the restore ---------------------------------------------


def test_planted_links_at_file_names_are_replaced_not_written_through(
    app: Appliance, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    write_files(src, {"f.txt": b"restored f\n", "sub/g.txt": b"restored g\n", "h.txt": b"h\n"})
    manifest = back_up(app, src)
    want = snapshot(src)
    outside = tmp_path / "outside"
    write_files(outside, {"victim": b"precious\n", "linked": b"precious too\n"})
    target = tmp_path / "target"
    (target / "sub").mkdir(parents=True)
    (target / "f.txt").symlink_to(outside / "victim")
    (target / "h.txt").symlink_to(outside / "dangling")  # O_CREAT alone would follow it
    os.link(outside / "linked", target / "sub" / "g.txt")  # O_TRUNC alone would write it
    before = snapshot(outside)

    counts = restore_tree(app.repo, manifest, str(target), workers=2)
    assert counts["files"] == 3 and counts["kept"] == 0
    assert snapshot(target) == want
    assert snapshot(outside) == before
    assert not (outside / "dangling").exists()


# --- conflict choices ----------------------------------------------------------------------------


def test_keep_both_renames_what_is_in_the_way(app: Appliance, tmp_path: Path) -> None:
    src = tmp_path / "src"
    payload = os.urandom(300_000)
    write_files(src, {"f.bin": payload, "sub/g.txt": b"new g\n", "sub/same.txt": b"same\n"})
    (src / "link").symlink_to("f.bin")
    os.link(src / "f.bin", src / "hard")
    (src / "was_file").mkdir()
    manifest = back_up(app, src)

    target = tmp_path / "target"
    write_files(target, {"f.bin": b"old f\n", "sub/g.txt": b"old g\n", "was_file": b"old x\n"})
    (target / "link").symlink_to("/etc/passwd")
    (target / "hard").write_bytes(b"old hard\n")
    (target / "untouched.txt").write_bytes(b"mine\n")

    counts = restore_tree(
        app.repo, manifest, str(target), on_conflict="keep_both", now=NOW, workers=2
    )
    assert counts["kept"] == 5
    assert (target / "f.bin").read_bytes() == payload
    assert (target / "sub/g.txt").read_bytes() == b"new g\n"
    assert (target / "sub/same.txt").read_bytes() == b"same\n"
    assert os.readlink(target / "link") == "f.bin"
    assert os.stat(target / "hard").st_ino == os.stat(target / "f.bin").st_ino
    assert (target / "was_file").is_dir()
    assert (target / f"f.bin{KEPT}").read_bytes() == b"old f\n"
    assert (target / f"sub/g.txt{KEPT}").read_bytes() == b"old g\n"
    assert (target / f"was_file{KEPT}").read_bytes() == b"old x\n"
    assert (target / f"hard{KEPT}").read_bytes() == b"old hard\n"
    assert os.readlink(target / f"link{KEPT}") == "/etc/passwd"
    assert (target / "untouched.txt").read_bytes() == b"mine\n"

    # The same restore again: the first kept names are taken, so "-2" is appended.
    counts = restore_tree(
        app.repo, manifest, str(target), on_conflict="keep_both", now=NOW, workers=1
    )
    assert counts["kept"] == 5  # f.bin, g.txt, same.txt, link, hard (was_file is a folder now)
    assert (target / f"f.bin{KEPT}-2").read_bytes() == payload
    assert (target / f"f.bin{KEPT}").read_bytes() == b"old f\n"
    assert (target / "f.bin").read_bytes() == payload


def test_overwrite_replaces_and_refuses_a_folder_at_a_file_name(
    app: Appliance, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    write_files(src, {"f.txt": b"new\n", "g.txt": b"g\n"})
    manifest = back_up(app, src)
    target = tmp_path / "target"
    write_files(target, {"f.txt": b"old\n"})
    counts = restore_tree(app.repo, manifest, str(target), on_conflict="overwrite", workers=1)
    assert counts["kept"] == 0 and (target / "f.txt").read_bytes() == b"new\n"
    assert sorted(os.listdir(target)) == ["f.txt", "g.txt"]

    os.unlink(target / "g.txt")
    (target / "g.txt").mkdir()
    (target / "g.txt" / "keep").write_bytes(b"mine\n")
    with pytest.raises(UnsafeRestorePath, match=r"g\.txt"):
        restore_tree(app.repo, manifest, str(target), on_conflict="keep_both", workers=1)
    assert (target / "g.txt" / "keep").read_bytes() == b"mine\n"


def test_an_unknown_conflict_choice_is_refused(app: Appliance, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_files(src, {"f.txt": b"f\n"})
    manifest = back_up(app, src)
    with pytest.raises(Exception, match="conflict"):
        restore_tree(app.repo, manifest, str(tmp_path / "t"), on_conflict="merge")  # type: ignore[arg-type]
    assert not (tmp_path / "t" / "f.txt").exists()


# --- the target folder's own metadata ------------------------------------------------------------


@root_only
def test_an_existing_target_keeps_its_owner_and_mode(app: Appliance, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_files(src, {"f.txt": b"f\n", "sub/g.txt": b"g\n"})
    os.chown(src, NOBODY, NOBODY)
    os.chmod(src, 0o777)
    os.chown(src / "sub", NOBODY, NOBODY)
    os.chmod(src / "sub", 0o775)
    manifest = back_up(app, src)

    target = tmp_path / "etc-like"
    target.mkdir()
    os.chown(target, 0, 0)
    os.chmod(target, 0o755)
    restore_tree(app.repo, manifest, str(target), workers=1)
    st = os.stat(target)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0)
    sub = os.stat(target / "sub")  # folders below the target take the point's metadata
    assert (stat.S_IMODE(sub.st_mode), sub.st_uid) == (0o775, NOBODY)

    created = tmp_path / "new" / "target"
    restore_tree(app.repo, manifest, str(created), workers=1)
    st = os.stat(created)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o777, NOBODY, NOBODY)

    kept = tmp_path / "new" / "kept"
    restore_tree(app.repo, manifest, str(kept), keep_root_metadata=True, workers=1)
    st = os.stat(kept)
    assert (stat.S_IMODE(st.st_mode), st.st_uid) != (0o777, NOBODY)


# --- image points ----------------------------------------------------------------------------------


@pytest.fixture()
def image_repo(tmp_path: Path) -> Iterator[tuple[Repository, dict[str, Any]]]:
    store = tmp_path / "store"
    shutil.copytree(FIXTURES / "store-v1", store)
    expected = json.loads((FIXTURES / "store-v1.expected.json").read_text())
    repo = Repository.open(
        LocalDirectoryBackend(str(store)),
        str(tmp_path / "cache"),
        passphrase=expected["passphrase"],
    )
    disk = repo.get_manifest(expected["image_point"])["disks"][0]
    yield repo, {"disk": disk, **expected}
    repo.close()


def test_a_disk_target_that_is_a_symlink_is_refused(
    image_repo: tuple[Repository, dict[str, Any]], tmp_path: Path
) -> None:
    repo, fixture = image_repo
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    link = tmp_path / "disk.img"
    link.symlink_to(victim)
    with pytest.raises(UnsafeRestorePath, match="symlink"):
        restore_disk(repo, fixture["disk"], str(link))
    assert victim.read_bytes() == b"precious\n"
    with pytest.raises(UnsafeRestorePath, match="symlink"):
        restore_disk(repo, fixture["disk"], str(link), target_format="qcow2")
    assert victim.read_bytes() == b"precious\n" and link.is_symlink()

    dangling = tmp_path / "dangling.img"
    dangling.symlink_to(tmp_path / "created-through-link")
    with pytest.raises(UnsafeRestorePath, match="symlink"):
        restore_disk(repo, fixture["disk"], str(dangling))
    assert not (tmp_path / "created-through-link").exists()


def test_a_disk_target_with_other_hard_links_is_refused(
    image_repo: tuple[Repository, dict[str, Any]], tmp_path: Path
) -> None:
    repo, fixture = image_repo
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    os.link(victim, tmp_path / "disk.img")
    with pytest.raises(UnsafeRestorePath, match="hard links"):
        restore_disk(repo, fixture["disk"], str(tmp_path / "disk.img"))
    assert victim.read_bytes() == b"precious\n"


def test_an_existing_disk_file_is_rewritten_in_place(
    image_repo: tuple[Repository, dict[str, Any]], tmp_path: Path
) -> None:
    repo, fixture = image_repo
    out = tmp_path / "disk.img"
    out.write_bytes(b"x" * (fixture["disk_size"] + 4096))
    os.chmod(out, 0o640)
    inode = os.stat(out).st_ino
    restore_disk(repo, fixture["disk"], str(out))
    st = os.stat(out)
    assert (st.st_ino, stat.S_IMODE(st.st_mode), st.st_size) == (
        inode,
        0o640,
        fixture["disk_size"],
    )
    assert hashlib.sha256(out.read_bytes()).hexdigest() == fixture["disk_sha256"]


def test_a_planted_staging_symlink_is_not_followed(
    image_repo: tuple[Repository, dict[str, Any]], tmp_path: Path
) -> None:
    repo, fixture = image_repo
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    out = tmp_path / "disk.qcow2"
    Path(f"{out}.raw-restore").symlink_to(victim)
    try:
        restore_disk(repo, fixture["disk"], str(out), target_format="qcow2")
    except Exception as exc:  # without qemu-img the conversion itself is refused
        assert "qemu-img" in str(exc), exc
    assert victim.read_bytes() == b"precious\n"
    assert not os.path.lexists(f"{out}.raw-restore")
