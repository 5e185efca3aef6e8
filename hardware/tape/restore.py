"""Restoring from tape: what a point (or one path of it) needs, read from its media set.

:func:`restore_from_tape` (the ``tape_restore`` job's work and ``appliance tape restore``) reads
only the objects the read needs, in position order (:func:`hardware.tape.reader.read_objects`):
first the point's metadata objects its set's mirror lacks (none after a backup or a scan), then
the data packs the point needs -- all of them, or only those holding ``subpath``
(``appliance.point_packs``, computed on the set's mirror). A whole point comes back into the
home pool (packs, its index file, the manifest last; its home copy becomes ``present``, and the
mirror drops the packs again); a path is left in the set's mirror, from which ``restore --from
<set>`` reads it. A tape not within reach makes the job wait ("needs tape B").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from appliance.catalog.records import home_location_id
from appliance.errors import NotFound, ObjectMissing
from appliance.locations.work import location_cache
from appliance.point_packs import point_packs
from appliance.store.packs import pack_object_name
from appliance.store.repository import Repository
from hardware.tape.deck import Deck, bring
from hardware.tape.drive import Drive
from hardware.tape.layout import SetCatalog, TapeObject
from hardware.tape.reader import CountingDrive, check_label, read_objects
from hardware.tape.sets import metadata_names, open_mirror, set_catalog

if TYPE_CHECKING:
    from appliance.engine import Appliance

Log = Callable[[str, str], None]
Progress = Callable[[dict[str, Any]], None]


def _quiet(level: str, message: str) -> None:
    return None


def _set_of_point(app: Appliance, point_id: str, set_id: str | None) -> SetCatalog:
    held = [
        c.location_id
        for c in app.catalog.copies_of(app.point(point_id).id)
        if c.state == "present" and c.location_id
    ]
    sets = [s for s in app.catalog.list_tape_sets() if s.id in held and s.catalog]
    if set_id is not None:
        sets = [s for s in sets if s.id == set_id]
    if not sets:
        raise NotFound(f"point {point_id} has no copy on a media set", point=point_id)
    catalog = set_catalog(sets[-1])
    if point_id not in catalog.points:
        raise NotFound(f"media set {catalog.media_set_id} does not list point {point_id}")
    return catalog


def restore_from_tape(
    app: Appliance,
    deck: Deck,
    point_id: str,
    *,
    subpath: str | None = None,
    set_id: str | None = None,
    log: Log = _quiet,
    progress: Progress | None = None,
    checkpoint: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Read what the point (``subpath`` of it) needs from tape (see the module doc)."""
    catalog = _set_of_point(app, point_id, set_id)
    set_id = catalog.media_set_id
    needs = catalog.points[point_id]
    state = dict(checkpoint or {})
    counted: list[CountingDrive] = []

    def tape_for(sequence: int) -> Drive:
        barcode = catalog.barcode_of(sequence)
        drive = CountingDrive(bring(deck, barcode, state, app.clock))
        counted.append(drive)
        check_label(drive, catalog, sequence)
        log("info", f"reading tape {barcode} (tape {sequence} of set {set_id})")
        return drive

    mirror = open_mirror(app, set_id)
    try:
        have = {i.name for i in mirror.list()}
        meta = [n for n in metadata_names(needs) if n not in have]
        done = [0, 0]

        def keep(obj: TapeObject, data: bytes) -> None:
            mirror.put(obj.name, data)
            done[0] += 1
            done[1] += len(data)
            if progress is not None:
                progress({"objects_read": done[0], "bytes_read": done[1]})

        read_meta = read_objects(catalog, meta, tape_for, keep)
        repo = Repository(mirror, app.repo.config, app.repo.key, location_cache(app, set_id))
        with contextlib.closing(repo.index):
            repo.sync_index()
            wanted = point_packs(repo, repo.get_manifest(point_id), subpath)
        names = [pack_object_name(p, k) for p, k in sorted(wanted.packs.items())]
        home = app.repo.backend

        def at_home(name: str) -> bool:
            try:
                home.stat(name)
            except ObjectMissing:
                return False
            return True

        missing = [n for n in names if n not in have and (subpath or not at_home(n))]
        read_data = read_objects(catalog, missing, tape_for, keep)
        result: dict[str, Any] = {
            "point": point_id,
            "path": subpath,
            "set": set_id,
            "objects_read": read_meta.objects + read_data.objects,
            "bytes_read": read_meta.bytes + read_data.bytes,
            "tapes": sorted({catalog.barcode_of(s) for s in read_meta.tapes + read_data.tapes}),
            "locates": sum(d.locates for d in counted),
            "positions": sum(d.positions for d in counted),
            "blocks_read": sum(d.blocks_read for d in counted),
        }
        if subpath:
            location = app.catalog.get_location(set_id)
            log("info", f"{subpath} of {point_id} is readable: restore it --from {location.label}")
            return {**result, "read_from": location.label, "home": False}
        with app.locks.shared():
            for name in names:
                if not at_home(name):
                    home.put(name, mirror.get(name))
            for name in needs:
                store_object = name.startswith(("index/", "keys/")) or name == "config"
                if store_object and not at_home(name):
                    home.put(name, mirror.get(name))
            home.put(f"manifests/{point_id}", mirror.get(f"manifests/{point_id}"))
        app.repo.sync_index()
        app.catalog.set_copy(point_id, home_location_id(app.repo.store_id), "present")
        for name in names:  # the packs are home now: the mirror keeps metadata only
            if name.startswith("data/"):
                mirror.delete(name)
        log(
            "info", f"point {point_id} is back in the home pool ({result['bytes_read']} bytes read)"
        )
        return {**result, "home": True}
    finally:
        mirror.close()
        deck.release()
