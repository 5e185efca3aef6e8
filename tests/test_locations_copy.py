"""Copies of points at two directory locations on two real loop-mounted ext4 filesystems.

A point is copied (dedup-aware, verified, then committed) to both; the first is unmounted and the
point is restored from the second through the fallback reader, which says it switched; a copy
whose target is pulled mid-way leaves the target consistent and resumes; a location holding
another store is refused.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_support import compare_trees, new_appliance, set_engine_env, snapshot, write_sparse
from loop_support import mounted_disk

from appliance.engine import Appliance
from appliance.errors import LocationUnavailable
from appliance.locations.copy import FallbackBackend, copy_point
from appliance.maintenance import verify_point
from appliance.point_packs import point_packs
from appliance.restore import restore_disk, restore_tree
from appliance.store.backend import LocalDirectoryBackend, MemoryBackend
from appliance.store.identity import check_identity, write_identity
from appliance.store.repository import Repository

pytestmark = pytest.mark.root


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[dict]:
    app, recovery = new_appliance(tmp_path / "appliance")
    tree = tmp_path / "tree"
    (tree / "docs").mkdir(parents=True)
    for i in range(30):
        (tree / "docs" / f"f{i}.bin").write_bytes(os.urandom(40_000 + i))
    (tree / "notes.txt").write_text("notes\n" * 500)
    disk = tmp_path / "disk.raw"
    write_sparse(disk, 8 << 20, {0: os.urandom(1 << 20), 6 << 20: os.urandom(200_000)})
    files = app.backup_files(str(tree), "tree").point.id
    image = app.backup_image([str(disk)], "vm").point.id
    with (
        mounted_disk(tmp_path / "a.img", tmp_path / "a"),
        mounted_disk(tmp_path / "b.img", tmp_path / "b"),
    ):
        yield {
            "app": app,
            "recovery": recovery,
            "tree": tree,
            "disk": disk,
            "files": files,
            "image": image,
            "a": tmp_path / "a",
            "b": tmp_path / "b",
        }
    app.close()


def _location(root: Path) -> LocalDirectoryBackend:
    return LocalDirectoryBackend(str(root), require_mount=True)


def _reader(site: dict, sources: list, cache: Path, switches: list) -> Repository:
    fallback = FallbackBackend(sources, lambda a, b, exc: switches.append((a, b, exc.code)))
    return Repository.open(fallback, str(cache), recovery_key=site["recovery"])


def test_copy_to_two_locations_then_restore_from_the_second(site: dict, tmp_path: Path) -> None:
    app: Appliance = site["app"]
    a, b = _location(site["a"]), _location(site["b"])
    store_id = app.repo.store_id
    write_identity(a, store_id, "loc-a")
    write_identity(b, store_id, "loc-b")
    first = copy_point(app.repo, site["files"], a)
    assert first.packs_copied == first.packs_needed > 0 and first.packs_present == 0
    again = copy_point(app.repo, site["files"], a)  # a rerun moves nothing
    assert again.packs_copied == 0 and again.packs_present == again.packs_needed
    copy_point(app.repo, site["image"], a)
    for point in (site["files"], site["image"]):
        copy_point(app.repo, point, b)

    # Unmount the first location: the point is restored from the second, and the switch is told.
    subprocess.run(["umount", "-l", str(site["a"])], check=True)
    with pytest.raises(LocationUnavailable):
        check_identity(a, store_id, "loc-a")
    assert check_identity(b, store_id, "loc-b") == "loc-b"
    switches: list = []
    repo = _reader(site, [("a", a), ("b", b)], tmp_path / "cache", switches)
    assert switches and switches[0][:2] == ("a", "b") and switches[0][2] == "location_unavailable"
    manifest = repo.get_manifest(site["files"])
    out = tmp_path / "restored"
    restore_tree(repo, manifest, str(out), workers=1)
    compare_trees(snapshot(site["tree"]), snapshot(out))
    restore_disk(repo, repo.get_manifest(site["image"])["disks"][0], str(tmp_path / "disk.out"))
    assert (tmp_path / "disk.out").read_bytes() == site["disk"].read_bytes()
    assert verify_point(repo, site["image"]).ok
    # The second location alone is a complete, self-describing store of both points.
    alone = Repository.open(b, str(tmp_path / "cache-b"), recovery_key=site["recovery"])
    assert sorted(alone.manifest_ids()) == sorted([site["files"], site["image"]])
    for point in (site["files"], site["image"]):
        assert point_packs(alone, alone.get_manifest(point)).complete


def test_a_location_pulled_during_a_copy_stays_consistent_and_the_copy_resumes(
    site: dict, tmp_path: Path
) -> None:
    app: Appliance = site["app"]
    target = _location(site["a"])
    write_identity(target, app.repo.store_id, "loc-a")
    device = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE", str(site["a"])],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    calls = []

    def pull(info: dict) -> None:
        calls.append(info)
        if len(calls) == 1:
            subprocess.run(["umount", "-l", str(site["a"])], check=True)

    with pytest.raises(LocationUnavailable):
        copy_point(app.repo, site["files"], target, progress=pull)
    # Nothing was written into the bare mountpoint, and the pulled disk holds no manifest.
    assert list(site["a"].iterdir()) == []
    subprocess.run(["mount", device, str(site["a"])], check=True)
    assert not (site["a"] / "manifests" / site["files"]).exists()
    resumed = copy_point(app.repo, site["files"], _location(site["a"]))
    assert (
        resumed.packs_present >= 1
        and resumed.packs_copied + resumed.packs_present == resumed.packs_needed
    )
    repo = Repository.open(_location(site["a"]), str(tmp_path / "c"), recovery_key=site["recovery"])
    assert verify_point(repo, site["files"]).ok


def test_a_location_of_another_store_is_refused(site: dict, tmp_path: Path) -> None:
    b = _location(site["b"])
    write_identity(b, "another-store", "loc-x")
    with pytest.raises(LocationUnavailable):
        check_identity(b, site["app"].repo.store_id)


def _files_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def test_maintenance_never_deletes_on_the_grounds_of_an_unavailable_location(
    site: dict, tmp_path: Path
) -> None:
    """GC, prune, repair and a catalog rebuild run while a location holding copies is
    unmounted: nothing there is touched, and its copies stay in the catalog."""
    from appliance.catalog.records import home_location_id

    app: Appliance = site["app"]
    location = app.add_location(str(site["a"]), label="a", require_mount=True)
    for point in (site["files"], site["image"]):
        app.copy_point(point, "a")
    before = _files_under(site["a"])
    device = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE", str(site["a"])],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    subprocess.run(["umount", "-l", str(site["a"])], check=True)
    # The point made here is deleted from the local pool; its copy at "a" must survive.
    app.delete_points([site["files"]])
    from appliance.maintenance import collect_garbage

    with app.locks.exclusive():
        collect_garbage(app.repo, grace_seconds=0)
    app.rebuild_catalog()
    assert list(site["a"].iterdir()) == []  # nothing was created in the bare mountpoint
    # Reading the image point with "a" named first: "a" is passed over, the local pool serves.
    notes: list[str] = []
    reader = app.reader(site["image"], named="a", log=notes.append)
    disk = reader.get_manifest(site["image"])["disks"][0]
    restore_disk(reader, disk, str(tmp_path / "disk.out"))
    assert (tmp_path / "disk.out").read_bytes() == site["disk"].read_bytes()
    assert notes and notes[0].startswith("reading from a failed"), notes
    assert not app.catalog.get_location(location.id).online
    subprocess.run(["mount", device, str(site["a"])], check=True)
    assert _files_under(site["a"]) == before
    states = {c.location_id: c.state for c in app.catalog.copies_of(site["image"])}
    assert states[location.id] == "present"
    assert states[home_location_id(app.repo.store_id)] == "present"


def test_a_damaged_pack_at_one_copy_is_read_from_the_next(site: dict, tmp_path: Path) -> None:
    """Bytes that do not decrypt at the first copy are read again from the next one (in the
    restore's worker processes too; the switch is reported where the read is in-process)."""
    app: Appliance = site["app"]
    app.add_location(str(site["a"]), label="a", require_mount=True)
    app.copy_point(site["files"], "a")
    app.copy_point(site["image"], "a")
    packs = sorted((site["a"] / "data").rglob("*"))
    damaged = next(p for p in packs if p.is_file())
    raw = bytearray(damaged.read_bytes())
    for i in range(100, len(raw), 4096):  # flip bytes all through the pack's blobs
        raw[i] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    notes: list[str] = []
    reader = app.reader(site["files"], named="a", log=notes.append)
    out = tmp_path / "out"
    restore_tree(reader, reader.get_manifest(site["files"]), str(out), workers=1)
    compare_trees(snapshot(site["tree"]), snapshot(out))
    # Every pack damaged now (the one above stays damaged: flipping it again would mend it).
    for pack in (p for p in sorted((site["a"] / "data").rglob("*")) if p.is_file()):
        if pack == damaged:
            continue
        raw = bytearray(pack.read_bytes())
        for i in range(100, len(raw), 4096):
            raw[i] ^= 0xFF
        pack.write_bytes(bytes(raw))
    reader = app.reader(site["image"], named="a", log=notes.append)
    disk = reader.get_manifest(site["image"])["disks"][0]
    restore_disk(reader, disk, str(tmp_path / "disk.out"))  # threads: in this process
    assert (tmp_path / "disk.out").read_bytes() == site["disk"].read_bytes()
    assert any(n.startswith("reading from a failed") for n in notes), notes


def test_a_reread_moves_on_from_the_copy_that_gave_the_bytes() -> None:
    """Two threads read damaged bytes from the first copy; the first to find out moves the
    reader to the next copy, and the second still gets good bytes from there (it used to find
    'no copy left', because it moved on from the current copy rather than from its own)."""
    damaged, good = MemoryBackend(), MemoryBackend()
    damaged.put("data/ab/pack", b"XXXX")
    good.put("data/ab/pack", b"good")
    reader = FallbackBackend([("first", damaged), ("second", good)])
    assert reader.get("data/ab/pack") == b"XXXX"  # this thread read the first copy
    other: list[bytes | None] = []

    def elsewhere() -> None:
        other.append(reader.get("data/ab/pack"))
        other.append(reader.reread("data/ab/pack", 0, None, ValueError("damaged")))

    worker = threading.Thread(target=elsewhere)
    worker.start()
    worker.join()
    assert other == [b"XXXX", b"good"] and reader.current == 1
    assert reader.reread("data/ab/pack", 0, None, ValueError("damaged")) == b"good"
    # Bytes from the last copy have nowhere further to go.
    assert reader.reread("data/ab/pack", 0, None, ValueError("damaged")) is None


def test_verifying_one_copy_reads_that_copy_alone(site: dict) -> None:
    """A copy is checked where it is; a damaged one is marked lost, the others stay present."""
    from appliance.catalog.records import home_location_id

    app: Appliance = site["app"]
    location = app.add_location(str(site["a"]), label="a", require_mount=True)
    app.copy_point(site["image"], "a")
    assert app.verify_copy(site["image"], "a")["ok"]
    for pack in (p for p in sorted((site["a"] / "data").rglob("*")) if p.is_file()):
        raw = bytearray(pack.read_bytes())
        raw[200] ^= 0xFF
        pack.write_bytes(bytes(raw))
    assert not app.verify_copy(site["image"], "a")["ok"]  # no fallback to the local pool
    states = {c.location_id: c.state for c in app.catalog.copies_of(site["image"])}
    assert states == {location.id: "lost", home_location_id(app.repo.store_id): "present"}
    assert app.verify(site["image"]).ok
