"""Maintenance of a store: verify, prune by retention, and garbage collection.

All three stream: manifests are read one at a time, marks go to an on-disk table of the index
cache, and per-pack work reads one pack at a time, so memory stays bounded however large the store.

Verify
    A full verify re-reads every pack, checks its name (BLAKE3 of its bytes), parses it, and opens
    every blob (authenticated decryption, then the keyed hash of the plaintext must equal the ID),
    then checks that every blob each manifest refers to is indexed. A budgeted verify
    (``max_bytes``) checks the packs verified longest ago (never-verified first) up to the budget
    and records when each was verified, so repeated nightly runs cover the whole store. Damage is
    reported with the exact recovery points it affects.

GC
    Holds the store lock exclusively (no backup can run). Marks every blob reachable from a
    manifest; deletes packs with nothing live, repacks packs that are mostly dead, writes
    consolidated index files, then removes the old index files and the freed packs, in that order,
    so a crash at any step leaves a store that verifies. Packs that no index names (left by a
    crashed backup) and temporary files are deleted only once older than the grace period. If any
    manifest cannot be read, GC stops before deleting anything.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from appliance.errors import IntegrityError, ObjectMissing, StoreError, UnsupportedFormat
from appliance.point_packs import point_blobs
from appliance.store import format as fmt
from appliance.store.backend import LocalDirectoryBackend
from appliance.store.crypto import Envelope
from appliance.store.packs import (
    IndexEntry,
    PackWriter,
    pack_name_matches,
    pack_object_name,
    parse_pack,
)
from appliance.store.repository import INDEX_FILE_ENTRIES, Repository

ProgressCallback = Callable[[dict[str, Any]], None]


@dataclass
class VerifyReport:
    packs_checked: int = 0
    bytes_checked: int = 0
    blobs_checked: int = 0
    packs_total: int = 0
    points_checked: int = 0
    damaged_packs: list[dict[str, str]] = field(default_factory=list)
    missing_blobs: int = 0
    affected_points: dict[str, list[str]] = field(default_factory=dict)
    damaged_index_files: list[dict[str, str]] = field(default_factory=list)
    coverage: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            not self.damaged_packs
            and not self.affected_points
            and not self.missing_blobs
            and not self.damaged_index_files
        )

    def to_dict(self) -> dict[str, Any]:
        return {**vars(self), "ok": self.ok}


def _check_pack(
    repo: Repository, envelope: Envelope, pack: bytes, kind: int
) -> tuple[int, int, list[bytes], str | None]:
    """Return (bytes, blobs, damaged blob IDs, error) for one pack."""
    expected = repo.index.pack_entries(pack)
    name = pack_object_name(pack, kind)
    try:
        data = repo.backend.get(name)
    except ObjectMissing:
        return 0, 0, [e.blob_id for e in expected], "pack is missing"
    except StoreError as exc:
        return 0, 0, [e.blob_id for e in expected], str(exc)
    if not pack_name_matches(pack, data):
        error = "pack content does not match its name (bit rot or tampering)"
    else:
        error = None
    found: dict[bytes, IndexEntry] = {}
    try:
        for entry in parse_pack(pack, data):
            found[entry.blob_id] = entry
    except (IntegrityError, UnsupportedFormat) as exc:
        error = str(exc)
    damaged: list[bytes] = []
    blobs = 0
    for entry in expected:
        at = found.get(entry.blob_id)
        if at is None or at.offset != entry.offset or at.length != entry.length:
            damaged.append(entry.blob_id)
            continue
        blob = data[entry.offset : entry.offset + entry.length]
        try:
            envelope.open_content(entry.blob_type, entry.blob_id, blob)
            blobs += 1
        except (IntegrityError, UnsupportedFormat):
            damaged.append(entry.blob_id)
    if damaged and error is None:
        error = f"{len(damaged)} blob(s) failed authentication"
    return len(data), blobs, damaged, error


def verify_store(
    repo: Repository,
    *,
    max_bytes: int | None = None,
    progress: ProgressCallback | None = None,
    now: Callable[[], float] = time.time,
) -> VerifyReport:
    repo.sync_index()
    report = VerifyReport()
    envelope = Envelope(repo.key)
    damaged_ids: set[bytes] = set()
    candidates = list(repo.index.packs_by_verify_age())
    report.packs_total = len(candidates)
    started = now()
    for pack, kind, _verified_at in candidates:
        if max_bytes is not None and report.bytes_checked >= max_bytes:
            break
        size, blobs, damaged, error = _check_pack(repo, envelope, pack, kind)
        report.packs_checked += 1
        report.bytes_checked += size
        report.blobs_checked += blobs
        if error is not None:
            report.damaged_packs.append({"pack": pack.hex(), "error": error})
            damaged_ids.update(damaged)
        else:
            repo.index.mark_verified(pack, started)
        if progress is not None:
            progress(
                {
                    "packs_done": report.packs_checked,
                    "packs_total": report.packs_total,
                    "bytes_done": report.bytes_checked,
                }
            )
    full = max_bytes is None
    if full:
        # The local cache answers lookups, so a damaged index file in the store goes unnoticed
        # until the cache is lost; then the store would not open. Catch it now.
        for info in repo.backend.list("index/"):
            try:
                repo.check_index_file(info.name)
            except (IntegrityError, ObjectMissing, UnsupportedFormat) as exc:
                report.damaged_index_files.append({"name": info.name, "error": exc.message})
    if damaged_ids or full:
        # Map damage (and, on a full verify, lost references) to the points it affects.
        for point_id in repo.manifest_ids():
            report.points_checked += 1
            reasons = _check_point_blobs(repo, point_id, damaged_ids, check_missing=full)
            if reasons:
                report.affected_points[point_id] = reasons
                report.missing_blobs += sum(1 for r in reasons if r.startswith("missing"))
    cycle_start = min((at for _p, _k, at in repo.index.packs_by_verify_age() if at), default=0.0)
    verified = repo.index.verified_since(cycle_start) if cycle_start else 0
    report.coverage = verified / report.packs_total if report.packs_total else 1.0
    return report


def _check_point_blobs(
    repo: Repository, point_id: str, damaged: set[bytes], *, check_missing: bool
) -> list[str]:
    reasons: list[str] = []
    try:
        manifest = repo.get_manifest(point_id)
        missing = 0
        hit = 0
        for blob_id in point_blobs(repo, manifest):
            if blob_id in damaged:
                hit += 1
            elif check_missing and not repo.index.contains(blob_id):
                missing += 1
        if hit:
            reasons.append(f"damaged: {hit} blob(s) in damaged packs")
        if missing:
            reasons.append(f"missing: {missing} blob(s) not in the store")
    except (IntegrityError, ObjectMissing, UnsupportedFormat) as exc:
        reasons.append(f"unreadable: {exc}")
    return reasons


def verify_point(repo: Repository, point_id: str) -> VerifyReport:
    """Read and check every blob one point needs."""
    repo.sync_index()
    report = VerifyReport(points_checked=1)
    envelope = Envelope(repo.key)
    problems: list[str] = []
    try:
        manifest = repo.get_manifest(point_id)
        for blob_id in point_blobs(repo, manifest):
            try:
                data = repo.read_blob(blob_id, envelope)
                report.blobs_checked += 1
                report.bytes_checked += len(data)
            except ObjectMissing:
                report.missing_blobs += 1
            except IntegrityError as exc:
                problems.append(str(exc))
    except (IntegrityError, ObjectMissing, UnsupportedFormat) as exc:
        problems.append(f"unreadable: {exc}")
    if report.missing_blobs:
        problems.append(f"missing: {report.missing_blobs} blob(s) not in the store")
    if problems:
        report.affected_points[point_id] = problems[:20]
    return report


def consolidate_index(repo: Repository) -> int:
    """Write the cache's entries as new index files, then delete the old ones; returns how many
    were written. Crash-safe: until the old files go, old and new both describe live packs."""
    old_index_files = [info.name for info in repo.backend.list("index/")]
    written: list[str] = []
    chunk: list[IndexEntry] = []
    for entry in repo.index.all_entries():
        chunk.append(entry)
        if len(chunk) >= INDEX_FILE_ENTRIES:
            written.append(repo.commit_index(chunk) or "")
            chunk = []
    if chunk:
        written.append(repo.commit_index(chunk) or "")
    for name in old_index_files:
        if name not in written:
            repo.backend.delete(name)
            repo.index.forget_index_file(name)
    return len([w for w in written if w])


@dataclass
class GcReport:
    points: int = 0
    packs_before: int = 0
    packs_deleted: int = 0
    packs_repacked: int = 0
    packs_orphaned_deleted: int = 0
    bytes_freed: int = 0
    blobs_live: int = 0
    temp_files_deleted: int = 0
    index_files: int = 0
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def collect_garbage(
    repo: Repository,
    *,
    grace_seconds: float = 3600.0,
    repack_below: float = 0.5,
    dry_run: bool = False,
    now: Callable[[], float] = time.time,
    keep: Iterable[bytes] = (),
) -> GcReport:
    """Free the space of blobs no point references. The caller holds the exclusive store lock.

    ``keep``: blobs no point references yet that must stay (the chunks of open upload sessions
    of the backup client, ``appliance.sources.ingest.session_chunks``)."""
    repo.sync_index()
    report = GcReport(dry_run=dry_run)
    cutoff = now() - grace_seconds
    index = repo.index
    index.start_marking()
    for point_id in repo.manifest_ids():
        manifest = repo.get_manifest(point_id)  # any failure aborts GC before a deletion
        batch: list[bytes] = []
        for blob_id in point_blobs(repo, manifest):
            batch.append(blob_id)
            if len(batch) >= 50_000:
                index.mark(batch)
                batch = []
        index.mark(batch)
        report.points += 1
    pending = [blob_id for blob_id in keep if index.contains(blob_id)]
    for start in range(0, len(pending), 50_000):
        index.mark(pending[start : start + 50_000])
    lost = index.missing_marks(limit=10)
    if lost:
        raise IntegrityError(
            f"{len(lost)}+ referenced blobs are missing from the index; run `appliance verify` "
            "(GC deletes nothing while references are broken)"
        )
    live = index.live_by_pack()
    sizes = {
        info.name: (info.size, info.mtime)
        for p in ("data/", "meta/")
        for info in repo.backend.list(p)
    }
    indexed = list(index.packs())
    report.packs_before = len(indexed)
    delete: list[tuple[bytes, int]] = []
    repack: list[tuple[bytes, int]] = []
    indexed_names: set[str] = set()
    for pack, kind in indexed:
        name = pack_object_name(pack, kind)
        indexed_names.add(name)
        size, _mtime = sizes.get(name, (0, 0.0))
        live_bytes, live_blobs = live.get(pack, (0, 0))
        # Count what the live blobs occupy in a pack, headers included: a pack that is all live
        # must never look mostly dead, however small its blobs.
        live_bytes += live_blobs * fmt.PACK_ENTRY_HEADER_SIZE + fmt.PACK_HEADER_SIZE
        report.blobs_live += live_blobs
        if live_blobs == 0:
            delete.append((pack, kind))
            report.bytes_freed += size
        elif size and live_bytes / size < repack_below:
            repack.append((pack, kind))
            report.bytes_freed += size - live_bytes
    orphans = [
        name
        for name, (size, mtime) in sizes.items()
        if name not in indexed_names and mtime < cutoff
    ]
    report.packs_deleted = len(delete)
    report.packs_repacked = len(repack)
    report.packs_orphaned_deleted = len(orphans)
    report.bytes_freed += sum(sizes[name][0] for name in orphans)
    if dry_run:
        return report
    # 1. Copy live blobs of mostly-dead packs into new packs (envelopes are copied as they are).
    new_entries: list[IndexEntry] = []
    writers = {
        fmt.PACK_KIND_DATA: PackWriter(repo.backend, fmt.PACK_KIND_DATA, repo.config.pack_size),
        fmt.PACK_KIND_META: PackWriter(repo.backend, fmt.PACK_KIND_META, repo.config.pack_size),
    }
    for pack, kind in repack:
        data = repo.backend.get(pack_object_name(pack, kind))
        for entry in index.live_entries(pack):
            writers[kind].add(
                entry.blob_type, entry.blob_id, data[entry.offset : entry.offset + entry.length]
            )
    for writer in writers.values():
        new_entries.extend(writer.flush())
    # 2. Consolidated index files: every entry of the surviving packs plus the repacked blobs.
    gone = {pack for pack, _kind in delete + repack}
    index.remove_packs(gone)
    index.add(None, new_entries)
    # 3. Consolidated index files replace the old ones, then 4. the freed packs go.
    report.index_files = consolidate_index(repo)
    rewritten = {entry.pack for entry in new_entries}
    for pack, kind in delete + repack:
        # Repacking identical live content yields the same pack name: that pack is the new one.
        if pack not in rewritten:
            repo.backend.delete(pack_object_name(pack, kind))
    for name in orphans:
        repo.backend.delete(name)
    if isinstance(repo.backend, LocalDirectoryBackend):
        for path in repo.backend.temporary_files(cutoff):
            os.unlink(path)
            report.temp_files_deleted += 1
    repo.sync_index()
    return report


@dataclass
class RepairReport:
    packs_scanned: int = 0
    blobs_indexed: int = 0
    damaged_packs: list[dict[str, str]] = field(default_factory=list)
    blobs_dropped: int = 0
    affected_points: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def repair_store(repo: Repository) -> RepairReport:
    """Make the store safe to back up into again after damage.

    Rebuilds the index from the packs alone (so a damaged or lost index file is no obstacle),
    then checks every pack and drops the damaged blobs from the index. Without this step a new
    backup would deduplicate against a lost blob and inherit the damage; after it, the next
    backup of the source stores that data afresh. Points that needed the damaged blobs are
    reported: they stay damaged until a later backup stores the same data again (same chunk
    IDs, so they become whole again) or a copy is brought back. The caller holds the exclusive
    store lock.
    """
    report = RepairReport()
    report.packs_scanned, report.blobs_indexed = repo.rebuild_index()
    envelope = Envelope(repo.key)
    damaged_ids: set[bytes] = set()
    damaged_locations: list[tuple[bytes, bytes]] = []
    for pack, kind in list(repo.index.packs()):
        _size, _blobs, damaged, error = _check_pack(repo, envelope, pack, kind)
        if error is not None:
            report.damaged_packs.append({"pack": pack.hex(), "error": error})
            damaged_ids.update(damaged)
            damaged_locations.extend((blob_id, pack) for blob_id in damaged)
    if damaged_locations:
        repo.index.remove_blobs(damaged_locations)
        report.blobs_dropped = len(damaged_locations)
        consolidate_index(repo)
        repo.sync_index()
    for point_id in repo.manifest_ids():
        reasons = _check_point_blobs(repo, point_id, damaged_ids, check_missing=True)
        if reasons:
            report.affected_points[point_id] = reasons
    return report
