"""Copying a recovery point to another location of its store, and reading from any copy.

A location holds (part of) the same store: the same store id, key files and pack names, so a copy
is the objects a point needs, byte for byte. :func:`copy_point` is dedup-aware, verified, then
committed, in this order (a crash at any step leaves the target consistent, and a rerun resumes):

1. the store's own objects (``config``, ``keys/*``), copied when the target lacks them;
2. the packs the point needs (:func:`appliance.point_packs.point_packs`) that the target lacks:
   each is copied whole and read back from the target, and its name (the BLAKE3 of its bytes)
   must match, before the next one; a rerun skips packs already there (on their own or in a
   bundle). A data pack put in a cold class (a bucket's GLACIER) cannot be read back until
   thawed: the upload's checksum, verified by the medium, and the stored size stand in for the
   read-back. Small data packs going to a cold class are put together in bundles
   (:mod:`.bundles`: fewer objects, each charged for), a bundle before its directory;
3. index files at the target for every pack the point needs, so the copy is self-describing
   (``catalog rebuild`` from it alone works);
4. the manifest, last: a point exists at the target only once everything it needs is there.

:class:`FallbackBackend` reads one store through its copies in the order of
:func:`appliance.locations.choice.order_copies`: a read that fails at one location (unavailable,
object missing, an I/O error) is retried at the next, and the switch is reported.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, cast

from appliance.errors import (
    BackupCancelled,
    IntegrityError,
    InvalidInput,
    LocationUnavailable,
    ObjectMissing,
    StoreError,
)
from appliance.locations import bundles
from appliance.point_packs import point_packs
from appliance.store import format as fmt
from appliance.store.backend import (
    HOT_RANDOM_ACCESS,
    Backend,
    BackendCapabilities,
    ObjectInfo,
    PutOptions,
)
from appliance.store.index import encode_index
from appliance.store.packs import IndexEntry, pack_name_matches, pack_object_name
from appliance.store.repository import INDEX_FILE_ENTRIES, Repository
from appliance.store.wrappers import ReadOnly

ProgressCallback = Callable[[dict[str, Any]], None]
#: The most names a copy asks a target's ``present_many`` about in one call (a peer's limit).
PRESENT_BATCH = 10000
#: Packs a copy has in flight at once (each held in memory whole: at most this many packs, or
#: bundles of about one pack each).
COPY_THREADS = 3


@dataclass
class CopyResult:
    point: str
    packs_needed: int = 0
    packs_copied: int = 0
    bytes_copied: int = 0
    packs_present: int = 0
    #: Bundles put (:mod:`.bundles`) and the packs in them (counted in ``packs_copied`` too).
    bundles: int = 0
    packs_bundled: int = 0
    index_files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _already_there(target: Backend, name: str, pack: bytes, size: int, cold: bool) -> bool:
    """Whether the target holds this pack whole: its bytes hash to its name, or (a cold object,
    unreadable until thawed) it exists with the right size."""
    if cold:
        try:
            return target.stat(name).size == size
        except ObjectMissing:
            return False
    return _exists(target, name) and pack_name_matches(pack, target.get(name))


def _exists(backend: Backend, name: str) -> bool:
    try:
        backend.stat(name)
    except ObjectMissing:
        return False
    return True


def copy_point(
    repo: Repository,
    point_id: str,
    target: Backend,
    *,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    options: PutOptions | None = None,
) -> CopyResult:
    """Copy ``point_id`` from ``repo`` to ``target`` (see the module doc). ``options`` go with
    the data packs (storage class, retain-until); every other object the point needs is locked
    as long (``retain``, extending the lock of objects already there) and stays hot."""
    manifest = repo.get_manifest(point_id)
    needs = point_packs(repo, manifest)
    if not needs.complete:
        raise StoreError(
            f"point {point_id} is not complete in {repo.backend.describe()}: "
            f"{len(needs.missing_metadata) + len(needs.missing)} blob(s) missing; "
            "copy it from another location",
            point=point_id,
        )
    result = CopyResult(point_id, packs_needed=len(needs.packs))
    # Everything a point needs to be restored is locked as long as its data: a manifest, an
    # index or a key file deleted early would make locked data unreadable. Only data packs
    # take the storage class; metadata stays hot.
    until = options.retain_until if options is not None else None
    hot = PutOptions(retain_until=until) if until is not None else None
    for name in ["config", *(info.name for info in repo.backend.list("keys/"))]:
        _put_or_retain(target, name, functools.partial(repo.backend.get, name), hot)
    stats = {p: repo.backend.stat(pack_object_name(p, k)) for p, k in needs.packs.items()}
    sizes = {p: info.size for p, info in stats.items()}
    total = sum(sizes.values())
    # Packs already in a bundle at the target count as there, like packs on their own.
    target = bundles.with_bundles(target)
    # A bucket is listed once (one LIST answers for a thousand objects, a HEAD for one); its
    # puts are atomic and checked by the bucket (SHA-256), so a listed object of the right size
    # is there whole. A target that answers "which of these do you hold?" (a peer) is asked
    # for the point's packs alone, in batches, rather than listed whole. A disk's packs are read
    # back and hashed against their names.
    trusted = target.capabilities.listing_cost == "expensive"
    listed: dict[str, int] = {}
    present_many = _present_many(target)
    if trusted and present_many is not None:
        names = [pack_object_name(p, k) for p, k in sorted(needs.packs.items())]
        for start in range(0, len(names), PRESENT_BATCH):
            listed.update(present_many(names[start : start + PRESENT_BATCH]))
    elif trusted:
        for prefix in ("data/", "meta/"):
            listed.update((info.name, info.size) for info in target.list(prefix))

    def there(name: str, pack: bytes, size: int, cold: bool) -> bool:
        if trusted:
            return listed.get(name) == size
        return _already_there(target, name, pack, size, cold)

    # A target that checks each pack against its name (a peer) refuses a damaged one anyway:
    # the source's own check runs only when the target refuses.
    checked_there = target.capabilities.checks_pack_names
    # Reads overlap the uploads; the puts themselves are as many at once as the target takes.
    put_slots = threading.BoundedSemaphore(target.capabilities.puts_in_flight or COPY_THREADS)

    def damaged(pack: bytes) -> IntegrityError:
        return IntegrityError(f"pack {pack.hex()[:16]} is damaged at the source", pack=pack.hex())

    def source(pack: bytes, kind: int, check: bool = True) -> tuple[str, bytes]:
        name = pack_object_name(pack, kind)
        data = repo.backend.get(name)
        if check and not pack_name_matches(pack, data):
            raise damaged(pack)
        return name, data

    def send(pack: bytes, kind: int) -> tuple[int, int, int]:
        name, data = source(pack, kind, check=not checked_there)
        put_options = options if kind == fmt.PACK_KIND_DATA else hot
        # A pack in a cold class cannot be read back until thawed: its size is checked.
        cold = bool(target.capabilities.cold_objects and put_options and put_options.storage_class)
        try:
            with put_slots:
                target.put(name, data, put_options)
        except IntegrityError as exc:
            if checked_there and not pack_name_matches(pack, data):
                raise damaged(pack) from exc
            raise
        if not trusted and not there(name, pack, len(data), cold):
            raise IntegrityError(
                f"pack {pack.hex()[:16]} read back from {target.describe()} differs",
                pack=pack.hex(),
            )
        return 1, len(data), 0

    def send_bundle(group: list[bytes]) -> tuple[int, int, int]:
        # One pack read at a time into the bundle: a bundle in flight costs its own size.
        directory = target.put_bundle(
            (source(pack, fmt.PACK_KIND_DATA) for pack in group), options, hot
        )
        if not trusted and target.backend.stat(directory.bundle).size != directory.size:
            raise IntegrityError(
                f"bundle {directory.bundle} read back from {target.describe()} differs",
                bundle=directory.bundle,
            )
        return len(group), directory.size, 1

    todo: list[tuple[bytes, int]] = []
    for pack, kind in sorted(needs.packs.items()):
        name = pack_object_name(pack, kind)
        put_options = options if kind == fmt.PACK_KIND_DATA else hot
        cold = bool(target.capabilities.cold_objects and put_options and put_options.storage_class)
        if there(name, pack, sizes[pack], cold):
            result.packs_present += 1
            if until is not None:  # shared with a point kept less long: lock it longer
                target.retain(name, until)
        else:
            todo.append((pack, kind))
    groups = _bundle_groups(target, options, todo, stats, repo.config.pack_size)
    grouped = {pack for group in groups for pack in group}
    jobs: list[Callable[[], tuple[int, int, int]]] = [
        *(functools.partial(send_bundle, group) for group in groups),
        *(functools.partial(send, pack, kind) for pack, kind in todo if pack not in grouped),
    ]
    done = 0

    def account(finished: set[Future[tuple[int, int, int]]]) -> None:
        nonlocal done
        for future in finished:
            # A failed pack fails the copy (a rerun resumes).
            count, size, bundle = future.result()
            result.packs_copied += count
            result.bytes_copied += size
            result.bundles += bundle
            result.packs_bundled += count if bundle else 0
            done += size
        if progress is not None:
            progress({"bytes_done": done, "bytes_total": total, "packs": result.packs_copied})

    # A few packs (or bundles) in flight: reading and hashing the next overlaps the upload.
    with ThreadPoolExecutor(max_workers=COPY_THREADS) as pool:
        pending: set[Future[tuple[int, int, int]]] = set()
        for job in jobs:
            if cancel is not None and cancel.is_set():
                raise BackupCancelled("the copy was cancelled")
            pending.add(pool.submit(job))
            if len(pending) >= COPY_THREADS:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                account(finished)
        account(set(wait(pending).done))
    if progress is not None and not todo:
        progress({"bytes_done": 0, "bytes_total": total, "packs": 0})
    entries: list[IndexEntry] = []
    for pack in sorted(needs.packs):
        entries.extend(repo.index.pack_entries(pack))
    for start in range(0, len(entries), INDEX_FILE_ENTRIES):
        result.index_files.append(
            _put_index(repo, target, entries[start : start + INDEX_FILE_ENTRIES], hot)
        )
    manifest_name = f"manifests/{point_id}"
    _put_or_retain(target, manifest_name, lambda: repo.backend.get(manifest_name), hot)
    return result


def _present_many(target: Backend) -> Callable[[list[str]], dict[str, int]] | None:
    """The target's batch presence query ``present_many(names) -> {name: size}`` (a peer's),
    found on the outermost layer that offers it (the wrappers forward it, retried and rate
    limited like any call, when the backend below has it), or None.

    Only a hot target's: bundles go to cold classes alone, and the query knows no bundles."""
    if target.capabilities.cold_objects:
        return None
    layer: object = target
    while layer is not None:
        ask = getattr(layer, "present_many", None)
        if callable(ask):
            return cast(Callable[[list[str]], dict[str, int]], ask)
        layer = getattr(layer, "backend", None)
    return None


