"""What a work function sees of its job: the protocol both the job runner's context and an
isolated child's context implement.

Kept apart from ``appliance.jobs`` so that ``appliance.isolation`` (which the runner uses to run a
job in a child process) depends on this contract only, not on the runner: no import cycle.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol


class JobView(Protocol):
    """A running job, as its work function uses it."""

    job_id: str
    #: Set when the job should stop (cancelled, or the service shuts down).
    cancel: threading.Event | Any
    #: Set on service shutdown: the job ends "interrupted" and resumes on the next start.
    interrupted: bool
    #: The newest progress document.
    latest: dict[str, Any]
    #: The checkpoint the job resumes from: the last one saved, or handed over with
    #: :class:`appliance.errors.JobWaiting` (an empty dict on a first run).
    checkpoint: dict[str, Any]

    def progress(self, info: dict[str, Any]) -> None:
        """Report progress (bytes_done, bytes_total, files, ...)."""

    def log(self, level: str, message: str) -> None:
        """Append a line to the job's log."""

    def submit(self, kind: str, params: dict[str, Any]) -> Any:
        """Queue a follow-up job."""

    def save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store a JSON checkpoint: a run interrupted after this resumes from it."""


#: Work functions (pickled references) of kinds the service registered but an isolated job's
#: process did not (its fork server started before): handed over by appliance.isolation.
_INHERITED_WORK: dict[str, bytes] = {}


def inherit_work(works: dict[str, bytes]) -> None:
    _INHERITED_WORK.update(works)


def inherited_work(kind: str) -> bytes | None:
    return _INHERITED_WORK.get(kind)
