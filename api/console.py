"""The live console of a failed-over VM: a WebSocket relayed to QEMU's VNC socket, and noVNC.

QEMU serves VNC on a unix socket in the session's directory (no TCP port at all); only this
service reaches it. A browser opens ``/api/failover/{id}/console`` as a WebSocket (subprotocol
``binary``, which noVNC asks for) and :class:`ConsoleRelay` copies bytes both ways, unchanged:
the RFB protocol runs end to end between noVNC and QEMU.

Who may open one, checked before the WebSocket is accepted (a refusal is a plain HTTP answer
with the API's error body):

- the caller is authenticated like any API request: ``Authorization: Bearer`` (scripts) or the
  session cookie (the page: a browser cannot set headers on a WebSocket, but sends cookies);
- a cookie-authenticated handshake must come from this service's own page: its ``Origin`` must
  name the host it was sent to. Browsers send cookies with a WebSocket opened by any site, and
  a WebSocket has no CSRF header, so the origin is what stops another site's page from driving
  a VM with a signed-in operator's cookie;
- admins and operators only: a viewer sees the screenshot, never the keyboard;
- the VM runs under this service, was started with a VNC socket, and has fewer than
  :data:`image.console.MAX_CONSOLES` consoles open.

Opening and closing are audited (``failover.console_opened`` / ``failover.console_closed``: who,
which VM and session, from where, how long, why it closed). A relay ends when either side
closes, when the VM stops (QEMU closes the socket; the session state is also polled), or after
:data:`IDLE_SECONDS` without a byte either way. Half-open connections are found by uvicorn's
WebSocket pings (every 20 s), which end the receive side and so the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from anyio import to_thread
from fastapi import WebSocket
from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.websockets import WebSocketDisconnect

from api.deps import check_credentials
from api.errors import STATUS_BY_CODE, STATUS_BY_KIND, PermissionDenied, error_body
from api.security import Principal, role_allows
from api.service import Service
from appliance.errors import ApplianceError, InvalidInput, NotFound
from image.console import CONSOLE_STATES, ConsoleUnavailable, check_console

#: The noVNC client (Debian package ``novnc``); only its ``core/`` and ``vendor/`` are served.
NOVNC_DIR = Path("/usr/share/novnc")
NOVNC_PACKAGE = "novnc"
NOVNC_PARTS = ("core", "vendor")
#: The WebSocket subprotocol noVNC asks for: binary frames carrying RFB bytes as they are.
SUBPROTOCOL = "binary"
#: A console with no byte either way for this long is closed.
IDLE_SECONDS = 15 * 60.0
#: How often a relay checks that the session still runs.
STATE_POLL_SECONDS = 2.0
READ_SIZE = 64 * 1024


# --- noVNC's files -----------------------------------------------------------------------------


class NovncMissing(NotFound):
    """noVNC is not installed on the appliance."""

    code = "novnc_missing"


def novnc_file(relative: str, root: Path | None = None) -> Path:
    """The noVNC script at ``relative`` (``core/...`` or ``vendor/...``, ``.js`` only), resolved
    inside ``root`` (default :data:`NOVNC_DIR`); a link or ``..`` leading anywhere else is
    refused."""
    root = root if root is not None else NOVNC_DIR
    if not (root / "core" / "rfb.js").is_file():
        raise NovncMissing(
            f"the console needs noVNC: install the Debian package {NOVNC_PACKAGE} "
            f"(apt-get install {NOVNC_PACKAGE})",
            package=NOVNC_PACKAGE,
        )
    parts = relative.split("/")
    if (
        len(parts) < 2
        or parts[0] not in NOVNC_PARTS
        or any(p in ("", ".", "..") or p.startswith(".") for p in parts)
        or not relative.endswith(".js")
    ):
        raise InvalidInput(f"not a noVNC script: {relative[:200]!r}")
    base = (root / parts[0]).resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(base) or not path.is_file():
        raise NotFound(f"noVNC has no script {relative[:200]!r}")
    return path


# --- the handshake -----------------------------------------------------------------------------


def same_origin(origin: str | None, host: str | None) -> bool:
    """Whether an ``Origin`` header names the host the request was sent to (``Host``)."""
    if not origin or not host:
        return False
    parsed = urlsplit(origin)
    return parsed.scheme in ("http", "https") and parsed.netloc.lower() == host.lower()


def handshake_principal(service: Service, websocket: WebSocket) -> Principal:
    """The caller of a WebSocket handshake (a GET), authenticated like an API request."""
    request = Request({**websocket.scope, "type": "http", "method": "GET"})
    principal = check_credentials(service, request)
    if principal.via == "session" and not same_origin(
        websocket.headers.get("origin"), websocket.headers.get("host")
    ):
        raise PermissionDenied(
            "a console opened with the page's sign-in must come from the appliance's own page",
            origin=(websocket.headers.get("origin") or "")[:200],
        )
    if not role_allows(principal.role, "operator"):
        raise PermissionDenied(
            f"the console needs the operator role; you are signed in as {principal.role}",
            needed="operator",
            role=principal.role,
        )
    return principal


async def refuse(websocket: WebSocket, exc: ApplianceError) -> None:
    """Answer the handshake with the API's error body and status instead of accepting it."""
    status = STATUS_BY_CODE.get(exc.code) or STATUS_BY_KIND.get(exc.kind, 500)
    await websocket.send_denial_response(
        JSONResponse(error_body(exc.code, exc.message, exc.details), status_code=status)
    )


