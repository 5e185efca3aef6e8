"""Restores to a client host: an operator starts them on the page (``POST /api/hosts/{name}/
restores``), the host pulls them (``appliance-client restore``).

The appliance streams the point (or one folder of it) as a POSIX tar; the client extracts it with
the ``tar`` extraction filter, which refuses absolute names, ``..`` and links that point outside
the target folder, so a restore cannot write outside the folder it was given. Owners are kept by
number when the client runs as root.
"""

from __future__ import annotations

import os
import tarfile
from typing import Any

from appliance.client.connection import ClientError, Connection


class _Body:
    """A file object over the response's byte chunks, for ``tarfile`` in stream mode."""

    def __init__(self, chunks: Any) -> None:
        self._chunks = chunks
        self._buffer = b""
        self.received = 0

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            piece = next(self._chunks, None)
            if piece is None:
                break
            self.received += len(piece)
            self._buffer += piece
        if size < 0:
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data


def run_restore(conn: Connection, *, restore_id: str | None, target: str | None) -> dict[str, Any]:
    waiting = conn.get_json("/api/client/restores")
    if restore_id is not None:
        chosen = [r for r in waiting if r["id"] == restore_id]
    else:
        chosen = waiting[:1]
    if not chosen:
        raise ClientError(
            "no restore is waiting for this host: start one on the appliance's page",
            code="no_restore",
        )
    grant = chosen[0]
    folder = os.path.abspath(target or grant["target"])
    os.makedirs(folder, exist_ok=True)
    entries = 0
    try:
        with conn.stream("GET", f"/api/client/restores/{grant['id']}/archive") as response:
            body = _Body(response.iter_bytes(1 << 20))
            with tarfile.open(fileobj=body, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    tar.extract(member, folder, numeric_owner=True, filter="tar")
                    entries += 1
    except (tarfile.TarError, OSError) as exc:
        conn.request(
            "POST",
            f"/api/client/restores/{grant['id']}/done",
            json_body={"ok": False, "entries": entries, "message": str(exc)[:500]},
        )
        raise ClientError(f"the restore stopped after {entries} entries: {exc}") from exc
    conn.request(
        "POST",
        f"/api/client/restores/{grant['id']}/done",
        json_body={"ok": True, "entries": entries, "message": ""},
    )
    return {
        "restore": grant["id"],
        "point": grant["point"],
        "folder": folder,
        "entries": entries,
        "bytes": body.received,
    }
