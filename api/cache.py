"""Short-lived in-process caches for what the page and scripts poll.

A page open on the jobs screen asks for the same job every second, and a hundred of them ask a
hundred times. Each answer costs catalog queries and serialisation, yet it can only have changed
as fast as the job runner writes progress (twice a second). These caches keep an answer for a
fraction of a second to a few seconds, so the cost of polling stays flat as clients are added,
while every client still sees a change within that time.

They are per process and hold no lock on the catalog: a change made by another process (the
CLI, an isolated job) shows once the entry expires. A change made through this service clears
what it makes stale (see :func:`api.deps.authenticate`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class TtlCache(Generic[V]):
    """Entries live ``ttl`` seconds (monotonic clock); the oldest go first beyond ``max_entries``."""

    def __init__(
        self, ttl: float, max_entries: int = 1024, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()  # filled from the event loop and from worker threads

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                del self._entries[key]
                return None
            return entry[1]

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            self._entries[key] = (self._clock() + self.ttl, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def pop(self, key: Hashable) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
