"""A lost appliance's store, read back from its tapes: the objects that make a store openable.

A media set carries the store's own ``config`` and key files beside its packs (docs/format.md,
"Tape"). On a fresh appliance those are all the store needs to be opened with the recovery key;
the scan (:mod:`hardware.tape.scan`) then adopts the set's points, and a restore reads their packs
from tape.

* :func:`store_objects` reads them from the newest set within reach of a drive, with one index
  file of the set to prove a recovery key on (an index file opens only with the right key).
* :func:`stage_store` writes them into a folder, proves the recovery key on the index file, adds
  a key file for this appliance's passphrase (so the service opens the store as its own, as it
  opens one it made), and leaves no index file behind: the packs it names are on tape, not in
  the folder, and an index that named them would make backups skip chunks the pool lacks.

Used by the CLI on a fresh data directory (:func:`hardware.tape.scan.seed_store_from_tape`) and
by the service's "Recover from tapes" (``api.tape_recovery``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.errors import InvalidInput, NotFound, WrongPassphrase
from appliance.store.backend import LocalDirectoryBackend
from appliance.store.repository import Repository
from hardware.tape.deck import Deck
from hardware.tape.layout import SetCatalog
from hardware.tape.reader import read_objects

Log = Callable[[str, str], None]


def _quiet(level: str, message: str) -> None:
    return None


@dataclass
class StoreObjects:
    """What :func:`store_objects` read: the set it came from, and objects by name."""

    catalog: SetCatalog
    objects: dict[str, bytes] = field(default_factory=dict)

    @property
    def store_id(self) -> str:
        return self.catalog.store_id

    @property
    def index_names(self) -> list[str]:
        return sorted(n for n in self.objects if n.startswith("index/"))


def newest_set(catalogs: dict[str, SetCatalog]) -> SetCatalog:
    """The set whose catalog was written last: the store the tapes were last written by."""
    if not catalogs:
        raise NotFound("no tape within reach holds a set catalog of this appliance's format")
    return max(catalogs.values(), key=lambda c: c.written_at)


def opening_names(catalog: SetCatalog, *, with_index: bool) -> list[str]:
    """The objects that open the set's store: its config, its key files and (to prove a
    recovery key on) the smallest index file."""
    names = ["config", *sorted(o.name for o in catalog.objects if o.name.startswith("keys/"))]
    if "config" not in catalog.by_name():
        raise NotFound(f"set {catalog.media_set_id} does not hold its store's config")
    if with_index:
        indexes = [o for o in catalog.objects if o.name.startswith("index/")]
        if indexes:
            names.append(min(indexes, key=lambda o: (o.size, o.name)).name)
    return names


def store_objects(deck: Deck, *, with_index: bool = True, log: Log = _quiet) -> StoreObjects:
    """Read the opening objects (:func:`opening_names`) of the newest set within reach."""
    from hardware.tape.scan import read_tapes, tape_reader

    catalogs, _labels, _others = read_tapes(deck, log)
    catalog = newest_set(catalogs)
    found = StoreObjects(catalog)
    try:
        read_objects(
            catalog,
            opening_names(catalog, with_index=with_index),
            tape_reader(deck, catalog, log),
            lambda obj, data: found.objects.__setitem__(obj.name, data),
        )
    finally:
        deck.release()
    return found


def stage_store(
    found: StoreObjects, folder: str, *, recovery_key: str, passphrase: str | None = None
) -> str:
    """Write ``found`` into ``folder`` (created; it must not hold a store) as an openable store:
    the recovery key is proven on the index file read with it (a wrong key raises
    :class:`WrongPassphrase` and leaves nothing behind) and ``passphrase``, when given, gets a
    key file of its own. Returns the store's id."""
    if not found.index_names:
        raise InvalidInput(
            f"set {found.catalog.media_set_id} holds no index file to prove the recovery key on"
        )
    if os.path.exists(os.path.join(folder, "config")):
        raise InvalidInput(f"{folder} holds a store already")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    backend = LocalDirectoryBackend(folder)
    cache = tempfile.mkdtemp(prefix="recover-cache-", dir=os.path.dirname(folder) or None)
    try:
        for name, data in found.objects.items():
            backend.put(name, data)
        try:
            repo = Repository.open(backend, cache, recovery_key=recovery_key, sync=False)
        except WrongPassphrase:
            raise WrongPassphrase(
                f"the recovery key does not unlock store {found.store_id} on these tapes"
            ) from None
        try:
            if passphrase is not None:
                repo.add_passphrase(passphrase)
        finally:
            repo.close()
        for name in found.index_names:
            backend.delete(name)
    except BaseException:
        backend.close()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    backend.close()
    return found.store_id