# --- open consoles -----------------------------------------------------------------------------


@dataclass
class OpenConsoles:
    """How many consoles each session has open (one per service)."""

    counts: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, session_id: str) -> int:
        with self.lock:
            return self.counts.get(session_id, 0)

    def acquire(self, session_id: str, limit_check: Callable[[int], None]) -> None:
        """Count one more console, after ``limit_check(open now)`` did not raise."""
        with self.lock:
            current = self.counts.get(session_id, 0)
            limit_check(current)
            self.counts[session_id] = current + 1

    def release(self, session_id: str) -> None:
        with self.lock:
            left = self.counts.get(session_id, 0) - 1
            if left > 0:
                self.counts[session_id] = left
            else:
                self.counts.pop(session_id, None)


def open_consoles(websocket: WebSocket) -> OpenConsoles:
    state = websocket.app.state
    consoles = getattr(state, "open_consoles", None)
    if consoles is None:
        consoles = state.open_consoles = OpenConsoles()
    return consoles


@dataclass
class ConsoleTarget:
    """What a console connects to: the VM's session and its VNC socket."""

    session_id: str
    asset: str
    vnc_socket: str
    is_running: Callable[[], bool]


def console_target(service: Service, session_id: str, consoles: OpenConsoles) -> ConsoleTarget:
    """The session's console, counted as open (release it with ``consoles.release``)."""
    record = service.app.catalog.get_failover_session(session_id)  # 404 for an unknown one
    live = service.failovers.live_session(session_id)
    socket = live.process.files.vnc_socket if live is not None else None

    def is_running() -> bool:
        return live is not None and live.state in CONSOLE_STATES and live.qemu_alive()

    consoles.acquire(
        session_id,
        lambda current: check_console(
            session_id,
            state=live.state if live is not None else record.state,
            running_here=is_running(),
            has_socket=socket is not None and os.path.exists(socket),
            open_consoles=current,
        ),
    )
    assert socket is not None
    return ConsoleTarget(session_id, record.asset, socket, is_running)


# --- the relay ---------------------------------------------------------------------------------


def idle_words(seconds: float) -> str:
    if seconds >= 120:
        return f"{round(seconds / 60)} minutes"
    return f"{round(seconds)} second{'' if round(seconds) == 1 else 's'}"


