"""Facts stated in docs/format.md, checked against a real store parsed the way the document says.

The store is read here with the document's own recipes (struct layouts, folders, bare envelopes,
surrogate escapes), not with the appliance's readers, so that the document stays a sufficient
description of the format.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import struct
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3
import pytest
import zstandard
from argon2.low_level import Type, hash_secret_raw
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.backup.files import backup_tree
from appliance.backup.images import backup_disk
from appliance.points import new_manifest, new_point_id
from appliance.store.backend import LocalDirectoryBackend
from appliance.store.repository import Repository

PASSPHRASE = "format doc"
ZERO_ID = bytes(32)
CHUNK = 64 * 1024
DISK_SIZE = 3 * CHUNK + 1000  # chunk 1 all zeros, chunk 3 short


def _boundary(path: str) -> bool:
    return zlib.crc32(path.encode("utf-8", "surrogateescape")) & 0xFF == 0


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("format-doc")
    src = root / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "f").write_bytes(b"hello")
    (src / "a-b").write_bytes(b"x")
    os.chmod(src / "a-b", 0o4755)
    (src / "\u00e9").write_bytes(b"e")
    with open(os.fsencode(src) + b"/\x80", "wb") as f:
        f.write(b"raw")
    os.symlink(b"tgt\xfe", os.fsencode(src) + b"/lnk")
    os.link(src / "a" / "f", src / "hl")
    os.mkfifo(src / "fifo")
    xattr_name = b"user.n\xe9".decode("utf-8", "surrogateescape")
    try:
        os.setxattr(src / "a" / "f", xattr_name, b"v")
        has_xattrs = True
    except OSError:
        has_xattrs = False
    with open(src / "sparse", "wb") as f:
        f.truncate(1024 * 1024)
        f.seek(512 * 1024)
        f.write(b"q" * 100)
    # Symlinks are cheap records: enough of them to cut the tree into several slices.
    many = src / "many"
    many.mkdir()
    i = cuts = 0
    while cuts < 3:
        name = f"l{i:05d}"
        os.symlink("x", many / name)
        cuts += _boundary(f"many/{name}")
        i += 1
    disk = root / "disk.img"
    disk.write_bytes(
        os.urandom(CHUNK) + bytes(CHUNK) + os.urandom(CHUNK) + os.urandom(DISK_SIZE - 3 * CHUNK)
    )

    # The store layer alone (no catalog): the manifests are built as the engine builds them.
    store_dir = root / "store"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APPLIANCE_TEST_WEAK_KDF", "1")
        repo = Repository.init(
            LocalDirectoryBackend(str(store_dir)), PASSPHRASE, str(root / "cache")
        )
    try:
        full = _files_point(repo, str(src), None)
        incr = _files_point(repo, str(src), full)
        entry, _stats, entries = backup_disk(repo, str(disk), name="disk", base=None, threads=1)
        repo.commit_index(entries)
        image = new_manifest(
            point_id=new_point_id(datetime.now(UTC)),
            asset="vm",
            kind="image",
            mode="full",
            created=datetime.now(UTC),
            parent=None,
            base_full=None,
            store_id=repo.store_id,
            source=str(disk),
        )
        image["disks"] = [entry]
        repo.put_manifest(image["point_id"], image)
    finally:
        repo.close()
    yield {
        "dir": store_dir,
        "full": full["point_id"],
        "incr": incr["point_id"],
        "image": image["point_id"],
        "has_xattrs": has_xattrs,
    }


def _files_point(repo: Repository, src: str, base: dict[str, Any] | None) -> dict[str, Any]:
    tree, stats, warnings = backup_tree(repo, src, previous=base, workers=1)
    created = datetime.now(UTC)
    manifest = new_manifest(
        point_id=new_point_id(created),
        asset="files",
        kind="files",
        mode="incremental" if base else "full",
        created=created,
        parent=base["point_id"] if base else None,
        base_full=base["point_id"] if base else None,
        store_id=repo.store_id,
        source=src,
    )
    manifest["tree"] = tree
    manifest["stats"] = {**vars(stats), "logical_bytes": stats.bytes_total}
    manifest["warnings"] = warnings.items
    manifest["warning_count"] = warnings.count
    repo.put_manifest(manifest["point_id"], manifest)
    return manifest


# --- a reader written from docs/format.md ----------------------------------------------------------


class DocReader:
    def __init__(self, store_dir: Path) -> None:
        self.dir = store_dir
        self.config = json.loads((store_dir / "config").read_text())
        key_file = json.loads(next((store_dir / "keys").iterdir()).read_text())
        self.key_file = key_file
        kek = hash_secret_raw(
            PASSPHRASE.encode("utf-8"),
            base64.b64decode(key_file["salt"]),
            time_cost=key_file["iterations"],
            memory_cost=key_file["memory_kib"],
            parallelism=key_file["lanes"],
            hash_len=32,
            type=Type.ID,
            version=0x13,
        )
        self.master = AESGCM(kek).decrypt(
            base64.b64decode(key_file["nonce"]),
            base64.b64decode(key_file["wrapped"]),
            b"APLKEY\x01" + self.config["store_id"].encode("ascii"),
        )
        self.aead = AESGCM(self.master[:32])
        self.entries: dict[bytes, tuple[int, str, int, int]] = {}
        for index_file in sorted((store_dir / "index").iterdir()):
            blob_id = bytes.fromhex(index_file.name)
            plaintext = self.open(6, blob_id, index_file.read_bytes())  # a bare envelope
            assert self.keyed(plaintext) == blob_id
            for blob_id, blob_type, path, offset, length in parse_index(plaintext):
                self.entries[blob_id] = (blob_type, path, offset, length)

    def keyed(self, data: bytes) -> bytes:
        return blake3.blake3(data, key=self.master[32:]).digest()

    def open(self, blob_type: int, blob_id: bytes, envelope: bytes) -> bytes:
        header, nonce = envelope[:3], envelope[3:15]
        aad = b"APLB" + header + bytes((blob_type,)) + blob_id
        body = self.aead.decrypt(nonce, envelope[15:], aad)
        assert header[:2] == b"\x01\x01" and header[2] in (0, 1)
        return zstandard.ZstdDecompressor().decompress(body) if header[2] == 1 else body

    def blob(self, blob_id: bytes) -> bytes:
        blob_type, path, offset, length = self.entries[blob_id]
        pack = (self.dir / path).read_bytes()
        # The 37-byte entry header right before the envelope repeats type, ID and length.
        assert struct.unpack_from(">B32sI", pack, offset - 37) == (blob_type, blob_id, length)
        plaintext = self.open(blob_type, blob_id, pack[offset : offset + length])
        assert self.keyed(plaintext) == blob_id
        return plaintext

    def manifest(self, point_id: str) -> dict[str, Any]:
        blob_id = self.keyed(f"manifest:{point_id}".encode())
        raw = (self.dir / "manifests" / point_id).read_bytes()  # a bare envelope
        plaintext = self.open(5, blob_id, raw)
        assert plaintext.isascii()
        document: dict[str, Any] = json.loads(plaintext)
        return document

    def tree_slices(self, manifest: dict[str, Any]) -> list[bytes]:
        return [self.blob(bytes.fromhex(h)) for h in manifest["tree"]]

    def records(self, manifest: dict[str, Any]) -> list[dict[str, Any]]:
        return [json.loads(line) for s in self.tree_slices(manifest) for line in s.splitlines()]


def parse_index(plaintext: bytes) -> Iterator[tuple[bytes, int, str, int, int]]:
    assert plaintext[:8] == b"APLIDX\x00\x01"
    pos = 8
    while pos < len(plaintext):
        pack, kind, count = struct.unpack_from(">32sBI", plaintext, pos)
        pos += 37
        folder = {ord("d"): "data", ord("m"): "meta"}[kind]
        path = f"{folder}/{pack.hex()[:2]}/{pack.hex()}"
        for _ in range(count):
            blob_id, blob_type, offset, length = struct.unpack_from(">32sBII", plaintext, pos)
            pos += 41
            yield blob_id, blob_type, path, offset, length
    assert pos == len(plaintext)


@pytest.fixture(scope="module")
def reader(store: dict[str, Any]) -> DocReader:
    return DocReader(store["dir"])


def by_path(records: list[dict[str, Any]]) -> dict[bytes, dict[str, Any]]:
    return {r["path"].encode("utf-8", "surrogateescape"): r for r in records}


# --- the facts ----------------------------------------------------------------------------------------


def test_key_file_is_base64_and_argon2id_v13(reader: DocReader) -> None:
    key_file = reader.key_file
    assert len(base64.b64decode(key_file["salt"], validate=True)) == 16
    assert len(base64.b64decode(key_file["nonce"], validate=True)) == 12
    assert len(base64.b64decode(key_file["wrapped"], validate=True)) == 80
    assert len(reader.master) == 64  # unwrapped with Argon2 version 0x13 in DocReader


def test_index_entries_locate_every_blob_in_its_pack(reader: DocReader) -> None:
    assert reader.entries
    assert ZERO_ID not in reader.entries
    for blob_id, (blob_type, path, _offset, _length) in reader.entries.items():
        assert path.startswith("data/" if blob_type in (1, 2) else "meta/")
        reader.blob(blob_id)
    for pack in (reader.dir / "data").rglob("*"):
        if pack.is_file():
            assert blake3.blake3(pack.read_bytes()).hexdigest() == pack.name


def test_manifest_fields(reader: DocReader, store: dict[str, Any]) -> None:
    full = reader.manifest(store["full"])
    assert "format" not in full and "labels" not in full
    assert "labels" in reader.config
    assert full["created"].endswith("+00:00") and full["parent"] is None
    millis = int(datetime.fromisoformat(full["created"]).timestamp() * 1000)
    assert full["point_id"][:11] == f"{millis:011x}" and len(full["point_id"]) == 16
    stats = full["stats"]
    assert stats["new_blobs"] == 0
    sizes = [r["size"] for r in reader.records(full) if r["type"] == "file"]
    assert stats["logical_bytes"] == stats["bytes_total"] == sum(sizes)


def test_incremental_tree_is_complete(reader: DocReader, store: dict[str, Any]) -> None:
    full = reader.records(reader.manifest(store["full"]))
    incr = reader.records(reader.manifest(store["incr"]))
    assert [r["path"] for r in incr] == [r["path"] for r in full]
    assert [r.get("chunks") for r in incr] == [r.get("chunks") for r in full]


def test_names_are_surrogate_escaped(reader: DocReader, store: dict[str, Any]) -> None:
    manifest = reader.manifest(store["full"])
    text = b"".join(reader.tree_slices(manifest))
    assert text.isascii()
    assert b'"path":"\\udc80"' in text
    assert b'"path":"\\u00e9"' in text
    assert b'"target":"tgt\\udcfe"' in text
    if store["has_xattrs"]:
        assert b'"user.n\\udce9":"' + base64.b64encode(b"v") + b'"' in text
    records = by_path(reader.records(manifest))
    assert records[b"\x80"]["type"] == "file"
    assert records[b"lnk"]["target"].encode("utf-8", "surrogateescape") == b"tgt\xfe"


def test_canonical_order(reader: DocReader, store: dict[str, Any]) -> None:
    paths = [r["path"] for r in reader.records(reader.manifest(store["full"]))]
    assert paths[0] == ""
    assert paths.index("a") < paths.index("a/f") < paths.index("a-b")
    assert paths.index("\u00e9") < paths.index("\udc80")  # code point order, not byte order
    assert paths == sorted(paths, key=lambda p: tuple(p.split("/")) if p else ())


def test_record_fields_per_type(reader: DocReader, store: dict[str, Any]) -> None:
    records = by_path(reader.records(reader.manifest(store["full"])))
    common = {"path", "type", "mode", "uid", "gid", "mtime_ns"}
    optional = {"user", "group", "xattrs", "sparse"}
    allowed = {
        "dir": set(),
        "file": {"ctime_ns", "size", "ino", "chunks"},
        "symlink": {"target"},
        "hardlink": {"target"},
    }
    for record in records.values():
        keys = set(record)
        extra = allowed[record["type"]]
        assert common | extra <= keys <= common | extra | optional, record
        if record["type"] == "hardlink":
            assert "xattrs" not in record
        if record["type"] != "file":
            assert "sparse" not in record
    assert records[b"hl"] == {**records[b"hl"], "type": "hardlink", "target": "a/f"}
    assert records[b"a-b"]["mode"] == 0o4755
    assert all(r["mode"] == stat.S_IMODE(r["mode"]) for r in records.values())


def test_chunk_lists_and_holes(reader: DocReader, store: dict[str, Any]) -> None:
    records = by_path(reader.records(reader.manifest(store["full"])))
    sparse = records[b"sparse"]
    assert sparse["sparse"] is True
    assert sum(length for _, length in sparse["chunks"]) == sparse["size"] == 1024 * 1024
    assert sparse["chunks"][0] == [None, 512 * 1024] and sparse["chunks"][-1][0] is None
    for record in records.values():
        for hex_id, length in record.get("chunks", []):
            assert hex_id != ZERO_ID.hex() and length > 0
            if hex_id is not None:
                assert len(reader.blob(bytes.fromhex(hex_id))) == length


def test_special_files_are_warnings(reader: DocReader, store: dict[str, Any]) -> None:
    manifest = reader.manifest(store["full"])
    assert b"fifo" not in by_path(reader.records(manifest))
    assert {"path": "fifo", "message": "special file (fifo) not backed up"} in manifest["warnings"]


def test_tree_slices_are_cut_by_crc32(reader: DocReader, store: dict[str, Any]) -> None:
    slices = reader.tree_slices(reader.manifest(store["full"]))
    assert len(slices) >= 3
    for i, data in enumerate(slices):
        assert data.endswith(b"\n")
        paths = [json.loads(line)["path"] for line in data.splitlines()]
        cuts = [n for n, p in enumerate(paths) if n >= 15 and _boundary(p)]
        last = len(paths) - 1
        assert cuts == ([last] if i < len(slices) - 1 else [])


def test_disk_table_zero_id_and_short_last_chunk(reader: DocReader, store: dict[str, Any]) -> None:
    manifest = reader.manifest(store["image"])
    (disk,) = manifest["disks"]
    assert disk["size"] == DISK_SIZE and disk["chunk_size"] == CHUNK
    assert set(disk["identity"]) == {"size", "mtime_ns", "ctime_ns", "ino"}
    table = b"".join(reader.blob(bytes.fromhex(h)) for h in disk["tables"])
    ids = [table[i : i + 32] for i in range(0, len(table), 32)]
    assert len(ids) == -(-DISK_SIZE // CHUNK) == 4
    assert ids[1] == ZERO_ID and ZERO_ID not in ids[:1] + ids[2:]
    assert len(reader.blob(ids[3])) == DISK_SIZE % CHUNK
    assert disk["allocated"] == 3 * CHUNK
