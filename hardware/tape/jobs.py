"""Tape jobs: back points up to a media pool, restore a point from tape, scan tapes, erase one.

Work functions (the CLI, the jobs and the tests call the same ones):

* :func:`backup_to_tape` writes the chosen points (ids, or ``"newest"``: the newest complete
  point of every asset) to the pool's set as :func:`hardware.tape.media.allocate` decides: the
  store's objects each point needs (``config``, ``keys/*``, its packs, an index file naming
  exactly those packs, its manifest last), those the set lacks only. Each set catalog that
  reaches tape is recorded at once (set row, media rows, a ``present`` copy of every point it
  lists), so a job killed at any instant is simply run again: the next session appends after
  the last data file the recorded catalog lists, and skips what it lists.
* :func:`hardware.tape.restore.restore_from_tape` reads what a point (or one path of it) needs
  from the set's tapes, only those files, in position order. A whole point comes back into the
  home pool (packs, index, manifest last: then the normal restore, failover and verify work); a
  path is read into the set's mirror, from which ``restore --from <set>`` reads it.
* :func:`erase_tape` makes a tape blank again, refusing a tape whose points are still needed.
* scanning lives in :mod:`hardware.tape.scan`.

A job that needs a tape that is not in a drive or the drive's library WAITS ("needs tape B",
"needs a new tape of pool P") with its checkpoint; a library's robot loads a tape that is in
one of its slots without asking anybody.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from appliance.errors import (
    BackupCancelled,
    Conflict,
    InvalidInput,
    JobWaiting,
    NotFound,
)
from appliance.job_context import JobView
from appliance.jobs import JOB_KINDS, JobKind, register_job_kind
from hardware.tape.deck import TAPE_RETRY, Deck, bring, open_deck
from hardware.tape.drive import Drive, TapeError, WriteProtected
from hardware.tape.layout import SetCatalog, TapeLabel
from hardware.tape.media import PointOnTape, allocate, label_action, may_overwrite
from hardware.tape.reader import check_label, read_objects
from hardware.tape.restore import restore_from_tape
from hardware.tape.schedule import check_rule, home_points, points_by_rule
from hardware.tape.sets import (
    describe,
    empty_catalog,
    ensure_set,
    new_set_id,
    open_mirror,
    point_objects,
    record_catalog,
    record_copies,
    set_catalog,
)
from hardware.tape.writer import SetWriter, now_iso, read_label, write_label

if TYPE_CHECKING:
    from appliance.engine import Appliance

BACKUP_KIND = "tape_backup"
RESTORE_KIND = "tape_restore"
SCAN_KIND = "tape_scan"
ERASE_KIND = "tape_erase"

Log = Callable[[str, str], None]
Progress = Callable[[dict[str, Any]], None]


def _quiet(level: str, message: str) -> None:
    return None


# --- media facts ---------------------------------------------------------------------------------


def sync_library(app: Appliance, deck: Deck) -> None:
    """Record every cartridge in the deck's library (new barcodes as blank tapes) and where."""
    for barcode, slot in deck.library_barcodes().items():
        try:
            medium = app.catalog.get_tape_medium(barcode)
        except NotFound:
            app.catalog.put_tape_medium(barcode, place="library", slot=slot)
            continue
        if medium.place != "library" or medium.slot != slot:
            app.catalog.set_tape_medium_place(barcode, "library", slot)
    loaded = deck.loaded_barcode()
    if loaded is not None:
        try:
            app.catalog.get_tape_medium(loaded)
        except NotFound:
            app.catalog.put_tape_medium(loaded, place="library")


