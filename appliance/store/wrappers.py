"""Wrappers around a backend: retries, rate limits and fault injection, composed once.

Each wrapper is itself a :class:`~appliance.store.backend.Backend` and keeps the contract of the
one it wraps; adapters (a directory, a bucket, a tape) therefore contain no retry or throttling
loops of their own. :func:`compose` is the one place that stacks them, in one order::

    RetryingBackend(RateLimitedBackend(backend))

so every attempt of a retried call waits for its turn under the rate limit, and a rate limit never
holds a slot while a retry sleeps.

Only :class:`TransientBackendError` is retried. Every other error (a missing object, a full disk,
an archived or locked object, an unavailable location, a corrupt range) is permanent and passes
through at once: retrying cannot change its answer. Retrying is safe because the backend contract
makes ``put`` (same bytes) and ``delete`` idempotent.

A backend may offer more than the contract: ``present_many(names) -> {name: size}``, the batch
question "which of these do you hold?" that a copy asks a peer instead of listing it. Each
wrapper passes it through when, and only when, the backend it wraps has it (a read-only question:
retried, rate-limited and fault-injected like ``stat``), so ``getattr(wrapped, "present_many",
None)`` answers for the whole stack.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar, cast

from appliance.errors import InvalidInput, StoreError, TransientBackendError
from appliance.store.backend import (
    Backend,
    BackendCapabilities,
    ObjectInfo,
    PutOptions,
    WarmUpStatus,
)

T = TypeVar("T")

Sleep = Callable[[float], None]
Clock = Callable[[], float]
PresentMany = Callable[[Iterable[str]], dict[str, int]]


def inner_present_many(backend: Backend) -> PresentMany:
    """``backend``'s ``present_many``; AttributeError when it has none (so that a wrapper's
    ``present_many`` property is absent too, to ``getattr`` and ``hasattr``)."""
    ask = getattr(backend, "present_many", None)
    if not callable(ask):
        raise AttributeError(f"{type(backend).__name__} has no present_many")
    return cast(PresentMany, ask)


class _Delegating:
    """Forwards every operation to the wrapped backend; subclasses override what they change."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @property
    def capabilities(self) -> BackendCapabilities:
        return self.backend.capabilities

    def describe(self) -> str:
        return self.backend.describe()

    def close(self) -> None:
        self.backend.close()


