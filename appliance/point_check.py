"""The check a new image point gets right after its backup: is every chunk there, intact?

A backup that ends without this check leaves its point *unverified*, and a failover then boots
an older, verified point instead. So each ``backup_image`` job checks the point it made before it
ends (:func:`verify_new_point`), and the point's verify status says what it found, as a
``verify`` job's would: ``ok``, or ``damaged`` with what is wrong.

What is checked, and why it is fast:

- every chunk-table blob and every data blob of the point's disks is in the index (one batched,
  sorted lookup for each kind: :meth:`IndexCache.locate_many`);
- every pack those blobs live in is present and intact: a pack is named by the BLAKE3 of its
  bytes, so one hash over the pack proves that no byte of it changed since it was written. This
  is the whole difference from the failover's pre-boot check, which only asks whether each pack
  exists. Blobs are not decrypted one by one (the full ``verify`` does that): a pack whose bytes
  are the ones written holds blobs that were sealed and checked when they were written.

Each pack is hashed once per run however many points of the run need it (``checked``), so a
caller checking several points hashes their shared packs once. What the check found wrong is
kept (:func:`recorded_problems`) for as long as the point is marked damaged by it, so the
failover can say *why* it boots an older point.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from appliance.catalog.records import home_location_id
from appliance.engine import Appliance
from appliance.errors import InvalidInput, NotFound, ObjectMissing, StoreError
from appliance.point_packs import data_blobs, metadata_blobs
from appliance.store.packs import pack_name_matches, pack_object_name
from appliance.store.repository import Repository

#: The catalog settings document holding what failed checks found (``{"points": {id: ...}}``).
PROBLEMS_KEY = "point_check_problems"
#: Failed checks remembered (the newest); a point that fails is rare, and its entry goes when a
#: later check of it passes.
PROBLEMS_KEPT = 200
#: Packs read and hashed at once.
PACK_WORKERS = 2
#: Problems named one by one in a result; the rest are counted.
PROBLEMS_SHOWN = 20


@dataclass
class PointCheck:
    """What checking one point found."""

    point_id: str
    #: Distinct blobs the point needs (chunk-table slices and data chunks).
    chunks: int = 0
    #: Packs holding them.
    packs: int = 0
    #: Of those, packs hashed by this call (the others were hashed earlier in the same run).
    packs_hashed: int = 0
    bytes_hashed: int = 0
    seconds: float = 0.0
    #: What is wrong, one sentence each ([]: the point is whole).
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """The job log's line: "verified point X: 1,204 chunks in 3 packs, 0.4 s"."""
        if self.ok:
            return (
                f"verified point {self.point_id}: {self.chunks:,} chunks in "
                f"{self.packs:,} pack{'' if self.packs == 1 else 's'}, {self.seconds:.1f} s"
            )
        return f"point {self.point_id} failed verification: {'; '.join(self.problems)}"

    def to_dict(self) -> dict[str, Any]:
        return {**vars(self), "ok": self.ok}


def _short(blob_or_pack: bytes) -> str:
    return blob_or_pack.hex()[:16]


def check_point_data(
    repo: Repository,
    manifest: Mapping[str, Any],
    *,
    checked: dict[bytes, str | None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    workers: int = PACK_WORKERS,
) -> PointCheck:
    """Check one image point's data in ``repo`` (see the module docstring); reads its chunk
    tables and the packs that hold its blobs, writes nothing.

    ``checked`` (pack name -> the problem found with it, or None) carries the packs already
    hashed in this run from one call to the next; it is updated.
    """
    started = clock()
    checked = {} if checked is None else checked
    report = PointCheck(point_id=str(manifest.get("point_id") or manifest.get("id") or ""))
    problems = report.problems
    meta_ids = metadata_blobs(dict(manifest))
    meta = repo.index.locate_many(meta_ids)
    packs = dict(meta.packs)
    chunks = len(set(meta_ids))
    if meta.missing:
        problems.append(
            f"{len(meta.missing)} chunk table(s) not in the store (e.g. {_short(meta.missing[0])})"
        )
    else:
        try:
            data_ids = set(data_blobs(repo, dict(manifest)))
        except StoreError as exc:
            # A chunk table that cannot be read hides the chunks it lists: the point is damaged
            # (said here, not raised: the backup that made it still succeeded).
            problems.append(f"a chunk table cannot be read: {exc.message}")
            data_ids = set()
        chunks += len(data_ids)
        data = repo.index.locate_many(data_ids)
        packs.update(data.packs)
        if data.missing:
            problems.append(
                f"{len(data.missing):,} data chunk(s) not in the store "
                f"(e.g. {_short(data.missing[0])})"
            )
    report.chunks = chunks
    report.packs = len(packs)
    todo = sorted(p for p in packs if p not in checked)
    # Reading and hashing release the GIL: a few packs at once use the cores; each worker holds
    # one pack's bytes at a time, so memory stays bounded by the workers.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for pack, (problem, size) in zip(
            todo, pool.map(lambda p: _check_pack_bytes(repo, p, packs[p]), todo), strict=True
        ):
            checked[pack] = problem
            report.packs_hashed += 1
            report.bytes_hashed += size
    # Name order: the same order every run, so a damaged store always names the same first pack.
    for pack in sorted(packs):
        problem = checked[pack]
        if problem is not None:
            problems.append(problem)
    if len(problems) > PROBLEMS_SHOWN:
        more = len(problems) - PROBLEMS_SHOWN
        del problems[PROBLEMS_SHOWN:]
        problems.append(f"and {more} more problem(s)")
    report.seconds = round(clock() - started, 3)
    return report


