"""A small HTTP/1.1 proxy on 127.0.0.1 that injects faults between boto3 and the S3 test server.

The tests start it in their own process (threads, no child process) in front of moto's server
(``s3_support``) and point a bucket location's ``endpoint_url`` at :attr:`FaultProxy.url`. Every
request is forwarded byte for byte unless a rule set from the test says otherwise. HTTP/1.1 as
boto3 speaks it: the client's connection is kept alive (moto's server closes its own after each
answer; the proxy reconnects); request bodies by ``Content-Length`` or ``Transfer-Encoding:
chunked`` (``aws-chunked`` uploads travel that way; boto3 sends them only over HTTPS, and to
``http://127.0.0.1`` sends ``Content-Length`` with an ``x-amz-checksum-sha256`` header); the
proxy itself answers ``Expect: 100-continue`` (``UploadPart`` asks it); no body for ``HEAD``,
1xx, 204 and 304 answers. The rules:

- :meth:`FaultProxy.fail` answers matching requests itself with an S3 error (status, XML body
  with ``Code`` and ``Message``; none for ``HEAD``, as S3 does), without forwarding them;
- :meth:`FaultProxy.drop` closes the connection mid-request (nothing forwarded), inside the
  answer's headers, mid-body, or after the server carried the request out but before any of
  its answer;
- :meth:`FaultProxy.delay` holds matching requests for a while before forwarding them.

A rule's ``match(method, target)`` sees the request target as sent (path and query, e.g.
``/bucket/p/data/ab/cd?partNumber=2&uploadId=...``); ``every=n`` strikes every n-th matching
request, ``times`` bounds how often it strikes (``None``: forever). :attr:`FaultProxy.requests`
records every request with the fault it met and the status the client got.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import socketserver
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Literal
from urllib.parse import urlsplit

Match = Callable[[str, str], bool]
Phase = Literal["request", "headers", "response", "lost_reply"]
_MAX_LINE = 65536


def any_request(method: str, target: str) -> bool:
    return True


@dataclass
class Seen:
    """One request as the proxy saw it: ``fault`` is the rule that struck it (``None``:
    forwarded untouched), ``status`` the status the client was sent (``None``: dropped before
    any answer)."""

    method: str
    path: str
    #: The client connection it came on (numbered from 1): keep-alive reuses one.
    connection: int
    fault: str | None = None
    status: int | None = None


@dataclass
class Rule:
    kind: Literal["fail", "drop", "delay"]
    match: Match
    times: int | None
    every: int = 1
    status: int = 503
    code: str = "SlowDown"
    message: str = ""
    phase: Phase = "response"
    after_bytes: int = 0
    seconds: float = 0.0
    matched: int = 0
    #: How often the rule struck.
    fired: int = 0

    @property
    def name(self) -> str:
        if self.kind == "fail":
            return f"{self.status} {self.code}"
        if self.kind == "drop":
            return f"drop {self.phase} after {self.after_bytes}"
        return f"delay {self.seconds}"

    def strikes(self, method: str, target: str) -> bool:
        """Whether this request is struck (counts it; the caller holds the proxy's lock)."""
        if self.times is not None and self.fired >= self.times:
            return False
        if not self.match(method, target):
            return False
        self.matched += 1
        if self.matched % self.every:
            return False
        self.fired += 1
        return True


class _Dropped(Exception):
    """The proxy closed the client's connection on purpose."""


class FaultProxy:
    """See the module docstring. Use :func:`fault_proxy` to run one for a block."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        if parts.hostname != "127.0.0.1" or parts.port is None:
            raise ValueError(f"the proxy only forwards to 127.0.0.1:PORT, not {upstream!r}")
        self.upstream = ("127.0.0.1", parts.port)
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._seen: list[Seen] = []
        self._sockets: set[socket.socket] = set()
        self._connections = itertools.count(1)
        self._busy = 0  # requests read and not yet answered (or dropped)
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            block_on_close = False
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},  # stop() waits for the loop's next look
            name="s3-fault-proxy",
            daemon=True,
        )

    # --- control from the test ---

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        self._thread.join(10)

    def _add(self, rule: Rule) -> Rule:
        if rule.every < 1:
            raise ValueError("every must be at least 1")
        with self._lock:
            self._rules.append(rule)
        return rule

    def fail(
        self,
        times: int | None = 1,
        *,
        status: int = 503,
        code: str = "SlowDown",
        message: str = "",
        match: Match = any_request,
        every: int = 1,
    ) -> Rule:
        """Answer matching requests with an S3 error instead of forwarding them."""
        return self._add(
            Rule(
                "fail",
                match,
                times,
                every,
                status=status,
                code=code,
                message=message or _MESSAGES.get(code, code),
            )
        )

    def drop(
        self,
        times: int | None = 1,
        *,
        match: Match = any_request,
        phase: Phase = "response",
        after_bytes: int = 0,
        every: int = 1,
    ) -> Rule:
        """Close the client's connection: ``request``: mid-request, after reading
        ``after_bytes`` of its body (nothing is forwarded); ``headers``: inside the answer's
        headers, after its status line; ``response``: mid-response, after the headers and
        ``after_bytes`` of the body (an answer without a body, such as ``HEAD``'s, is cut as
        ``headers``); ``lost_reply``: the server carries the request out and the connection
        closes before any of its answer."""
        return self._add(Rule("drop", match, times, every, phase=phase, after_bytes=after_bytes))

    def delay(
        self, seconds: float, *, times: int | None = None, match: Match = any_request
    ) -> Rule:
        """Hold matching requests ``seconds`` before forwarding them."""
        return self._add(Rule("delay", match, times, seconds=seconds))

    def clear(self) -> None:
        """Remove every rule (what was recorded stays)."""
        with self._lock:
            self._rules.clear()

    @property
    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no request is in hand (a delayed one of a killed client may still be
        forwarded)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._busy == 0:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the proxy still has {self._busy} request(s) in hand")
            time.sleep(0.02)

    def count(self, method: str | None = None, match: Match = any_request) -> int:
        return sum(
            1
            for seen in self.requests
            if (method is None or seen.method == method) and match(seen.method, seen.path)
        )

    # --- the connection loop ---

    def _decide(self, method: str, target: str, connection: int) -> tuple[Seen, list[Rule]]:
        """The delays and the (first) fault that strike this request, recorded."""
        with self._lock:
            struck: list[Rule] = []
            for rule in self._rules:
                faulted = any(r.kind != "delay" for r in struck)
                if (rule.kind == "delay" or not faulted) and rule.strikes(method, target):
                    struck.append(rule)
            fault = next((r.name for r in struck if r.kind != "delay"), None)
            seen = Seen(method, target, connection, fault)
            self._seen.append(seen)
        return seen, struck

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._sockets.add(sock)
            else:
                self._sockets.discard(sock)

    def _serve(self, client: socket.socket) -> None:
        self._track(client, True)
        connection = next(self._connections)
        upstream = _Upstream(self.upstream, self._track)
        reader = client.makefile("rb")
        try:
            while True:
                line = reader.readline(_MAX_LINE)
                if not line:
                    return
                if line in (b"\r\n", b"\n"):
                    continue
                with self._lock:
                    self._busy += 1
                try:
                    if not self._exchange(client, reader, upstream, connection, line):
                        return
                finally:
                    with self._lock:
                        self._busy -= 1
        except (_Dropped, OSError, ValueError):
            return
        finally:
            upstream.close()
            reader.close()
            with contextlib.suppress(OSError):
                client.close()
            self._track(client, False)

    def _exchange(
        self,
        client: socket.socket,
        reader: BinaryIO,
        upstream: _Upstream,
        connection: int,
        line: bytes,
    ) -> bool:
        """Handle one request; whether the client's connection stays open for another."""
        method, target, _version = line.decode("latin-1").split()
        headers = _read_headers(reader)
        seen, struck = self._decide(method, target, connection)
        for rule in struck:
            if rule.kind == "delay":
                time.sleep(rule.seconds)
        fault = next((r for r in struck if r.kind != "delay"), None)
        expect = _header(headers, "expect").lower() == "100-continue"
        headers = [(k, v) for k, v in headers if k.lower() != "expect"]
        if fault is not None and fault.kind == "fail":
            if expect:  # the body is never sent: answer and close
                seen.status = fault.status
                _send_error(client, method, fault, close=True)
                return False
            _read_body(reader, headers)
            seen.status = fault.status
            _send_error(client, method, fault, close=False)
            return True
        if expect:
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if fault is not None and fault.phase == "request":
            _read_body(reader, headers, limit=fault.after_bytes)
            _abort(client)
            raise _Dropped
        body = _read_body(reader, headers)
        answer = upstream.exchange(method, target, headers, body)
        if not answer.reusable:
            upstream.close()
        # Hop-by-hop: the client's connection is kept alive whenever the body has a known
        # end, whatever the server does with the proxy's own connection.
        keep = answer.delimited and _header(headers, "connection").lower() != "close"
        response_head = answer.head(keep_alive=keep)
        if fault is not None:  # a drop mid-response, or before any of it
            if fault.phase == "response" and answer.has_body:
                client.sendall(response_head + answer.body[: fault.after_bytes])
            elif fault.phase != "lost_reply":  # cut inside the headers
                client.sendall(answer.status_line)
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            raise _Dropped
        seen.status = answer.status  # before it is sent: the test may look at once
        client.sendall(response_head + answer.body)
        return keep


class _Upstream:
    """One keep-alive connection to the S3 server, reopened once when it went stale."""

    def __init__(
        self, address: tuple[str, int], track: Callable[[socket.socket, bool], None]
    ) -> None:
        self.address = address
        self._track = track
        self.sock: socket.socket | None = None
        self.reader: BinaryIO | None = None

    def _open(self) -> tuple[socket.socket, BinaryIO]:
        if self.sock is None or self.reader is None:
            self.sock = socket.create_connection(self.address, timeout=60)
            self.reader = self.sock.makefile("rb")
            self._track(self.sock, True)
        return self.sock, self.reader

    def close(self) -> None:
        if self.sock is not None:
            self._track(self.sock, False)
            with contextlib.suppress(OSError):
                self.sock.close()
        if self.reader is not None:
            with contextlib.suppress(OSError):
                self.reader.close()
        self.sock = self.reader = None

    def exchange(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> _Answer:
        """Send one request and read its answer."""
        request = f"{method} {target} HTTP/1.1\r\n".encode("latin-1")
        request += b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers) + b"\r\n"
        for attempt in (1, 2):
            sock, reader = self._open()
            try:
                sock.sendall(request + body)
                line = reader.readline(_MAX_LINE)
                if not line:
                    raise ConnectionResetError("the server closed a kept-alive connection")
                break
            except OSError:
                self.close()  # a stale kept-alive connection: once more on a fresh one
                if attempt == 2:
                    raise
        while True:
            status = int(line.split()[1])
            response_headers = _read_headers(reader)
            if 100 <= status < 200:
                line = reader.readline(_MAX_LINE)
                continue
            break
        answer = _Answer(
            method != "HEAD" and status not in (204, 304),
            line,
            status,
            response_headers,
            b"",
            delimited=True,
            reusable=_header(response_headers, "connection").lower() != "close",
        )
        if not answer.has_body:
            return answer
        if _header(response_headers, "transfer-encoding").lower().endswith("chunked"):
            answer.body = _read_chunked(reader)
        elif _header(response_headers, "content-length"):
            answer.body = _read_exactly(reader, int(_header(response_headers, "content-length")))
        else:  # the body ends when the server closes
            answer.body = reader.read()
            answer.delimited = answer.reusable = False
        return answer


@dataclass
class _Answer:
    has_body: bool
    status_line: bytes
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    delimited: bool
    reusable: bool

    def head(self, *, keep_alive: bool) -> bytes:
        """The status line and headers for the client, with its own ``Connection`` header."""
        kept = [(k, v) for k, v in self.headers if k.lower() not in ("connection", "keep-alive")]
        kept.append(("Connection", "keep-alive" if keep_alive else "close"))
        lines = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in kept)
        return self.status_line + lines + b"\r\n"