def reusable_media(app: Appliance, pool: str) -> set[str]:
    """The pool's tapes of closed sets that :func:`may_overwrite` allows to be written over."""
    retention = app.catalog.get_tape_pool(pool).retention_days
    now = app.clock()
    closed = {s.id: s for s in app.catalog.list_tape_sets(pool) if s.closed_at is not None}
    found: set[str] = set()
    for medium in app.catalog.list_tape_media(pool=pool):
        if medium.media_set_id not in closed or medium.write_protected:
            continue
        catalog = set_catalog(closed[medium.media_set_id])
        names = {o.name for o in catalog.objects if o.sequence == medium.sequence}
        facts = []
        for point_id, needs in catalog.points.items():
            if not names.intersection(needs):
                continue
            try:
                copies = app.catalog.copies_of(point_id)
            except NotFound:
                continue  # the point is gone from the catalog: nothing to keep
            facts.append(
                PointOnTape(
                    point_id,
                    medium.last_written_at or medium.created_at,
                    any(
                        c.location_id != medium.media_set_id
                        and c.state == "present"
                        and c.verified_at is not None
                        for c in copies
                    ),
                )
            )
        if may_overwrite(facts, retention, now).allowed:
            found.add(medium.barcode)
    return found


def select_points(app: Appliance, points: str | list[str] | dict[str, Any]) -> list[str]:
    """Point ids to write: the ids given (each must exist), or a rule
    (:mod:`hardware.tape.schedule`: ``"newest"``, the newest complete point of every asset
    that has a copy in the home pool; ``{"rule": "gfs", ...}``, the points GFS keeps)."""
    if isinstance(points, dict) or points == "newest" or points == ["newest"]:
        return points_by_rule(home_points(app), check_rule(points))
    if isinstance(points, str) or not points:
        raise InvalidInput('points are a list of point ids, "newest", or a rule')
    return [app.point(p).id for p in points]


def _label_new_tape(
    app: Appliance,
    deck: Deck,
    pool: str,
    set_id: str,
    sequence: int,
    checkpoint: dict[str, Any],
    log: Log,
) -> tuple[Drive, TapeLabel]:
    """A blank (or reusable) tape of the pool in the drive, labelled as ``sequence`` of the set."""
    reusable = reusable_media(app, pool)
    tried: set[str] = set()
    while True:
        sets = [s for s in app.catalog.list_tape_sets(pool) if s.id == set_id]
        media = [m for m in app.catalog.list_tape_media() if m.barcode not in tried]
        if not sets:  # the set is made when its first tape is labelled
            alloc = allocate(app.catalog.get_tape_pool(pool), [], media, reusable)
        else:
            alloc = allocate(app.catalog.get_tape_pool(pool), sets, media, reusable)
        reachable = set(deck.library_barcodes()) | {deck.loaded_barcode()}
        if alloc.kind != "new" or alloc.barcode is None or alloc.barcode not in reachable:
            # Tapes out of reach are asked for by name only when nothing else would do.
            raise JobWaiting(
                f"needs a new tape of pool {pool}"
                + (f" (tape {alloc.barcode} would do)" if alloc.barcode else ""),
                wake_at=app.clock() + TAPE_RETRY,
                checkpoint=checkpoint,
            )
        barcode = alloc.barcode
        tried.add(barcode)
        drive = bring(deck, barcode, checkpoint, app.clock)
        verdict, _old = read_label(drive)
        action = label_action(verdict)
        if verdict == "ours" and barcode not in reusable:
            log("warning", f"tape {barcode} holds a set of this appliance not known here: scan it")
            continue
        if action.action == "refuse" or drive.status().write_protected:
            reason = "it is write protected" if drive.status().write_protected else action.reason
            log("warning", f"tape {barcode} is not used: {reason}")
            app.catalog.put_tape_medium(
                barcode,
                write_protected=drive.status().write_protected,
                **({"state": "retired"} if action.action == "refuse" else {}),
            )
            continue
        label = TapeLabel(
            uuid.uuid4().hex, barcode, pool, set_id, sequence, app.repo.store_id, now_iso()
        )
        ensure_set(app, set_id, pool)
        if verdict == "ours":  # a reusable tape of a closed set: its copies there are gone
            lost = forget_tape(app, barcode)
            log("info", f"tape {barcode} is reused ({len(lost)} expired copy(ies) on it)")
        # The catalog first: a crash before the label is written finds a member tape that is
        # blank, and labels it again with the same id.
        app.catalog.put_tape_medium(
            barcode,
            label_id=label.label_id,
            pool=pool,
            media_set_id=set_id,
            sequence=sequence,
            state="writable",
            bytes_written=0,
            point_count=0,
            last_written_at=app.clock(),
        )
        try:
            write_label(drive, label)
        except WriteProtected:
            app.catalog.put_tape_medium(barcode, write_protected=True, state="full")
            continue
        log("info", f"tape {barcode} labelled as tape {sequence} of set {set_id}")
        return drive, label


