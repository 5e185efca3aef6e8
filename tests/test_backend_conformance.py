"""The backend contract (see ``appliance/store/backend.py``): one suite over every backend.

Every backend, and every wrapper stack the appliance composes, runs the same tests: the local
directory (as the default store and as a registered ``pool_dir`` location), memory, and a memory
backend behind injected transient faults that the retry wrapper must hide completely. What only a
filesystem can get wrong is in ``tests/test_backend.py``; the wrappers' own behaviour (giving up,
backoff, limits) in ``tests/test_backend_wrappers.py``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import (
    IntegrityError,
    InvalidInput,
    InvalidName,
    LocationUnavailable,
    ObjectMissing,
    StoreExists,
)
from appliance.store.backend import (
    Backend,
    BackendCapabilities,
    LocalDirectoryBackend,
    MemoryBackend,
    PutOptions,
    check_name,
)
from appliance.store.identity import IDENTITY_NAME, check_identity, write_identity
from appliance.store.registry import backend_kinds, open_backend
from appliance.store.wrappers import (
    FaultyBackend,
    RateLimit,
    RetryingBackend,
    RetryPolicy,
    compose,
)

BACKENDS = ["local", "pool_dir", "memory", "retry-faulty", "composed", "s3", "s3-locked"]


def make_backend(kind: str, tmp_path: Path, s3: Any = None) -> Backend:
    if kind == "local":
        return LocalDirectoryBackend(str(tmp_path / "store"))
    if kind == "pool_dir":
        (tmp_path / "pool").mkdir()
        return open_backend("pool_dir", str(tmp_path / "pool"))
    if kind == "memory":
        return MemoryBackend()
    if kind == "retry-faulty":
        # Every third call fails with a transient error; the retries must hide every one.
        return RetryingBackend(
            FaultyBackend(MemoryBackend(), every=3),
            RetryPolicy(attempts=3),
            sleep=lambda _s: None,
            rng=random.Random(1),
        )
    if kind == "composed":
        # The stack the appliance builds, over a directory failing a random quarter of its calls,
        # some of them after the operation took effect (a lost reply).
        faulty = FaultyBackend(
            LocalDirectoryBackend(str(tmp_path / "store")), fraction=0.25, seed=5, after_effect=True
        )
        return compose(
            faulty,
            retries=RetryPolicy(attempts=8),
            rate_limit=RateLimit(max_concurrent=4, per_second=1e6, burst=100),
            sleep=lambda _s: None,
            rng=random.Random(2),
        )
    if kind == "s3":
        # A bucket on a real S3 server over HTTP, through the registered kind, under a prefix.
        return open_backend("s3_bucket", f"s3://{s3.bucket()}/site-a", **s3.options())
    if kind == "s3-locked":
        # A versioned bucket with Object Lock: deletes must remove every version.
        address = f"s3://{s3.bucket(lock=True)}"
        return open_backend("s3_bucket", address, **s3.options(lock_mode="GOVERNANCE"))
    raise AssertionError(kind)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    s3 = request.getfixturevalue("s3") if str(request.param).startswith("s3") else None
    store = make_backend(request.param, tmp_path, s3)
    yield store
    store.close()


INVALID_NAMES = [
    "",  # empty
    "/abs/name",  # absolute
    "a/../b",  # parent reference
    "..",
    "../escape",
    "Upper",  # uppercase
    "data/Pack",
    "a//b",  # empty segment
    "a/",  # trailing empty segment
    "a b",  # space
    ".hidden",  # segments start with a letter or digit
    "data/ab.tmp-123456",  # reserved for temporary files
    "x" * 513,  # too long
]


# --- the contract, for every backend -----------------------------------------------------------


def test_put_get_and_ranged_get(backend: Backend) -> None:
    data = bytes(range(256)) * 40
    backend.put("data/ab/object", data)
    assert backend.get("data/ab/object") == data
    assert backend.get("data/ab/object", 100, 50) == data[100:150]
    assert backend.get("data/ab/object", 0, len(data)) == data
    assert backend.get("data/ab/object", len(data) - 1, 1) == data[-1:]
    assert backend.get("data/ab/object", 10) == data[10:]
    assert backend.get("data/ab/object", 5, 0) == b""
    info = backend.stat("data/ab/object")
    assert (info.name, info.size) == ("data/ab/object", len(data))


def test_put_accepts_bytearray_and_memoryview(backend: Backend) -> None:
    backend.put("one", bytearray(b"abc"))
    backend.put("two", memoryview(b"0123456789")[2:5])
    assert backend.get("one") == b"abc"
    assert backend.get("two") == b"234"


def test_empty_object(backend: Backend) -> None:
    backend.put("empty", b"")
    assert backend.get("empty") == b""
    assert backend.stat("empty").size == 0


def test_get_and_stat_of_missing_object(backend: Backend) -> None:
    with pytest.raises(ObjectMissing) as info:
        backend.get("data/xx/missing")
    assert info.value.code == "object_missing"
    assert info.value.details["name"] == "data/xx/missing"
    with pytest.raises(ObjectMissing):
        backend.get("data/xx/missing", 0, 10)
    with pytest.raises(ObjectMissing):
        backend.stat("data/xx/missing")


@pytest.mark.parametrize(("offset", "length"), [(0, 11), (5, 6), (10, 1), (100, 1)])
def test_range_past_the_end_is_damage(backend: Backend, offset: int, length: int) -> None:
    backend.put("obj", b"0123456789")
    with pytest.raises(IntegrityError):
        backend.get("obj", offset, length)


def test_delete_is_idempotent(backend: Backend) -> None:
    backend.put("keys/k1", b"key")
    backend.delete("keys/k1")
    with pytest.raises(ObjectMissing):
        backend.get("keys/k1")
    backend.delete("keys/k1")  # again: not an error
    backend.delete("keys/never-existed")
    assert [i.name for i in backend.list("keys/")] == []


def test_overwrite_replaces_content(backend: Backend) -> None:
    backend.put("config", b"first version")
    assert backend.get("config", 0, 5) == b"first"  # a cached descriptor must not survive
    backend.put("config", b"second")
    assert backend.get("config") == b"second"
    assert backend.stat("config").size == 6
    assert [i.name for i in backend.list()].count("config") == 1


def test_list_yields_each_object_once(backend: Backend) -> None:
    names = {
        "config",
        "keys/0011",
        "data/00/aa",
        "data/00/bb",
        "data/ff/cc",
        "meta/12/dd",
        "index/ee",
    }
    for name in sorted(names):
        backend.put(name, name.encode())
    everything = [info.name for info in backend.list()]
    assert sorted(everything) == sorted(names)
    data = [info.name for info in backend.list("data/")]
    assert sorted(data) == ["data/00/aa", "data/00/bb", "data/ff/cc"]
    assert sorted(info.name for info in backend.list("data/00/")) == ["data/00/aa", "data/00/bb"]
    sizes = {info.name: info.size for info in backend.list()}
    assert sizes == {name: len(name) for name in names}
    assert list(backend.list("nothing-here/")) == []


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_names_are_refused(backend: Backend, name: str) -> None:
    with pytest.raises(InvalidName):
        check_name(name)
    with pytest.raises(InvalidName):
        backend.put(name, b"x")
    with pytest.raises(InvalidName):
        backend.get(name)
    with pytest.raises(InvalidName):
        backend.delete(name)
    # Nothing was written under any spelling of the name.
    assert list(backend.list()) == []


@pytest.mark.parametrize("name", ["config", "keys/0a1b", "data/ab/" + "c" * 64, "a_b.c-d/e"])
def test_valid_names_are_accepted(backend: Backend, name: str) -> None:
    assert check_name(name) == name
    backend.put(name, b"ok")
    assert backend.get(name) == b"ok"


def test_describe_names_the_location(backend: Backend) -> None:
    assert isinstance(backend.describe(), str) and backend.describe()


@pytest.mark.parametrize("offset", [0, 3, 10])
def test_range_at_the_end_is_empty(backend: Backend, offset: int) -> None:
    backend.put("obj", b"0123456789")
    assert backend.get("obj", offset) == b"0123456789"[offset:]
    assert backend.get("obj", 10) == b""
    assert backend.get("obj", 10, 0) == b""


@pytest.mark.parametrize(("offset", "length"), [(11, None), (11, 0), (1000, None)])
def test_offset_after_the_end_is_damage(backend: Backend, offset: int, length: int | None) -> None:
    backend.put("obj", b"0123456789")
    with pytest.raises(IntegrityError):
        backend.get("obj", offset, length)


def test_put_of_the_same_bytes_is_idempotent(backend: Backend) -> None:
    for _ in range(3):
        backend.put("data/ab/pack", b"the same bytes")
    assert backend.get("data/ab/pack") == b"the same bytes"
    assert [i.name for i in backend.list()] == ["data/ab/pack"]


def test_put_accepts_options(backend: Backend) -> None:
    """Storage class and retain-until may be ignored, but never refused or stored as content."""
    retain = datetime(2040, 1, 1, tzinfo=UTC)
    backend.put("data/cd/pack", b"cold data", PutOptions(storage_class="archive"))
    backend.put("keys/k", b"hot key", PutOptions(storage_class=None, retain_until=retain))
    backend.put("index/i", b"index", options=PutOptions())
    assert backend.get("data/cd/pack") == b"cold data"
    assert backend.get("keys/k") == b"hot key"
    assert backend.stat("index/i").size == 5


def test_list_prefix_is_a_string_prefix(backend: Backend) -> None:
    for name in ("data/00/aa", "data/01/bb", "data/10/cc", "database", "meta/00/dd"):
        backend.put(name, b"x")
    assert sorted(i.name for i in backend.list("data/0")) == ["data/00/aa", "data/01/bb"]
    assert sorted(i.name for i in backend.list("data")) == [
        "data/00/aa",
        "data/01/bb",
        "data/10/cc",
        "database",
    ]
    assert [i.name for i in backend.list("meta/00/d")] == ["meta/00/dd"]


def test_a_folder_is_not_an_object(backend: Backend) -> None:
    backend.put("data/ab/pack", b"x")
    for name in ("data", "data/ab"):
        with pytest.raises(ObjectMissing):
            backend.stat(name)
        with pytest.raises(ObjectMissing):
            backend.get(name)
        backend.delete(name)  # nothing to delete: not an error, and the pack stays
    assert backend.get("data/ab/pack") == b"x"


def test_capabilities_are_declared(backend: Backend) -> None:
    caps = backend.capabilities
    assert isinstance(caps, BackendCapabilities)
    assert caps.listing_cost in ("cheap", "expensive")
    assert caps == backend.capabilities  # constant
    with pytest.raises(AttributeError):
        caps.cold_objects = True  # type: ignore[misc]


def test_warm_up_is_a_no_op_for_hot_objects(backend: Backend) -> None:
    if backend.capabilities.cold_objects:
        pytest.skip("a cold backend has its own warm-up tests")
    backend.put("data/ab/pack", b"hot")
    status = backend.warm_up(["data/ab/pack", "index/not-there-yet"])
    assert status.done
    assert status.ready == {"data/ab/pack", "index/not-there-yet"}
    assert status.pending == frozenset()
    backend.wait_warm(["data/ab/pack"], timeout=0)
    assert backend.warm_up([]).done
    with pytest.raises(InvalidName):
        backend.warm_up(["../escape"])
    assert backend.get("data/ab/pack") == b"hot"


# --- the location identity, on every backend -------------------------------------------------------


def test_identity_round_trip(backend: Backend) -> None:
    with pytest.raises(LocationUnavailable, match="no location identity"):
        check_identity(backend, "store-a")
    write_identity(backend, "store-a", "loc-1")
    write_identity(backend, "store-a", "loc-1")  # idempotent
    assert check_identity(backend, "store-a") == "loc-1"
    assert check_identity(backend, "store-a", "loc-1") == "loc-1"
    assert check_name(IDENTITY_NAME) == IDENTITY_NAME
    # The identity sits outside every prefix the repository lists.
    for prefix in ("data/", "meta/", "index/", "keys/", "manifests/", "config"):
        assert [i.name for i in backend.list(prefix)] == []


def test_identity_of_another_store_is_refused(backend: Backend) -> None:
    write_identity(backend, "store-a", "loc-1")
    with pytest.raises(LocationUnavailable, match="another store") as info:
        check_identity(backend, "store-b")
    assert info.value.code == "location_unavailable"
    with pytest.raises(LocationUnavailable, match="not loc-2"):
        check_identity(backend, "store-a", "loc-2")
    with pytest.raises(StoreExists):
        write_identity(backend, "store-b", "loc-9")  # never overwritten by accident
    assert check_identity(backend, "store-a") == "loc-1"


@pytest.mark.parametrize("content", [b"", b"not json", b"[]", b'{"kind": "other"}'])
def test_unreadable_identity_is_unavailable(backend: Backend, content: bytes) -> None:
    backend.put(IDENTITY_NAME, content)
    with pytest.raises(LocationUnavailable, match="cannot read"):
        check_identity(backend, "store-a")
    with pytest.raises(LocationUnavailable):
        write_identity(backend, "store-a", "loc-1")


# --- the registry ----------------------------------------------------------------------------------


def test_registry_knows_the_pool_directory(tmp_path: Path) -> None:
    assert "pool_dir" in backend_kinds()
    pool = open_backend("pool_dir", str(tmp_path))
    assert isinstance(pool, LocalDirectoryBackend) and pool.require_root
    missing = open_backend("pool_dir", str(tmp_path / "absent"), require_mount=False)
    with pytest.raises(LocationUnavailable):
        missing.put("config", b"x")
    assert not (tmp_path / "absent").exists()


def test_registry_refuses_an_unknown_kind() -> None:
    with pytest.raises(InvalidInput, match=r"unknown backend kind 'floppy'.*pool_dir"):
        open_backend("floppy", "/dev/fd0")


def test_retain_extends_or_is_a_no_op_and_a_missing_object_is_missing(backend: Backend) -> None:
    backend.put("data/ab/pack", b"kept")
    later = datetime(2040, 1, 1, tzinfo=UTC)
    backend.retain("data/ab/pack", later)
    backend.retain("data/ab/pack", datetime(2030, 1, 1, tzinfo=UTC))  # shorter: no error
    assert backend.get("data/ab/pack") == b"kept"
    with pytest.raises(ObjectMissing):
        backend.retain("data/ab/missing", later)
    with pytest.raises(InvalidName):
        backend.retain("../escape", later)
