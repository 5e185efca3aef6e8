"""The committed fixture store (written by scripts/make-fixture-store) must stay readable.

If one of these tests fails, the on-disk format changed: that breaks every store already on a
pool, a USB disk, a tape or in a bucket. Add a new format version instead (see docs/format.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from appliance.restore import restore_disk, restore_tree
from appliance.store import format as fmt
from appliance.store.backend import LocalDirectoryBackend
from appliance.store.repository import Repository

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture()
def fixture_repo(tmp_path):
    store = tmp_path / "store"
    shutil.copytree(os.path.join(FIXTURES, "store-v1"), store)
    with open(os.path.join(FIXTURES, "store-v1.expected.json")) as f:
        expected = json.load(f)
    repo = Repository.open(
        LocalDirectoryBackend(str(store)),
        str(tmp_path / "cache"),
        passphrase=expected["passphrase"],
    )
    yield repo, expected
    repo.close()


def test_frozen_constants():
    # Never renumber: these values are written in stores that exist.
    assert fmt.STORE_FORMAT_VERSION == 1
    assert fmt.PACK_MAGIC == b"APLPACK\x01"
    assert fmt.INDEX_MAGIC == b"APLIDX\x00\x01"
    assert (fmt.BLOB_DATA, fmt.BLOB_DISK, fmt.BLOB_TREE, fmt.BLOB_TABLE) == (1, 2, 3, 4)
    assert (fmt.BLOB_MANIFEST, fmt.BLOB_INDEX) == (5, 6)
    assert (fmt.COMPRESSION_NONE, fmt.COMPRESSION_ZSTD, fmt.CIPHER_AES_256_GCM) == (0, 1, 1)


def test_fixture_files_point_restores(fixture_repo, tmp_path):
    repo, expected = fixture_repo
    manifest = repo.get_manifest(expected["files_point"])
    assert manifest["kind"] == "files"
    target = tmp_path / "out"
    restore_tree(repo, manifest, str(target), workers=1)
    for rel, sha in expected["files"].items():
        assert hashlib.sha256((target / rel).read_bytes()).hexdigest() == sha, rel
    for rel, link in expected["symlinks"].items():
        assert os.readlink(target / rel) == link


def test_fixture_image_point_restores(fixture_repo, tmp_path):
    repo, expected = fixture_repo
    manifest = repo.get_manifest(expected["image_point"])
    assert manifest["kind"] == "image"
    out = tmp_path / "disk.img"
    restore_disk(repo, manifest["disks"][0], str(out))
    assert out.stat().st_size == expected["disk_size"]
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected["disk_sha256"]


def test_fixture_pack_headers_and_index_rebuild(fixture_repo):
    repo, _expected = fixture_repo
    packs = [i.name for p in ("data/", "meta/") for i in repo.backend.list(p)]
    assert packs
    for name in packs:
        assert repo.backend.get(name, 0, 8) == fmt.PACK_MAGIC
    before = {e.blob_id: (e.pack, e.offset) for e in repo.index.all_entries()}
    packs_found, blobs = repo.rebuild_index()
    after = {e.blob_id: (e.pack, e.offset) for e in repo.index.all_entries()}
    assert packs_found == len(packs) and blobs == len(before) and after == before
