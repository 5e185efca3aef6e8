"""Bundles: small data packs put together into one object before they go cold.

A cold class charges per object, not only per byte: every object in GLACIER or DEEP_ARCHIVE
carries 40 KiB of billed overhead, GLACIER_IR bills at least 128 KiB per object, and each PUT and
each restore request is charged. A store's packs are ~16 MiB, but the last pack of every backup
and the packs of small incrementals are often far smaller, and a monthly cold copy gathers the
packs of every incremental since the previous one. So when :func:`~.copy.copy_point` sends data
packs to a cold class, its small packs (:func:`small_pack_limit`: under a quarter of the store's
pack size, 4 MiB by default) go into *bundles* of about one pack (:func:`bundle_target`) instead
of one object each; fewer than :data:`BUNDLE_MIN_PACKS` small packs are put one by one.

A bundle is a location-level layer; the store format does not change:

- ``bundles/<64 hex>``: the bundle, the packs' bytes one after the other, unchanged; its name is
  the unkeyed BLAKE3 of its bytes (like a pack's). Put with the data packs' class and lock.
- ``bundles/<64 hex>.json``: its *directory*, written after it, hot (the default class) and
  locked as long: plain JSON ``{"version": 1, "bundle": NAME, "size": N, "packs": [[pack object
  name, offset, length], ...]}``. A pack ``data/xx/<hex>`` at ``offset``/``length`` in the bundle
  is exactly the pack object an unbundled copy would hold, so it is still checked by its name.

The names and the directory's fields are a frozen on-disk format (``docs/format.md``,
"Bundles"): never renamed or renumbered. A directory is plain JSON, not an envelope: it says
nothing an unbundled copy does not (pack names are object names there, and their lengths object
sizes), and it is never trusted with content (a pack is checked by its name, a blob by its GCM
tag and ID), so a forged directory can make a read fail, never return other data; a tool without
the key can still cut packs out.

A bundle counts only when its directory is there and the listed bundle has the directory's size
(a crash between the two puts leaves an *orphan* the location's GC removes). Bundles are never
rewritten: a bundle is deleted whole, by the location's GC, once none of its packs is needed and
its lock has ended. :class:`BundledBackend` makes bundled packs look like pack objects to
everything above a location's backend (reads become ranged reads in the bundle; a recall thaws
bundles); :func:`load_bundles` reads the directories once per open, the unchanged ones from a
local cache (a directory's content never changes under its name).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import blake3

from appliance.errors import IntegrityError, ObjectMissing, StoreError
from appliance.store.backend import (
    Backend,
    BackendCapabilities,
    ObjectInfo,
    PutOptions,
    WarmUpStatus,
)

#: The smallest object worth making in a cold class: GLACIER_IR (like the IA classes) bills at
#: least 128 KiB per object, and S3's lifecycle rules skip smaller objects by default.
MIN_COLD_OBJECT = 128 * 1024
#: A data pack smaller than this fraction of its store's pack size is a *small* pack (the tail
#: of a backup, the pack of a small incremental): 1/4, so 4 MiB at the default 16 MiB, where the
#: 40 KiB overhead of an object of its own is 1 %.
SMALL_PACK_FRACTION = 4
#: A bundle of one pack saves nothing (one cold object either way, plus a directory).
BUNDLE_MIN_PACKS = 2


def small_pack_limit(pack_size: int) -> int:
    """Data packs below this many bytes are bundled (never below :data:`MIN_COLD_OBJECT`)."""
    return max(pack_size // SMALL_PACK_FRACTION, MIN_COLD_OBJECT)


def bundle_target(pack_size: int) -> int:
    """A bundle is closed once it holds this much: about one of its store's packs (a store
    chose its pack size for its cold objects and its recalls; a bundle does not undo that),
    never less than :data:`MIN_COLD_OBJECT`. It may exceed it by less than one small pack."""
    return max(pack_size, MIN_COLD_OBJECT)


BUNDLES_FOLDER = "bundles/"
DIRECTORY_VERSION = 1
_DIRECTORY_SUFFIX = ".json"
_BUNDLE = re.compile(r"^bundles/[0-9a-f]{64}$")
_DATA_PACK = re.compile(r"^data/([0-9a-f]{2})/([0-9a-f]{64})$")
T = TypeVar("T")


@dataclass(frozen=True)
class BundleDirectory:
    """Where each pack of one bundle lies (its ``bundles/<hex>.json`` object)."""

    name: str
    bundle: str
    size: int
    packs: tuple[tuple[str, int, int], ...]

    def encode(self) -> bytes:
        document = {
            "version": DIRECTORY_VERSION,
            "bundle": self.bundle,
            "size": self.size,
            "packs": [list(entry) for entry in self.packs],
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def directory_name(bundle: str) -> str:
    return bundle + _DIRECTORY_SUFFIX


def parse_directory(name: str, data: bytes) -> BundleDirectory:
    """A directory object's content, checked (:class:`IntegrityError` when it is not one)."""
    try:
        document = json.loads(data)
        bundle, size, packs = document["bundle"], document["size"], document["packs"]
        if document.get("version") != DIRECTORY_VERSION:
            raise ValueError(f"version {document.get('version')!r}")
        if not _BUNDLE.match(bundle) or directory_name(bundle) != name:
            raise ValueError(f"it names bundle {bundle!r}")
        entries = tuple((str(p), int(o), int(n)) for p, o, n in packs)
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"bundle directory {name} is damaged: {exc}", name=name) from exc
    end = 0
    for pack, offset, length in sorted(entries, key=lambda e: e[1]):
        match = _DATA_PACK.match(pack)
        if match is None or match[1] != match[2][:2] or offset < end or length <= 0:
            raise IntegrityError(f"bundle directory {name} is damaged at {pack}", name=name)
        end = offset + length
    if not isinstance(size, int) or end > size:
        raise IntegrityError(f"bundle directory {name} is damaged: size {size!r}", name=name)
    return BundleDirectory(name, bundle, size, entries)


