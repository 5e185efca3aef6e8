"""The identity file at a location's root: which store, and which location of it, lives here.

Every location (a pool directory, a removable disk, a bucket) holds one small unencrypted JSON
object, :data:`IDENTITY_NAME`, naming the store id and the location id. It is checked at every
open, so a disk holding another store, or a mountpoint with nothing mounted, is reported as
*unavailable* (:class:`LocationUnavailable`) instead of being read as an empty or foreign store.

The name is a valid object name at the root, outside every prefix the repository lists
(``data/``, ``meta/``, ``index/``, ``keys/``, ``manifests/``) and distinct from ``config``, so GC,
index rebuilds and copies never take it for store data. It is always written in the default
(hot) storage class: planning and opening never wait for a thaw.
"""

from __future__ import annotations

import json

from appliance.errors import LocationUnavailable, ObjectMissing, StoreExists
from appliance.store.backend import Backend, PutOptions

#: Object name of the identity file (frozen: existing locations are found by it).
IDENTITY_NAME = "location.json"
#: Value of the file's "kind" field; anything else is not ours.
IDENTITY_KIND = "appliance-location"
IDENTITY_VERSION = 1


def _read(backend: Backend) -> dict[str, object] | None:
    """The parsed identity, or None when there is none; unreadable content is unavailability."""
    try:
        raw = backend.get(IDENTITY_NAME)
    except ObjectMissing:
        return None
    try:
        document = json.loads(raw)
    except ValueError:
        document = None
    if (
        not isinstance(document, dict)
        or document.get("kind") != IDENTITY_KIND
        or not isinstance(document.get("store_id"), str)
        or not isinstance(document.get("location_id"), str)
    ):
        raise LocationUnavailable(
            f"{backend.describe()} holds an identity file this appliance cannot read",
            location=backend.describe(),
            reason="unreadable identity",
        )
    return document


def write_identity(backend: Backend, store_id: str, location_id: str) -> None:
    """Mark ``backend`` as location ``location_id`` of store ``store_id``.

    Idempotent for the same identity. Refuses (:class:`StoreExists`) to overwrite a different
    identity: a location is re-assigned only by clearing it first, never by accident.
    """
    current = _read(backend)
    if current is not None:
        if current["store_id"] == store_id and current["location_id"] == location_id:
            return
        raise StoreExists(
            f"{backend.describe()} already belongs to store {current['store_id']} as location "
            f"{current['location_id']}",
            location=backend.describe(),
            store_id=current["store_id"],
            location_id=current["location_id"],
        )
    document = {
        "kind": IDENTITY_KIND,
        "version": IDENTITY_VERSION,
        "store_id": store_id,
        "location_id": location_id,
    }
    data = json.dumps(document, sort_keys=True).encode() + b"\n"
    backend.put(IDENTITY_NAME, data, PutOptions(storage_class=None, retain_until=None))


def check_identity(backend: Backend, store_id: str, location_id: str | None = None) -> str:
    """The location id of ``backend``, after checking that it holds store ``store_id``.

    Raises :class:`LocationUnavailable` when the identity file is missing, unreadable, names
    another store, or (if ``location_id`` is given) another location. Errors of the backend itself
    (an unmounted root: :class:`LocationUnavailable` too) pass through.
    """
    where = backend.describe()
    current = _read(backend)
    if current is None:
        raise LocationUnavailable(
            f"{where} holds no location identity (not prepared, or not the right disk)",
            location=where,
            reason="no identity",
        )
    if current["store_id"] != store_id:
        raise LocationUnavailable(
            f"{where} belongs to another store ({current['store_id']}, not {store_id})",
            location=where,
            reason="another store",
            store_id=current["store_id"],
        )
    found = str(current["location_id"])
    if location_id is not None and found != location_id:
        raise LocationUnavailable(
            f"{where} is location {found} of this store, not {location_id}",
            location=where,
            reason="another location",
            location_id=found,
        )
    return found