def _bundle_groups(
    target: Backend,
    options: PutOptions | None,
    todo: list[tuple[bytes, int]],
    stats: dict[bytes, ObjectInfo],
    pack_size: int,
) -> list[list[bytes]]:
    """The small data packs to send as bundles (:func:`.bundles.plan_bundles`): only when they go
    to a cold class, ordered by when the source wrote them (a backup's packs stay together, so
    a recall of what one backup wrote thaws few bundles)."""
    if not (
        target.capabilities.cold_objects
        and options is not None
        and options.storage_class not in (None, "STANDARD")
    ):
        return []
    limit = bundles.small_pack_limit(pack_size)
    small = sorted(
        (stats[pack].mtime, pack)
        for pack, kind in todo
        if kind == fmt.PACK_KIND_DATA and stats[pack].size < limit
    )
    return bundles.plan_bundles(
        [(pack, stats[pack].size) for _, pack in small], bundles.bundle_target(pack_size)
    )


def _put_or_retain(
    target: Backend, name: str, data: Callable[[], bytes], options: PutOptions | None
) -> None:
    """Put the object if the target lacks it, else extend its lock to the options' date."""
    if not _exists(target, name):
        target.put(name, data(), options)
    elif options is not None and options.retain_until is not None:
        target.retain(name, options.retain_until)


