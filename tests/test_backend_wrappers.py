"""The backend wrappers' own behaviour: when retries give up, what is never retried, backoff and
jitter, rate limits, deterministic faults, and the one ``compose`` that stacks them.

That the wrapped stacks keep the backend contract is checked by the conformance suite.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import pytest

from appliance.errors import (
    LocationUnavailable,
    ObjectArchived,
    ObjectLocked,
    ObjectMissing,
    StoreError,
    StoreFull,
    TransientBackendError,
)
from appliance.store.backend import MemoryBackend, ObjectInfo
from appliance.store.wrappers import (
    FaultyBackend,
    RateLimit,
    RateLimitedBackend,
    RetryingBackend,
    RetryPolicy,
    compose,
)


class FakeTime:
    """A clock that only moves when something sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def numbered_transient() -> tuple[list[str], object]:
    messages: list[str] = []

    def error(operation: str, name: str) -> StoreError:
        messages.append(f"failure {len(messages) + 1} of {operation} {name}")
        return TransientBackendError(messages[-1], name=name)

    return messages, error


# --- retries ---------------------------------------------------------------------------------------


def test_retry_gives_up_after_the_attempts_with_the_last_error() -> None:
    messages, error = numbered_transient()
    faulty = FaultyBackend(MemoryBackend(), every=1, error=error)  # type: ignore[arg-type]
    fake = FakeTime()
    policy = RetryPolicy(attempts=4, base_delay=1.0, max_delay=3.0, jitter=0.5, max_elapsed=None)
    retrying = RetryingBackend(
        faulty, policy, sleep=fake.sleep, clock=fake.clock, rng=random.Random(3)
    )
    with pytest.raises(TransientBackendError) as info:
        retrying.put("data/ab/pack", b"x")
    assert faulty.calls == 4
    assert info.value.message == messages[-1] == "failure 4 of put data/ab/pack"
    # Exponential, capped at max_delay, each scaled down by at most the jitter.
    assert len(fake.sleeps) == 3
    for delay, cap in zip(fake.sleeps, [1.0, 2.0, 3.0], strict=True):
        assert cap * 0.5 <= delay <= cap


def test_retry_succeeds_once_the_fault_passes() -> None:
    faulty = FaultyBackend(MemoryBackend(), fail_calls={1, 2})
    fake = FakeTime()
    retrying = RetryingBackend(faulty, RetryPolicy(attempts=3), sleep=fake.sleep, clock=fake.clock)
    retrying.put("config", b"x")
    assert faulty.failures == 2 and faulty.calls == 3
    assert retrying.get("config") == b"x"


def test_retry_respects_the_time_budget() -> None:
    faulty = FaultyBackend(MemoryBackend(), every=1)
    fake = FakeTime()
    policy = RetryPolicy(attempts=100, base_delay=1.0, max_delay=8.0, jitter=0.0, max_elapsed=10.0)
    retrying = RetryingBackend(faulty, policy, sleep=fake.sleep, clock=fake.clock)
    with pytest.raises(TransientBackendError):
        retrying.stat("config")
    assert fake.sleeps == [1.0, 2.0, 4.0]  # a next wait of 8 s would end past 10 s
    assert faulty.calls == 4


@pytest.mark.parametrize(
    "permanent",
    [
        StoreError("permission denied"),
        StoreFull("full"),
        ObjectArchived("cold"),
        ObjectLocked("locked"),
        LocationUnavailable("unplugged"),
        ObjectMissing("gone"),
    ],
    ids=lambda e: e.code,
)
def test_permanent_errors_are_not_retried(permanent: StoreError) -> None:
    faulty = FaultyBackend(MemoryBackend(), every=1, error=lambda _op, _name: permanent)
    fake = FakeTime()
    retrying = RetryingBackend(faulty, RetryPolicy(attempts=5), sleep=fake.sleep, clock=fake.clock)
    with pytest.raises(type(permanent)) as info:
        retrying.get("config")
    assert info.value is permanent
    assert faulty.calls == 1 and fake.sleeps == []


def test_missing_object_from_the_backend_is_not_retried() -> None:
    memory = MemoryBackend()
    counting = FaultyBackend(memory)  # counts, never fails
    retrying = RetryingBackend(counting, sleep=lambda _s: pytest.fail("slept"))
    with pytest.raises(ObjectMissing):
        retrying.get("data/ab/missing")
    assert counting.calls == 1


def test_retry_after_a_lost_reply_is_idempotent() -> None:
    memory = MemoryBackend()
    faulty = FaultyBackend(memory, fail_calls={1, 3}, after_effect=True)
    retrying = RetryingBackend(faulty, sleep=lambda _s: None)
    retrying.put("data/ab/pack", b"payload")  # stored, reply lost, stored again
    retrying.delete("data/ab/pack")  # deleted, reply lost, deleted again: not an error
    assert faulty.failures == 2
    assert list(memory.list()) == []


class FlakyListing(MemoryBackend):
    """Fails the first listing after yielding two objects."""

    def __init__(self) -> None:
        super().__init__()
        self.listings = 0

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self.listings += 1
        for n, info in enumerate(sorted(super().list(prefix), key=lambda i: i.name)):
            if self.listings == 1 and n == 2:
                raise TransientBackendError("listing interrupted")
            yield info


def test_retried_listing_yields_each_object_once() -> None:
    flaky = FlakyListing()
    names = [f"data/{i:02x}/p" for i in range(6)]
    for name in names:
        flaky.put(name, b"x")
    retrying = RetryingBackend(flaky, sleep=lambda _s: None)
    assert [i.name for i in retrying.list("data/")] == names
    assert flaky.listings == 2


