"""Which checks a failed boot test names: the recorded list first, the message as a fallback."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from appliance.boot_verification import boot_test_result, failed_check_names
from appliance.catalog.records import FailoverSessionRecord

SERIAL = "serial console never printed a line matching 'login:'"
HTTP = "http://127.0.0.1:40123/health (guest port 80) never answered (timed out; retried)"
TIMEOUT = f"boot proof failed after 60 s: {SERIAL}; {HTTP}"


def _failed(**details: Any) -> FailoverSessionRecord:
    return FailoverSessionRecord(
        id="s1",
        asset="web",
        point_id="p1",
        state="failed",
        started_at=datetime(2024, 5, 1, 8, tzinfo=UTC),
        details={"purpose": "boot_test", "failed_at": "2024-05-01T08:05:00+00:00", **details},
    )


def test_the_recorded_list_wins_over_the_message() -> None:
    # The message says serial and http; the record's list is what the failover knew.
    result = boot_test_result(_failed(error=TIMEOUT, failed_checks=["http"]))
    assert result.failed_checks == ("http",)
    assert result.failed_check == f"{SERIAL}; {HTTP}"  # the words stay the checks' own
    assert boot_test_result(_failed(error=TIMEOUT, failed_checks=[])).failed_checks == ()


def test_older_records_without_the_list_are_read_from_the_message() -> None:
    assert boot_test_result(_failed(error=TIMEOUT)).failed_checks == ("serial", "http")
    tcp_agent = (
        "boot proof failed after 5 s: guest TCP port 22 never answered (refused); "
        "the QEMU guest agent never answered (no socket)"
    )
    assert failed_check_names({}, tcp_agent) == ("tcp", "agent")
    screen = "boot proof failed after 5 s: the screen never stayed unchanged for 3 s (blank)"
    assert failed_check_names({}, screen) == ("screen_stable",)
    # Other failures are not a check's: no names.
    assert failed_check_names({}, "QEMU exited with status -9 while the VM was booting") == ()
    assert boot_test_result(_failed(error="QEMU exited with status 1")).failed_checks == ()


def test_a_proven_or_running_test_names_no_check() -> None:
    proven = _failed(proven_at="2024-05-01T08:00:11+00:00", failed_checks=["serial"])
    assert boot_test_result(proven).failed_checks == ()