@dataclass(frozen=True)
class Placement:
    """One pack's bytes inside a bundle."""

    bundle: str
    offset: int
    length: int


class BundleMap:
    """The bundles of one location: their directories and the listed bundle objects."""

    def __init__(
        self,
        directories: Iterable[BundleDirectory],
        listed: dict[str, ObjectInfo],
        damaged: Iterable[str] = (),
    ) -> None:
        self.directories: dict[str, BundleDirectory] = {}
        #: Bundle objects as listed (name -> info), with or without a directory.
        self.listed = dict(listed)
        #: Directories that could not be read or parsed: their bundles are left alone.
        self.damaged = sorted(damaged)
        self._packs: dict[str, list[Placement]] = {}
        for directory in directories:
            self.add(directory)

    def add(self, directory: BundleDirectory, info: ObjectInfo | None = None) -> None:
        """Know one more bundle (``info``: just put, so listed with that size)."""
        if info is not None:
            self.listed[directory.bundle] = info
        if directory.bundle in self.directories:
            return
        self.directories[directory.bundle] = directory
        for pack, offset, length in directory.packs:
            self._packs.setdefault(pack, []).append(Placement(directory.bundle, offset, length))

    def present(self, bundle: str) -> bool:
        """The bundle is there whole: listed, with the size its directory says."""
        info = self.listed.get(bundle)
        directory = self.directories.get(bundle)
        return info is not None and directory is not None and info.size == directory.size

    def placement(self, pack: str) -> Placement | None:
        """Where a pack object can be read from a bundle that is there; None if none."""
        return next((p for p in self._packs.get(pack, ()) if self.present(p.bundle)), None)

    def placements(self, pack: str) -> list[Placement]:
        return list(self._packs.get(pack, ()))

    def problem(self, pack: str) -> str | None:
        """Why a pack a directory names cannot be read from its bundle (None: it can, or no
        directory names it)."""
        for placement in self._packs.get(pack, ()):
            if self.present(placement.bundle):
                return None
            info = self.listed.get(placement.bundle)
            expected = self.directories[placement.bundle].size
            if info is None:
                return f"its bundle {placement.bundle} is gone"
            return (
                f"its bundle {placement.bundle} has {info.size} bytes, not the {expected} its "
                "directory says (truncated or replaced)"
            )
        return None

    def packs(self) -> Iterator[tuple[str, Placement]]:
        """Every pack a bundle that is there holds (once, at its first such bundle)."""
        for pack in self._packs:
            placement = self.placement(pack)
            if placement is not None:
                yield pack, placement

    def orphans(self) -> list[ObjectInfo]:
        """Bundle objects without a directory (a copy stopped between the two puts)."""
        unreadable = set(self.damaged)
        return [
            info
            for name, info in self.listed.items()
            if name not in self.directories and directory_name(name) not in unreadable
        ]


def load_bundles(backend: Backend, cache_path: str | None = None) -> BundleMap:
    """The location's bundles: one listing of ``bundles/``; each directory is read once and
    kept in ``cache_path`` (its content never changes under its name)."""
    listed: dict[str, ObjectInfo] = {}
    names: list[str] = []
    for info in backend.list(BUNDLES_FOLDER):
        if info.name.endswith(_DIRECTORY_SUFFIX):
            names.append(info.name)
        elif _BUNDLE.match(info.name):
            listed[info.name] = info
    cached = _read_cache(cache_path)
    directories, damaged, fresh = [], [], {}
    for name in sorted(names):
        try:
            if name in cached:
                directory = parse_directory(name, cached[name].encode())
            else:
                data = backend.get(name)
                directory = parse_directory(name, data)
        except (IntegrityError, ObjectMissing):
            damaged.append(name)
            continue
        directories.append(directory)
        fresh[name] = directory.encode().decode()
    if cache_path is not None and fresh != cached:
        _write_cache(cache_path, fresh)
    return BundleMap(directories, listed, damaged)