def test_retry_policy_is_validated() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(jitter=1.5)


# --- rate limits -----------------------------------------------------------------------------------


class SlowBackend(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.in_flight = 0
        self.most = 0
        self._count = threading.Lock()

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        with self._count:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        time.sleep(0.02)
        with self._count:
            self.in_flight -= 1
        return super().get(name, offset, length)


def test_concurrency_is_bounded() -> None:
    slow = SlowBackend()
    slow.put("obj", b"x")
    limited = RateLimitedBackend(slow, RateLimit(max_concurrent=2))
    threads = [threading.Thread(target=limited.get, args=("obj",)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert slow.most == 2


def test_requests_per_second_are_bounded() -> None:
    fake = FakeTime()
    limited = RateLimitedBackend(
        MemoryBackend(), RateLimit(per_second=10.0), sleep=fake.sleep, clock=fake.clock
    )
    for i in range(6):
        limited.put(f"obj/{i}", b"x")
    assert fake.now == pytest.approx(0.5)  # the first is free, then one per 0.1 s
    assert len(list(limited.list("obj/"))) == 6


def test_listing_does_not_hold_a_slot_while_the_caller_reads() -> None:
    memory = MemoryBackend()
    for i in range(3):
        memory.put(f"index/{i}", b"x")
    limited = RateLimitedBackend(memory, RateLimit(max_concurrent=1))
    # Reading each listed object while iterating would deadlock if the listing kept its slot.
    assert sorted(limited.get(info.name) for info in limited.list("index/")) == [b"x"] * 3


# --- faults ----------------------------------------------------------------------------------------


def test_faults_by_fraction_are_reproducible() -> None:
    def pattern(seed: int) -> list[bool]:
        faulty = FaultyBackend(MemoryBackend(), fraction=0.3, seed=seed)
        outcome = []
        for i in range(50):
            try:
                faulty.put(f"obj/{i}", b"x")
                outcome.append(True)
            except TransientBackendError:
                outcome.append(False)
        return outcome

    assert pattern(7) == pattern(7)
    assert pattern(7) != pattern(8)
    assert 5 < pattern(7).count(False) < 30


def test_faults_only_on_the_operations_named() -> None:
    faulty = FaultyBackend(MemoryBackend(), every=1, operations={"get"})
    faulty.put("config", b"x")  # not counted, never fails
    assert faulty.stat("config").size == 1
    with pytest.raises(TransientBackendError, match="injected fault: get config"):
        faulty.get("config")
    with pytest.raises(ValueError):
        FaultyBackend(MemoryBackend(), operations={"rename"})


def test_fault_on_listing() -> None:
    faulty = FaultyBackend(MemoryBackend(), fail_calls={1})
    with pytest.raises(TransientBackendError):
        list(faulty.list())
    assert list(faulty.list()) == []


# --- compose ---------------------------------------------------------------------------------------


def test_compose_stacks_rate_limit_inside_retries() -> None:
    memory = MemoryBackend()
    composed = compose(memory, rate_limit=RateLimit(max_concurrent=2), sleep=lambda _s: None)
    assert isinstance(composed, RetryingBackend)
    assert isinstance(composed.backend, RateLimitedBackend)
    assert composed.backend.backend is memory
    assert composed.capabilities == memory.capabilities
    assert composed.describe() == "memory"


def test_compose_without_retries_or_limits_is_the_backend() -> None:
    memory = MemoryBackend()
    assert compose(memory, retries=RetryPolicy(attempts=1)) is memory


def test_composed_stack_hides_transient_faults() -> None:
    faulty = FaultyBackend(MemoryBackend(), fraction=0.4, seed=11)
    composed = compose(faulty, retries=RetryPolicy(attempts=10), sleep=lambda _s: None)
    for i in range(30):
        composed.put(f"data/{i:02x}/pack", bytes([i]) * 10)
    assert sorted(i.name for i in composed.list("data/")) == [
        f"data/{i:02x}/pack" for i in range(30)
    ]
    assert all(composed.get(f"data/{i:02x}/pack", 5, 1) == bytes([i]) for i in range(30))
    assert faulty.failures > 10


def test_a_bandwidth_limit_paces_uploads_by_their_bytes() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limited = RateLimitedBackend(
        MemoryBackend(),
        RateLimit(put_bytes_per_second=1000.0),
        sleep=sleep,
        clock=lambda: now[0],
    )
    limited.put("a", b"x" * 1000)  # one second's worth goes out at once
    assert slept == []
    limited.put("b", b"x" * 3000)  # three more seconds of bytes: wait them out
    assert slept == [pytest.approx(3.0)]
    limited.get("b")  # reads are not limited by the upload bandwidth
    assert len(slept) == 1
    with pytest.raises(ValueError):
        RateLimit(put_bytes_per_second=0)


def test_read_only_views_refuse_writes_deletes_and_locks_in_words() -> None:
    from datetime import UTC, datetime

    from appliance.errors import InvalidInput
    from appliance.locations.copy import FallbackBackend

    store = MemoryBackend()
    store.put("config", b"x")
    view = FallbackBackend([("pool", store)], borrowed=[store])
    assert view.get("config") == b"x"
    with pytest.raises(InvalidInput, match="reading a point from its copies never writes to them"):
        view.put("config", b"y")
    with pytest.raises(InvalidInput, match="never deletes from them"):
        view.delete("config")
    with pytest.raises(InvalidInput, match="never changes the locks of them"):
        view.retain("config", datetime.now(UTC))
    assert view.warm_up(["config"]).ready == frozenset({"config"})
    assert store.get("config") == b"x"