def _check_pack_bytes(repo: Repository, pack: bytes, kind: int) -> tuple[str | None, int]:
    """(the problem with the pack or None, the bytes hashed)."""
    name = pack_object_name(pack, kind)
    try:
        # stat first: a backend may keep a file open that was deleted since (its fd cache).
        repo.backend.stat(name)
        data = repo.backend.get(name)
    except ObjectMissing:
        return f"pack {_short(pack)} is missing", 0
    except StoreError as exc:
        return f"pack {_short(pack)} cannot be read: {exc.message}", 0
    if not pack_name_matches(pack, data):
        return f"pack {_short(pack)} is damaged: its content does not match its name", len(data)
    return None, len(data)


def verify_new_point(
    app: Appliance,
    point_id: str,
    *,
    checked: dict[bytes, str | None] | None = None,
    log: Callable[[str, str], None] | None = None,
) -> PointCheck:
    """Check a point of the home pool and record the outcome as its verify status.

    The one work function of the check: the ``backup_image`` job calls it for the point it made,
    ``appliance verify --quick POINT`` for any image point. ``ok`` also marks the home pool's copy
    verified (what was read is that copy), as a ``verify`` job does; ``damaged`` keeps the point
    (it is not deleted) and remembers the problems. ``log(level, line)`` gets one line.
    """
    point = app.point(point_id)
    with app.locks.shared():
        app.repo.sync_index()
        manifest = app.repo.get_manifest(point.id)
        if manifest.get("kind") != "image":
            raise InvalidInput(
                f"point {point.id} is not a VM image point; check it with a full verify",
                point=point.id,
            )
        report = check_point_data(app.repo, {**manifest, "point_id": point.id}, checked=checked)
    now = app.clock()
    status = "ok" if report.ok else "damaged"
    with contextlib.suppress(NotFound):  # the point was deleted meanwhile: nothing to mark
        app.catalog.mark_verified(point.id, now, status)
        if report.ok:
            app.catalog.mark_copy_verified(point.id, home_location_id(app.repo.store_id), now)
    _remember(app, point.id, now, report.problems)
    if log is not None:
        log("info" if report.ok else "error", report.summary())
    return report


def _remember(app: Appliance, point_id: str, at: datetime, problems: list[str]) -> None:
    stored = dict(app.catalog.get_settings(PROBLEMS_KEY).get("points") or {})
    if not problems and point_id not in stored:
        return
    stored.pop(point_id, None)
    if problems:
        stored[point_id] = {"at": at.astimezone(UTC).isoformat(), "problems": list(problems)}
    newest = sorted(stored.items(), key=lambda item: str(item[1].get("at")))[-PROBLEMS_KEPT:]
    app.catalog.put_settings(PROBLEMS_KEY, {"points": dict(newest)})


def recorded_problems(settings: Mapping[str, Any], points: Iterable[Any]) -> dict[str, str]:
    """``{point id: what is wrong, in one sentence}`` for those of ``points`` (PointRecords)
    whose damaged status this check set (a later verify that changed the status also changed
    ``verified_at``, so its stale entry is not used). ``settings``: the ``PROBLEMS_KEY``
    document."""
    stored = settings.get("points") or {}
    out: dict[str, str] = {}
    for point in points:
        entry = stored.get(point.id)
        if not entry or point.verify_status != "damaged" or point.verified_at is None:
            continue
        try:
            at = datetime.fromisoformat(str(entry.get("at")))
        except ValueError:
            continue
        # The catalog keeps the time this check marked; another verify since set another.
        if abs((at - point.verified_at).total_seconds()) > 0.001:
            continue
        out[point.id] = "; ".join(str(p) for p in entry.get("problems") or [])
    return out
