"""``present_many`` through the wrappers: passed on when (and only when) the wrapped backend has
it, retried on a transient failure like the other calls, one call under a rate limit, and
fault-injectable; so the copy code's "ask in batches" path finds it on the outer stack."""

from __future__ import annotations

import contextlib
import random

import pytest

from appliance.errors import ObjectMissing, TransientBackendError
from appliance.store.backend import BackendCapabilities, MemoryBackend
from appliance.store.wrappers import (
    FaultyBackend,
    RateLimit,
    RateLimitedBackend,
    RetryingBackend,
    RetryPolicy,
    compose,
)


class Asking(MemoryBackend):
    """A peer-shaped backend: expensive listing, a batch presence query."""

    capabilities = BackendCapabilities(listing_cost="expensive")

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[list[str]] = []

    def present_many(self, names: list[str]) -> dict[str, int]:
        self.asked.append(list(names))
        held = {}
        for name in names:
            with contextlib.suppress(ObjectMissing):
                held[name] = self.stat(name).size
        return held


def test_a_wrapper_has_present_many_only_when_the_backend_has_it() -> None:
    plain = compose(MemoryBackend(), rate_limit=RateLimit(max_concurrent=2))
    assert getattr(plain, "present_many", None) is None
    assert not hasattr(FaultyBackend(MemoryBackend()), "present_many")
    inner = Asking()
    inner.put("config", b"12345")
    stack = compose(inner, rate_limit=RateLimit(max_concurrent=2))
    assert isinstance(stack, RetryingBackend)
    ask = getattr(stack, "present_many", None)
    assert callable(ask)
    assert ask(n for n in ["config", "keys/00112233"]) == {"config": 5}  # any iterable
    assert inner.asked == [["config", "keys/00112233"]]


def test_present_many_is_retried_after_a_transient_failure() -> None:
    inner = Asking()
    inner.put("config", b"x")
    faulty = FaultyBackend(inner, fail_calls={1, 2}, operations={"present_many"})
    sleeps: list[float] = []
    retrying = RetryingBackend(
        faulty,
        RetryPolicy(attempts=3, base_delay=0.01, max_elapsed=None),
        sleep=sleeps.append,
        rng=random.Random(1),
    )
    assert retrying.present_many(["config"]) == {"config": 1}
    assert faulty.failures == 2 and len(sleeps) == 2
    assert inner.asked == [["config"]]  # the failed calls never reached it


def test_present_many_gives_up_like_the_other_calls() -> None:
    faulty = FaultyBackend(Asking(), every=1, operations={"present_many"})
    retrying = RetryingBackend(
        faulty, RetryPolicy(attempts=2, base_delay=0.0, max_elapsed=None), sleep=lambda _: None
    )
    with pytest.raises(TransientBackendError):
        retrying.present_many(["config"])
    assert faulty.calls == 2


def test_present_many_is_one_call_under_a_rate_limit() -> None:
    inner = Asking()
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    limited = RateLimitedBackend(
        inner, RateLimit(per_second=1.0), sleep=sleep, clock=lambda: now[0]
    )
    limited.present_many(["config"])
    limited.present_many(["config"])
    assert sleeps == [pytest.approx(1.0)]  # the second waited for its turn
    assert len(inner.asked) == 2
