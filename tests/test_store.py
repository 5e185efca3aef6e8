"""The store below the backup engine: packs, index files, the repository (envelopes and keys:
test_store_crypto.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import blake3
import pytest
from engine_support import (
    PASSPHRASE,
    SMALL_PACKS,
    compare_trees,
    new_appliance,
    random_bytes,
    set_engine_env,
    snapshot,
    text_bytes,
)

from appliance.engine import Appliance
from appliance.errors import (
    IntegrityError,
    InvalidInput,
    ObjectMissing,
    StoreExists,
    StoreNotFound,
    UnsupportedFormat,
    WrongPassphrase,
)
from appliance.store import format as fmt
from appliance.store.backend import LocalDirectoryBackend, MemoryBackend
from appliance.store.crypto import (
    Envelope,
    MasterKey,
)
from appliance.store.index import IndexCache, decode_index, encode_index
from appliance.store.packs import (
    IndexEntry,
    PackWriter,
    pack_name_matches,
    pack_object_name,
    parse_pack,
)
from appliance.store.repository import Repository


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


@pytest.fixture(scope="module")
def key() -> MasterKey:
    return MasterKey.generate()


@pytest.fixture
def envelope(key: MasterKey) -> Envelope:
    return Envelope(key)


def _flip(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 1]) + data[position + 1 :]


# --- packs ------------------------------------------------------------------------------------------


def _sealed_blobs(envelope: Envelope, count: int, size: int) -> list[tuple[int, bytes, bytes]]:
    out = []
    for i in range(count):
        data = random_bytes(size, 1000 + i)
        blob_id = envelope.chunk_id(data)
        out.append((fmt.BLOB_DATA, blob_id, envelope.seal(fmt.BLOB_DATA, blob_id, data)))
    return out


def test_pack_writer_and_parse_round_trip(envelope: Envelope) -> None:
    backend = MemoryBackend()
    writer = PackWriter(backend, fmt.PACK_KIND_DATA, target_size=10_000)
    blobs = _sealed_blobs(envelope, 12, 3000)
    for blob_type, blob_id, sealed in blobs:
        writer.add(blob_type, blob_id, sealed)
    entries = writer.flush()
    assert writer.packs_written == len({e.pack for e in entries}) >= 3
    assert writer.flush() == []  # nothing pending: no empty pack
    assert sorted(e.blob_id for e in entries) == sorted(b[1] for b in blobs)
    stored = {info.name for info in backend.list()}
    assert stored == {pack_object_name(e.pack, fmt.PACK_KIND_DATA) for e in entries}
    assert all(name.startswith("data/") for name in stored)
    by_id = {blob_id: sealed for _t, blob_id, sealed in blobs}
    for pack in {e.pack for e in entries}:
        data = backend.get(pack_object_name(pack, fmt.PACK_KIND_DATA))
        # The pack's name is the (unkeyed) BLAKE3 of its bytes.
        assert blake3.blake3(data).digest() == pack
        assert pack_name_matches(pack, data)
        assert data[: len(fmt.PACK_MAGIC)] == fmt.PACK_MAGIC
        parsed = list(parse_pack(pack, data))
        assert parsed == sorted((e for e in entries if e.pack == pack), key=lambda e: e.offset)
        for entry in parsed:
            envelope_bytes = data[entry.offset : entry.offset + entry.length]
            assert envelope_bytes == by_id[entry.blob_id]
            assert envelope.open_content(entry.blob_type, entry.blob_id, envelope_bytes)


def test_pack_kinds_go_to_their_own_prefix(envelope: Envelope) -> None:
    backend = MemoryBackend()
    writer = PackWriter(backend, fmt.PACK_KIND_META)
    data = b'{"path":""}\n'
    blob_id = envelope.chunk_id(data)
    writer.add(fmt.BLOB_TREE, blob_id, envelope.seal(fmt.BLOB_TREE, blob_id, data))
    assert writer.take_completed() == []  # the open pack is not written yet
    assert list(backend.list()) == []
    (entry,) = writer.flush()
    assert entry.pack_kind == fmt.PACK_KIND_META and entry.blob_type == fmt.BLOB_TREE
    assert [i.name for i in backend.list()] == [pack_object_name(entry.pack, fmt.PACK_KIND_META)]
    assert pack_object_name(entry.pack, fmt.PACK_KIND_META).startswith("meta/")


def test_pack_writer_discard_writes_nothing(envelope: Envelope) -> None:
    backend = MemoryBackend()
    writer = PackWriter(backend, fmt.PACK_KIND_DATA)
    for blob_type, blob_id, sealed in _sealed_blobs(envelope, 3, 100):
        writer.add(blob_type, blob_id, sealed)
    writer.discard()
    assert writer.flush() == []
    assert list(backend.list()) == []


def test_damaged_packs_are_detected(envelope: Envelope) -> None:
    backend = MemoryBackend()
    writer = PackWriter(backend, fmt.PACK_KIND_DATA)
    for blob_type, blob_id, sealed in _sealed_blobs(envelope, 3, 500):
        writer.add(blob_type, blob_id, sealed)
    (pack,) = {e.pack for e in writer.flush()}
    data = backend.get(pack_object_name(pack, fmt.PACK_KIND_DATA))
    with pytest.raises(IntegrityError):
        list(parse_pack(pack, data[:-10]))  # truncated in the last envelope
    with pytest.raises(IntegrityError):
        list(parse_pack(pack, data[: fmt.PACK_HEADER_SIZE + 20]))  # truncated in an entry header
    with pytest.raises(IntegrityError):
        list(parse_pack(pack, b"NOTAPACK" + data[8:]))
    with pytest.raises(UnsupportedFormat):
        list(parse_pack(pack, data[:7] + b"\x09" + data[8:]))
    with pytest.raises(IntegrityError):
        list(parse_pack(pack, data[:8] + b"z" + data[9:]))  # unknown kind
    assert not pack_name_matches(pack, _flip(data, len(data) // 2))


# --- index files and the index cache -------------------------------------------------------------


def _entries(count: int, packs: int = 3) -> list[IndexEntry]:
    out = []
    for i in range(count):
        pack = blake3.blake3(b"pack %d" % (i % packs)).digest()
        kind = fmt.PACK_KIND_DATA if i % packs else fmt.PACK_KIND_META
        blob_type = fmt.BLOB_DATA if kind == fmt.PACK_KIND_DATA else fmt.BLOB_TREE
        out.append(
            IndexEntry(
                blake3.blake3(b"blob %d" % i).digest(),
                blob_type,
                pack,
                kind,
                fmt.PACK_HEADER_SIZE + i * 1000,
                900 + i,
            )
        )
    return out


def test_index_encode_decode_round_trip() -> None:
    entries = _entries(50)
    data = encode_index(entries)
    assert data.startswith(fmt.INDEX_MAGIC)
    decoded = list(decode_index(data))
    assert sorted(decoded, key=lambda e: e.blob_id) == sorted(entries, key=lambda e: e.blob_id)
    # Deterministic: the same entries in any order encode to the same bytes (same index ID).
    assert encode_index(reversed(entries)) == data
    assert list(decode_index(encode_index([]))) == []


def test_damaged_index_files_are_detected() -> None:
    data = encode_index(_entries(10))
    with pytest.raises(IntegrityError):
        list(decode_index(data[:-5]))
    with pytest.raises(IntegrityError):
        list(decode_index(b"garbage!" + data[8:]))
    with pytest.raises(UnsupportedFormat):
        list(decode_index(data[:7] + b"\x07" + data[8:]))


def test_index_cache_add_lookup_remove(tmp_path: Path) -> None:
    cache = IndexCache(str(tmp_path / "cache" / "index.sqlite"))
    entries = _entries(30)
    cache.add("index/one", entries[:20])
    cache.add("index/two", entries[20:])
    cache.add("index/two", entries[20:])  # idempotent
    assert cache.index_files() == {"index/one", "index/two"}
    assert cache.counts() == (30, 3)
    for entry in entries:
        assert cache.lookup(entry.blob_id) == entry
        assert cache.contains(entry.blob_id)
    unknown = blake3.blake3(b"unknown").digest()
    assert cache.lookup(unknown) is None and not cache.contains(unknown)
    first_pack = entries[0].pack
    assert cache.pack_entries(first_pack) == [e for e in entries if e.pack == first_pack]
    cache.remove_packs([first_pack])
    assert cache.counts() == (20, 2)
    for entry in entries:
        assert (cache.lookup(entry.blob_id) is None) == (entry.pack == first_pack)
    assert sorted(p for p, _k in cache.packs()) == sorted({e.pack for e in entries} - {first_pack})
    cache.forget_index_file("index/one")
    assert cache.index_files() == {"index/two"}
    cache.clear()
    assert cache.counts() == (0, 0) and cache.index_files() == set()
    cache.close()


def test_index_cache_batch_lookups_agree_with_single_lookups(tmp_path: Path) -> None:
    cache = IndexCache(str(tmp_path / "cache" / "index.sqlite"))
    entries = _entries(1200, packs=7)  # more IDs than one query takes
    cache.add("index/one", entries[:1100])
    unknown = [blake3.blake3(b"unknown %d" % i).digest() for i in range(3)]
    asked = [e.blob_id for e in reversed(entries)] + unknown + [entries[5].blob_id]
    found = cache.lookup_many(asked)
    assert found == {e.blob_id: e for e in entries[:1100]}
    located = cache.locate_many(iter(asked))  # any iterable, duplicates counted once
    assert located.packs == {e.pack: e.pack_kind for e in entries[:1100]}
    assert located.missing == sorted([e.blob_id for e in entries[1100:]] + unknown)
    assert cache.lookup_many([]) == {} and cache.locate_many([]).missing == []
    cache.remove_blobs([(entries[0].blob_id, entries[0].pack)])
    assert cache.locate_many([entries[0].blob_id]).missing == [entries[0].blob_id]
    cache.close()


def test_index_cache_persists_across_instances(tmp_path: Path) -> None:
    path = str(tmp_path / "index.sqlite")
    entries = _entries(5)
    cache = IndexCache(path)
    cache.add("index/x", entries)
    cache.close()
    again = IndexCache(path)
    assert again.lookup(entries[3].blob_id) == entries[3]
    assert again.index_files() == {"index/x"}
    again.close()


def _new_repo(tmp_path: Path, **config: object) -> Repository:
    backend = LocalDirectoryBackend(str(tmp_path / "store"))
    return Repository.init(backend, PASSPHRASE, str(tmp_path / "cache"), **config)


def _write_blobs(repo: Repository, seeds: range, size: int = 20_000) -> dict[bytes, bytes]:
    writer = repo.writer()
    written = {}
    for seed in seeds:
        data = random_bytes(size, seed)
        written[writer.put(fmt.BLOB_DATA, data)] = data
    repo.commit_index(writer.flush())
    return written


def test_sync_index_follows_the_store(tmp_path: Path) -> None:
    repo = _new_repo(tmp_path, pack_size=SMALL_PACKS)
    first = _write_blobs(repo, range(0, 10))
    second = _write_blobs(repo, range(10, 20))
    index_files = repo.index.index_files()
    assert len(index_files) == 2
    # Another cache (another appliance reading the same store) catches up from the index files.
    other = Repository.open(
        LocalDirectoryBackend(repo.backend.root),  # type: ignore[attr-defined]
        str(tmp_path / "other-cache"),
        passphrase=PASSPHRASE,
    )
    for blob_id, data in {**first, **second}.items():
        assert other.read_blob(blob_id) == data
    # A third session writes more: sync picks up only the new index file.
    third = _write_blobs(repo, range(20, 25))
    other.sync_index()
    assert other.index.index_files() == repo.index.index_files()
    assert all(other.index.contains(b) for b in third)
    # An index file removed from the store (consolidated by GC elsewhere): the cache starts over.
    gone = sorted(index_files)[0]
    repo.backend.delete(gone)
    other.sync_index()
    assert other.index.index_files() == repo.index.index_files() - {gone}
    # The blobs of the deleted index file are no longer known; the others are.
    assert sum(other.index.contains(b) for b in {**first, **second}) == 10
    assert all(other.index.contains(b) for b in third)
    other.close()
    repo.close()


def test_writer_deduplicates_within_and_across_sessions(tmp_path: Path) -> None:
    repo = _new_repo(tmp_path)
    data = random_bytes(50_000, 7)
    writer = repo.writer()
    first = writer.put(fmt.BLOB_DATA, data)
    assert writer.put(fmt.BLOB_DATA, data) == first
    assert writer.new_blobs == 1
    repo.commit_index(writer.flush())
    again = repo.writer()
    assert again.put(fmt.BLOB_DATA, data) == first
    assert again.new_blobs == 0 and again.flush() == []
    assert repo.read_blob(first) == data
    with pytest.raises(ObjectMissing):
        repo.read_blob(bytes(32))
    repo.close()


# --- repository ---------------------------------------------------------------------------------------


def test_init_twice_is_refused(tmp_path: Path) -> None:
    repo = _new_repo(tmp_path)
    with pytest.raises(StoreExists):
        Repository.init(repo.backend, "other", str(tmp_path / "cache2"))
    repo.close()
    app, _recovery = new_appliance(tmp_path / "appliance")
    app.close()
    with pytest.raises(StoreExists):
        new_appliance(tmp_path / "appliance")


def test_open_missing_store(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFound) as info:
        Repository.open(
            LocalDirectoryBackend(str(tmp_path / "nothing")),
            str(tmp_path / "cache"),
            passphrase=PASSPHRASE,
        )
    assert info.value.code == "store_not_found"
    with pytest.raises(StoreNotFound):
        Appliance.open(str(tmp_path / "nothing-either"), passphrase=PASSPHRASE)


def test_open_needs_a_secret(tmp_path: Path) -> None:
    repo = _new_repo(tmp_path)
    with pytest.raises(InvalidInput):
        Repository.open(repo.backend, str(tmp_path / "cache"))
    repo.close()


def test_open_with_wrong_passphrase(tmp_path: Path) -> None:
    repo = _new_repo(tmp_path)
    with pytest.raises(WrongPassphrase):
        Repository.open(repo.backend, str(tmp_path / "cache"), passphrase="not it")
    repo.close()


def test_config_records_overrides(tmp_path: Path) -> None:
    repo = _new_repo(tmp_path, pack_size=SMALL_PACKS, labels={"site": "lab"})
    config = Repository.read_config(repo.backend)
    assert config.pack_size == SMALL_PACKS and config.labels == {"site": "lab"}
    assert config.store_id == repo.store_id
    assert config.format == fmt.STORE_FORMAT_VERSION
    repo.close()


def test_open_with_recovery_key(tmp_path: Path) -> None:
    repo = _new_repo(tmp_path)
    blobs = _write_blobs(repo, range(3))
    recovery = repo.key.recovery_key()
    repo.close()
    backend = LocalDirectoryBackend(str(tmp_path / "store"))
    opened = Repository.open(backend, str(tmp_path / "cache-r"), recovery_key=recovery.lower())
    for blob_id, data in blobs.items():
        assert opened.read_blob(blob_id) == data
    opened.close()


def test_recovery_key_of_another_store_is_refused(tmp_path: Path) -> None:
    repo = _new_repo(tmp_path)
    _write_blobs(repo, range(2))
    repo.close()
    stranger = MasterKey.generate().recovery_key()  # valid checksum, wrong store
    with pytest.raises(WrongPassphrase):
        Repository.open(
            LocalDirectoryBackend(str(tmp_path / "store")),
            str(tmp_path / "cache-x"),
            recovery_key=stranger,
        )


def test_add_passphrase_then_open_with_it(tmp_path: Path) -> None:
    repo = _new_repo(tmp_path)
    blobs = _write_blobs(repo, range(3))
    name = repo.add_passphrase("a second passphrase")
    assert name in repo.key_files() and len(repo.key_files()) == 2
    repo.close()
    for passphrase in (PASSPHRASE, "a second passphrase"):
        opened = Repository.open(
            LocalDirectoryBackend(str(tmp_path / "store")),
            str(tmp_path / "cache"),
            passphrase=passphrase,
        )
        assert opened.key == repo.key
        assert all(opened.read_blob(b) == d for b, d in blobs.items())
        opened.close()


def test_recovery_then_new_passphrase_after_losing_every_key_file(tmp_path: Path) -> None:
    repo = _new_repo(tmp_path)
    blobs = _write_blobs(repo, range(2))
    recovery = repo.key.recovery_key()
    for name in repo.key_files():
        repo.backend.delete(name)
    repo.close()
    backend = LocalDirectoryBackend(str(tmp_path / "store"))
    with pytest.raises(StoreNotFound):
        Repository.open(backend, str(tmp_path / "cache"), passphrase=PASSPHRASE)
    recovered = Repository.open(backend, str(tmp_path / "cache"), recovery_key=recovery)
    recovered.add_passphrase("brand new")
    recovered.close()
    reopened = Repository.open(backend, str(tmp_path / "cache"), passphrase="brand new")
    assert all(reopened.read_blob(b) == d for b, d in blobs.items())
    reopened.close()


def test_manifests_round_trip_and_are_bound_to_their_id(tmp_path: Path) -> None:
    repo = _new_repo(tmp_path)
    document = {"version": fmt.MANIFEST_VERSION, "point_id": "p1", "kind": "files", "tree": []}
    repo.put_manifest("p1", document)
    assert repo.get_manifest("p1") == document
    assert repo.manifest_ids() == ["p1"]
    # A manifest copied under another point's name does not open.
    repo.backend.put("manifests/p2", repo.backend.get("manifests/p1"))
    with pytest.raises(IntegrityError):
        repo.get_manifest("p2")
    repo.delete_manifest("p1")
    assert repo.manifest_ids() == ["p2"]
    with pytest.raises(ObjectMissing):
        repo.get_manifest("p1")
    repo.close()


def test_rebuild_index_from_packs_alone(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    for i in range(12):
        (source / f"f{i}.bin").write_bytes(random_bytes(30_000 + i * 1000, i))
    (source / "sub" / "text.txt").write_bytes(text_bytes(500_000))
    data_dir = tmp_path / "appliance"
    app, _recovery = new_appliance(data_dir, pack_size=SMALL_PACKS)
    point = app.backup_files(str(source), "docs", workers=2).point
    app.backup_files(str(source), "docs", mode="full", workers=2)
    before = {e.blob_id: e for e in app.repo.index.all_entries()}
    packs_before = sorted(p for p, _k in app.repo.index.packs())
    assert len(packs_before) > 5  # small packs: many of them
    app.close()

    store = data_dir / "pools" / "default" / "store"
    shutil.rmtree(store / "index")
    shutil.rmtree(data_dir / "cache")
    app = Appliance.open(str(data_dir), passphrase=PASSPHRASE)
    try:
        assert app.repo.index.counts() == (0, 0)
        packs, blobs = app.repo.rebuild_index()
        assert (packs, blobs) == (len(packs_before), len(before))
        after = {e.blob_id: e for e in app.repo.index.all_entries()}
        assert after == before
        for blob_id, entry in before.items():
            assert app.repo.index.lookup(blob_id) == entry
        assert list((store / "index").iterdir())  # index files were written again
        target = tmp_path / "restored"
        app.restore(point.id, str(target), workers=2)
        compare_trees(snapshot(source), snapshot(target))
    finally:
        app.close()
    # And a later open (new cache) reads the rebuilt index files.
    shutil.rmtree(data_dir / "cache")
    with Appliance.open(str(data_dir), passphrase=PASSPHRASE) as app:
        assert {e.blob_id: e for e in app.repo.index.all_entries()} == before
