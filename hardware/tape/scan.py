"""``appliance tape scan``: the catalog's tape media, sets and copies rebuilt from the tapes alone.

:func:`scan_tapes` reads every tape within reach of a drive (the one in it, and every cartridge
in its library's slots): its label, and the newest set catalog on it (each tape's file headers
are passed over by spacing; only catalogs are read whole). Per media set of this store the newest
catalog (highest generation, on whichever tape) wins; it is recorded (pool, set, tapes, the
set's location) and the set's metadata objects are read into its mirror (only the files that hold
them), after which the set's points are adopted like any location's (``adopt_location``): points
new to the catalog are added, with their copy on the set ``present`` and none in the home pool.
A restore then reads their packs from tape (``tape restore``).

On a **fresh appliance** (a data directory without a store) :func:`seed_store_from_tape` comes
first: it reads the store's ``config`` and key files from the set, so the recovery key (or the
passphrase) opens the store; the scan then rebuilds the rest.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from appliance.engine import DataDir
from appliance.errors import NotFound
from appliance.store.backend import LocalDirectoryBackend
from hardware.tape.backend import mirror_path
from hardware.tape.deck import Deck
from hardware.tape.drive import Drive
from hardware.tape.layout import SetCatalog, TapeLabel, TapeObject
from hardware.tape.reader import check_label, read_objects, scan_tape
from hardware.tape.recover import stage_store, store_objects
from hardware.tape.sets import describe, ensure_set, metadata_names, open_mirror, record_catalog
from hardware.tape.sets import set_label as make_set_label

if TYPE_CHECKING:
    from appliance.engine import Appliance

Log = Callable[[str, str], None]


def _quiet(level: str, message: str) -> None:
    return None


def _within_reach(deck: Deck) -> list[str | None]:
    """Barcodes to scan, the one in the drive first (None: an unknown one in a bare drive)."""
    loaded = deck.loaded_barcode()
    rest: list[str | None] = [b for b in sorted(deck.library_barcodes()) if b != loaded]
    if loaded is None and deck.changer is None:
        return [None]
    return [loaded, *rest] if loaded is not None else rest


def _drive_for(deck: Deck, barcode: str | None) -> Drive | None:
    if barcode is None:
        return deck.drive()
    return deck.bring(barcode)


def read_tapes(
    deck: Deck, log: Log = _quiet
) -> tuple[dict[str, SetCatalog], dict[str, TapeLabel], dict[str, str]]:
    """Scan every tape within reach: the newest catalog of each set, the label of each tape
    (by barcode), and what each unusable tape was found to be."""
    catalogs: dict[str, SetCatalog] = {}
    labels: dict[str, TapeLabel] = {}
    others: dict[str, str] = {}
    for barcode in _within_reach(deck):
        drive = _drive_for(deck, barcode)
        if drive is None:
            continue
        scan = scan_tape(drive)
        name = barcode or (scan.label.barcode if scan.label else "(unknown)")
        if scan.label is None:
            others[name] = scan.verdict
            log("info", f"tape {name}: {scan.verdict}")
            continue
        labels[name] = scan.label
        found = scan.catalog
        log(
            "info",
            f"tape {name}: tape {scan.label.sequence} of set {scan.label.media_set_id} "
            f"({scan.data_files} data file(s)"
            + (f", catalog generation {found.generation})" if found else ", no catalog)"),
        )
        if found is not None:
            best = catalogs.get(found.media_set_id)
            if best is None or found.generation > best.generation:
                catalogs[found.media_set_id] = found
    deck.release()
    return catalogs, labels, others


def tape_reader(deck: Deck, catalog: SetCatalog, log: Log) -> Callable[[int], Drive]:
    def tape_for(sequence: int) -> Drive:
        barcode = catalog.barcode_of(sequence)
        drive = deck.bring(barcode)
        if drive is None:
            raise NotFound(f"tape {barcode} of set {catalog.media_set_id} is not within reach")
        check_label(drive, catalog, sequence)
        log("info", f"reading the metadata of set {catalog.media_set_id} from tape {barcode}")
        return drive

    return tape_for


def _putter(backend: LocalDirectoryBackend) -> Callable[[TapeObject, bytes], None]:
    def put(obj: TapeObject, data: bytes) -> None:
        backend.put(obj.name, data)

    return put


def seed_store_from_tape(
    data_dir: str, deck: Deck, log: Log = _quiet, *, recovery_key: str | None = None
) -> dict[str, Any]:
    """Give a fresh data directory the store of the tapes within reach: its ``config`` and key
    files (see the module doc); with ``recovery_key`` the key is proven first (a wrong one
    leaves the data directory as it was). Nothing happens when it has a store already."""
    store_path = DataDir(os.path.abspath(data_dir)).store_path
    if os.path.exists(os.path.join(store_path, "config")):
        return {"seeded": False}
    found = store_objects(deck, with_index=recovery_key is not None, log=log)
    if recovery_key is not None:
        stage_store(found, store_path, recovery_key=recovery_key)
    else:
        os.makedirs(store_path, exist_ok=True)
        home = LocalDirectoryBackend(store_path)
        try:
            for name, data in found.objects.items():
                home.put(name, data)
        finally:
            home.close()
    log("info", f"the data directory's pool now belongs to store {found.store_id}")
    return {"seeded": True, "store_id": found.store_id, "set": found.catalog.media_set_id}


def scan_tapes(
    app: Appliance,
    deck: Deck,
    *,
    log: Log = _quiet,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Rebuild the catalog's tape media, sets and copies from the tapes (see the module doc)."""
    from hardware.tape.jobs import sync_library

    sync_library(app, deck)
    catalogs, labels, others = read_tapes(deck, log)
    if progress is not None:
        progress({"tapes_scanned": len(labels) + len(others), "sets": len(catalogs)})
    store = app.repo.store_id
    foreign = {b: lab.store_id for b, lab in labels.items() if lab.store_id != store}
    for barcode, verdict in others.items():
        if verdict == "blank" and barcode != "(unknown)":
            app.catalog.put_tape_medium(barcode, state="blank")
    for barcode, found in labels.items():
        if found.store_id != store:
            continue
        try:
            app.catalog.get_tape_pool(found.pool)
        except NotFound:
            app.catalog.put_tape_pool(found.pool)
        app.catalog.put_tape_medium(
            barcode,
            label_id=found.label_id,
            pool=found.pool,
            media_set_id=found.media_set_id,
            sequence=found.sequence,
            state="writable",
        )
    sets: list[dict[str, Any]] = []
    for catalog in catalogs.values():
        if catalog.store_id != store:
            continue
        ensure_set(app, catalog.media_set_id, catalog.pool)
        record_catalog(app, catalog)
        mirror = open_mirror(app, catalog.media_set_id)
        try:
            have = {i.name for i in mirror.list()}
            names = sorted(
                {n for needs in catalog.points.values() for n in metadata_names(needs)} - have
            )
            read = read_objects(catalog, names, tape_reader(deck, catalog, log), _putter(mirror))
        finally:
            mirror.close()
            deck.release()
        adopted = app.adopt_location(
            catalog.media_set_id,
            kind="tape_set",
            options={
                "mirror": mirror_path(app.data_dir.path, catalog.media_set_id),
                "label": make_set_label(catalog.pool, catalog.media_set_id),
            },
        )
        sets.append(
            {
                **describe(catalog),
                "metadata_objects_read": read.objects,
                "points_added": adopted["points_added"],
                "damaged_points": adopted["damaged_points"],
            }
        )
        log(
            "info",
            f"set {catalog.media_set_id}: {len(catalog.points)} point(s), "
            f"{adopted['points_added']} new to the catalog",
        )
    return {
        "sets": sets,
        "tapes": sorted(labels),
        "foreign": foreign,
        "other": others,
    }
