"""Boot proofs: how the appliance knows a failed-over VM really booted.

``query-status`` only says QEMU runs, not that the guest booted. A proof is a set of checks that
must *all* pass before the timeout; each is configured per asset:

``serial``
    a regular expression that a line of the serial console must match;
``tcp``
    a guest TCP port that accepts a connection and keeps it open (through a port forward on
    127.0.0.1: user-mode networking accepts on the host side even when the guest does not listen,
    and then closes the connection at once; so "open and not closed" is the test);
``http``
    a guest port and path answering HTTP 2xx (and containing ``expect`` when set);
``agent``
    the QEMU guest agent answering ``guest-sync``;
``screen_stable``
    the console screenshot, non-blank, unchanged for this many seconds.

With no check configured, the proof is ``screen_stable`` for 5 s (the only generic one).

A failed proof names every check that had not passed, and why.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import socket
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from appliance.errors import InvalidInput

DEFAULT_TIMEOUT = 180.0
DEFAULT_SCREEN_STABLE = 5.0


@dataclass(frozen=True)
class BootProofSpec:
    """What proves a boot (see the module docstring). All configured checks must pass."""

    serial: str | None = None
    tcp: int | None = None
    http_port: int | None = None
    http_path: str = "/"
    http_expect: str | None = None
    agent: bool = False
    screen_stable: float | None = None
    timeout: float = DEFAULT_TIMEOUT
    #: The guest's address for TCP/HTTP checks of a bridged failover (isolated ones use forwards).
    address: str | None = None

    def __post_init__(self) -> None:
        if self.serial is not None:
            try:
                re.compile(self.serial)
            except re.error as exc:
                raise InvalidInput(
                    f"boot proof: bad serial pattern {self.serial!r}: {exc}"
                ) from exc
        for port in (self.tcp, self.http_port):
            if port is not None and not 1 <= port <= 65535:
                raise InvalidInput(f"boot proof: {port} is not a TCP port")
        if self.timeout <= 0:
            raise InvalidInput("boot proof: the timeout must be positive")
        if not self.http_path.startswith("/"):
            raise InvalidInput("boot proof: the HTTP path must start with /")

    @property
    def empty(self) -> bool:
        return (
            self.serial is None
            and self.tcp is None
            and self.http_port is None
            and not self.agent
            and self.screen_stable is None
        )

    def effective(self) -> BootProofSpec:
        """This spec, or the generic screen check when nothing is configured."""
        if not self.empty:
            return self
        return BootProofSpec(
            screen_stable=DEFAULT_SCREEN_STABLE, timeout=self.timeout, address=self.address
        )

    def guest_ports(self) -> list[int]:
        """Guest TCP ports the checks reach (they need port forwards)."""
        ports = [p for p in (self.http_port, self.tcp) if p is not None]
        return sorted(set(ports))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> BootProofSpec:
        data = dict(data or {})
        http = data.pop("http", None)
        if isinstance(http, dict):
            data.setdefault("http_port", http.get("port"))
            data.setdefault("http_path", http.get("path", "/"))
            data.setdefault("http_expect", http.get("expect"))
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise InvalidInput(f"boot proof: unknown settings {', '.join(sorted(unknown))}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise InvalidInput(f"boot proof: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "tcp": self.tcp,
            "http_port": self.http_port,
            "http_path": self.http_path,
            "http_expect": self.http_expect,
            "agent": self.agent,
            "screen_stable": self.screen_stable,
            "timeout": self.timeout,
            "address": self.address,
        }


class Check(Protocol):
    name: str
    passed_at: float | None
    #: True when a poll connects into the guest (its network or agent), False when it only
    #: reads what QEMU wrote (serial log, screen).
    reaches_guest: bool

    def poll(self, now: float) -> bool:
        """Try once (quickly); True once the check has passed."""
        ...

    def failure(self) -> str:
        """Why the check has not passed."""
        ...


def poll_checks(checks: Sequence[Check], now: float) -> list[Check]:
    """Poll every check once; returns those that have not passed.

    Checks that reach into the guest (TCP, HTTP, agent: ``reaches_guest``) are tried only once
    the others (serial console, screen) have passed. All must pass anyway, and a connection
    tried while the guest is still booting costs a slirp connection in QEMU and can hold this
    loop for its whole timeout, which then delays the proof after the guest is ready.
    """
    local_pending = [c for c in checks if not c.reaches_guest and not c.poll(now)]
    pending = list(local_pending)
    for check in checks:
        if check.reaches_guest and (local_pending or not check.poll(now)):
            pending.append(check)
    return pending


class SerialCheck:
    def __init__(self, log_path: str, pattern: str) -> None:
        self.name = "serial"
        self.reaches_guest = False
        self.log_path = log_path
        self.pattern = re.compile(pattern)
        self.passed_at: float | None = None
        self.matched = ""
        self._offset = 0
        self._pending = ""

    def poll(self, now: float) -> bool:
        if self.passed_at is not None:
            return True
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return False
        self._offset += len(data)
        text = self._pending + data.decode("utf-8", "replace")
        lines = text.split("\n")
        self._pending = lines.pop()  # an unfinished line is matched once it is complete
        for line in [*lines, self._pending]:
            found = self.pattern.search(line.rstrip("\r"))
            if found:
                self.matched = line.strip()
                self.passed_at = now
                return True
        return False

    def failure(self) -> str:
        return f"serial console never printed a line matching {self.pattern.pattern!r}"


class TcpCheck:
    def __init__(self, host: str, port: int, guest_port: int) -> None:
        self.name = "tcp"
        self.reaches_guest = True
        self.host = host
        self.port = port
        self.guest_port = guest_port
        self.passed_at: float | None = None
        self.last_error = "not tried"

    def poll(self, now: float) -> bool:
        if self.passed_at is not None:
            return True
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                sock.settimeout(0.3)
                try:
                    data = sock.recv(1)
                except TimeoutError:
                    data = None  # open and quiet: the guest accepted
                if data == b"":
                    self.last_error = "connection closed at once (nothing listens in the guest)"
                    return False
        except OSError as exc:
            self.last_error = str(exc)
            return False
        self.passed_at = now
        return True

    def failure(self) -> str:
        return f"guest TCP port {self.guest_port} never answered ({self.last_error})"


class HttpCheck:
    def __init__(self, host: str, port: int, guest_port: int, path: str, expect: str | None):
        self.name = "http"
        self.reaches_guest = True
        self.host = host
        self.port = port
        self.guest_port = guest_port
        self.path = path
        self.expect = expect
        self.passed_at: float | None = None
        self.last_error = "not tried"
        self.body = ""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    def poll(self, now: float) -> bool:
        if self.passed_at is not None:
            return True
        conn = http.client.HTTPConnection(self.host, self.port, timeout=2.0)
        try:
            conn.request("GET", self.path)
            response = conn.getresponse()
            body = response.read(65536).decode("utf-8", "replace")
            if not 200 <= response.status < 300:
                self.last_error = f"HTTP {response.status}"
                return False
            if self.expect is not None and self.expect not in body:
                self.last_error = f"the page does not contain {self.expect!r}"
                return False
            self.body = body
        except (OSError, http.client.HTTPException) as exc:
            self.last_error = str(exc) or type(exc).__name__
            return False
        finally:
            conn.close()
        self.passed_at = now
        return True

    def failure(self) -> str:
        return f"{self.url} (guest port {self.guest_port}) never answered ({self.last_error})"


class AgentCheck:
    def __init__(self, socket_path: str) -> None:
        self.name = "agent"
        self.reaches_guest = True
        self.socket_path = socket_path
        self.passed_at: float | None = None
        self.last_error = "not tried"
        self._sync_id = int(time.time()) & 0xFFFFFF

    def poll(self, now: float) -> bool:
        if self.passed_at is not None:
            return True
        self._sync_id += 1
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1.0)
                sock.connect(self.socket_path)
                request = {"execute": "guest-sync", "arguments": {"id": self._sync_id}}
                sock.sendall(b"\xff" + json.dumps(request).encode() + b"\n")
                buffer = b""
                while b"\n" not in buffer:
                    data = sock.recv(4096)
                    if not data:
                        break
                    buffer += data
            for line in buffer.splitlines():
                with contextlib.suppress(ValueError):
                    if json.loads(line.strip(b"\xff")).get("return") == self._sync_id:
                        self.passed_at = now
                        return True
            self.last_error = "no answer to guest-sync"
        except OSError as exc:
            self.last_error = str(exc)
        return False

    def failure(self) -> str:
        return f"the QEMU guest agent never answered ({self.last_error})"


class ScreenStableCheck:
    """Passes when ``capture()``'s PNG is non-blank and unchanged for ``seconds``."""

    def __init__(self, capture: Any, seconds: float, interval: float = 1.0) -> None:
        self.name = "screen_stable"
        self.reaches_guest = False
        self.capture = capture  # () -> bytes of a PNG, or None when no screenshot could be taken
        self.seconds = seconds
        self.interval = interval
        self.passed_at: float | None = None
        self._digest: bytes | None = None
        self._since = 0.0
        self._last_try = 0.0
        self.last_state = "no screenshot yet"

    def poll(self, now: float) -> bool:
        if self.passed_at is not None:
            return True
        if now - self._last_try < self.interval:
            return False
        self._last_try = now
        data = self.capture()
        if not data:
            self.last_state = "no screenshot could be taken"
            return False
        digest = hashlib.sha256(data).digest()
        if digest != self._digest:
            self._digest = digest
            self._since = now
            self.last_state = "the screen was still changing"
            return False
        if png_is_blank(data):
            self.last_state = "the screen stayed blank"
            return False
        if now - self._since >= self.seconds:
            self.passed_at = now
            return True
        return False

    def failure(self) -> str:
        return f"the screen never stayed unchanged for {self.seconds:g} s ({self.last_state})"


