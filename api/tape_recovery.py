"""Recover a lost appliance from its tapes, on the page of a fresh one (docs/tape.md, "Recover a
lost appliance from tapes").

A fresh service has a store of its own, made empty at its first start. An administrator names a
tape drive (of a registered library, or one udev found) and types the lost store's recovery key;
:class:`TapeRecovery` then works in a thread of its own, through these states:

1. ``reading``: the newest media set within reach gives its store's config, key files and one
   index file (:func:`hardware.tape.recover.store_objects`); the key is proven on the index file
   in a folder beside the pool's store, and this appliance's passphrase gets a key file there
   (:func:`~hardware.tape.recover.stage_store`). A wrong key, a missing tape, an unreadable one:
   ``failed``, with the appliance as it was.
2. ``switching``: the service stops, the empty store moves aside to
   ``<data>/replaced-stores/<store id>``, the recovered one takes its place, and the service
   starts on it; the catalog forgets the empty store and the default pool names the new one.
   Should the service not start on it, the empty store is put back and the service restarted.
3. ``scanning``: a ``tape_scan`` job on the same drive adopts the set's points (their copies on
   tape; restoring reads them back, ``tape_restore``).
4. ``done`` once that job succeeded (``failed`` if it did not; a scan can be run again).

A recovery is refused (409) while the home store holds a recovery point (it replaces an empty
store only: a store with points takes the tapes' sets with a scan, if they are its own) and while
any job is queued, running or waiting. The recovery key lives in memory for the run only; it is
never stored, logged or audited. The state is the service process's: a restart forgets a finished
one (its outcome is in the audit log and the scan job).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from appliance.catalog.records import TERMINAL_JOB_STATES, home_location_id
from appliance.errors import ApplianceError, Conflict, NotFound
from hardware.tape.deck import Deck
from hardware.tape.recover import stage_store, store_objects

if TYPE_CHECKING:
    from api.service import Service

log = logging.getLogger(__name__)

#: The states of a recovery under way: another one is refused.
BUSY = frozenset({"reading", "switching", "scanning"})
_ACTIVE_JOBS = ("queued", "running", "waiting")
#: The newest lines of the run's log kept for the page.
LOG_LINES = 50


@dataclass(frozen=True)
class RecoveryState:
    state: str = "idle"
    drive: str | None = None
    message: str | None = None
    store_id: str | None = None
    scan_job: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    log: tuple[str, ...] = field(default_factory=tuple)


def refusal(points: int, active_jobs: list[str], state: str) -> str | None:
    """Why a recovery may not start now (None: it may)."""
    if state in BUSY:
        return "a recovery from tapes is under way"
    if points:
        return (
            f"this appliance's store holds {points} recovery point(s): recovering from tapes "
            "replaces an empty store only (a scan adds the tapes' sets of this store)"
        )
    if active_jobs:
        return f"job(s) {', '.join(active_jobs)} must end first (recovery restarts the service)"
    return None


class TapeRecovery:
    """One service's recovery from tapes (see the module doc)."""

    def __init__(self, service: Service) -> None:
        self._service = service
        self._lock = threading.Lock()
        self._state = RecoveryState()
        self._thread: threading.Thread | None = None

    # --- what the page reads ----------------------------------------------------------------

    def refusal(self, state: str | None = None) -> str | None:
        """Why a recovery may not start now (``state``: the run's own, else the current one)."""
        if self._service.appliance is None:
            return "the appliance is restarting"
        app = self._service.app
        points = max(
            len(app.repo.manifest_ids()), len(app.catalog.list_points(store_id=app.repo.store_id))
        )
        active = [j.id for s in _ACTIVE_JOBS for j in app.catalog.list_jobs(state=s, limit=5)]
        return refusal(points, active, state if state is not None else self.state().state)

    def state(self) -> RecoveryState:
        with self._lock:
            state = self._state
        if state.state != "scanning" or state.scan_job is None or self._service.appliance is None:
            return state
        job = self._service.app.catalog.get_job(state.scan_job)
        if job.state not in TERMINAL_JOB_STATES:
            return state
        if job.state == "succeeded":
            message = f"recovered store {state.store_id}: its points are listed, on tape"
        else:
            why = (job.error or {}).get("message") or job.state
            message = f"the scan job {job.id} {job.state}: {why} (run a scan again)"
        done = "done" if job.state == "succeeded" else "failed"
        self._set(state=done, message=message, ended_at=self._service.now())
        with self._lock:
            return self._state

    # --- starting ---------------------------------------------------------------------------

    def start(self, drive: str, deck: Deck, recovery_key: str) -> RecoveryState:
        """Begin (see the module doc); the drive was checked by the caller."""
        with self._lock:
            busy = self._state.state in BUSY
        why = "a recovery from tapes is under way" if busy else self.refusal()
        with self._lock:
            if why is None and self._state.state in BUSY:
                why = "a recovery from tapes is under way"
            if why is not None:
                raise Conflict(f"cannot recover from tapes now: {why}")
            self._state = RecoveryState(
                state="reading", drive=drive, started_at=self._service.now()
            )
            self._thread = threading.Thread(
                target=self._run,
                args=(drive, deck, recovery_key),
                name="tape-recovery",
                daemon=True,
            )
            self._thread.start()
            return self._state

    # --- the run ----------------------------------------------------------------------------

    def _set(self, **changes: Any) -> None:
        with self._lock:
            self._state = replace(self._state, **changes)

    def _note(self, level: str, message: str) -> None:
        log.log(logging.WARNING if level in ("warning", "error") else logging.INFO, "%s", message)
        with self._lock:
            lines = (*self._state.log, message)[-LOG_LINES:]
            self._state = replace(self._state, log=lines)

    def _run(self, drive: str, deck: Deck, recovery_key: str) -> None:
        service = self._service
        store_path = service.app.data_dir.store_path
        staging = f"{store_path}.recovering"
        try:
            shutil.rmtree(staging, ignore_errors=True)  # left by a process that did not finish
            found = store_objects(deck, log=self._note)
            store_id = stage_store(
                found, staging, recovery_key=recovery_key, passphrase=service.passphrase()
            )
            self._note("info", f"the recovery key opens store {store_id}")
            self._set(state="switching", store_id=store_id)
            self._switch(store_path, staging, store_id)
            job = service.jobs.submit("tape_scan", {"drive": drive})
            self._note("info", f"scanning the tapes for the points of store {store_id}: {job.id}")
            self._set(state="scanning", scan_job=job.id)
        except Exception as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, ApplianceError):
                message = str(exc)
            else:
                log.exception("tape recovery failed")
                message = f"{type(exc).__name__}: {exc}"
            self._note("error", message)
            self._set(state="failed", message=message, ended_at=service.now())
        finally:
            deck.release()

    def _switch(self, store_path: str, staging: str, store_id: str) -> None:
        service = self._service
        old_id = service.app.repo.store_id
        why = self.refusal(state="idle")  # a backup made or a job queued meanwhile
        if why is not None:
            raise Conflict(f"cannot recover from tapes now: {why}")
        aside = os.path.join(service.app.data_dir.path, "replaced-stores", old_id)
        os.makedirs(os.path.dirname(aside), mode=0o700, exist_ok=True)
        service.stop()
        os.replace(store_path, aside)
        os.replace(staging, store_path)
        try:
            service.start()
        except Exception:
            log.exception("the service did not start on the recovered store; putting the old back")
            service.stop()
            os.replace(store_path, staging)
            os.replace(aside, store_path)
            service.start()
            raise
        self._note("info", f"the empty store {old_id} was moved to {aside}")
        catalog = service.app.catalog
        catalog.update_pool("default", store_id=store_id, location_id=home_location_id(store_id))
        with contextlib.suppress(NotFound):
            catalog.forget_store(old_id)
        service.changed()
