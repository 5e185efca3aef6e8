"""The ``tape_set`` backend kind: a media set, seen through what the appliance keeps of it on disk.

A media set is a location of kind ``tape_set`` (its id is the set's id, its access
``sequential``). Tape cannot answer a ``get`` by name in any useful time, so the backend reads a
*mirror*: a directory on the appliance (``<data dir>/tape/sets/<set id>``) that holds the set's
identity file and its metadata objects (``config``, ``keys/*``, index files, manifests,
metadata packs), written there by every tape backup and by ``tape scan``, plus the data packs a
``tape_restore`` has read back from tape. So listing the set's points, planning a restore and
``catalog rebuild --from`` work at once; a data pack still only on tape is *unavailable* ("the
set is on tape: restore the point from tape first"), never missing. Writes go to tape through
:mod:`hardware.tape.writer` only: the backend is read-only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from appliance.errors import LocationUnavailable, ObjectMissing
from appliance.store.backend import BackendCapabilities, LocalDirectoryBackend, ObjectInfo
from appliance.store.wrappers import ReadOnly

#: What a tape set's medium can do: read in order, list rarely (its mirror answers).
TAPE_CAPABILITIES = BackendCapabilities(sequential_only=True)
#: Data pack prefixes: the objects a mirror lacks until a restore reads them from tape.
DATA_PREFIXES = ("data/",)


def mirror_path(data_dir: str, set_id: str) -> str:
    """Where the appliance keeps the mirror of media set ``set_id``."""
    return os.path.join(os.path.abspath(data_dir), "tape", "sets", set_id)


def is_metadata(name: str) -> bool:
    """Objects every mirror holds (everything but data packs)."""
    return not name.startswith(DATA_PREFIXES)


class TapeSetBackend(ReadOnly):
    """A read-only view of a media set through its mirror (see the module doc)."""

    refusing = "a media set on tape"
    where = "it except by a tape backup"

    def __init__(self, set_id: str, mirror: str, label: str = "") -> None:
        self.set_id = set_id
        self.label = label or set_id
        self.mirror = os.path.abspath(mirror)
        self._inner = LocalDirectoryBackend(self.mirror, require_root=True)

    @property
    def capabilities(self) -> BackendCapabilities:
        return TAPE_CAPABILITIES

    def _on_tape(self, name: str) -> LocationUnavailable:
        return LocationUnavailable(
            f"{name} of media set {self.label} is on tape: restore the point from tape first "
            "(appliance tape restore)",
            location=self.describe(),
            reason="on tape",
        )

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            return self._inner.get(name, offset, length)
        except ObjectMissing:
            if not is_metadata(name):
                raise self._on_tape(name) from None
            raise

    def stat(self, name: str) -> ObjectInfo:
        try:
            return self._inner.stat(name)
        except ObjectMissing:
            if not is_metadata(name):
                raise self._on_tape(name) from None
            raise

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self._inner.list(prefix)

    def describe(self) -> str:
        return f"media set {self.label} (tape)"

    def close(self) -> None:
        self._inner.close()


def open_tape_set(address: str, *, mirror: str, label: str = "") -> TapeSetBackend:
    """The ``tape_set`` backend of the registry: ``address`` is the set's id."""
    return TapeSetBackend(address, mirror, label)
