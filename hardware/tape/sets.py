"""Media sets in the appliance's catalog: their location, mirror, catalog and the objects of a point.

A media set is a location of kind ``tape_set`` (same id) whose backend reads its mirror
(:mod:`hardware.tape.backend`); its newest set catalog is kept in the set's row, its tapes in the
media rows. These functions keep the three in step: every tape backup and every scan go through
them, so a set written here and a set found by ``tape scan`` on a fresh appliance end up
recorded the same way.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from appliance.catalog.tape import TapeSetRecord
from appliance.errors import NotFound
from appliance.point_packs import point_packs
from appliance.store import format as fmt
from appliance.store.backend import LocalDirectoryBackend
from appliance.store.identity import write_identity
from appliance.store.index import encode_index
from appliance.store.packs import IndexEntry, pack_object_name
from appliance.store.repository import INDEX_FILE_ENTRIES, Repository
from hardware.tape.backend import is_metadata, mirror_path
from hardware.tape.layout import SetCatalog

if TYPE_CHECKING:
    from appliance.engine import Appliance


def new_set_id() -> str:
    return uuid.uuid4().hex


def empty_catalog(set_id: str, store_id: str, pool: str) -> SetCatalog:
    return SetCatalog(set_id, store_id, pool, 0, "")


def set_catalog(record: TapeSetRecord) -> SetCatalog:
    """The set's newest catalog as recorded (an empty one before the first was written)."""
    if not record.catalog:
        return empty_catalog(record.id, record.store_id, record.pool)
    return SetCatalog.from_document(record.catalog)


def set_label(pool: str, set_id: str) -> str:
    return f"tape-{pool}-{set_id[:8]}"


def open_mirror(app: Appliance, set_id: str) -> LocalDirectoryBackend:
    """The set's mirror directory as a writable backend (created if missing)."""
    path = mirror_path(app.data_dir.path, set_id)
    os.makedirs(path, exist_ok=True)
    return LocalDirectoryBackend(path, fsync=True)


def ensure_set(
    app: Appliance, set_id: str, pool: str, *, created_at: datetime | None = None
) -> TapeSetRecord:
    """The set's row, location (kind ``tape_set``, access ``sequential``, removable) and mirror
    with its identity file; each made when missing."""
    store = app.repo.store_id
    record = app.catalog.put_tape_set(set_id, pool=pool, store_id=store, created_at=created_at)
    mirror = open_mirror(app, set_id)
    try:
        write_identity(mirror, store, set_id)
    finally:
        mirror.close()
    try:
        app.catalog.get_location(set_id)
    except NotFound:
        app.catalog.add_location(
            store,
            "tape_set",
            set_id,
            access="sequential",
            removable=True,
            label=set_label(pool, set_id),
            details={
                "options": {
                    "mirror": mirror_path(app.data_dir.path, set_id),
                    "label": set_label(pool, set_id),
                }
            },
            location_id=set_id,
        )
    return record


def record_catalog(app: Appliance, catalog: SetCatalog) -> None:
    """Keep a set catalog that is on tape now, and what it says about each of the set's tapes."""
    app.catalog.put_tape_set(
        catalog.media_set_id,
        pool=catalog.pool,
        store_id=catalog.store_id,
        catalog=catalog.to_document(),
    )
    last = max((m.sequence for m in catalog.media), default=0)
    for medium in catalog.media:
        on_it = [o for o in catalog.objects if o.sequence == medium.sequence]
        names = {o.name for o in on_it}
        points = sum(1 for needs in catalog.points.values() if names.intersection(needs))
        app.catalog.put_tape_medium(
            medium.barcode,
            label_id=medium.label_id,
            pool=catalog.pool,
            media_set_id=catalog.media_set_id,
            sequence=medium.sequence,
            bytes_written=sum(o.size for o in on_it),
            point_count=points,
            **({"state": "full"} if medium.sequence < last else {}),
        )


def record_copies(app: Appliance, catalog: SetCatalog, points: Iterable[str]) -> None:
    for point_id in points:
        app.catalog.set_copy(point_id, catalog.media_set_id, "present")


# --- what a point needs -------------------------------------------------------------------------


def index_object(repo: Repository, entries: list[IndexEntry]) -> tuple[str, bytes]:
    """An index file naming ``entries`` (sealed like every index file): its name and bytes."""
    plaintext = encode_index(entries)
    blob_id = repo.envelope.chunk_id(plaintext)
    return f"index/{blob_id.hex()}", repo.envelope.seal(fmt.BLOB_INDEX, blob_id, plaintext)


def point_objects(repo: Repository, point_id: str) -> tuple[list[str], dict[str, bytes]]:
    """Every object a copy of the point needs, in the order they go to tape (the store's own
    objects, packs, index files naming exactly those packs, the manifest last), and the bytes
    of the index files made for it (the others are read from the store)."""
    manifest = repo.get_manifest(point_id)
    needs = point_packs(repo, manifest)
    if not needs.complete:
        raise NotFound(f"point {point_id} is not complete in the store: it cannot go to tape")
    names = ["config", *sorted(info.name for info in repo.backend.list("keys/"))]
    names += [pack_object_name(p, k) for p, k in sorted(needs.packs.items())]
    entries: list[IndexEntry] = []
    for pack in sorted(needs.packs):
        entries.extend(repo.index.pack_entries(pack))
    made: dict[str, bytes] = {}
    for start in range(0, len(entries), INDEX_FILE_ENTRIES):
        name, data = index_object(repo, entries[start : start + INDEX_FILE_ENTRIES])
        made[name] = data
        names.append(name)
    names.append(f"manifests/{point_id}")
    return names, made


def metadata_names(names: Iterable[str]) -> list[str]:
    return [n for n in names if is_metadata(n)]


def describe(catalog: SetCatalog) -> dict[str, Any]:
    """A short summary of a set catalog for job results and the CLI."""
    return {
        "set": catalog.media_set_id,
        "pool": catalog.pool,
        "generation": catalog.generation,
        "tapes": [m.barcode for m in catalog.media],
        "objects": len(catalog.objects),
        "points": sorted(catalog.points),
        "bytes": sum(o.size for o in catalog.objects),
    }
