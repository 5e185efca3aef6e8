"""What the link between two appliances observes on the wire: the bytes it carries and how far
the two clocks are apart.

**Traffic.** :data:`TRAFFIC` counts the bytes each peer address was sent and answered by this
process (bodies and headers), so a replication can say what it cost on the wire.

**Clocks.** Both sides put their own time in :data:`TIME_HEADER` (``X-Appliance-Time``, ISO 8601
with microseconds, UTC): the source on every replication request, the peer on every answer of its
replication routes. The peer's own service clock is what it sends, not the web server's ``Date``
header (uvicorn writes ``Date`` from the operating system's time, at one-second resolution, and
not from the service's clock); a peer that does not send the header is read by its ``Date``.

- The source takes the peer's time against the middle of the request on its own clock
  (:func:`skew_seconds`): positive when the peer's clock is ahead. The round trip bounds the
  error; on a LAN it is milliseconds, far under the :data:`SKEW_WARNING` that matters.
- The peer takes the source's time against the moment the request arrived (the one-way delay
  counts as skew: again milliseconds).

Nothing depends on the skew for correctness: the RPO at the peer is the age of the newest point
copied there, and both the point's time and "now" are the source's own. It is shown so that a
person can fix a clock before it confuses logs, certificates and the peer's own page (which ages
the points by the peer's clock). Readings are kept per peer address (source side) or per source
appliance (peer side) in this process: :class:`ClockBook`.
"""

from __future__ import annotations

import email.utils
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx

#: The header each side puts its own time in.
TIME_HEADER = "X-Appliance-Time"
#: A skew above this many seconds is shown as a warning in words.
SKEW_WARNING = 300.0


# --- traffic ----------------------------------------------------------------------------------------


@dataclass
class Traffic:
    """Bytes sent to and received from one peer address by this process (bodies and headers)."""

    sent: int = 0
    received: int = 0
    requests: int = 0


TRAFFIC: dict[str, Traffic] = {}
_TRAFFIC_LOCK = threading.Lock()


def traffic(address: str) -> Traffic:
    """A snapshot of the bytes exchanged with ``address`` so far."""
    with _TRAFFIC_LOCK:
        counted = TRAFFIC.get(address, Traffic())
        return Traffic(counted.sent, counted.received, counted.requests)


def count(address: str, request: httpx.Request, response: httpx.Response | None) -> None:
    """Add one exchange with ``address`` to :data:`TRAFFIC`."""
    sent = len(request.method) + len(request.url.raw_path) + 12  # the request line
    sent += sum(len(k) + len(v) + 4 for k, v in request.headers.raw)
    sent += len(request.content) + 2
    received = 0
    if response is not None:
        received = 17 + sum(len(k) + len(v) + 4 for k, v in response.headers.raw)
        received += len(response.content) + 2
    with _TRAFFIC_LOCK:
        counted = TRAFFIC.setdefault(address, Traffic())
        counted.sent += sent
        counted.received += received
        counted.requests += 1


# --- clocks -----------------------------------------------------------------------------------------


def time_header(now: datetime) -> str:
    """``now`` as :data:`TIME_HEADER` carries it (UTC, microseconds)."""
    return now.astimezone(UTC).isoformat(timespec="microseconds")


def parse_time_header(value: str | None) -> datetime | None:
    """The time in a :data:`TIME_HEADER` value; None when absent or unreadable (a timezone-less
    time is taken as UTC)."""
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def answered_time(headers: httpx.Headers) -> datetime | None:
    """The peer's time in an answer: its :data:`TIME_HEADER`, else the ``Date`` header (whose
    whole seconds are truncated: half a second is added, the expected value)."""
    exact = parse_time_header(headers.get(TIME_HEADER))
    if exact is not None:
        return exact
    date = headers.get("date")
    if not date:
        return None
    try:
        when = email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC) + timedelta(seconds=0.5)


def skew_seconds(other: datetime, sent: datetime, received: datetime) -> float:
    """How far the other side's clock (``other``, read during the exchange) is ahead of ours
    (negative: behind), against the middle of the exchange on our clock (``sent`` to
    ``received``)."""
    middle = sent + (received - sent) / 2
    return (other - middle).total_seconds()


def skew_words(seconds: float | None, whose: str = "the peer's clock") -> str | None:
    """A warning in words when the skew is above :data:`SKEW_WARNING`: "the peer's clock is 12
    min ahead of this appliance's"; None when it is smaller or unknown."""
    if seconds is None or abs(seconds) <= SKEW_WARNING:
        return None
    minutes = int(abs(seconds) // 60)
    if minutes < 120:
        amount = f"{minutes} min"
    elif minutes < 48 * 60:
        amount = f"{minutes // 60} h"
    else:
        amount = f"{minutes // 1440} days"
    side = "ahead of" if seconds > 0 else "behind"
    return f"{whose} is {amount} {side} this appliance's"


@dataclass(frozen=True)
class ClockReading:
    #: The other side's clock minus ours, in seconds.
    skew_seconds: float
    #: When it was read (our clock).
    at: datetime


class ClockBook:
    """The latest clock reading per key (a peer's address, a source's appliance id)."""

    def __init__(self) -> None:
        self._readings: dict[str, ClockReading] = {}
        self._lock = threading.Lock()

    def note(self, key: str, skew: float, at: datetime) -> None:
        with self._lock:
            self._readings[key] = ClockReading(skew, at)

    def get(self, key: str) -> ClockReading | None:
        with self._lock:
            return self._readings.get(key)


#: The source's readings of its peers' clocks, by peer address.
PEER_CLOCKS = ClockBook()