def _read_cache(path: str | None) -> dict[str, str]:
    if path is None:
        return {}
    try:
        with open(path) as f:
            loaded = json.load(f)
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}


def _write_cache(path: str, directories: dict[str, str]) -> None:
    temporary = f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"  # forked readers too
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(temporary, "w") as f:
            json.dump(directories, f)
        os.replace(temporary, path)
    except OSError:  # a cache: the directories are read from the location next time
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def plan_bundles(
    packs: list[tuple[T, int]], target: int, min_packs: int = BUNDLE_MIN_PACKS
) -> list[list[T]]:
    """Groups of packs (key, size), in the order given, each closed once it holds ``target``
    bytes; a last group smaller than ``min_packs`` joins the one before. Fewer than
    ``min_packs`` packs in all: no group (they are put one by one)."""
    if not packs or len(packs) < min_packs:
        return []
    groups: list[list[T]] = [[]]
    filled = 0
    for key, size in packs:
        if filled >= target:
            groups.append([])
            filled = 0
        groups[-1].append(key)
        filled += size
    if len(groups) > 1 and len(groups[-1]) < min_packs:
        groups[-2].extend(groups.pop())
    return groups


def bundled(packs: Iterable[tuple[str, bytes]]) -> tuple[bytearray, BundleDirectory]:
    """The bundle of these packs (object name, bytes), taken one at a time, and its directory."""
    body = bytearray()
    entries = []
    for name, data in packs:
        entries.append((name, len(body), len(data)))
        body += data
    bundle = BUNDLES_FOLDER + blake3.blake3(body).hexdigest()
    return body, BundleDirectory(directory_name(bundle), bundle, len(body), tuple(entries))


class BundledBackend:
    """A location's backend on which bundled packs look like pack objects (see module doc).

    ``get``/``stat``/``list`` of a pack a present bundle holds read the bundle (a ranged read;
    the pack's size); ``warm_up``/``wait_warm``/``retain`` of such a pack act on its bundle (and
    ``retain`` on its directory too). Everything else goes to the wrapped backend unchanged. The
    bundles are read on first need (a read of a manifest or an index never needs them).
    """

    def __init__(self, backend: Backend, cache_path: str | None = None) -> None:
        self.backend = backend
        self._cache_path = cache_path
        self._map: BundleMap | None = None
        self._lock = threading.Lock()
        self._retained: dict[str, datetime] = {}

    @property
    def capabilities(self) -> BackendCapabilities:
        return self.backend.capabilities

    def describe(self) -> str:
        return self.backend.describe()

    def close(self) -> None:
        self.backend.close()

    def bundles(self) -> BundleMap:
        """The location's bundles, read once (:func:`load_bundles`)."""
        with self._lock:
            if self._map is None:
                self._map = load_bundles(self.backend, self._cache_path)
            return self._map

    def _where(self, name: str) -> Placement | None:
        if not name.startswith("data/"):
            return None
        return self.bundles().placement(name)

    def object_of(self, name: str) -> str:
        """The object that holds ``name``: its bundle, or itself."""
        placement = self._where(name)
        return placement.bundle if placement is not None else name

    def put(
        self, name: str, data: bytes | bytearray | memoryview, options: PutOptions | None = None
    ) -> None:
        self.backend.put(name, data, options)

    def put_bundle(
        self, packs: Iterable[tuple[str, bytes]], data: PutOptions | None, hot: PutOptions | None
    ) -> BundleDirectory:
        """Put a bundle of these packs, then its directory; the map knows it at once."""
        body, directory = bundled(packs)
        self.backend.put(directory.bundle, body, data)
        self.backend.put(directory.name, directory.encode(), hot)
        info = ObjectInfo(directory.bundle, directory.size, time.time())
        bundles = self.bundles()
        with self._lock:
            bundles.add(directory, info)
            if self._cache_path is not None:  # the next open reads it from here
                cached = _read_cache(self._cache_path)
                cached[directory.name] = directory.encode().decode()
                _write_cache(self._cache_path, cached)
        return directory

    def _unbundled(self, name: str, exc: ObjectMissing) -> ObjectMissing:
        """A pack not found on its own: say why its bundle could not stand in, if it has one."""
        reason = self.bundles().problem(name) if name.startswith("data/") else None
        if reason is None:
            return exc
        return ObjectMissing(f"{exc.message}; {reason}", **exc.details)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        placement = self._where(name)
        if placement is None:
            try:
                return self.backend.get(name, offset, length)
            except ObjectMissing as exc:
                raise self._unbundled(name, exc) from exc
        end = placement.length if length is None else offset + length
        if offset < 0 or end > placement.length or offset > end:
            raise IntegrityError(
                f"{name} (in {placement.bundle}): the range {offset}+{length} is past its end "
                f"({placement.length} bytes)",
                name=name,
            )
        try:
            return self.backend.get(placement.bundle, placement.offset + offset, end - offset)
        except StoreError as exc:
            raise type(exc)(
                f"pack {name} lies in {placement.bundle}: {exc.message}", **exc.details
            ) from exc

    def stat(self, name: str) -> ObjectInfo:
        placement = self._where(name)
        if placement is None:
            try:
                return self.backend.stat(name)
            except ObjectMissing as exc:
                raise self._unbundled(name, exc) from exc
        info = self.bundles().listed[placement.bundle]
        return ObjectInfo(name, placement.length, info.mtime)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        seen = set()
        for info in self.backend.list(prefix):
            seen.add(info.name)
            yield info
        if not ("data/".startswith(prefix) or prefix.startswith("data/")):
            return
        bundles = self.bundles()
        for pack, placement in list(bundles.packs()):
            if pack.startswith(prefix) and pack not in seen:
                mtime = bundles.listed[placement.bundle].mtime
                yield ObjectInfo(pack, placement.length, mtime)

    def delete(self, name: str) -> None:
        placement = self._where(name)
        if placement is not None:
            raise StoreError(
                f"pack {name} lies in {placement.bundle}; a bundle is deleted whole, by the "
                "location's garbage collection, once none of its packs is needed",
                name=name,
                bundle=placement.bundle,
            )
        self.backend.delete(name)

    def warm_up(self, names: Iterable[str]) -> WarmUpStatus:
        wanted = {name: self.object_of(name) for name in names}
        status = self.backend.warm_up(sorted(set(wanted.values())))
        return WarmUpStatus(
            frozenset(n for n, o in wanted.items() if o in status.ready),
            frozenset(n for n, o in wanted.items() if o not in status.ready),
        )

    def wait_warm(self, names: Iterable[str], timeout: float) -> None:
        self.backend.wait_warm(sorted({self.object_of(name) for name in names}), timeout)

    def retain(self, name: str, until: datetime) -> None:
        placement = self._where(name)
        if placement is None:
            self.backend.retain(name, until)
            return
        # A bundle holds many packs a copy finds there: its lock is extended once per date.
        with self._lock:
            done = self._retained.get(placement.bundle)
        if done is not None and done >= until:
            return
        self.backend.retain(placement.bundle, until)
        self.backend.retain(directory_name(placement.bundle), until)
        with self._lock:
            self._retained[placement.bundle] = until


