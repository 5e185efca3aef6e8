"""Scheduled boot verification: what a boot test's record says, in the terms the page shows.

A boot test (``image.failover``: an isolated test boot of a VM's point, proven by its configured
checks, its RTO measured and a screenshot kept, then shut down and discarded) is recorded as a
failover session whose ``details["purpose"]`` is ``"boot_test"``. The catalog finds the newest
ones per asset and per point (:meth:`Catalog.last_boot_tests`); this module turns one record into
a :class:`BootTestResult` and decides the dashboard's alerts. Pure functions, no I/O: the
``details`` keys read here (``proven_at``, ``rto_seconds``, ``error``, ``failed_at``,
``stopped_at``, ``screenshot``, ``failed_checks``) are the ones the failover code writes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from appliance.catalog.records import ACTIVE_FAILOVER_STATES, FailoverSessionRecord

PURPOSE = "boot_test"
#: How a proof timeout starts its message; the checks' own words follow the colon.
_PROOF_FAILED = re.compile(r"^boot proof failed after [^:]*: ")
#: How each check (``image.boot_proof``) words its failure, for records that predate the
#: recorded ``failed_checks`` list: each failure starts the text or follows a "; ".
_CHECK_FAILURES = {
    "serial": re.compile(r"(?:^|; )serial console never printed "),
    "tcp": re.compile(r"(?:^|; )guest TCP port \d+ never answered"),
    "http": re.compile(r"(?:^|; )https?://\S* \(guest port \d+\) never answered"),
    "agent": re.compile(r"(?:^|; )the QEMU guest agent never answered"),
    "screen_stable": re.compile(r"(?:^|; )the screen never stayed unchanged"),
}


@dataclass(frozen=True)
class BootTestResult:
    session: str
    asset: str
    point_id: str
    #: ``proven``, ``failed`` (it ended without a proof) or ``running`` (not decided yet).
    state: str
    #: When it was proven, failed or stopped (the session's start while it runs).
    at: datetime
    rto_seconds: float | None
    #: In words, which check did not pass (or what else stopped the boot).
    failed_check: str | None
    #: Names of the checks that did not pass (``serial``, ``http``, ...): as the failover
    #: recorded them, else read from the message of a proof timeout; empty for other failures.
    failed_checks: tuple[str, ...]
    error: str | None
    has_screenshot: bool


def _when(value: object, fallback: datetime) -> datetime:
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return fallback
        return parsed if parsed.tzinfo is not None else fallback
    return fallback


def failed_check_words(error: str | None) -> str | None:
    """The failing checks of a proof timeout ("serial console never printed ..."), else the
    whole error (QEMU exited, a damaged pack, ...)."""
    if not error:
        return None
    return _PROOF_FAILED.sub("", error, count=1) or error


def failed_check_names(details: Mapping[str, Any], error: str | None) -> tuple[str, ...]:
    """The names of the checks that did not pass: the list the failover recorded when there is
    one (``details["failed_checks"]``, even empty), else read back from a proof timeout's
    message (records written before the list was); none for other failures."""
    recorded = details.get("failed_checks")
    if isinstance(recorded, list | tuple):
        return tuple(str(name) for name in recorded)
    if not error or not _PROOF_FAILED.match(error):
        return ()
    words = _PROOF_FAILED.sub("", error, count=1)
    found = [(m.start(), name) for name, rx in _CHECK_FAILURES.items() if (m := rx.search(words))]
    return tuple(name for _, name in sorted(found))


def boot_test_result(record: FailoverSessionRecord) -> BootTestResult:
    details = record.details
    proven_at = details.get("proven_at")
    error = details.get("error")
    if proven_at:
        state, at = "proven", _when(proven_at, record.started_at)
    elif record.state in ACTIVE_FAILOVER_STATES:
        state, at = "running", record.started_at
    else:
        state = "failed"
        at = _when(details.get("failed_at") or details.get("stopped_at"), record.started_at)
        if not error:
            error = f"the boot was not proven (session {record.state})"
    rto = details.get("rto_seconds")
    return BootTestResult(
        session=record.id,
        asset=record.asset,
        point_id=record.point_id,
        state=state,
        at=at,
        rto_seconds=float(rto) if isinstance(rto, int | float) and state == "proven" else None,
        failed_check=failed_check_words(str(error)) if state == "failed" else None,
        failed_checks=failed_check_names(details, str(error)) if state == "failed" else (),
        error=str(error) if state == "failed" and error else None,
        has_screenshot=bool(details.get("screenshot")),
    )