# --- retries ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a transient failure.

    The n-th retry (n = 0, 1, ...) waits ``min(max_delay, base_delay * 2**n)`` scaled down by a
    random factor in ``[1 - jitter, 1]``, so that many clients failing together do not retry in
    lockstep. A call is tried at most ``attempts`` times, and no retry starts that would end later
    than ``max_elapsed`` seconds after the first attempt began.
    """

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 30.0
    jitter: float = 0.5
    max_elapsed: float | None = 300.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be between 0 and 1")

    def delay(self, retry: int, rng: random.Random) -> float:
        cap = min(self.max_delay, self.base_delay * (2**retry))
        return cap * (1.0 - self.jitter * rng.random())


class RetryingBackend(_Delegating):
    """Retries :class:`TransientBackendError` with capped exponential backoff and jitter.

    After the last attempt the last transient error is raised as it is. ``sleep``, ``clock`` and
    ``rng`` are injectable so tests run without waiting. ``list`` restarts the listing after a
    transient failure and skips names it already yielded, so each object is still yielded once.
    """

    def __init__(
        self,
        backend: Backend,
        policy: RetryPolicy | None = None,
        *,
        sleep: Sleep = time.sleep,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        on_retry: Callable[[str, int, TransientBackendError, float], None] | None = None,
    ) -> None:
        super().__init__(backend)
        self.policy = policy or RetryPolicy()
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()
        self._on_retry = on_retry

    def _next_delay(self, what: str, retry: int, exc: TransientBackendError, start: float) -> float:
        """The wait before retry number ``retry``; re-raises ``exc`` when no retry is left."""
        if retry + 1 >= self.policy.attempts:
            raise exc
        with self._rng_lock:
            delay = self.policy.delay(retry, self._rng)
        if (
            self.policy.max_elapsed is not None
            and self._clock() + delay - start > self.policy.max_elapsed
        ):
            raise exc
        if self._on_retry is not None:
            self._on_retry(what, retry + 1, exc, delay)
        return delay

    def _call(self, what: str, operation: Callable[[], T]) -> T:
        start = self._clock()
        retry = 0
        while True:
            try:
                return operation()
            except TransientBackendError as exc:
                self._sleep(self._next_delay(what, retry, exc, start))
                retry += 1

    def put(
        self, name: str, data: bytes | bytearray | memoryview, options: PutOptions | None = None
    ) -> None:
        self._call("put", lambda: self.backend.put(name, data, options))

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._call("get", lambda: self.backend.get(name, offset, length))

    def stat(self, name: str) -> ObjectInfo:
        return self._call("stat", lambda: self.backend.stat(name))

    def delete(self, name: str) -> None:
        self._call("delete", lambda: self.backend.delete(name))

    def warm_up(self, names: Iterable[str]) -> WarmUpStatus:
        wanted = list(names)
        return self._call("warm_up", lambda: self.backend.warm_up(wanted))

    def wait_warm(self, names: Iterable[str], timeout: float) -> None:
        wanted = list(names)
        self._call("wait_warm", lambda: self.backend.wait_warm(wanted, timeout))

    def retain(self, name: str, until: datetime) -> None:
        self._call("retain", lambda: self.backend.retain(name, until))

    @property
    def present_many(self) -> PresentMany:
        """The wrapped backend's batch presence query, retried (see the module docstring)."""
        ask = inner_present_many(self.backend)

        def present_many(names: Iterable[str]) -> dict[str, int]:
            wanted = list(names)
            return self._call("present_many", lambda: ask(wanted))

        return present_many

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        start = self._clock()
        retry = 0
        seen: set[str] = set()
        while True:
            try:
                for info in self.backend.list(prefix):
                    if info.name not in seen:
                        seen.add(info.name)
                        yield info
                return
            except TransientBackendError as exc:
                self._sleep(self._next_delay("list", retry, exc, start))
                retry += 1


# --- rate limits -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateLimit:
    """At most ``max_concurrent`` calls in flight and ``per_second`` calls started per second.

    Either may be None (no limit of that kind). ``burst`` calls may start back to back after a
    quiet spell.
    """

    max_concurrent: int | None = None
    per_second: float | None = None
    burst: int = 1
    #: Bytes written per second (a bandwidth limit on uploads); None: no limit.
    put_bytes_per_second: float | None = None

    def __post_init__(self) -> None:
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if self.per_second is not None and self.per_second <= 0:
            raise ValueError("per_second must be positive")
        if self.burst < 1:
            raise ValueError("burst must be at least 1")
        if self.put_bytes_per_second is not None and self.put_bytes_per_second <= 0:
            raise ValueError("put_bytes_per_second must be positive")


