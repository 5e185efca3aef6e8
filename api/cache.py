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

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from anyio import to_thread

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
        self._pending: dict[Hashable, asyncio.Future[V]] = {}

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                del self._entries[key]
                return None
            return entry[1]

    async def get_or_compute(self, key: Hashable, compute: Callable[[], V]) -> V:
        """The cached value, else ``compute()`` run in a worker thread and cached.

        When an entry expires, the clients polling it all miss at once; they wait for the one
        computation under way instead of each running its own (which would make every expiry
        cost as many catalog queries as there are clients). Call from the event loop only.
        """
        value = self.get(key)
        if value is not None:
            return value
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        # Nobody may be waiting when it fails: do not let asyncio report it as never retrieved.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pending[key] = future
        try:
            value = await to_thread.run_sync(compute)
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            del self._pending[key]
        self.put(key, value)
        future.set_result(value)
        return value

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            self._entries[key] = (self._clock() + self.ttl, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
