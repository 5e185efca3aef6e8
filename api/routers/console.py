"""The live console of a failed-over VM: the WebSocket relay, keys typed through QMP, noVNC.

The relay and its rules (who, which origin, how many, when it ends) are in :mod:`api.console`;
the text-to-keys mapping in :mod:`image.console`. Every key route is audited with the number of
keys only: pasted text may be a password and never reaches the audit log.
"""

from __future__ import annotations

from fastapi import APIRouter, WebSocket
from fastapi.responses import FileResponse

from api import console
from api.console import NOVNC_PACKAGE, novnc_file, serve_console
from api.deps import Operator, ServiceDep, Viewer
from api.schemas_console import ConsoleKeys, ConsoleKeysPublic, ConsoleStatusPublic
from appliance.errors import InvalidInput
from image.console import (
    CONSOLE_STATES,
    ConsoleUnavailable,
    send_ctrl_alt_del,
    type_text,
)
from image.qmp import QmpError

router = APIRouter(tags=["console"])


@router.websocket("/failover/{session_id}/console")
async def console_socket(websocket: WebSocket, session_id: str) -> None:
    """The VM's screen, keyboard and mouse: RFB (VNC) in binary WebSocket frames (noVNC)."""
    await serve_console(websocket, websocket.app.state.service, session_id)


@router.get("/failover/{session_id}/console", response_model=ConsoleStatusPublic)
def console_status(session_id: str, principal: Viewer, service: ServiceDep) -> ConsoleStatusPublic:
    """Whether the session's console can open now (a plain GET; the console is a WebSocket)."""
    record = service.app.catalog.get_failover_session(session_id)
    live = service.failovers.live_session(session_id)
    reason = None
    if live is None or live.state not in CONSOLE_STATES or not live.qemu_alive():
        reason = f"the VM is not running ({record.state})"
    elif not live.process.files.vnc_socket:
        reason = "the VM was started without a console"
    return ConsoleStatusPublic(
        session=session_id,
        available=reason is None,
        reason=reason,
        novnc=(console.NOVNC_DIR / "core" / "rfb.js").is_file(),
        novnc_package=NOVNC_PACKAGE,
    )


@router.post("/failover/{session_id}/console/keys", response_model=ConsoleKeysPublic)
def console_keys(
    session_id: str, body: ConsoleKeys, principal: Operator, service: ServiceDep
) -> ConsoleKeysPublic:
    """Type ``text`` into the VM as keystrokes, or send ``combo`` (Ctrl-Alt-Del)."""
    if (body.text is None) == (body.combo is None):
        raise InvalidInput("give either text to type or a key combination, not both")
    record = service.app.catalog.get_failover_session(session_id)  # 404 for an unknown one
    live = service.failovers.live_session(session_id)
    qmp = live.process.qmp if live is not None else None
    if live is None or live.state not in CONSOLE_STATES or qmp is None or not live.qemu_alive():
        raise ConsoleUnavailable(
            f"the VM of failover session {session_id} is not running ({record.state})",
            session=session_id,
        )
    try:
        if body.text is not None:
            keys = type_text(qmp, body.text)
        else:
            send_ctrl_alt_del(qmp)
            keys = 1
    except QmpError as exc:  # QEMU refused or went away: the VM's state, not the request's
        raise ConsoleUnavailable(
            f"the VM did not take the keys: {exc.message}", session=session_id
        ) from exc
    service.app.catalog.audit(
        principal.name,
        "failover.console_keys",
        f"{record.asset} (failover {session_id})",
        {
            "session": session_id,
            "asset": record.asset,
            # Only how many: pasted text may be a password.
            **({"characters": keys} if body.text is not None else {"combo": body.combo}),
            **principal.audit_details,
        },
    )
    return ConsoleKeysPublic(session=session_id, keys=keys)


@router.get("/console/novnc/{path:path}", response_class=FileResponse)
def novnc_script(path: str, principal: Viewer) -> FileResponse:
    """noVNC's ES modules (``core/``, ``vendor/``) from the Debian package, read-only."""
    return FileResponse(
        novnc_file(path),
        media_type="text/javascript",
        headers={"cache-control": "no-cache"},
    )