class RateLimitedBackend(_Delegating):
    """Bounds concurrent calls (a semaphore) and the call rate (a token bucket).

    ``list`` counts as one call and is read to the end inside its slot, so a caller that reads
    objects while iterating a listing cannot deadlock against its own listing.
    """

    def __init__(
        self,
        backend: Backend,
        limit: RateLimit,
        *,
        sleep: Sleep = time.sleep,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(backend)
        self.limit = limit
        self._sleep = sleep
        self._clock = clock
        self._slots = (
            threading.BoundedSemaphore(limit.max_concurrent) if limit.max_concurrent else None
        )
        self._bucket_lock = threading.Lock()
        self._tokens = float(limit.burst)
        self._refilled = clock()
        # The bandwidth bucket: bytes may go out back to back up to one second's worth.
        self._byte_tokens = float(limit.put_bytes_per_second or 0)
        self._bytes_refilled = clock()

    def _take_bytes(self, count: int) -> None:
        rate = self.limit.put_bytes_per_second
        if rate is None or count <= 0:
            return
        with self._bucket_lock:
            now = self._clock()
            self._byte_tokens = min(rate, self._byte_tokens + (now - self._bytes_refilled) * rate)
            self._bytes_refilled = now
            self._byte_tokens -= count
            wait = -self._byte_tokens / rate if self._byte_tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)

    def _take_token(self) -> None:
        rate = self.limit.per_second
        if rate is None:
            return
        with self._bucket_lock:
            now = self._clock()
            self._tokens = min(
                float(self.limit.burst), self._tokens + (now - self._refilled) * rate
            )
            self._refilled = now
            self._tokens -= 1.0  # reserve ours; a debt is paid by waiting
            wait = -self._tokens / rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)

    def _call(self, operation: Callable[[], T]) -> T:
        self._take_token()
        if self._slots is None:
            return operation()
        with self._slots:
            return operation()

    def put(
        self, name: str, data: bytes | bytearray | memoryview, options: PutOptions | None = None
    ) -> None:
        self._take_bytes(len(data))
        self._call(lambda: self.backend.put(name, data, options))

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._call(lambda: self.backend.get(name, offset, length))

    def stat(self, name: str) -> ObjectInfo:
        return self._call(lambda: self.backend.stat(name))

    def delete(self, name: str) -> None:
        self._call(lambda: self.backend.delete(name))

    def warm_up(self, names: Iterable[str]) -> WarmUpStatus:
        wanted = list(names)
        return self._call(lambda: self.backend.warm_up(wanted))

    def wait_warm(self, names: Iterable[str], timeout: float) -> None:
        # Waiting is not a request: it must not hold a slot for hours.
        self.backend.wait_warm(names, timeout)

    def retain(self, name: str, until: datetime) -> None:
        self._call(lambda: self.backend.retain(name, until))

    @property
    def present_many(self) -> PresentMany:
        """The wrapped backend's batch presence query, one call under the limits."""
        ask = inner_present_many(self.backend)

        def present_many(names: Iterable[str]) -> dict[str, int]:
            wanted = list(names)
            return self._call(lambda: ask(wanted))

        return present_many

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        yield from self._call(lambda: list(self.backend.list(prefix)))


# --- fault injection -------------------------------------------------------------------------------

OPERATIONS = frozenset(
    {"put", "get", "stat", "list", "delete", "warm_up", "wait_warm", "present_many"}
)


