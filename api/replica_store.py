"""Replica stores: what a peer holds for each source that replicates into it.

A source's store lives byte for byte in ``<data dir>/replicas/<source store id>/``
(:func:`replica_root`), written through a :class:`~appliance.store.backend.LocalDirectoryBackend`
rooted there (temporary file, fsync, rename, fsync of the folder). The peer never holds the key:
every object is the source's ciphertext, and the peer checks only what it can without the key.

Invariants, each kept by :class:`ReplicaStore`:

- **Names follow the store layout** (:func:`check_replica_name`): ``config``, ``location.json``
  (the identity file a source's location framework writes at every location's root),
  ``keys/<hex>``, ``data/<2 hex>/<64 hex>`` and ``meta/<2 hex>/<64 hex>`` (the folder is the
  name's first two digits), ``index/<hex>``, ``manifests/<point id>``. Anything else (``bundles/``,
  ``..``, an absolute path, a NUL, upper case) is :class:`~appliance.errors.InvalidName` (400), so
  nothing a source sends reaches outside its replica directory.
- **Every upload is checked**: a pack's bytes must hash (BLAKE3) to its name, as a pack's name
  is its content's hash (:class:`NameMismatch`); any other object's SHA-256 must equal the one
  the source sent (:class:`ChecksumMismatch`), as must a pack's when the source sent one; both
  400. A pack needs no second checksum: its name already says what its bytes are.
- **Nothing is overwritten**: a name that exists with the same bytes is a repeated upload and
  succeeds without writing; with other bytes it is :class:`ObjectExists` (409). The check and
  the write of one name hold one lock, so two racing uploads of a name cannot both land.
- **The reserve stays free**: before a write, :func:`appliance.space.check_free_space` on the
  replica's filesystem; a write that would eat into the reserve is :class:`PeerFull` (507), as is
  a write that hits ENOSPC anyway.
- **A manifest is never durable before its packs' names**: a pack's bytes are fsynced before
  its 201, but the fsync of its folder (which makes its new name survive a crash) is deferred
  and done once per folder, for every pack published since, before any other object (an index,
  a manifest, keys) or a point summary is published (:meth:`ReplicaStore.sync_folders`). A crash
  in between can lose only names no manifest refers to yet; the source asks which packs are
  present again when it resumes, and sends those. One folder fsync per pack cost ~8 ms of a
  16 MiB pack's ~45 ms in a run of uploads here (profiled).
- **Nothing is deleted by a source**: there is no delete here; :meth:`ReplicaStore.remove` is the
  peer admin's ``DELETE /api/replication/sources/{id}?delete_data=1``.

Point summaries (``POST /api/replication/store/points/{id}``: asset, kind, created_at, bytes; the
plaintext the peer's page shows) are kept beside the replica, one JSON file each in
``<data dir>/replicas/<store id>.points/<point id>.json``, so the replica folder stays exactly the
source's store layout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import blake3

from api.limits import MAX_REPLICA_OBJECT_BYTES
from appliance import space
from appliance.errors import (
    ApplianceError,
    InvalidInput,
    InvalidName,
    ObjectMissing,
    StoreError,
    StoreFull,
)
from appliance.protection import directory_bytes
from appliance.store.backend import LocalDirectoryBackend
from appliance.store.staged import StagedObject

#: The folder of the data directory holding every replica store.
REPLICAS_DIR = "replicas"
#: Suffix of the folder beside a replica holding its point summaries.
SUMMARIES_SUFFIX = ".points"
#: At most this many names in one list page or one ``present`` batch.
MAX_BATCH = 10_000
#: The identity file a location holds at its root (``appliance.store.identity.IDENTITY_NAME``).
IDENTITY_NAME = "location.json"
#: The identity file is a few hundred bytes; a bigger one is not one.
MAX_IDENTITY_BYTES = 4096
#: How long a measured replica size is reused by the sources page.
SIZE_TTL = 30.0

_HEX = "[0-9a-f]"
_POINT_ID = re.compile(rf"^{_HEX}{{8,64}}$")
_STORE_ID = re.compile(rf"^{_HEX}{{8,64}}$")
_LAYOUT = re.compile(
    rf"^(?:config|location\.json|keys/{_HEX}{{8,128}}|index/{_HEX}{{8,128}}"
    rf"|manifests/{_HEX}{{8,64}}|(?:data|meta)/({_HEX}{{2}})/({_HEX}{{64}}))$"
)
#: The characters a name, or a prefix of one, may have.
_NAME_CHARS = re.compile(r"^[a-z0-9./_-]*$")


class PeerFull(ApplianceError):
    """The peer is full: the object would eat into its free-space reserve; nothing was written."""

    code = "peer_full"
    kind = "insufficient_storage"


class ChecksumMismatch(ApplianceError):
    """The uploaded bytes do not match their checksum; nothing was written."""

    code = "checksum_mismatch"
    kind = "invalid"


class NameMismatch(ApplianceError):
    """The pack's bytes do not hash to its name (a pack is named by its BLAKE3); nothing was
    written."""

    code = "name_mismatch"
    kind = "invalid"


class ObjectExists(ApplianceError):
    """The replica holds this name with other bytes; objects are never overwritten."""

    code = "object_exists"
    kind = "conflict"


def check_replica_name(name: str) -> str:
    """``name`` if it is a name of the store layout (see the module docstring), else
    :class:`InvalidName`."""
    match = _LAYOUT.match(name) if len(name) <= 256 else None
    if match is None or (match.group(1) is not None and match.group(2)[:2] != match.group(1)):
        raise InvalidName(
            f"{name[:300]!r} is not an object name of a store "
            "(config, location.json, keys/, data/, meta/, index/ or manifests/)",
            name=name[:300],
        )
    return name


def check_point_id(point_id: str) -> str:
    """``point_id`` if it may name a manifest (``manifests/<point id>``), else InvalidName."""
    if not _POINT_ID.match(point_id):
        raise InvalidName(f"{point_id[:100]!r} is not a point id", name=point_id[:100])
    return point_id


def check_store_id(store_id: str) -> str:
    if not _STORE_ID.match(store_id):
        raise InvalidName(f"{store_id[:100]!r} is not a store id", name=store_id[:100])
    return store_id


def check_prefix(text: str, what: str) -> str:
    """A list ``prefix`` or ``after``: only the characters of names, no ``..``."""
    if len(text) > 256 or not _NAME_CHARS.match(text) or ".." in text or text.startswith("/"):
        raise InvalidName(f"{what} {text[:100]!r} cannot be part of an object name")
    return text


def replicas_dir(data_dir: str) -> str:
    return os.path.join(data_dir, REPLICAS_DIR)


def replica_root(data_dir: str, store_id: str) -> str:
    """The folder holding the replica of store ``store_id``."""
    return os.path.join(replicas_dir(data_dir), check_store_id(store_id))


@dataclass(frozen=True)
class Listing:
    objects: list[tuple[str, int]]
    #: The last name of this page when more may follow; None at the end.
    next_after: str | None


def is_pack_name(name: str) -> bool:
    """Whether ``name`` (a checked name) is a pack's: its last part is its content's BLAKE3."""
    return name.startswith(("data/", "meta/"))


@dataclass
class BodyDigests:
    """Hex digests of an upload's body, taken while it arrives (:meth:`update`) or at once
    (:meth:`of`); a digest not asked for stays None."""

    sha256: str | None = None
    blake3: str | None = None
    _sha: Any = None
    _blake: Any = None

    @classmethod
    def start(cls, *, sha256: bool, blake: bool) -> BodyDigests:
        return cls(
            _sha=hashlib.sha256() if sha256 else None, _blake=blake3.blake3() if blake else None
        )

    @classmethod
    def of(cls, data: bytes, *, sha256: bool, blake: bool) -> BodyDigests:
        digests = cls.start(sha256=sha256, blake=blake)
        digests.update(data)
        return digests.finish()

    def update(self, chunk: bytes) -> None:
        if self._sha is not None:
            self._sha.update(chunk)
        if self._blake is not None:
            self._blake.update(chunk)

    def finish(self) -> BodyDigests:
        if self._sha is not None:
            self.sha256 = self._sha.hexdigest()
        if self._blake is not None:
            self.blake3 = self._blake.hexdigest()
        return self


@dataclass
class Upload:
    """An object on its way in (:meth:`ReplicaStore.begin`): written to a staged file as it
    arrives and hashed on the way, so the checks are done when its last byte is in."""

    name: str
    sha256: str | None
    limit: int
    digests: BodyDigests
    staged: StagedObject

    def write(self, chunk: bytes) -> None:
        self.digests.update(chunk)
        self.staged.write(chunk)

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.staged.published:
            self.staged.abort()


#: Threads that fsync an upload's file while its body is hashed (:meth:`ReplicaStore.put`).
_SYNCS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="replica-fsync")


class ReplicaStore:
    """One source's replica store; see the module docstring. Get it with :func:`replica_store`
    (one instance per folder and process, so the per-name locks are shared)."""

    _STRIPES = 64

    def __init__(self, data_dir: str, store_id: str) -> None:
        self.store_id = check_store_id(store_id)
        self.data_dir = data_dir
        self.root = replica_root(data_dir, store_id)
        self.summaries_dir = self.root + SUMMARIES_SUFFIX
        self.backend = LocalDirectoryBackend(self.root)
        self._locks = [threading.Lock() for _ in range(self._STRIPES)]
        self._size: tuple[float, int] | None = None
        #: Folders (relative to the root) where packs were published without a folder fsync.
        self._unsynced: set[str] = set()
        self._unsynced_lock = threading.Lock()

    def describe(self) -> str:
        return f"the replica of store {self.store_id}"

    def create(self) -> None:
        """Make the replica's folders (0700; kept when they exist)."""
        for path in (replicas_dir(self.data_dir), self.root, self.summaries_dir):
            os.makedirs(path, mode=0o700, exist_ok=True)

    # --- reads ------------------------------------------------------------------------------

    def path(self, name: str) -> str:
        """The file of object ``name`` (checked), whether or not it exists."""
        return os.path.join(self.root, *check_replica_name(name).split("/"))

    def size(self, name: str) -> int:
        """The object's size; :class:`ObjectMissing` when the replica lacks it."""
        try:
            st = os.stat(self.path(name), follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise ObjectMissing(f"{name} is not in {self.describe()}", name=name)
        return st.st_size

    def present(self, names: list[str]) -> dict[str, int]:
        """Of ``names`` (each checked first), those the replica holds, with their sizes."""
        for name in names:
            check_replica_name(name)
        held: dict[str, int] = {}
        for name in names:
            with contextlib.suppress(ObjectMissing):
                held[name] = self.size(name)
        return held

    def list_objects(self, prefix: str = "", after: str = "", limit: int = 1000) -> Listing:
        """Up to ``limit`` objects whose names start with ``prefix`` and sort after ``after``,
        sorted by name. The walk visits folders in name order and skips those wholly before
        ``after``, so paging through a big replica costs each page its own size."""
        check_prefix(prefix, "prefix")
        check_prefix(after, "after")
        limit = max(1, min(limit, MAX_BATCH))
        found: list[tuple[str, int]] = []
        for item in self._walk(self.root, "", prefix, after):
            found.append(item)
            if len(found) > limit:
                break
        more = len(found) > limit
        page = found[:limit]
        return Listing(page, page[-1][0] if more and page else None)

    def _walk(self, folder: str, rel: str, prefix: str, after: str) -> Iterator[tuple[str, int]]:
        try:
            with os.scandir(folder) as scan:
                entries = list(scan)
        except (FileNotFoundError, NotADirectoryError):
            return
        keyed: list[tuple[str, os.DirEntry[str], bool]] = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                keyed.append((f"{rel}{entry.name}/", entry, True))
            elif entry.is_file(follow_symlinks=False):
                keyed.append((f"{rel}{entry.name}", entry, False))
        # A folder sorts as its name and a slash: then every name below it sorts where the
        # folder does among its siblings, and the walk yields names in string order.
        keyed.sort(key=lambda item: item[0])
        for key, entry, is_dir in keyed:
            if is_dir:
                if not (key.startswith(prefix) or prefix.startswith(key)):
                    continue
                if after and key <= after and not after.startswith(key):
                    continue  # everything below sorts before ``after``
                yield from self._walk(entry.path, key, prefix, after)
                continue
            if not key.startswith(prefix) or (after and key <= after):
                continue
            if not _LAYOUT.match(key):
                continue  # a leftover temporary file, or something not put through here
            try:
                yield key, entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue

    # --- writes -----------------------------------------------------------------------------

    def put(
        self,
        name: str,
        data: bytes | Sequence[bytes],
        sha256: str | None,
    ) -> bool:
        """Store ``data`` as ``name`` after checking it; True if written, False if the replica
        held the very same bytes already. See the module docstring for the refusals, and
        :meth:`begin` for ``sha256``. ``data`` may be the body's chunks as they arrived
        (written with ``writev``, never joined). The body is hashed while the file's fsync runs
        in another thread: BLAKE3 holds the GIL for a pack's chunk sizes, an fsync does not, so
        the hash costs no time beside the wait for the disk (and hashing as the body arrives
        would hold the event loop, and with it the upload)."""
        chunks = [data] if isinstance(data, bytes) else list(data)
        upload = self.begin(name, sum(len(c) for c in chunks), sha256)
        with upload:
            upload.staged.write_many(chunks)
            syncing = _SYNCS.submit(upload.staged.finish)
            try:
                for chunk in chunks:
                    upload.digests.update(chunk)
            finally:
                syncing.result()
            return self.commit(upload)

    def begin(self, name: str, size: int | None, sha256: str | None) -> Upload:
        """An upload of ``name`` to be written as it arrives (:meth:`Upload.write`, hashed on
        the way) and checked and published by :meth:`commit`; leaving its ``with`` block
        without committing drops it. ``size`` is the announced length (None: unknown), checked
        against the object size limit and the free-space reserve before a byte is written.
        ``sha256`` is the checksum the source sent; a pack (``data/``, ``meta/``) may come
        without one, its name being the stronger check."""
        check_replica_name(name)
        limit = MAX_IDENTITY_BYTES if name == IDENTITY_NAME else MAX_REPLICA_OBJECT_BYTES
        if size is not None and size > limit:
            raise InvalidInput(f"{name} is too large ({size} bytes)", name=name)
        pack = is_pack_name(name)
        if sha256 is None and not pack:
            raise ChecksumMismatch(
                f"send the SHA-256 of {name} in X-Content-SHA256 (only a pack may come without)",
                name=name,
            )
        self._check_space(limit if size is None else size)
        try:
            staged = self.backend.stage(name)
        except StoreFull as exc:
            raise PeerFull(f"{self.describe()} ran out of space writing {name}") from exc
        digests = BodyDigests.start(sha256=sha256 is not None, blake=pack)
        return Upload(name, sha256.lower() if sha256 else None, limit, digests, staged)

    def commit(self, upload: Upload) -> bool:
        """Check what :meth:`begin`'s upload received and publish it; True if written, False
        when the replica held the very same bytes already (the upload is dropped)."""
        name, digests = upload.name, upload.digests.finish()
        if upload.staged.size > upload.limit:
            raise InvalidInput(f"{name} is too large ({upload.staged.size} bytes)", name=name)
        if upload.sha256 is not None and digests.sha256 != upload.sha256:
            raise ChecksumMismatch(
                f"the bytes of {name} do not match X-Content-SHA256: they hash to {digests.sha256}",
                name=name,
                sha256=digests.sha256,
            )
        if digests.blake3 is not None and digests.blake3 != name.rsplit("/", 1)[1]:
            raise NameMismatch(f"the bytes of pack {name} do not hash to its name", name=name)
        try:
            upload.staged.finish()
            pack = is_pack_name(name)
            if not pack:
                self.sync_folders()
            with self._lock(name):
                if self._holds_same(name, digests):
                    upload.staged.abort()
                    return False
                upload.staged.publish(sync_folder=not pack)
            if pack:
                with self._unsynced_lock:
                    self._unsynced.add(name.rsplit("/", 1)[0])
        except StoreFull as exc:
            raise PeerFull(f"{self.describe()} ran out of space writing {name}") from exc
        self._size = None
        return True

    def sync_folders(self) -> None:
        """Make the names of every pack published so far durable (an fsync of each folder
        they went to); see the module docstring."""
        with self._unsynced_lock:
            folders, self._unsynced = self._unsynced, set()
        try:
            while folders:
                folder = folders.pop()
                fd = os.open(
                    os.path.join(self.root, folder),
                    os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW,
                )
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            with self._unsynced_lock:
                self._unsynced |= folders | {folder}
            raise StoreError(f"{self.describe()}: cannot sync {folder}: {exc.strerror}") from exc

    def _holds_same(self, name: str, digests: BodyDigests) -> bool:
        """False when the replica lacks ``name``; True when it holds the bytes ``digests``
        describe; :class:`ObjectExists` when it holds other bytes. A pack already checked
        against its name is the same as the one held when that one, too, hashes to the name."""
        try:
            fd = os.open(self.path(name), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            return False
        with os.fdopen(fd, "rb") as f:
            if digests.blake3 is not None:
                held = blake3.blake3()
                while chunk := f.read(1 << 20):
                    held.update(chunk)
                same = held.hexdigest() == digests.blake3
            else:
                same = hashlib.file_digest(f, "sha256").hexdigest() == digests.sha256
        if same:
            return True
        raise ObjectExists(
            f"{self.describe()} holds {name} with other bytes; objects are never overwritten",
            name=name,
        )

    def _lock(self, name: str) -> threading.Lock:
        return self._locks[zlib.crc32(name.encode()) % self._STRIPES]

    def _check_space(self, needed: int) -> None:
        """:class:`PeerFull` unless ``needed`` bytes leave the replicas' filesystem its reserve."""
        where = self.root if os.path.isdir(self.root) else os.path.dirname(self.root)
        try:
            space.check_free_space(where, "this peer", needed)
        except StoreFull as exc:
            raise PeerFull(
                f"this peer is full: {exc.message}",
                free_bytes=exc.details.get("free_bytes"),
                reserve_bytes=exc.details.get("reserve_bytes"),
                needed_bytes=needed,
            ) from exc

    # --- point summaries --------------------------------------------------------------------

    def put_summary(self, point_id: str, summary: dict[str, Any]) -> None:
        """Keep a point's plaintext summary (replaces an earlier one of the same point)."""
        check_point_id(point_id)
        self.sync_folders()
        os.makedirs(self.summaries_dir, mode=0o700, exist_ok=True)
        body = json.dumps({"id": point_id, **summary}, sort_keys=True).encode()
        path = os.path.join(self.summaries_dir, f"{point_id}.json")
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def summaries(self) -> list[dict[str, Any]]:
        """Every point summary kept, oldest first (by ``created_at``)."""
        found: list[dict[str, Any]] = []
        try:
            names = os.listdir(self.summaries_dir)
        except FileNotFoundError:
            return found
        for filename in names:
            if not filename.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.summaries_dir, filename), "rb") as f:
                    document = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(document, dict):
                found.append(document)
        found.sort(key=lambda d: str(d.get("created_at", "")))
        return found

    # --- size and removal -------------------------------------------------------------------

    def bytes_held(self) -> int:
        """Bytes the replica occupies (measured at most every :data:`SIZE_TTL` seconds, and
        again after a write)."""
        now = time.monotonic()
        if self._size is None or now - self._size[0] > SIZE_TTL:
            self._size = (now, directory_bytes(self.root) if os.path.isdir(self.root) else 0)
        return self._size[1]

    def remove(self) -> None:
        """Delete the replica and its summaries (the peer admin's choice, never a source's)."""
        self.backend.close()
        for path in (self.root, self.summaries_dir):
            shutil.rmtree(path, ignore_errors=True)
        self._size = None


_STORES: dict[str, ReplicaStore] = {}
_STORES_LOCK = threading.Lock()


def replica_store(data_dir: str, store_id: str) -> ReplicaStore:
    """The :class:`ReplicaStore` of ``store_id`` under ``data_dir`` (one per folder)."""
    root = replica_root(data_dir, store_id)
    with _STORES_LOCK:
        store = _STORES.get(root)
        if store is None:
            store = _STORES[root] = ReplicaStore(data_dir, store_id)
        return store
