"""Faults between the bucket backend and a real S3 server, injected on the wire.

A small HTTP proxy on 127.0.0.1 (``servers/s3_fault_proxy.py``) sits between boto3 and moto's
server and, on the test's command, answers throttling, server errors and refused credentials
itself, drops connections mid-request or mid-response, or slows requests down; it records
every request, so the retries the tests expect are counted on the wire. Nothing of boto3 is
patched.

What is proved: throttling and server errors are :class:`TransientBackendError` from the raw
backend (one request: boto3 retries nothing behind the wrapper's back) and succeed through the
retry wrapper; a connection dropped anywhere is transient and never a short read returned as
success; a multipart upload cut off leaves no partial object and no open upload, and one whose
creation's answer was lost is aborted by the sweep of uploads left behind (never one in flight);
the checks at open are retried through throttling, server errors and dropped connections, and a
bucket that keeps throttling is unavailable in bounded time, saying why; refused or expired
credentials make the location unavailable at once (never retried), with a message in words, also
from a real server that authenticates. Copies of points through the proxy:
tests/test_s3_copy_faults.py.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from engine_support import new_appliance, set_engine_env
from s3_support import CREDENTIALS, random_tree, s3_server
from servers.s3_fault_proxy import FaultProxy, Match, Phase, Rule, Seen, fault_proxy

import tiering.s3 as s3mod
from appliance.errors import (
    LocationUnavailable,
    ObjectMissing,
    TransientBackendError,
)
from appliance.store.registry import open_backend
from appliance.store.wrappers import RetryPolicy, compose
from tiering.s3 import BucketAddress, S3Backend, make_client

NAME = "data/ab/object"
DATA = os.urandom(100_000)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


def _backend(s3: Any, proxy: FaultProxy) -> S3Backend:
    """A bucket backend on a new bucket, every request of it through the proxy."""
    address = f"s3://{s3.bucket()}/store"
    backend = open_backend("s3_bucket", address, **s3.options(endpoint_url=proxy.url))
    assert isinstance(backend, S3Backend)
    return backend


def _on_key(method: str, name: str = NAME) -> Match:
    return lambda m, target: m == method and target.split("?")[0].endswith("/store/" + name)


def _listing(method: str, target: str) -> bool:
    return method == "GET" and "list-type=2" in target


def _on_bucket(method: str, query: str = "") -> Match:
    """A request on the bucket itself (``HeadBucket``; ``?object-lock``: its lock settings)."""

    def match(m: str, target: str) -> bool:
        path, _, asked = target.partition("?")
        return m == method and path.count("/") == 1 and asked.startswith(query)

    return match


HEAD_BUCKET = _on_bucket("HEAD")
LOCK_SETTINGS = _on_bucket("GET", "object-lock")


def _creates_upload(method: str, target: str) -> bool:
    return method == "POST" and target.endswith("?uploads")


def _since(proxy: FaultProxy, start: int, match: Match) -> list[Seen]:
    return [seen for seen in proxy.requests[start:] if match(seen.method, seen.path)]


@dataclass(frozen=True)
class Operation:
    match: Match
    #: Does the operation through the backend given, and checks its answer.
    call: Callable[[Any], None]


def _get(backend: Any) -> None:
    assert backend.get(NAME) == DATA


def _put(backend: Any) -> None:
    backend.put("data/cd/new", b"new object")
    assert backend.get("data/cd/new") == b"new object"


def _stat(backend: Any) -> None:
    assert backend.stat(NAME).size == len(DATA)


def _list(backend: Any) -> None:
    assert [info.name for info in backend.list("data/")] == [NAME]


def _delete(backend: Any) -> None:
    backend.delete(NAME)
    with pytest.raises(ObjectMissing):
        backend.stat(NAME)


OPERATIONS = {
    "get": Operation(_on_key("GET"), _get),
    "put": Operation(_on_key("PUT", "data/cd/new"), _put),
    "stat": Operation(_on_key("HEAD"), _stat),
    "list": Operation(_listing, _list),
    "delete": Operation(_on_key("DELETE"), _delete),
}


# --- throttling and server errors ---------------------------------------------------------------


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (500, "InternalError")])
def test_throttling_and_server_errors_are_transient_and_retried_by_the_wrapper(
    s3: Any, proxy: FaultProxy, operation: str, status: int, code: str
) -> None:
    backend = _backend(s3, proxy)
    backend.put(NAME, DATA)
    op = OPERATIONS[operation]
    rule = proxy.fail(2, status=status, code=code, match=op.match)
    start = len(proxy.requests)
    with pytest.raises(TransientBackendError) as caught:
        op.call(backend)
    # A HEAD answer has no body, so the status stands for the code.
    assert code in caught.value.message or str(status) in caught.value.message
    assert "retrying may help" in caught.value.message
    # One request on the wire: boto3 retried nothing behind the wrapper's back.
    assert [(s.fault, s.status) for s in _since(proxy, start, op.match)] == [
        (f"{status} {code}", status)
    ]

    sleeps: list[float] = []
    op.call(compose(backend, sleep=sleeps.append))  # the second fault, then the answer
    assert rule.fired == 2 and len(sleeps) == 1
    seen = _since(proxy, start, op.match)
    assert [s.fault for s in seen[:3]] == [f"{status} {code}", f"{status} {code}", None]
    assert seen[2].status is not None and seen[2].status < 300


# --- dropped connections ----------------------------------------------------------------------


@pytest.mark.parametrize("after_bytes", [0, 40_000])
@pytest.mark.parametrize(("offset", "length"), [(0, None), (7, None), (7, 60_000)])
def test_a_get_cut_off_mid_answer_raises_and_never_returns_a_short_read(
    s3: Any, proxy: FaultProxy, offset: int, length: int | None, after_bytes: int
) -> None:
    backend = _backend(s3, proxy)
    backend.put(NAME, DATA)
    expected = DATA[offset:] if length is None else DATA[offset : offset + length]
    rule = proxy.drop(2, match=_on_key("GET"), after_bytes=after_bytes)
    with pytest.raises(TransientBackendError, match="could not be reached"):
        backend.get(NAME, offset, length)
    assert rule.fired == 1  # one request: the headers and part of the body came, then nothing
    sleeps: list[float] = []
    assert compose(backend, sleep=sleeps.append).get(NAME, offset, length) == expected
    gets = _since(proxy, 0, _on_key("GET"))
    assert [s.fault for s in gets[-3:]] == [rule.name, rule.name, None] and len(sleeps) == 1


@pytest.mark.parametrize(
    ("operation", "phase"),
    [
        ("stat", "response"),  # cut inside a HEAD answer's headers
        ("get", "headers"),  # http.client reads the cut as the end of the headers
        ("list", "headers"),
        ("list", "response"),
        ("put", "request"),  # cut while the body is sent: nothing reaches the server
        ("put", "lost_reply"),  # carried out, the answer lost: the retry repeats it
        ("delete", "lost_reply"),
        ("get", "request"),
    ],
)
def test_a_dropped_connection_is_transient_for_every_operation(
    s3: Any, proxy: FaultProxy, operation: str, phase: Phase
) -> None:
    backend = _backend(s3, proxy)
    backend.put(NAME, DATA)
    op = OPERATIONS[operation]
    rule = proxy.drop(2, match=op.match, phase=phase, after_bytes=5)
    # (botocore reads a listing cut mid-body as a 500: S3 may answer 200 with an error inside)
    with pytest.raises(TransientBackendError, match=r"could not be reached|answered 500"):
        op.call(backend)
    sleeps: list[float] = []
    op.call(compose(backend, sleep=sleeps.append))
    assert rule.fired == 2 and len(sleeps) == 1
    assert [s.fault for s in _since(proxy, 0, op.match)][-3:] == [rule.name, rule.name, None]


def test_an_answer_slower_than_the_read_timeout_is_transient(s3: Any, proxy: FaultProxy) -> None:
    backend = _backend(s3, proxy)
    backend.put(NAME, DATA)
    impatient = S3Backend(
        make_client(endpoint_url=proxy.url, region="us-east-1", read_timeout=0.5, **CREDENTIALS),
        BucketAddress.parse(f"s3://{backend.bucket}/store"),
    )
    proxy.delay(1.5, times=1, match=_on_key("GET"))
    started = time.monotonic()
    with pytest.raises(TransientBackendError, match="could not be reached"):
        impatient.get(NAME)
    assert time.monotonic() - started < 1.4  # it gave up on its own, not when the answer came
    assert compose(impatient, sleep=lambda _: None).get(NAME) == DATA


@pytest.mark.parametrize("where", ["part", "part-answer", "complete"])
def test_a_multipart_upload_cut_off_leaves_no_partial_object_and_no_open_upload(
    s3: Any, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    monkeypatch.setattr(s3mod, "MULTIPART_THRESHOLD", 6 << 20)
    monkeypatch.setattr(s3mod, "PART_SIZE", 5 << 20)
    backend = _backend(s3, proxy)
    data = os.urandom(12 << 20)  # three parts

    def second_part(method: str, target: str) -> bool:
        return method == "PUT" and "partNumber=2" in target

    if where == "part":  # the second part's connection is cut 1 MiB into its body
        rule = proxy.drop(1, match=second_part, phase="request", after_bytes=1 << 20)
    elif where == "part-answer":  # the second part is stored; its answer is cut short
        rule = proxy.drop(1, match=second_part, phase="headers")
    else:  # the server completes the upload; its answer is lost
        rule = proxy.drop(
            1, match=lambda m, t: m == "POST" and "uploadId=" in t, phase="lost_reply"
        )
    with pytest.raises(TransientBackendError, match="could not be reached"):
        backend.put("data/ee/big", data)
    assert rule.fired == 1
    assert _since(proxy, 0, lambda m, t: m == "DELETE" and "uploadId=" in t)  # the abort
    direct = s3.client()  # asked of the server itself, not through the proxy
    try:
        assert not direct.list_multipart_uploads(Bucket=backend.bucket).get("Uploads")
        listed = direct.list_objects_v2(Bucket=backend.bucket).get("Contents", [])
        # No object, or (the completion was carried out) the whole one: never a part of it.
        assert [item["Size"] for item in listed] in ([], [len(data)])
        if where != "complete":
            assert listed == []
            with pytest.raises(ObjectMissing):
                backend.stat("data/ee/big")
        else:
            assert backend.get("data/ee/big") == data

        compose(backend, sleep=lambda _: None).put("data/ee/big", data)
        assert backend.get("data/ee/big") == data
        assert not direct.list_multipart_uploads(Bucket=backend.bucket).get("Uploads")
    finally:
        direct.close()


def test_an_upload_whose_creation_answer_was_lost_is_aborted_by_the_sweep(
    s3: Any, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3mod, "MULTIPART_THRESHOLD", 6 << 20)
    monkeypatch.setattr(s3mod, "PART_SIZE", 5 << 20)
    backend = _backend(s3, proxy)
    data = os.urandom(12 << 20)
    # The server creates the upload; its answer (the upload's id) never comes back.
    rule = proxy.drop(1, match=_creates_upload, phase="lost_reply")
    compose(backend, sleep=lambda _: None).put("data/ee/big", data)  # the retry succeeds
    assert rule.fired == 1 and backend.get("data/ee/big") == data
    direct = s3.client()
    try:
        (orphan,) = direct.list_multipart_uploads(Bucket=backend.bucket)["Uploads"]
        assert orphan["Key"] == "store/data/ee/big"  # nothing could abort it: billed forever
        began = orphan["Initiated"]  # moto says 2010-11-10 of every upload: the clock follows
        assert backend.abort_abandoned_uploads(now=began + timedelta(hours=23)) == ()
        aborted = backend.abort_abandoned_uploads(now=began + timedelta(hours=25))
        assert [(u.name, u.upload_id) for u in aborted] == [("data/ee/big", orphan["UploadId"])]
        assert not direct.list_multipart_uploads(Bucket=backend.bucket).get("Uploads")
    finally:
        direct.close()
    assert _since(proxy, 0, lambda m, t: m == "DELETE" and orphan["UploadId"] in t)
    assert backend.get("data/ee/big") == data  # the object it was for is untouched


def test_a_sweep_never_aborts_an_upload_this_process_is_carrying_out(
    s3: Any, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3mod, "MULTIPART_THRESHOLD", 6 << 20)
    monkeypatch.setattr(s3mod, "PART_SIZE", 5 << 20)
    writer = _backend(s3, proxy)
    writer.put("index/aa", b"swept before its first write")
    data = os.urandom(12 << 20)
    proxy.delay(1.0, match=lambda m, t: m == "PUT" and "partNumber=" in t)  # parts held
    errors: list[BaseException] = []

    def put() -> None:
        try:
            writer.put("data/ee/big", data)
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    thread = threading.Thread(target=put)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not _since(proxy, 0, lambda m, t: m == "PUT" and "partNumber=" in t):
            assert time.monotonic() < deadline, "the upload never sent a part"
            time.sleep(0.01)
        # To the bucket (moto) it began in 2010; this process knows it is alive.
        sweeper = _open(s3, proxy, writer.bucket)
        assert len(sweeper.open_uploads()) == 1
        assert sweeper.abort_abandoned_uploads() == ()
    finally:
        thread.join(30)
    assert not errors and writer.get("data/ee/big") == data


# --- the checks at open -------------------------------------------------------------------------

#: Retries at open kept short in time, by configuration: no test waits seconds for a backoff.
QUICK = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)


def _open(s3: Any, proxy: FaultProxy, bucket: str, **options: Any) -> S3Backend:
    backend = open_backend(
        "s3_bucket", f"s3://{bucket}/store", **s3.options(endpoint_url=proxy.url, **options)
    )
    assert isinstance(backend, S3Backend)
    return backend


#: A fault struck three times on one of the requests made at open: which, and the rule.
OPEN_FAULTS: dict[str, tuple[Match, Callable[[FaultProxy], Rule]]] = {
    "HeadBucket SlowDown": (HEAD_BUCKET, lambda p: p.fail(3, match=HEAD_BUCKET)),
    "HeadBucket 500": (
        HEAD_BUCKET,
        lambda p: p.fail(3, status=500, code="InternalError", match=HEAD_BUCKET),
    ),
    "HeadBucket lost reply": (
        HEAD_BUCKET,
        lambda p: p.drop(3, match=HEAD_BUCKET, phase="lost_reply"),
    ),
    "lock settings 500": (
        LOCK_SETTINGS,
        lambda p: p.fail(3, status=500, code="InternalError", match=LOCK_SETTINGS),
    ),
    "lock settings cut": (
        LOCK_SETTINGS,
        lambda p: p.drop(3, match=LOCK_SETTINGS, phase="request"),
    ),
}


@pytest.mark.parametrize("fault", sorted(OPEN_FAULTS))
def test_the_checks_at_open_are_retried_through_throttling_and_dropped_connections(
    s3: Any, proxy: FaultProxy, fault: str
) -> None:
    bucket = s3.bucket(lock=True)
    match, strike = OPEN_FAULTS[fault]
    rule = strike(proxy)
    backend = _open(s3, proxy, bucket, lock_mode="COMPLIANCE", open_retries=QUICK)
    assert rule.fired == 3
    seen = _since(proxy, 0, match)
    assert [s.fault for s in seen] == [rule.name] * 3 + [None] and seen[-1].status == 200
    backend.put(NAME, DATA)
    assert backend.get(NAME) == DATA


@pytest.mark.parametrize(
    ("status", "code", "words"),
    [
        (503, "SlowDown", "is throttling requests (503)"),
        (500, "InternalError", "keeps failing (500)"),
    ],
)
def test_a_bucket_that_keeps_failing_its_checks_at_open_is_unavailable_in_bounded_time(
    s3: Any, proxy: FaultProxy, status: int, code: str, words: str
) -> None:
    bucket = s3.bucket()
    proxy.fail(None, status=status, code=code, match=HEAD_BUCKET)
    started = time.monotonic()
    with pytest.raises(LocationUnavailable) as caught:
        _open(s3, proxy, bucket, open_retries=QUICK)
    assert time.monotonic() - started < 5
    message = caught.value.message
    assert message.startswith(f"bucket {bucket} {words}: HeadBucket was tried 4 time(s) over")
    assert message.endswith("the location is unavailable until it answers")
    assert caught.value.details["attempts"] == 4
    assert [s.fault for s in _since(proxy, 0, HEAD_BUCKET)] == [f"{status} {code}"] * 4
    proxy.clear()
    assert _open(s3, proxy, bucket, open_retries=QUICK)  # it answers again: available


def test_a_location_that_keeps_throttling_at_open_goes_offline_and_a_throttled_one_opens(
    s3: Any, proxy: FaultProxy, tmp_path: Path
) -> None:
    app, _ = new_appliance(tmp_path / "app", pack_size=256 << 10)
    try:
        point = app.backup_files(str(random_tree(tmp_path / "tree", 2, 100_000)), "docs").point.id
        bucket = s3.bucket()
        # The location's own options (JSON in the catalog): short retries at open.
        quick = {"attempts": 3, "base_delay": 0.01, "max_delay": 0.02}
        options = s3.options(endpoint_url=proxy.url, open_retries=quick)
        app.add_location(f"s3://{bucket}/p", kind="s3_bucket", label="b", options=options)
        forever = proxy.fail(None, match=HEAD_BUCKET)
        with pytest.raises(LocationUnavailable, match="is throttling requests") as caught:
            app.copy_point(point, "b")
        assert "HeadBucket was tried 3 time(s)" in caught.value.message
        assert forever.fired == 3 and not app.find_location("b").online

        proxy.clear()
        rule = proxy.fail(2, match=HEAD_BUCKET)
        assert app.copy_point(point, "b")["packs_copied"] > 0
        assert rule.fired == 2 and app.find_location("b").online
        assert app.verify_copy(point, "b")["ok"]
    finally:
        app.close()


# --- refused credentials, missing objects ---------------------------------------------------------

#: Words of the bucket's own message for each code (the proxy sends S3's).
WORDS = {
    "InvalidAccessKeyId": "does not exist in our records",
    "ExpiredToken": "has expired",
    "SignatureDoesNotMatch": "does not match the signature",
}


@pytest.mark.parametrize("code", sorted(WORDS))
def test_refused_credentials_make_the_location_unavailable(
    s3: Any, proxy: FaultProxy, code: str
) -> None:
    backend = _backend(s3, proxy)
    backend.put(NAME, DATA)
    proxy.fail(None, status=403, code=code)
    sleeps: list[float] = []
    retrying = compose(backend, sleep=sleeps.append)
    for operation in OPERATIONS.values():
        for target in (backend, retrying):
            with pytest.raises(LocationUnavailable) as caught:
                operation.call(target)
            message = caught.value.message
            # In words: the bucket's own sentence, or (a HEAD answer has no body) ours.
            assert WORDS[code] in message or "refuses these credentials" in message, message
            assert backend.describe() in message
    with pytest.raises(LocationUnavailable):
        backend.warm_up([NAME])
    assert sleeps == []  # permanent: never retried
    heads = len(_since(proxy, 0, HEAD_BUCKET))
    with pytest.raises(LocationUnavailable, match="refuses these credentials"):
        open_backend("s3_bucket", str(backend.address), **s3.options(endpoint_url=proxy.url))
    assert len(_since(proxy, 0, HEAD_BUCKET)) == heads + 1  # not retried at open either
    # The realistic status of an expired token is 400; with a body, the code still tells.
    proxy.clear()
    proxy.fail(None, status=400, code="ExpiredToken")
    with pytest.raises(LocationUnavailable, match="has expired"):
        backend.get(NAME)
    with pytest.raises(LocationUnavailable, match="an expired session token"):  # HEAD: no body
        open_backend("s3_bucket", str(backend.address), **s3.options(endpoint_url=proxy.url))
    proxy.clear()
    assert backend.get(NAME) == DATA


def test_a_real_server_refusing_the_credentials_makes_the_location_unavailable_at_once(
    s3: Any,
) -> None:
    # moto's server authenticating every request knows no key: these credentials are refused
    # by the server itself, not by the proxy.
    with s3_server(authenticate=True) as refusing, fault_proxy(refusing.endpoint) as proxy:
        started = time.monotonic()
        with pytest.raises(LocationUnavailable) as caught:
            open_backend(
                "s3_bucket", "s3://some-bucket/store", **s3.options(endpoint_url=proxy.url)
            )
        assert time.monotonic() - started < 5
        assert caught.value.message.startswith(
            "bucket some-bucket refuses these credentials (403 to HeadBucket: a wrong or "
            "expired key, or no s3:ListBucket permission)"
        )
        assert [(s.method, s.status) for s in proxy.requests] == [("HEAD", 403)]  # once
        raw = S3Backend(
            make_client(endpoint_url=proxy.url, region="us-east-1", **CREDENTIALS),
            BucketAddress.parse("s3://some-bucket/store"),
        )
        try:
            with pytest.raises(LocationUnavailable, match="does not exist in our records"):
                raw.get(NAME)  # a GET's answer has a body: the server's own words
        finally:
            raw.close()


def test_a_missing_object_is_missing_and_not_retried(s3: Any, proxy: FaultProxy) -> None:
    backend = _backend(s3, proxy)
    sleeps: list[float] = []
    retrying = compose(backend, sleep=sleeps.append)
    for target in (backend, retrying):
        with pytest.raises(ObjectMissing, match="does not exist"):
            target.get("data/ff/none")
        with pytest.raises(ObjectMissing):
            target.get("data/ff/none", 5, 10)
        with pytest.raises(ObjectMissing):
            target.stat("data/ff/none")
    assert sleeps == []
    asked = _since(proxy, 0, lambda m, t: "/data/ff/none" in t)
    assert [(s.method, s.status) for s in asked] == [("GET", 404), ("GET", 404), ("HEAD", 404)] * 2


# --- the proxy itself ---------------------------------------------------------------------------


def test_the_proxy_forwards_chunked_bodies_and_keeps_connections_alive(
    s3: Any, proxy: FaultProxy
) -> None:
    bucket = s3.bucket()
    pieces = [b"a" * 1000, os.urandom(70_000), b"z"]
    signer = make_client(endpoint_url=proxy.url, region="us-east-1", **CREDENTIALS)
    try:  # presigned (query-string) requests: the body goes unsigned, chunked by http.client
        urls = {
            method: urlsplit(
                signer.generate_presigned_url(
                    operation, Params={"Bucket": bucket, "Key": "chunked"}, ExpiresIn=600
                )
            )
            for method, operation in (
                ("PUT", "put_object"),
                ("HEAD", "head_object"),
                ("GET", "get_object"),
            )
        }
    finally:
        signer.close()

    def target(method: str) -> str:
        return f"{urls[method].path}?{urls[method].query}"

    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        conn.request("PUT", target("PUT"), body=iter(pieces), encode_chunked=True)
        answer = conn.getresponse()
        assert answer.status == 200, answer.read()
        answer.read()
        conn.request("HEAD", target("HEAD"))
        answer = conn.getresponse()
        assert answer.status == 200 and answer.read() == b""
        assert int(answer.headers["Content-Length"]) == sum(map(len, pieces))
        conn.request("GET", target("GET"))
        answer = conn.getresponse()
        assert answer.status == 200 and answer.read() == b"".join(pieces)
    finally:
        conn.close()
    seen = _since(proxy, 0, lambda m, t: t.startswith(f"/{bucket}/chunked?"))
    assert [s.method for s in seen] == ["PUT", "HEAD", "GET"]
    assert len({s.connection for s in seen}) == 1  # one connection for the three

    backend = _backend(s3, proxy)
    for i in range(5):
        backend.put(f"data/aa/{i}", b"x")
    puts = _since(proxy, 0, lambda m, t: m == "PUT" and "/store/data/aa/" in t)
    assert len(puts) == 5 and len({s.connection for s in puts}) == 1  # boto3 kept it too