class FaultyBackend(_Delegating):
    """Fails chosen calls on command, for tests and fault drills (like borg's failing chunker).

    Calls to the ``operations`` named are numbered from 1 (across those operations). A call fails
    when its number is in ``fail_calls``, or is a multiple of ``every``, or (with probability
    ``fraction``) by a draw from a generator seeded with ``seed``, so a run is reproducible.
    ``error`` builds the exception from the operation and the name. With ``after_effect`` the
    operation is carried out first and the error raised afterwards (a reply lost on the way back),
    which is what makes idempotence matter. ``calls`` and ``failures`` count what happened.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        error: Callable[[str, str], StoreError] | None = None,
        fail_calls: Collection[int] = (),
        every: int | None = None,
        fraction: float = 0.0,
        seed: int = 0,
        operations: Collection[str] = OPERATIONS,
        after_effect: bool = False,
    ) -> None:
        super().__init__(backend)
        unknown = set(operations) - OPERATIONS
        if unknown:
            raise ValueError(f"unknown operations {sorted(unknown)}")
        if every is not None and every < 1:
            raise ValueError("every must be at least 1")
        self._error = error or _transient
        self._fail_calls = frozenset(fail_calls)
        self._every = every
        self._fraction = fraction
        self._rng = random.Random(seed)
        self._operations = frozenset(operations)
        self._after_effect = after_effect
        self._lock = threading.Lock()
        self.calls = 0
        self.failures = 0

    def _should_fail(self, operation: str) -> bool:
        if operation not in self._operations:
            return False
        with self._lock:
            self.calls += 1
            n = self.calls
            draw = self._rng.random()
            fail = (
                n in self._fail_calls
                or (self._every is not None and n % self._every == 0)
                or draw < self._fraction
            )
            if fail:
                self.failures += 1
        return fail

    def _call(self, operation: str, name: str, action: Callable[[], T]) -> T:
        if not self._should_fail(operation):
            return action()
        if self._after_effect:
            action()
        raise self._error(operation, name)

    def put(
        self, name: str, data: bytes | bytearray | memoryview, options: PutOptions | None = None
    ) -> None:
        self._call("put", name, lambda: self.backend.put(name, data, options))

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._call("get", name, lambda: self.backend.get(name, offset, length))

    def stat(self, name: str) -> ObjectInfo:
        return self._call("stat", name, lambda: self.backend.stat(name))

    def delete(self, name: str) -> None:
        self._call("delete", name, lambda: self.backend.delete(name))

    def warm_up(self, names: Iterable[str]) -> WarmUpStatus:
        wanted = list(names)
        return self._call("warm_up", ",".join(wanted), lambda: self.backend.warm_up(wanted))

    def wait_warm(self, names: Iterable[str], timeout: float) -> None:
        wanted = list(names)
        self._call("wait_warm", ",".join(wanted), lambda: self.backend.wait_warm(wanted, timeout))

    def retain(self, name: str, until: datetime) -> None:
        self._call("retain", name, lambda: self.backend.retain(name, until))

    @property
    def present_many(self) -> PresentMany:
        """The wrapped backend's batch presence query, failing on command like the others."""
        ask = inner_present_many(self.backend)

        def present_many(names: Iterable[str]) -> dict[str, int]:
            wanted = list(names)
            return self._call("present_many", ",".join(wanted), lambda: ask(wanted))

        return present_many

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # The fault strikes when the listing starts; a listing is one call.
        if self._should_fail("list"):
            raise self._error("list", prefix)
        yield from self.backend.list(prefix)


def _transient(operation: str, name: str) -> StoreError:
    return TransientBackendError(f"injected fault: {operation} {name}", name=name)


# --- the one place they are stacked ------------------------------------------------------------------


def compose(
    backend: Backend,
    *,
    retries: RetryPolicy | None = None,
    rate_limit: RateLimit | None = None,
    sleep: Sleep = time.sleep,
    clock: Clock = time.monotonic,
    rng: random.Random | None = None,
) -> Backend:
    """``backend`` wrapped for use: rate-limited inside, retried outside (see the module docstring).

    ``retries=None`` means the default :class:`RetryPolicy`; pass ``RetryPolicy(attempts=1)`` for
    none. ``rate_limit=None`` means no limit.
    """
    wrapped: Backend = backend
    if rate_limit is not None:
        wrapped = RateLimitedBackend(wrapped, rate_limit, sleep=sleep, clock=clock)
    policy = retries or RetryPolicy()
    if policy.attempts > 1:
        wrapped = RetryingBackend(wrapped, policy, sleep=sleep, clock=clock, rng=rng)
    return wrapped


class ReadOnly:
    """What a backend that only reads says to everything else: writes, deletes and locks are
    refused with words naming ``refusing`` (e.g. "reading a point from its copies") and
    ``where`` ("them", "the peer"); nothing is cold. Mixed into read-only views of other
    backends (a copy's sources, a pull's peer)."""

    refusing = "a read-only view"
    where = "it"

    def put(
        self, name: str, data: bytes | bytearray | memoryview, options: PutOptions | None = None
    ) -> None:
        raise InvalidInput(f"{self.refusing} never writes to {self.where}", name=name)

    def delete(self, name: str) -> None:
        raise InvalidInput(f"{self.refusing} never deletes from {self.where}", name=name)

    def retain(self, name: str, until: datetime) -> None:
        raise InvalidInput(f"{self.refusing} never changes the locks of {self.where}", name=name)

    def warm_up(self, names: Iterable[str]) -> WarmUpStatus:
        return WarmUpStatus(frozenset(names), frozenset())

    def wait_warm(self, names: Iterable[str], timeout: float) -> None:
        return None
