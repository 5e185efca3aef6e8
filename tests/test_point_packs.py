"""The packs a point needs: one function (appliance.point_packs) that verify, the failover's
pre-boot check and copies use, checked against a blob-by-blob lookup."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_support import new_appliance, set_engine_env, write_sparse

from appliance.engine import Appliance
from appliance.point_packs import metadata_blobs, point_blobs, point_packs
from appliance.store import format as fmt
from image.nbd_export import missing_blobs


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Appliance]:
    appliance, _recovery = new_appliance(tmp_path / "appliance")
    yield appliance
    appliance.close()


def _by_lookup(app: Appliance, manifest: dict) -> dict[bytes, int]:
    packs = {}
    for blob_id in point_blobs(app.repo, manifest):
        entry = app.repo.locate(blob_id)
        packs[entry.pack] = entry.pack_kind
    return packs


def test_files_and_image_points_need_exactly_the_packs_of_their_blobs(
    app: Appliance, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    for i in range(40):
        (tree / "d" / f"f{i}").write_bytes(os.urandom(50_000))
    (tree / "empty").write_bytes(b"")
    disk = tmp_path / "disk.raw"
    write_sparse(disk, 8 << 20, {0: os.urandom(1 << 20), 5 << 20: os.urandom(300_000)})
    files = app.backup_files(str(tree), "tree").point.id
    image = app.backup_image([str(disk)], "vm").point.id
    for point_id in (files, image):
        manifest = app.repo.get_manifest(point_id)
        needs = point_packs(app.repo, manifest)
        assert needs.complete
        assert needs.packs == _by_lookup(app, manifest)
        assert fmt.PACK_KIND_META in needs.packs.values()  # its tree or table blobs
        assert fmt.ZERO_ID not in set(point_blobs(app.repo, manifest))


def test_what_the_index_lacks_is_named(app: Appliance, tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    write_sparse(disk, 4 << 20, {0: os.urandom(2 << 20)})
    point_id = app.backup_image([str(disk)], "vm").point.id
    manifest = app.repo.get_manifest(point_id)
    full = point_packs(app.repo, manifest)
    data_packs = [p for p, kind in full.packs.items() if kind == fmt.PACK_KIND_DATA]
    app.repo.index.remove_packs(data_packs)
    lacking = point_packs(app.repo, manifest)
    assert not lacking.complete and lacking.missing and not lacking.missing_metadata
    assert missing_blobs(app.repo, manifest["disks"])["blobs"] == len(lacking.missing)
    app.repo.index.remove_packs(list(full.packs))
    no_tables = point_packs(app.repo, manifest)
    assert no_tables.missing_metadata == sorted(metadata_blobs(manifest))
    assert missing_blobs(app.repo, manifest["disks"])["tables"] == [
        b.hex() for b in no_tables.missing_metadata
    ]


class CountingBackend:
    """Counts the reads that reach the store (a bucket or a tape bills or waits per request)."""

    def __init__(self, backend: object) -> None:
        self._backend = backend
        # Shared with the forked restore workers, which make most of the reads.
        self._gets = multiprocessing.Value("i", 0)

    @property
    def gets(self) -> int:
        return int(self._gets.value)

    @gets.setter
    def gets(self, value: int) -> None:
        self._gets.value = value

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        with self._gets.get_lock():
            self._gets.value += 1
        return self._backend.get(name, offset, length)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._backend, name)


def test_restores_read_each_pack_run_once(app: Appliance, tmp_path: Path) -> None:
    """About one request per pack a point needs, not one per blob (~16k per GiB before)."""
    from appliance.restore import restore_disk, restore_tree
    from appliance.store.repository import Repository

    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(200):
        (tree / f"small{i}").write_bytes(os.urandom(3000))
    (tree / "big").write_bytes(os.urandom(6 << 20))
    disk = tmp_path / "disk.raw"
    write_sparse(disk, 16 << 20, {0: os.urandom(4 << 20), 10 << 20: os.urandom(2 << 20)})
    files = app.backup_files(str(tree), "tree").point.id
    image = app.backup_image([str(disk)], "vm").point.id
    counting = CountingBackend(app.repo.backend)
    repo = Repository(counting, app.repo.config, app.repo.key, app.repo.cache_dir)  # type: ignore[arg-type]
    for point_id in (files, image):
        manifest = repo.get_manifest(point_id)
        packs = len(point_packs(repo, manifest).packs)
        blobs = len(set(point_blobs(repo, manifest)))
        counting.gets = 0
        if manifest["kind"] == "files":
            restore_tree(repo, manifest, str(tmp_path / "out"), workers=1)
        else:
            restore_disk(repo, manifest["disks"][0], str(tmp_path / "disk.out"))
        # Metadata blobs are read one by one while walking; data blobs by pack runs.
        assert counting.gets <= packs + len(metadata_blobs(manifest)) + 8, (
            counting.gets,
            packs,
            blobs,
        )
        assert packs - len(metadata_blobs(manifest)) <= counting.gets < blobs / 4, (
            counting.gets,
            blobs,
        )
        print(f"{manifest['kind']}: {counting.gets} reads, {packs} packs, {blobs} blobs")
    assert (tmp_path / "disk.out").read_bytes() == disk.read_bytes()
    assert (tmp_path / "out" / "big").read_bytes() == (tree / "big").read_bytes()
