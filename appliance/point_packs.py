"""What a recovery point needs from a store: its blobs, and the packs that hold them.

One definition, called by everything that moves or checks a point as a whole: verify, GC's
marking, copying a point to another location, the pre-boot check of a failover, and (later)
recall from a cold bucket, export and replication. A point needs its metadata blobs (a files
point's tree blobs, an image point's chunk-table slices) and every data blob they list except the
all-zero chunk, which is never stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from appliance.backup.images import read_table
from appliance.backup.tree import iter_tree
from appliance.restore_paths import detached_hardlinks, select_records
from appliance.store import format as fmt
from appliance.store.repository import Repository


def metadata_blobs(manifest: dict[str, Any]) -> list[bytes]:
    """The blobs that list a point's data: tree blobs, or chunk-table slices."""
    if manifest["kind"] == "files":
        return [bytes.fromhex(h) for h in manifest.get("tree", [])]
    return [bytes.fromhex(h) for disk in manifest.get("disks", []) for h in disk["tables"]]


def data_blobs(
    repo: Repository, manifest: dict[str, Any], subpath: str | None = None
) -> Iterator[bytes]:
    """Every data blob a point lists, in point order (repeats included); reads its metadata.

    ``subpath`` (a files point): only what restoring that path reads, including the files that
    hardlinks inside it share with names outside it."""
    if manifest["kind"] == "files":
        records: Iterable[dict[str, Any]]
        if subpath:
            records = [
                record for _rel, record in select_records(iter_tree(repo, manifest), subpath)
            ]
            _firsts, stand_ins = detached_hardlinks(repo, manifest, subpath)
            records = [*records, *stand_ins.values()]
        else:
            records = iter_tree(repo, manifest)
        for record in records:
            for hex_id, _length in record.get("chunks", ()):
                if hex_id is not None:
                    yield bytes.fromhex(hex_id)
        return
    for disk in manifest.get("disks", []):
        for blob_id in read_table(repo, disk):
            if blob_id != fmt.ZERO_ID:
                yield blob_id


def point_blobs(repo: Repository, manifest: dict[str, Any]) -> Iterator[bytes]:
    """Every blob ID a point needs (metadata blobs first, then data)."""
    yield from metadata_blobs(manifest)
    yield from data_blobs(repo, manifest)


@dataclass(frozen=True)
class PointPacks:
    """The packs a point needs, by the local index."""

    #: pack name -> pack kind (data or tree), of every pack holding a blob of the point.
    packs: dict[bytes, int]
    #: Metadata blobs the index does not know: the data they list could not be enumerated.
    missing_metadata: list[bytes]
    #: Data blobs the index does not know.
    missing: list[bytes]

    @property
    def complete(self) -> bool:
        return not self.missing_metadata and not self.missing


def point_packs(
    repo: Repository, manifest: dict[str, Any], subpath: str | None = None
) -> PointPacks:
    """The packs holding every blob of a point (``subpath``: of that path of a files point), and
    what the index lacks, reading only metadata blobs (never data): one sorted lookup for the
    metadata, one for the data."""
    meta = repo.index.locate_many(metadata_blobs(manifest))
    packs = dict(meta.packs)
    if meta.missing:
        return PointPacks(packs, list(meta.missing), [])
    data = repo.index.locate_many(data_blobs(repo, manifest, subpath))
    packs.update(data.packs)
    return PointPacks(packs, [], list(data.missing))
