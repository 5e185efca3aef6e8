"""Every location backend the engine opens is closed again, on every path.

A location's directory backend caches read descriptors; one left open keeps the filesystem
busy, and a pool or a USB disk then cannot be unmounted ("target is busy"). Here the location is
a folder on a real ext4 on a loop device: after a copy is verified, a point restored from it
(files, tar, a failed restore), or its adoption refused, nothing of this process is open below
it (``/proc/self/fd``) and a plain ``umount`` (not lazy) succeeds. The home repository is never
closed by any of it: the appliance goes on backing up and verifying.
"""

from __future__ import annotations

import io
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_support import compare_trees, new_appliance, set_engine_env, snapshot
from loop_support import mounted_disk

from appliance.catalog.records import home_location_id
from appliance.engine import Appliance
from appliance.errors import InvalidInput, LocationUnavailable
from appliance.locations import work as locations_work
from appliance.store.backend import LocalDirectoryBackend
from appliance.store.identity import write_identity

pytestmark = pytest.mark.root


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[dict]:
    app, _ = new_appliance(tmp_path / "appliance")
    tree = tmp_path / "tree"
    (tree / "docs").mkdir(parents=True)
    for i in range(12):
        (tree / "docs" / f"f{i}.bin").write_bytes(os.urandom(30_000 + i))
    point = app.backup_files(str(tree), "tree").point.id
    pool = tmp_path / "pool"
    try:
        with mounted_disk(tmp_path / "pool.img", pool, size=64 << 20):
            app.add_location(str(pool), label="pool", require_mount=True)
            app.copy_point(point, "pool")
            yield {"app": app, "tree": tree, "point": point, "pool": pool}
    finally:
        app.close()


def open_below(folder: Path) -> list[str]:
    """What this process has open below ``folder``."""
    root = os.path.realpath(folder)
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
        if target == root or target.startswith(root + os.sep):
            found.append(target)
    return found


def unmounts_now(folder: Path) -> None:
    """Nothing is open below ``folder``, and a plain ``umount`` of it succeeds."""
    assert open_below(folder) == []
    done = subprocess.run(["umount", str(folder)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert not os.path.ismount(folder)


def still_works(app: Appliance, tree: Path) -> None:
    """The home repository is open and whole: another backup, and a verify of everything."""
    (tree / "later.txt").write_text("after the location was let go\n")
    later = app.backup_files(str(tree), "tree").point.id
    assert app.verify(later).ok
    assert app.verify().ok


def test_verifying_a_copy_leaves_nothing_open_at_its_location(site: dict) -> None:
    app: Appliance = site["app"]
    assert app.verify_copy(site["point"], "pool")["ok"]
    unmounts_now(site["pool"])
    still_works(app, site["tree"])


def test_restoring_from_a_copy_leaves_nothing_open_there(site: dict, tmp_path: Path) -> None:
    app: Appliance = site["app"]
    out = tmp_path / "out"
    notes: list[str] = []
    app.restore(site["point"], str(out), location="pool", log=notes.append)
    compare_trees(snapshot(site["tree"]), snapshot(out))
    assert notes == []  # read from the pool, no fallback needed
    assert open_below(site["pool"]) == []
    # A restore that fails once the copy is open lets go too.
    with pytest.raises(InvalidInput):
        app.restore(site["point"], str(tmp_path / "none"), location="pool", on_conflict="?")  # type: ignore[arg-type]
    assert open_below(site["pool"]) == []
    # And a reader the caller closes: the copy there first, the home pool after it.
    repo = app.reader(site["point"], named="pool")
    assert app.reading_from(repo) == "pool"
    repo.get_manifest(site["point"])
    repo.close()
    unmounts_now(site["pool"])
    still_works(app, site["tree"])


def test_closing_a_reader_never_closes_the_home_repository(site: dict) -> None:
    """A reader through the home pool (alone, or before the copy elsewhere) borrows the home
    repository's backend: closing the reader leaves the descriptors the home store has open."""
    app: Appliance = site["app"]
    store = Path(app.data_dir.store_path)
    home = home_location_id(app.repo.store_id)
    for only in (True, False):
        repo = locations_work.reader(app, site["point"], named=home, only=only)
        assert repo is not app.repo
        assert app.reading_from(repo) == app.catalog.get_location(home).label
        repo.get_manifest(site["point"])
        held = open_below(store)
        assert held  # the home store's cached read descriptors
        repo.close()
        assert open_below(store) == held
    assert app.restore_tar(site["point"], io.BytesIO()) > 0
    assert open_below(site["pool"]) == []
    still_works(app, site["tree"])


def test_a_refused_adoption_leaves_nothing_open(site: dict, tmp_path: Path) -> None:
    """The place holds a location of another store: the identity check refuses it, and the
    backend opened to read the identity is closed."""
    app: Appliance = site["app"]
    stranger = site["pool"] / "stranger"
    stranger.mkdir()
    backend = LocalDirectoryBackend(str(stranger))
    write_identity(backend, "0123456789abcdef", uuid.uuid4().hex)
    backend.close()
    with pytest.raises(LocationUnavailable):
        app.adopt_location(str(stranger))
    unmounts_now(site["pool"])
    still_works(app, site["tree"])