# --- PNG inspection ------------------------------------------------------------------------------


def png_pixels(data: bytes) -> tuple[int, int, int, bytes]:
    """(width, height, bytes per pixel, unfiltered pixel rows) of an 8-bit non-interlaced PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos = 8
    width = height = bpp = 0
    idat = bytearray()
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if depth != 8 or interlace:
                raise ValueError("only 8-bit, non-interlaced PNGs are inspected")
            bpp = {0: 1, 2: 3, 4: 2, 6: 4}.get(color, 0)
            if not bpp:
                raise ValueError(f"PNG colour type {color} is not inspected")
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    raw = zlib.decompress(bytes(idat))
    stride = width * bpp
    out = bytearray(stride * height)
    prev = bytearray(stride)
    for y in range(height):
        filter_type = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        if filter_type == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif filter_type == 2:
            for i in range(stride):
                line[i] = (line[i] + prev[i]) & 0xFF
        elif filter_type == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif filter_type == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b = prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                predictor = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + predictor) & 0xFF
        out[y * stride : (y + 1) * stride] = line
        prev = line
    return width, height, bpp, bytes(out)


def png_is_blank(data: bytes) -> bool:
    """True when every pixel of the PNG has the same colour (or it cannot be read)."""
    try:
        _, _, bpp, pixels = png_pixels(data)
    except (ValueError, zlib.error, struct.error):
        return True
    first = pixels[:bpp]
    return pixels == first * (len(pixels) // bpp) if bpp else True


def png_file_is_blank(path: str) -> bool:
    if not os.path.isfile(path):
        return True
    with open(path, "rb") as f:
        return png_is_blank(f.read())