# --- HTTP/1.1 framing ---


def _read_headers(reader: BinaryIO) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    while True:
        line = reader.readline(_MAX_LINE)
        if not line:
            raise ConnectionResetError("the connection closed inside the headers")
        if line in (b"\r\n", b"\n"):
            return headers
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))


def _header(headers: list[tuple[str, str]], name: str) -> str:
    return next((v for k, v in headers if k.lower() == name), "")


def _read_exactly(reader: BinaryIO, size: int) -> bytes:
    data = reader.read(size)
    if len(data) != size:
        raise ConnectionResetError("the connection closed inside a body")
    return data


def _read_chunked(reader: BinaryIO, limit: int | None = None) -> bytes:
    """A chunked body as it was sent (chunk sizes, extensions and trailers included), or its
    first ``limit`` bytes."""
    raw = bytearray()
    while limit is None or len(raw) < limit:
        line = reader.readline(_MAX_LINE)
        if not line:
            raise ConnectionResetError("the connection closed inside a chunked body")
        raw += line
        size = int(line.split(b";")[0].strip(), 16)
        if size == 0:
            while True:  # trailers (aws-chunked puts its checksum there), then a blank line
                trailer = reader.readline(_MAX_LINE)
                if not trailer:
                    raise ConnectionResetError("the connection closed inside the trailers")
                raw += trailer
                if trailer in (b"\r\n", b"\n"):
                    return bytes(raw)
        raw += _read_exactly(reader, size + 2)
    return bytes(raw[:limit])