def with_bundles(backend: Backend, cache_path: str | None = None) -> BundledBackend:
    """``backend`` as a :class:`BundledBackend` (itself when it already is one)."""
    if isinstance(backend, BundledBackend):
        return backend
    return BundledBackend(backend, cache_path)


def unwrapped(backend: Backend) -> Backend:
    """The backend below a :class:`BundledBackend` (bundles as the objects they are)."""
    return backend.backend if isinstance(backend, BundledBackend) else backend


def cold_pack_problem(backend: Backend, name: str, expected: int | None) -> str | None:
    """Why a pack of a cold copy is not there whole, without reading it (None: it is): a
    bundled pack's bundle must be listed with its directory's size, a plain one must exist;
    either must have ``expected`` bytes (the home pool's pack) when that is known."""
    short = name.rsplit("/", 1)[1][:16]
    reason = None
    if isinstance(backend, BundledBackend):
        bundles = backend.bundles()
        placement = bundles.placement(name)
        if placement is not None:
            if expected is not None and placement.length != expected:
                return (
                    f"pack {short} has {placement.length} bytes in {placement.bundle}, "
                    f"not {expected}"
                )
            return None
        reason = bundles.problem(name)
        if reason is None and bundles.damaged:
            reason = f"bundle directories that cannot be read may name it: {bundles.damaged[0]}"
        backend = backend.backend
    try:
        size = backend.stat(name).size
    except ObjectMissing:
        return f"pack {short} is missing" + (f": {reason}" if reason else "")
    if expected is not None and size != expected:
        return f"pack {short} has {size} bytes, not {expected}"
    return None


def describe_bundles(bundles: BundleMap) -> dict[str, Any]:
    """Counts for a report: bundles there, packs in them, damaged directories, orphans."""
    return {
        "bundles": sum(1 for b in bundles.directories if bundles.present(b)),
        "bundled_packs": sum(1 for _ in bundles.packs()),
        "damaged_bundle_directories": list(bundles.damaged),
        "orphan_bundles": len(bundles.orphans()),
    }