def _put_index(
    repo: Repository, target: Backend, entries: list[IndexEntry], options: PutOptions | None
) -> str:
    plaintext = encode_index(entries)
    blob_id = repo.envelope.chunk_id(plaintext)
    name = f"index/{blob_id.hex()}"
    _put_or_retain(
        target, name, lambda: repo.envelope.seal(fmt.BLOB_INDEX, blob_id, plaintext), options
    )
    return name


#: Failures that make a read move on to the next copy.
FALLBACK_ERRORS = (LocationUnavailable, ObjectMissing, StoreError, OSError)


class FallbackBackend(ReadOnly):
    """A read-only view of one store through several copies, best first.

    Reads go to the current location; when one fails (see :data:`FALLBACK_ERRORS`), the next
    location is tried and becomes current, and ``switched(from, to, error)`` is called so that
    the job log can say so. Writes are refused: a read of a point never changes a copy.

    It owns its sources: :meth:`close` closes each of them, except the ``borrowed`` ones (the
    home repository's backend, which the appliance keeps open for everything else).
    """

    refusing = "reading a point from its copies"
    where = "them"

    def __init__(
        self,
        sources: list[tuple[str, Backend]],
        switched: Callable[[str, str, Exception], None] | None = None,
        *,
        borrowed: Iterable[Backend] = (),
    ) -> None:
        if not sources:
            raise InvalidInput("no copy of this point can be read")
        self.sources = sources
        self._borrowed = {id(b) for b in borrowed}
        self.current = 0
        self._switched = switched
        self._lock = threading.Lock()
        # Which copy gave this thread its last bytes: a damaged read moves on from that copy,
        # not from the current one, which another thread may have moved already.
        self._last = threading.local()
        # Restore workers are forked with this object: a switch seen there is not reported
        # (the callback writes the job log, which a forked worker must not touch).
        self._pid = os.getpid()

    @property
    def capabilities(self) -> BackendCapabilities:
        return HOT_RANDOM_ACCESS

    @property
    def label(self) -> str:
        return self.sources[self.current][0]

    def _read(self, call: Callable[[Backend], Any], start: int | None = None) -> Any:
        if start is None:
            with self._lock:
                start = self.current
        last: Exception | None = None
        for i in range(start, len(self.sources)):
            label, backend = self.sources[i]
            try:
                value = call(backend)
            except FALLBACK_ERRORS as exc:
                last = exc
                if i + 1 < len(self.sources):
                    with self._lock:
                        if self.current == i:
                            self.current = i + 1
                    self._report(label, self.sources[i + 1][0], exc)
                continue
            self._last.index = i
            return value
        assert last is not None
        raise last

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data: bytes = self._read(lambda b: b.get(name, offset, length))
        return data

    def reread(
        self, name: str, offset: int, length: int | None, damaged: Exception
    ) -> bytes | None:
        """The same bytes from the next copy, after the current one returned damaged data
        (the repository found it did not decrypt or match its ID); None when no copy is left."""
        with self._lock:
            gave = getattr(self._last, "index", self.current)
            if gave + 1 >= len(self.sources):
                return None
            moved = self.current <= gave
            if moved:
                self.current = gave + 1
        if moved:
            self._report(self.sources[gave][0], self.sources[gave + 1][0], damaged)
        data: bytes = self._read(lambda b: b.get(name, offset, length), start=gave + 1)
        return data

    def _report(self, old: str, new: str, exc: Exception) -> None:
        if self._switched is not None and os.getpid() == self._pid:
            self._switched(old, new, exc)

    def stat(self, name: str) -> ObjectInfo:
        info: ObjectInfo = self._read(lambda b: b.stat(name))
        return info

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        listed: list[ObjectInfo] = self._read(lambda b: list(b.list(prefix)))
        return iter(listed)

    def describe(self) -> str:
        return " then ".join(label for label, _ in self.sources)

    def view_of(self) -> Backend | None:
        """The one backend this reads through, when there is only one: worker processes of a
        restore may then open it themselves (``Repository.worker_spec``), as nothing is lost."""
        return self.sources[0][1] if len(self.sources) == 1 else None

    def close(self) -> None:
        """Close every source it owns (all of them are tried, even when one fails)."""
        with contextlib.ExitStack() as stack:
            for _, backend in self.sources:
                if id(backend) not in self._borrowed:
                    stack.callback(backend.close)