class ConsoleRelay:
    """Copies RFB bytes between one accepted WebSocket and QEMU's VNC socket until one ends."""

    def __init__(
        self,
        websocket: WebSocket,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        target: ConsoleTarget,
        *,
        idle_seconds: float = IDLE_SECONDS,
        poll_seconds: float = STATE_POLL_SECONDS,
    ) -> None:
        self.websocket = websocket
        self.reader = reader
        self.writer = writer
        self.target = target
        self.idle_seconds = idle_seconds
        self.poll_seconds = poll_seconds
        self.last_activity = time.monotonic()
        self.bytes_in = 0  # browser to VM
        self.bytes_out = 0  # VM to browser

    async def _from_browser(self) -> str:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return "the browser closed the console"
            data = message.get("bytes")
            if data is None and message.get("text") is not None:
                data = str(message["text"]).encode()
            if data:
                self.last_activity = time.monotonic()
                self.bytes_in += len(data)
                self.writer.write(data)
                await self.writer.drain()

    async def _from_vm(self) -> str:
        while True:
            data = await self.reader.read(READ_SIZE)
            if not data:
                return "the VM stopped"
            self.last_activity = time.monotonic()
            self.bytes_out += len(data)
            await self.websocket.send_bytes(data)

    async def _watch(self) -> str:
        while True:
            await asyncio.sleep(self.poll_seconds)
            if not self.target.is_running():
                return "the VM stopped"
            if time.monotonic() - self.last_activity >= self.idle_seconds:
                return f"nothing was sent either way for {idle_words(self.idle_seconds)}"

    async def run(self) -> str:
        """Relay until one side ends; returns why (for the audit)."""
        tasks = [
            asyncio.ensure_future(self._from_browser()),
            asyncio.ensure_future(self._from_vm()),
            asyncio.ensure_future(self._watch()),
        ]
        reason = "the console closed"
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.cancelled():
                    continue
                exc = task.exception()
                if exc is None:
                    reason = str(task.result())
                elif isinstance(exc, WebSocketDisconnect | ConnectionError | OSError):
                    reason = "the connection was lost"
                else:
                    reason = f"the relay failed: {type(exc).__name__}"
                break
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
            await self.websocket.close(code=1000, reason=reason[:120])
        return reason


def audit_console(
    service: Service,
    principal: Principal,
    action: str,
    target: ConsoleTarget,
    details: dict[str, Any],
) -> None:
    service.app.catalog.audit(
        principal.name,
        action,
        f"{target.asset} (failover {target.session_id})",
        {"session": target.session_id, "asset": target.asset, **details, **principal.audit_details},
    )


async def serve_console(websocket: WebSocket, service: Service, session_id: str) -> None:
    """One console, from the handshake to the audit of its end."""
    consoles = open_consoles(websocket)
    try:
        principal = await to_thread.run_sync(handshake_principal, service, websocket)
        target = await to_thread.run_sync(console_target, service, session_id, consoles)
    except ApplianceError as exc:
        await refuse(websocket, exc)
        return
    try:
        try:
            reader, writer = await asyncio.open_unix_connection(target.vnc_socket)
        except OSError as exc:
            await refuse(
                websocket,
                ConsoleUnavailable(
                    f"the VM's console does not answer: {exc.strerror or exc}", session=session_id
                ),
            )
            return
        offered = websocket.scope.get("subprotocols") or []
        await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        client = websocket.client.host if websocket.client else "unknown"
        await to_thread.run_sync(
            audit_console, service, principal, "failover.console_opened", target, {"client": client}
        )
        started = time.monotonic()
        relay = ConsoleRelay(
            websocket,
            reader,
            writer,
            target,
            idle_seconds=IDLE_SECONDS,
            poll_seconds=STATE_POLL_SECONDS,
        )
        reason = await relay.run()
        await to_thread.run_sync(
            audit_console,
            service,
            principal,
            "failover.console_closed",
            target,
            {
                "client": client,
                "seconds": round(time.monotonic() - started, 1),
                "reason": reason,
                "bytes_from_browser": relay.bytes_in,
                "bytes_to_browser": relay.bytes_out,
            },
        )
    finally:
        consoles.release(session_id)
