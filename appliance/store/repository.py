"""The repository: a store opened with its key.

Layout of a store (see docs/format.md):

    config                    plaintext JSON: format version, store ID, chunking parameters
    keys/<name>               the master key wrapped by a passphrase (JSON)
    data/<xx>/<pack>          packs of file and disk chunks
    meta/<xx>/<pack>          packs of manifest trees and disk chunk tables
    index/<id>                encrypted index files: blob ID -> (pack, offset, length)
    manifests/<point id>      one encrypted manifest per recovery point

Write order makes every instant crash-safe: packs, then the index file naming them, then the
manifest. A manifest therefore never refers to a blob whose pack or index entry is missing;
packs or index files without a manifest are garbage that GC removes after a grace period.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from appliance.errors import (
    IntegrityError,
    InvalidInput,
    LockHeld,
    ObjectMissing,
    StoreExists,
    StoreNotFound,
    UnsupportedFormat,
    WrongPassphrase,
)
from appliance.store import format as fmt
from appliance.store.backend import Backend
from appliance.store.crypto import Envelope, MasterKey, unwrap_key, wrap_key
from appliance.store.index import IndexCache, decode_index, encode_index
from appliance.store.packs import IndexEntry, PackWriter, pack_object_name, parse_pack

#: Entries per index file: bounds the memory of a session that writes millions of chunks.
INDEX_FILE_ENTRIES = 200_000
#: Blobs of one pack closer than this are fetched by one ranged read (restores, copies).
READ_GAP = 1 << 20
#: Intra-session dedup memory (IDs of blobs written this session but not yet in the cache).
SEEN_LIMIT = 2_000_000


@dataclass(frozen=True)
class StoreConfig:
    store_id: str
    created: str
    format: int = fmt.STORE_FORMAT_VERSION
    file_chunk_min: int = fmt.FILE_CHUNK_MIN
    file_chunk_avg: int = fmt.FILE_CHUNK_AVG
    file_chunk_max: int = fmt.FILE_CHUNK_MAX
    disk_chunk_size: int = fmt.DISK_CHUNK_SIZE
    pack_size: int = fmt.PACK_TARGET_SIZE
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> StoreConfig:
        try:
            document = json.loads(data)
        except ValueError as exc:
            raise IntegrityError(f"the store config is damaged: {exc}") from exc
        if document.get("format") != fmt.STORE_FORMAT_VERSION:
            raise UnsupportedFormat(
                f"store format {document.get('format')} is not supported by this version"
            )
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in document.items() if k in known})


class StoreLocks:
    """Process locks of a store (flock: released by the kernel when a process dies).

    Backups hold the store lock shared and their asset's lock exclusively; GC and prune hold the
    store lock exclusively, so GC never races a running backup and a crashed holder never leaves a
    stale lock behind.
    """

    def __init__(self, lock_dir: str, store_id: str) -> None:
        os.makedirs(lock_dir, exist_ok=True)
        self._dir = lock_dir
        self._store_id = store_id

    @contextmanager
    def _flock(self, name: str, mode: int, what: str) -> Iterator[None]:
        path = os.path.join(self._dir, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockHeld(what) from None
            yield
        finally:
            os.close(fd)

    def shared(self) -> Any:
        return self._flock(
            f"{self._store_id}.store.lock",
            fcntl.LOCK_SH,
            "the store is locked by maintenance (GC or prune); try again when it finishes",
        )

    def exclusive(self) -> Any:
        return self._flock(
            f"{self._store_id}.store.lock",
            fcntl.LOCK_EX,
            "the store is in use by a running backup or restore; try again when it finishes",
        )

    def asset(self, asset: str) -> Any:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in asset)
        return self._flock(
            f"{self._store_id}.asset.{safe}.lock",
            fcntl.LOCK_EX,
            f"a backup of asset {asset!r} is already running",
        )


#: A new data blob whose compressed size is at least this share of its size "does not compress".
DENSE_RATIO = 0.97
_SEAL_OVERHEAD = 3 + fmt.NONCE_SIZE + fmt.TAG_SIZE


class BlobWriter:
    """Seals blobs and appends them to packs, skipping blobs the store already has.

    One per worker (thread or process). ``flush`` returns the index entries of everything written.
    """

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.envelope = Envelope(repo.key)
        self._data = PackWriter(repo.backend, fmt.PACK_KIND_DATA, repo.config.pack_size)
        self._meta = PackWriter(repo.backend, fmt.PACK_KIND_META, repo.config.pack_size)
        self._seen: set[bytes] = set()
        self.new_bytes = 0
        self.new_blobs = 0
        #: Plaintext bytes of the new file-data blobs, and of those among them that zstd could
        #: not shrink below DENSE_RATIO (encrypted or already compressed data): a ransomware
        #: signal, counted from the envelope already sealed, never by compressing again.
        self.data_bytes = 0
        self.dense_bytes = 0

    def put(
        self, blob_type: int, plaintext: bytes | memoryview, blob_id: bytes | None = None
    ) -> bytes:
        if blob_id is None:
            blob_id = self.envelope.chunk_id(plaintext)
        if blob_id in self._seen or self.repo.index.contains(blob_id):
            return blob_id
        sealed = self.envelope.seal(blob_type, blob_id, plaintext)
        writer = self._data if blob_type in fmt.DATA_BLOB_TYPES else self._meta
        writer.add(blob_type, blob_id, sealed)
        if len(self._seen) >= SEEN_LIMIT:
            # Forgetting only risks storing a duplicate, never losing data.
            self._seen.clear()
        self._seen.add(blob_id)
        self.new_bytes += len(sealed)
        self.new_blobs += 1
        if blob_type == fmt.BLOB_DATA:
            size = len(plaintext)
            self.data_bytes += size
            if (
                sealed[2] == fmt.COMPRESSION_NONE
                or len(sealed) - _SEAL_OVERHEAD >= size * DENSE_RATIO
            ):
                self.dense_bytes += size
        return blob_id

    def put_compressed(
        self,
        blob_id: bytes,
        size: int,
        compression: int,
        body: bytes,
        blob_type: int = fmt.BLOB_DATA,
        *,
        in_index: bool | None = None,
    ) -> bool:
        """Store a data or disk blob that arrives compressed (the backup client), unless the
        store has it; the caller has checked that its plaintext hashes to ``blob_id``. True if
        written. ``in_index``: whether the index holds it, when the caller asked for a whole
        batch at once (one query instead of one per chunk)."""
        if blob_type not in fmt.DATA_BLOB_TYPES:
            raise ValueError(f"blob type {blob_type} is not a data blob")
        if in_index is None:
            in_index = self.repo.index.contains(blob_id)
        if blob_id in self._seen or in_index:
            return False
        sealed = self.envelope.seal_body(blob_type, blob_id, compression, body)
        self._data.add(blob_type, blob_id, sealed)
        self._seen.add(blob_id)
        self.new_bytes += len(sealed)
        self.new_blobs += 1
        if blob_type == fmt.BLOB_DATA:
            self.data_bytes += size
            if compression == fmt.COMPRESSION_NONE or len(body) >= size * DENSE_RATIO:
                self.dense_bytes += size
        return True

    def flush(self) -> list[IndexEntry]:
        return self._data.flush() + self._meta.flush()

    def take_completed(self) -> list[IndexEntry]:
        return self._data.take_completed() + self._meta.take_completed()

    def discard(self) -> None:
        self._data.discard()
        self._meta.discard()

    @property
    def packs_written(self) -> int:
        return self._data.packs_written + self._meta.packs_written


class Repository:
    def __init__(
        self, backend: Backend, config: StoreConfig, key: MasterKey, cache_dir: str
    ) -> None:
        self.backend = backend
        self.config = config
        self.key = key
        self.cache_dir = cache_dir
        self.envelope = Envelope(key)
        self.index = IndexCache(os.path.join(cache_dir, config.store_id, "index.sqlite"))

    @property
    def store_id(self) -> str:
        return self.config.store_id

    # --- creation and opening ---------------------------------------------------------------

    @classmethod
    def init(
        cls,
        backend: Backend,
        passphrase: str,
        cache_dir: str,
        **config: Any,
    ) -> Repository:
        try:
            backend.stat("config")
        except ObjectMissing:
            pass
        else:
            raise StoreExists(f"a store already exists in {backend.describe()}")
        store_config = StoreConfig(
            store_id=secrets.token_hex(8), created=datetime.now(UTC).isoformat(), **config
        )
        key = MasterKey.generate()
        # The key first: a store with a config but no key would be unopenable.
        backend.put(
            f"keys/{secrets.token_hex(8)}", wrap_key(key, passphrase, store_config.store_id)
        )
        backend.put("config", store_config.to_json())
        return cls(backend, store_config, key, cache_dir)

    @staticmethod
    def read_config(backend: Backend) -> StoreConfig:
        try:
            return StoreConfig.from_json(backend.get("config"))
        except ObjectMissing:
            raise StoreNotFound(f"no store in {backend.describe()}; run `appliance init`") from None

    @classmethod
    def open(
        cls,
        backend: Backend,
        cache_dir: str,
        *,
        passphrase: str | None = None,
        recovery_key: str | None = None,
        sync: bool = True,
    ) -> Repository:
        """Open the store. ``sync=False`` skips reading the index files (for `appliance repair`,
        which rebuilds them from the packs when they are damaged)."""
        config = cls.read_config(backend)
        if recovery_key is not None:
            key = MasterKey.from_recovery_key(recovery_key)
            repo = cls(backend, config, key, cache_dir)
            repo._check_key(sync=sync)
            return repo
        if passphrase is None:
            raise InvalidInput("a passphrase or a recovery key is needed to open the store")
        key_names = [info.name for info in backend.list("keys/")]
        if not key_names:
            raise StoreNotFound(f"the store in {backend.describe()} has no key file")
        for name in sorted(key_names):
            try:
                key = unwrap_key(backend.get(name), passphrase, config.store_id)
            except WrongPassphrase:
                continue
            repo = cls(backend, config, key, cache_dir)
            if sync:
                repo.sync_index()
            return repo
        raise WrongPassphrase()

    def _check_key(self, *, sync: bool = True) -> None:
        """A recovery key has no key file to check against: prove it on an index file.

        The key is wrong when no index file opens with it (one damaged index file must not make
        the right key look wrong; the sync below reports that damage as what it is).
        """
        names = [info.name for info in self.backend.list("index/")]
        for name in names:
            try:
                self._read_index_file(name)
                break
            except IntegrityError:
                continue
        else:
            if names:
                raise WrongPassphrase("the recovery key does not unlock this store")
        if sync:
            self.sync_index()

    def add_passphrase(self, passphrase: str) -> str:
        name = f"keys/{secrets.token_hex(8)}"
        self.backend.put(name, wrap_key(self.key, passphrase, self.store_id))
        return name

    def key_files(self) -> list[str]:
        return sorted(info.name for info in self.backend.list("keys/"))

    def locks(self, lock_dir: str) -> StoreLocks:
        return StoreLocks(lock_dir, self.store_id)

    # --- index ----------------------------------------------------------------------------------

    def _read_index_file(self, name: str) -> list[IndexEntry]:
        blob_id = bytes.fromhex(name.rsplit("/", 1)[1])
        try:
            plaintext = self.envelope.open_content(fmt.BLOB_INDEX, blob_id, self.backend.get(name))
            return list(decode_index(plaintext))
        except IntegrityError as exc:
            raise IntegrityError(
                f"index file {name} is damaged ({exc.message}); the index can be rebuilt from "
                "the packs",
                name=name,
            ) from exc

    def check_index_file(self, name: str) -> int:
        """Read and authenticate one index file of the store; return its number of entries."""
        return len(self._read_index_file(name))

    def sync_index(self) -> None:
        """Bring the local cache in line with the store's index files."""
        in_store = {info.name for info in self.backend.list("index/")}
        cached = self.index.index_files()
        if cached - in_store:
            self.index.clear()  # index files were consolidated or removed: start over
            cached = set()
        for name in sorted(in_store - cached):
            self.index.add(name, self._read_index_file(name))

    def commit_index(self, entries: list[IndexEntry]) -> str | None:
        """Write an index file for ``entries`` (whose packs are already stored) and cache it."""
        if not entries:
            return None
        plaintext = encode_index(entries)
        blob_id = self.envelope.chunk_id(plaintext)
        name = f"index/{blob_id.hex()}"
        self.backend.put(name, self.envelope.seal(fmt.BLOB_INDEX, blob_id, plaintext))
        self.index.add(name, entries)
        return name

    def rebuild_index(self) -> tuple[int, int]:
        """Recreate index files from the packs alone; returns (packs, blobs) found.

        Damaged packs are skipped up to their first damaged entry (their intact prefix is kept).
        """
        entries: list[IndexEntry] = []
        packs = blobs = 0
        old = [info.name for info in self.backend.list("index/")]
        written: list[str] = []
        for prefix in ("data/", "meta/"):
            for info in self.backend.list(prefix):
                pack = bytes.fromhex(info.name.rsplit("/", 1)[1])
                try:
                    for entry in parse_pack(pack, self.backend.get(info.name)):
                        entries.append(entry)
                        blobs += 1
                except IntegrityError:
                    pass
                packs += 1
                if len(entries) >= INDEX_FILE_ENTRIES:
                    written.append(self.commit_index(entries) or "")
                    entries = []
        written.append(self.commit_index(entries) or "")
        for name in old:
            if name not in written:
                self.backend.delete(name)
        self.index.clear()
        self.sync_index()
        return packs, blobs

    # --- blobs ------------------------------------------------------------------------------------

    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    def locate(self, blob_id: bytes) -> IndexEntry:
        entry = self.index.lookup(blob_id)
        if entry is None:
            raise ObjectMissing(
                f"blob {blob_id.hex()[:16]} is not in the store's index", blob=blob_id.hex()
            )
        return entry

    def read_blob(self, blob_id: bytes, envelope: Envelope | None = None) -> bytes:
        entry = self.locate(blob_id)
        name = pack_object_name(entry.pack, entry.pack_kind)
        try:
            data = self.backend.get(name, entry.offset, entry.length)
            while True:
                try:
                    return (envelope or self.envelope).open_content(entry.blob_type, blob_id, data)
                except IntegrityError as damaged:
                    # A backend over several copies of the store (a restore's fallback reader)
                    # can give the same bytes from the next copy; any other backend cannot.
                    reread = getattr(self.backend, "reread", None)
                    again = reread(name, entry.offset, entry.length, damaged) if reread else None
                    if again is None:
                        raise
                    data = again
        except (IntegrityError, ObjectMissing) as exc:
            # Name both: the blob is what a point needs, the pack is what `verify` reports.
            raise type(exc)(
                f"blob {blob_id.hex()[:16]} in pack {entry.pack.hex()[:16]} cannot be read: "
                f"{exc.message}",
                blob=blob_id.hex(),
                pack=entry.pack.hex(),
            ) from exc

    def read_blobs(
        self, blob_ids: Iterable[bytes], envelope: Envelope | None = None
    ) -> dict[bytes, bytes]:
        """Several blobs at once, each pack read once per run of nearby blobs.

        Entries are grouped by pack and sorted by offset; blobs less than :data:`READ_GAP`
        apart share one ranged read, so a restore makes about one request per pack it needs
        instead of one per blob (what a bucket or a tape needs). Missing blobs raise
        :class:`ObjectMissing`, damaged ones :class:`IntegrityError`, like :meth:`read_blob`.
        """
        wanted = set(blob_ids)
        entries = self.index.lookup_many(wanted)
        for blob_id in wanted:
            if blob_id not in entries:
                self.locate(blob_id)  # raises ObjectMissing naming the blob
        by_pack: dict[bytes, list[IndexEntry]] = {}
        for entry in entries.values():
            by_pack.setdefault(entry.pack, []).append(entry)
        out: dict[bytes, bytes] = {}
        for pack_entries in by_pack.values():
            pack_entries.sort(key=lambda e: e.offset)
            run: list[IndexEntry] = []
            for entry in pack_entries:
                if run and entry.offset - (run[-1].offset + run[-1].length) > READ_GAP:
                    self._read_run(run, envelope, out)
                    run = []
                run.append(entry)
            self._read_run(run, envelope, out)
        return out

    def _read_run(
        self, run: list[IndexEntry], envelope: Envelope | None, out: dict[bytes, bytes]
    ) -> None:
        first = run[0]
        start, end = first.offset, run[-1].offset + run[-1].length
        name = pack_object_name(first.pack, first.pack_kind)
        try:
            data = memoryview(self.backend.get(name, start, end - start))
        except (IntegrityError, ObjectMissing):
            # The run cannot be read whole (a truncated or missing pack): blob by blob, so the
            # error names the first blob that is really lost, and the pack.
            for entry in run:
                out[entry.blob_id] = self.read_blob(entry.blob_id, envelope)
            return
        for entry in run:
            piece = data[entry.offset - start : entry.offset - start + entry.length]
            try:
                out[entry.blob_id] = (envelope or self.envelope).open_content(
                    entry.blob_type, entry.blob_id, bytes(piece)
                )
            except IntegrityError:
                # Damaged here: read_blob names it, or reads it from another copy.
                out[entry.blob_id] = self.read_blob(entry.blob_id, envelope)

    # --- manifests ----------------------------------------------------------------------------------

    def put_manifest(self, point_id: str, document: dict[str, Any]) -> None:
        plaintext = json.dumps(document, sort_keys=True).encode()
        blob_id = self.envelope.named_id(f"manifest:{point_id}")
        self.backend.put(
            f"manifests/{point_id}", self.envelope.seal(fmt.BLOB_MANIFEST, blob_id, plaintext)
        )

    def get_manifest(self, point_id: str) -> dict[str, Any]:
        blob_id = self.envelope.named_id(f"manifest:{point_id}")
        data = self.backend.get(f"manifests/{point_id}")
        try:
            plaintext = self.envelope.open(fmt.BLOB_MANIFEST, blob_id, data)
        except IntegrityError as exc:
            raise IntegrityError(
                f"manifest of point {point_id} is damaged ({exc.message})", point=point_id
            ) from exc
        try:
            document: dict[str, Any] = json.loads(plaintext)
        except ValueError as exc:
            raise IntegrityError(f"manifest of point {point_id} is not valid JSON") from exc
        if document.get("version") != fmt.MANIFEST_VERSION:
            raise UnsupportedFormat(f"manifest version {document.get('version')} is not supported")
        return document

    def manifest_ids(self) -> list[str]:
        return sorted(info.name.split("/", 1)[1] for info in self.backend.list("manifests/"))

    def delete_manifest(self, point_id: str) -> None:
        self.backend.delete(f"manifests/{point_id}")

    # --- worker processes ---------------------------------------------------------------------

    def worker_spec(self) -> tuple[str, StoreConfig, bytes, str] | None:
        """What a worker process needs to open this repository itself, or None when the
        backend cannot be reopened in another process (then workers must be forked)."""
        from appliance.store.backend import LocalDirectoryBackend

        backend = self.backend
        # A view of one other backend (a point's reader with a single copy to read) is that
        # backend as far as a worker is concerned: there is no other copy to fall back to.
        view_of = getattr(backend, "view_of", None)
        if view_of is not None:
            backend = view_of() or backend
        if not isinstance(backend, LocalDirectoryBackend):
            return None
        return (backend.root, self.config, self.key.material, self.cache_dir)

    @classmethod
    def from_worker_spec(cls, spec: tuple[str, StoreConfig, bytes, str]) -> Repository:
        from appliance.store.backend import LocalDirectoryBackend

        root, config, material, cache_dir = spec
        return cls(LocalDirectoryBackend(root), config, MasterKey(material), cache_dir)

    def close(self) -> None:
        self.index.close()
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()
