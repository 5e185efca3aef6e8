"""Points of remote file trees: where SFTP pulls and the backup client meet the engine.

Both end in :func:`commit_tree_point`: records in canonical order (already checked) become tree
blobs, then the manifest, then the catalog row, in the store's crash-safe order (packs and index
first, manifest last). The point is an ordinary ``files`` point: its ``source`` names the host
(``ssh://root@web1:22/srv``, ``client://web1/srv``), so a later backup of another source under
the same asset starts a full chain, as for local folders.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from appliance.backup.tree import TreeWriter, iter_tree
from appliance.errors import BackupCancelled
from appliance.points import new_manifest, new_point_id
from appliance.sources.tree_source import SourceFS, TreeReader, WalkStats
from appliance.space import check_free_space
from appliance.store import format as fmt
from appliance.store.repository import BlobWriter

if TYPE_CHECKING:
    from appliance.engine import Appliance, BackupOutcome

ProgressCallback = Callable[[dict[str, Any]], None]


class StoreSink:
    """Chunks straight into the appliance's store (SFTP pulls)."""

    def __init__(self, writer: BlobWriter) -> None:
        self.writer = writer

    def put(self, data: bytes) -> str:
        return self.writer.put(fmt.BLOB_DATA, data).hex()


def previous_records(app: Appliance, base: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
    return iter_tree(app.repo, base) if base is not None else iter(())


def write_tree(app: Appliance, writer: BlobWriter, records: Iterable[dict[str, Any]]) -> list[str]:
    """Store ``records`` (canonical order) as tree blobs; their packs are indexed on return."""
    tree = TreeWriter(writer)
    for record in records:
        tree.add(record)
    tree_ids = tree.finish()
    app.repo.commit_index(writer.flush())
    return tree_ids


def commit_tree_point(
    app: Appliance,
    *,
    asset: str,
    source: str,
    mode: str,
    base: dict[str, Any] | None,
    created: Any,
    tree_ids: list[str],
    stats: dict[str, Any],
    warnings: list[dict[str, str]],
    warning_count: int,
) -> BackupOutcome:
    """Record the point whose tree is stored. Caller holds the asset's lock."""
    from appliance.engine import BackupOutcome

    manifest = new_manifest(
        point_id=new_point_id(created),
        asset=asset,
        kind="files",
        mode=mode,
        created=created,
        parent=base["point_id"] if base else None,
        base_full=app._base_full(base),
        store_id=app.repo.store_id,
        source=source,
    )
    manifest["tree"] = tree_ids
    manifest["stats"] = stats
    manifest["warnings"] = warnings
    manifest["warning_count"] = warning_count
    point = app._record(manifest)
    return BackupOutcome(point, dict(stats), warnings)


def backup_from_fs(
    app: Appliance,
    fs: SourceFS,
    asset: str,
    *,
    source: str,
    mode: str = "incremental",
    excludes: tuple[str, ...] = (),
    one_file_system: bool = False,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> BackupOutcome:
    """Back up the tree ``fs`` shows (an SFTP host's folder) as a point of ``asset``; files
    whose metadata match the previous point are not read again."""
    check_free_space(app.data_dir.store_path, "pool default")
    with app.locks.shared(), app.locks.asset(asset):
        created = app.clock()
        mode, base = app._base(asset, "files", mode)
        if base is not None and base.get("source") != source:
            mode, base = "full", None
        writer = app.repo.writer()
        params = {
            "min": app.repo.config.file_chunk_min,
            "avg": app.repo.config.file_chunk_avg,
            "max": app.repo.config.file_chunk_max,
        }
        done = [0]

        def advanced(n: int) -> None:
            done[0] += n
            if progress is not None and done[0] - advanced.last >= 8 << 20:  # type: ignore[attr-defined]
                advanced.last = done[0]  # type: ignore[attr-defined]
                progress({"bytes_read": done[0], "new_bytes": writer.new_bytes})

        advanced.last = 0  # type: ignore[attr-defined]
        reader = TreeReader(
            fs,
            StoreSink(writer),
            params,
            excludes=excludes,
            one_file_system=one_file_system,
            cancel=cancel,
            read_progress=advanced,
        )
        try:
            tree_ids = write_tree(
                app, writer, _committing(app, writer, reader.records(previous_records(app, base)))
            )
        except InterruptedError:
            writer.discard()
            raise BackupCancelled() from None
        except BaseException:
            app.repo.commit_index(writer.flush())  # what was read is kept for the retry
            raise
        stats = _stats(reader.stats, writer)
        return commit_tree_point(
            app,
            asset=asset,
            source=source,
            mode=mode,
            base=base,
            created=created,
            tree_ids=tree_ids,
            stats=stats,
            warnings=reader.stats.warnings,
            warning_count=reader.stats.warning_count,
        )


def _committing(
    app: Appliance, writer: BlobWriter, records: Iterator[dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    # Full packs are indexed as they complete, so a retry after a dropped link reuses them.
    for record in records:
        yield record
        done = writer.take_completed()
        if done:
            app.repo.commit_index(done)


def _stats(walk: WalkStats, writer: BlobWriter) -> dict[str, Any]:
    return {
        "files": walk.files,
        "directories": walk.directories,
        "symlinks": walk.symlinks,
        "hardlinks": walk.hardlinks,
        "files_read": walk.files_read,
        "files_reused": walk.files_reused,
        "bytes_total": walk.bytes_total,
        "bytes_read": walk.bytes_read,
        "logical_bytes": walk.bytes_total,
        "new_bytes": writer.new_bytes,
        "new_blobs": writer.new_blobs,
    }