def _open_member(
    app: Appliance, deck: Deck, barcode: str, catalog: SetCatalog, checkpoint: dict[str, Any]
) -> tuple[Drive, TapeLabel]:
    """The set's current tape in the drive, its label checked (written again if a crash came
    between recording the tape and labelling it)."""
    medium = app.catalog.get_tape_medium(barcode)
    drive = bring(deck, barcode, checkpoint, app.clock)
    verdict, label = read_label(drive)
    if verdict == "blank" and medium.label_id and medium.media_set_id and medium.sequence:
        label = TapeLabel(
            medium.label_id,
            barcode,
            catalog.pool,
            medium.media_set_id,
            medium.sequence,
            app.repo.store_id,
            now_iso(),
        )
        write_label(drive, label)
        return drive, label
    if label is None or label.label_id != medium.label_id:
        raise Conflict(
            f"tape {barcode} in {deck.describe()} does not carry the label this appliance wrote "
            f"on it (found: {verdict}); scan it or erase it",
            barcode=barcode,
        )
    return drive, label


def backup_to_tape(
    app: Appliance,
    deck: Deck,
    pool: str,
    points: str | list[str] = "newest",
    *,
    log: Log = _quiet,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    checkpoint: dict[str, Any] | None = None,
    save_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    verify: bool = False,
) -> dict[str, Any]:
    """Write ``points`` to the pool's media set (see the module doc). ``verify``: read back
    every object the written points need, checked against the catalog's SHA-256, and record
    their copies on the set as verified (a tape read twice; the overwrite rule counts only
    verified copies)."""
    state = dict(checkpoint or {})
    pool_record = app.catalog.get_tape_pool(pool)
    wanted = select_points(app, points)
    sync_library(app, deck)
    set_id = state.get("set")
    if set_id is None:
        sets = app.catalog.list_tape_sets(pool)
        if pool_record.allocation == "new_set":
            for s in sets:
                if s.closed_at is None:
                    app.catalog.put_tape_set(
                        s.id, pool=s.pool, store_id=s.store_id, closed_at=app.clock()
                    )
            set_id = new_set_id()
        else:
            open_sets = [s for s in sets if s.closed_at is None]
            set_id = open_sets[-1].id if open_sets else new_set_id()
        state["set"] = set_id
        if save_checkpoint is not None:
            save_checkpoint(state)
    try:
        record = app.catalog.get_tape_set(set_id)
        catalog = set_catalog(record)
    except NotFound:
        catalog = empty_catalog(set_id, app.repo.store_id, pool)
    todo = [p for p in wanted if p not in catalog.points]
    log(
        "info",
        f"writing {len(todo)} point(s) to media set {set_id} of pool {pool}; "
        f"{len(wanted) - len(todo)} already on it",
    )
    if not todo:
        return {
            **describe(catalog),
            "points_written": [],
            "skipped": wanted,
            "bytes_written": 0,
            "objects_written": 0,
            "tapes_filled": [],
        }
    members = [m for m in app.catalog.list_tape_media(media_set_id=set_id)]
    last = max(members, key=lambda m: m.sequence or 0) if members else None
    opened: tuple[Drive, TapeLabel] | None = None
    if last is not None and last.state == "writable" and not last.write_protected:
        opened = _open_member(app, deck, last.barcode, catalog, state)
        if opened[0].status().write_protected:
            # Its tab was slid since: the set goes on on another tape, this one stays as it is.
            log("warning", f"tape {last.barcode} is write protected: the set continues elsewhere")
            app.catalog.put_tape_medium(last.barcode, write_protected=True, state="full")
            opened = None
    if opened is not None:
        drive, label = opened
    else:
        sequence = (last.sequence or 0) + 1 if last is not None else 1
        drive, label = _label_new_tape(app, deck, pool, set_id, sequence, state, log)

    def next_tape(sequence: int) -> tuple[Drive, TapeLabel]:
        log("info", f"tape {writer.label.barcode} is full; the set continues on another tape")
        app.catalog.put_tape_medium(writer.label.barcode, state="full")
        return _label_new_tape(app, deck, pool, set_id, sequence, state, log)

    def on_catalog(written: SetCatalog, sequence: int) -> None:
        record_catalog(app, written)
        record_copies(app, written, written.points)
        app.catalog.put_tape_medium(written.barcode_of(sequence), last_written_at=app.clock())

    def moved(done_bytes: int, objects: int) -> None:
        if progress is not None:
            progress({"bytes_done": done_bytes, "objects": objects, "points_done": len(done)})

    writer = SetWriter(drive, label, catalog, next_tape, on_catalog=on_catalog, progress=moved)
    done: list[str] = []
    mirror = open_mirror(app, set_id)
    try:
        with app.locks.shared():  # GC must not free a pack the session is about to read
            for point_id in todo:
                if cancel is not None and cancel.is_set():
                    raise BackupCancelled("the tape backup was cancelled")
                names, made = point_objects(app.repo, point_id)

                def source(name: str, made: dict[str, bytes] = made) -> bytes:
                    data = made[name] if name in made else app.repo.backend.get(name)
                    if not name.startswith("data/"):
                        mirror.put(name, data)
                    return data

                sizes = [
                    len(made[n]) if n in made else app.repo.backend.stat(n).size for n in names
                ]
                writer.write_objects(names, sizes, source)
                writer.add_point(point_id, names)
                done.append(point_id)
                log("info", f"point {point_id}: {len(names)} object(s) on the set")
            result = writer.finish()
            if verify and done:
                _verify_points(app, deck, result.catalog, done, state, log)
    finally:
        mirror.close()
        deck.release()
    app.catalog.put_tape_medium(writer.label.barcode, last_written_at=app.clock())
    log(
        "info",
        f"{len(done)} point(s) written to media set {set_id} "
        f"({result.bytes_written} bytes on {len(result.per_tape)} tape(s))",
    )
    return {
        **describe(result.catalog),
        "points_written": done,
        "skipped": [p for p in wanted if p not in todo],
        "bytes_written": result.bytes_written,
        "objects_written": result.objects_written,
        "tapes_filled": [result.catalog.barcode_of(s) for s in result.filled],
    }


