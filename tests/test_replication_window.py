"""The pure decisions of replication's second part: the time window (explicit times, the
midnight wrap, a zone with daylight saving), clock skew in numbers and words, and the link's
state on the peers page."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from api.peer_wire import answered_time, skew_seconds, skew_words, time_header
from api.peers import link_status
from api.replication_window import Window, parse_window, wait_words, window_state
from appliance.errors import InvalidInput

NIGHT = Window(time(22, 0), time(6, 0))
OFFICE = Window(time(9, 0), time(17, 30))


def at(hour: int, minute: int = 0, day: int = 10) -> datetime:
    return datetime(2026, 3, day, hour, minute, tzinfo=UTC)


def test_no_window_is_always_open() -> None:
    state = window_state(at(3), None)
    assert state.open and state.next_open is None


@pytest.mark.parametrize(
    ("now", "open_", "next_open"),
    [
        (at(21, 59), False, at(22)),
        (at(22), True, None),
        (at(23, 59), True, None),
        (at(0), True, None),  # past midnight: still the night's window
        (at(5, 59), True, None),
        (at(6), False, at(22)),  # the end is not in the window
        (at(12), False, at(22)),
    ],
)
def test_a_window_over_midnight(now: datetime, open_: bool, next_open: datetime | None) -> None:
    state = window_state(now, NIGHT, UTC)
    assert state.open is open_
    assert state.next_open == next_open


@pytest.mark.parametrize(
    ("now", "open_", "next_open"),
    [
        (at(8, 59), False, at(9)),
        (at(9), True, None),
        (at(17, 29), True, None),
        (at(17, 30), False, at(9, day=11)),  # closed for today: tomorrow morning
        (at(23), False, at(9, day=11)),
    ],
)
def test_a_window_within_a_day(now: datetime, open_: bool, next_open: datetime | None) -> None:
    state = window_state(now, OFFICE, UTC)
    assert (state.open, state.next_open) == (open_, next_open)


def test_the_window_is_local_time() -> None:
    paris = ZoneInfo("Europe/Paris")
    # 21:30 UTC in winter is 22:30 in Paris: inside 22:00-06:00 there, not in UTC.
    assert window_state(at(21, 30), NIGHT, paris).open
    assert not window_state(at(21, 30), NIGHT, UTC).open
    # 20:00 UTC (21:00 Paris): opens at 22:00 Paris = 21:00 UTC.
    assert window_state(at(20), NIGHT, paris).next_open == at(21)
    # After the spring change (29 March 2026) 22:00 Paris is 20:00 UTC: the hours stay local.
    spring = datetime(2026, 3, 30, 19, tzinfo=UTC)
    assert window_state(spring, NIGHT, paris).next_open == datetime(2026, 3, 30, 20, tzinfo=UTC)


def test_naive_times_are_refused() -> None:
    with pytest.raises(InvalidInput):
        window_state(datetime(2026, 3, 10, 12), NIGHT)


def test_parse_window() -> None:
    assert parse_window(None) is None
    assert parse_window({"start": "22:00", "end": "06:00"}) == NIGHT
    for bad in (
        {"start": "22:00", "end": "22:00"},  # start == end
        {"start": "24:00", "end": "06:00"},
        {"start": "7:00", "end": "08:00"},
        {"start": "22:00"},
        "22:00-06:00",
    ):
        with pytest.raises(InvalidInput):
            parse_window(bad)


def test_wait_words() -> None:
    state = window_state(at(12), NIGHT, UTC)
    assert state.next_open is not None
    assert wait_words(NIGHT, state.next_open, UTC) == (
        "outside the replication window 22:00\N{EN DASH}06:00; starts at 22:00"
    )


def test_clock_skew_in_numbers_and_words() -> None:
    sent, received = at(12), at(12) + timedelta(seconds=2)
    assert skew_seconds(at(12, 12) + timedelta(seconds=1), sent, received) == 720.0
    assert skew_seconds(at(11, 59) + timedelta(seconds=1), sent, received) == -60.0
    assert skew_words(720.0) == "the peer's clock is 12 min ahead of this appliance's"
    assert skew_words(-3 * 3600.0, "the source's clock") == (
        "the source's clock is 3 h behind this appliance's"
    )
    assert skew_words(300.0) is None and skew_words(None) is None


def test_the_peer_time_is_read_from_its_header_else_date() -> None:
    import httpx

    exact = at(12, 0) + timedelta(microseconds=250)
    assert answered_time(httpx.Headers({"X-Appliance-Time": time_header(exact)})) == exact
    dated = answered_time(httpx.Headers({"Date": "Tue, 10 Mar 2026 12:00:00 GMT"}))
    assert dated == at(12) + timedelta(seconds=0.5)
    assert answered_time(httpx.Headers({})) is None


def test_link_status_words() -> None:
    assert link_status(True, {}) == ("ok", "answering")
    assert link_status(False, {"link_code": "ok"})[0] == "unreachable"
    refused = link_status(True, {"link_code": "peer_token_refused"})
    assert refused == ("token_refused", "the peer refused the token (unpaired?)")
    assert link_status(False, {"link_code": "peer_certificate_changed"})[0] == (
        "certificate_changed"
    )