def _read_body(reader: BinaryIO, headers: list[tuple[str, str]], limit: int | None = None) -> bytes:
    """The request body (``Content-Length`` or chunked), or its first ``limit`` bytes."""
    if _header(headers, "transfer-encoding").lower().endswith("chunked"):
        return _read_chunked(reader, limit)
    length = int(_header(headers, "content-length") or 0)
    if limit is not None:
        length = min(length, limit)
    return _read_exactly(reader, length)


def _abort(sock: socket.socket) -> None:
    """Close with a reset: the peer's pending send fails at once."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


_MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "InternalError": "We encountered an internal error. Please try again.",
    "ServiceUnavailable": "Service is unable to handle request.",
    "InvalidAccessKeyId": "The AWS Access Key Id you provided does not exist in our records.",
    "ExpiredToken": "The provided token has expired.",
    "SignatureDoesNotMatch": "The request signature we calculated does not match the signature "
    "you provided.",
}

_REASONS = {403: "Forbidden", 404: "Not Found", 500: "Internal Server Error", 503: "Slow Down"}


def _send_error(client: socket.socket, method: str, rule: Rule, *, close: bool) -> None:
    request_id = uuid.uuid4().hex[:16].upper()
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{rule.code}</Code><Message>{rule.message}</Message>"
        f"<RequestId>{request_id}</RequestId></Error>"
    ).encode()
    body = b"" if method == "HEAD" else xml
    head = (
        f"HTTP/1.1 {rule.status} {_REASONS.get(rule.status, 'Error')}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"x-amz-request-id: {request_id}\r\n"
        f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    ).encode()
    client.sendall(head + body)


@contextlib.contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    """A proxy in front of ``upstream`` (``http://127.0.0.1:PORT``) for the block."""
    proxy = FaultProxy(upstream).start()
    try:
        yield proxy
    finally:
        proxy.stop()


__all__ = ["FaultProxy", "Rule", "Seen", "any_request", "fault_proxy"]