def _verify_points(
    app: Appliance,
    deck: Deck,
    catalog: SetCatalog,
    points: list[str],
    checkpoint: dict[str, Any],
    log: Log,
) -> None:
    """Read back what ``points`` need from the set (sizes and SHA-256 checked) and mark their
    copies there verified."""

    def tape_for(sequence: int) -> Drive:
        drive = bring(deck, catalog.barcode_of(sequence), checkpoint, app.clock)
        check_label(drive, catalog, sequence)
        return drive

    names = sorted({n for p in points for n in catalog.points[p]})
    read = read_objects(catalog, names, tape_for, lambda obj, data: None)
    now = app.clock()
    for point_id in points:
        app.catalog.set_copy(point_id, catalog.media_set_id, "present", verified_at=now)
    log("info", f"read back {read.objects} object(s) ({read.bytes} bytes): the copies verify")


def forget_tape(app: Appliance, barcode: str) -> list[str]:
    """The tape is about to be erased or written over: the copies on its set that needed it
    become ``lost`` (their other tapes alone cannot restore them). Returns those points."""
    medium = app.catalog.get_tape_medium(barcode)
    lost: list[str] = []
    if not medium.media_set_id:
        return lost
    with contextlib.suppress(NotFound):
        catalog = set_catalog(app.catalog.get_tape_set(medium.media_set_id))
        names = {o.name for o in catalog.objects if o.sequence == medium.sequence}
        for point_id, needs in catalog.points.items():
            if names.intersection(needs):
                with contextlib.suppress(NotFound):
                    app.catalog.set_copy(point_id, catalog.media_set_id, "lost")
                    lost.append(point_id)
    return lost


# --- erase -------------------------------------------------------------------------------------


def erase_tape(
    app: Appliance, deck: Deck, barcode: str, *, force: bool = False, log: Log = _quiet
) -> dict[str, Any]:
    """Make the tape blank (a short erase from its beginning). A tape of this appliance whose
    points are still needed (:func:`may_overwrite`) is refused unless ``force``; the copies on
    its set that needed it become ``lost``."""
    sync_library(app, deck)
    medium = app.catalog.get_tape_medium(barcode)
    needed = bool(medium.media_set_id and medium.pool and not force)
    if needed and barcode not in reusable_media(app, medium.pool or ""):
        raise Conflict(
            f"tape {barcode} holds points of set {medium.media_set_id} that are still needed "
            "(not expired, no other verified copy); erase it with force only if you mean it",
            barcode=barcode,
        )
    drive = bring(deck, barcode, {}, app.clock)
    try:
        if drive.status().write_protected:
            raise WriteProtected(f"tape {barcode} is write protected: slide its tab to erase it")
        drive.rewind()
        drive.erase()
    except TapeError as exc:
        raise Conflict(str(exc), barcode=barcode) from exc
    finally:
        deck.release()
    lost = forget_tape(app, barcode)
    app.catalog.put_tape_medium(
        barcode,
        label_id=None,
        pool=None,
        media_set_id=None,
        sequence=None,
        state="blank",
        bytes_written=0,
        point_count=0,
        write_protected=False,
    )
    log("info", f"tape {barcode} is blank" + (f"; {len(lost)} copy(ies) lost" if lost else ""))
    return {"barcode": barcode, "lost": lost}


# --- the jobs ------------------------------------------------------------------------------------


def _backup_job(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    deck = open_deck(app.catalog, p["drive"])
    return backup_to_tape(
        app,
        deck,
        p["pool"],
        p.get("points", "newest"),
        log=ctx.log,
        progress=ctx.progress,
        cancel=ctx.cancel,
        checkpoint=ctx.checkpoint,
        save_checkpoint=ctx.save_checkpoint,
        verify=bool(p.get("verify")),
    )


def _restore_job(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    deck = open_deck(app.catalog, p["drive"])
    return restore_from_tape(
        app,
        deck,
        p["point"],
        subpath=p.get("path"),
        set_id=p.get("set"),
        log=ctx.log,
        progress=ctx.progress,
        checkpoint=ctx.checkpoint,
    )


def _scan_job(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    from hardware.tape.scan import scan_tapes

    return scan_tapes(app, open_deck(app.catalog, p["drive"]), log=ctx.log, progress=ctx.progress)


def _erase_job(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    deck = open_deck(app.catalog, p["drive"])
    return erase_tape(app, deck, p["barcode"], force=bool(p.get("force")), log=ctx.log)


def _drive_resources(p: dict[str, Any]) -> list[tuple[str, bool]]:
    return [(f"tape_drive:{p['drive']}", True)]


def _store_and_drive(p: dict[str, Any]) -> list[tuple[str, bool]]:
    return [("store", False), *_drive_resources(p)]


def _backup_resources(p: dict[str, Any]) -> list[tuple[str, bool]]:
    # One session per pool at a time: two drives must not append to the same set at once.
    return [*_store_and_drive(p), (f"tape_pool:{p['pool']}", True)]


def register_tape_jobs() -> None:
    """Register the ``tape_backup``, ``tape_restore``, ``tape_scan`` and ``tape_erase`` job
    kinds (at service start-up; again is harmless). All four are safe to run again after a
    crash: a backup appends after the last recorded catalog, a restore reads what is missing."""
    if all(k in JOB_KINDS for k in (BACKUP_KIND, RESTORE_KIND, SCAN_KIND, ERASE_KIND)):
        return
    register_job_kind(
        BACKUP_KIND,
        JobKind(_backup_job, _backup_resources, True, lambda p: f"tape backup to pool {p['pool']}"),
    )
    register_job_kind(
        RESTORE_KIND,
        JobKind(_restore_job, _store_and_drive, True, lambda p: f"restore {p['point']} from tape"),
    )
    register_job_kind(
        SCAN_KIND,
        JobKind(_scan_job, _store_and_drive, True, lambda p: f"scan of the tapes in {p['drive']}"),
    )
    register_job_kind(
        ERASE_KIND,
        JobKind(_erase_job, _drive_resources, False, lambda p: f"erase of tape {p['barcode']}"),
    )
