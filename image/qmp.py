"""A small synchronous QMP client (QEMU Machine Protocol) over a unix socket.

QMP is line-delimited JSON: the server greets (``{"QMP": ...}``), the client must send
``qmp_capabilities`` before anything else, then each command gets exactly one ``return`` or
``error`` reply; asynchronous ``event`` messages can arrive at any time in between. This client
sends one command at a time (a lock serialises callers on several threads), keeps the events it
reads while waiting for a reply in a bounded list, and raises :class:`QmpError` with QEMU's own
description for an ``error`` reply. A closed or timed-out socket is :class:`QmpError` too, with
``disconnected`` set, so a caller can tell "QEMU said no" from "QEMU is gone".
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

#: Events kept for ``wait_event``; older ones are dropped.
MAX_EVENTS = 256


class QmpError(Exception):
    def __init__(self, message: str, *, error_class: str = "", disconnected: bool = False):
        super().__init__(message)
        self.message = message
        self.error_class = error_class
        self.disconnected = disconnected


class QmpClient:
    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._buffer = b""
        self._sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
            greeting = self._read_message(time.monotonic() + timeout)
            if "QMP" not in greeting:
                raise QmpError("not a QMP server (no greeting)", disconnected=True)
            self.execute("qmp_capabilities")
        except OSError as exc:
            self.close()
            raise QmpError(f"cannot talk to QMP at {path}: {exc}", disconnected=True) from exc
        except QmpError:
            self.close()
            raise

    @classmethod
    def connect(cls, path: str, *, timeout: float = 10.0, wait: float = 0.0) -> QmpClient:
        """Connect, retrying for up to ``wait`` seconds while QEMU creates its socket."""
        deadline = time.monotonic() + wait
        while True:
            try:
                return cls(path, timeout=timeout)
            except QmpError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    @property
    def closed(self) -> bool:
        return self._sock is None

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- protocol ------------------------------------------------------------------------------

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            if self._sock is None:
                raise QmpError("QMP connection is closed", disconnected=True)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QmpError("QMP reply timed out", disconnected=True)
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise QmpError("QMP reply timed out", disconnected=True) from None
            except OSError as exc:
                self.close()
                raise QmpError(f"QMP connection failed: {exc}", disconnected=True) from exc
            if not data:
                self.close()
                raise QmpError("QEMU closed the QMP connection", disconnected=True)
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise QmpError(f"malformed QMP message: {exc}", disconnected=True) from exc
        if not isinstance(message, dict):
            raise QmpError("malformed QMP message: not an object", disconnected=True)
        return message

    def _keep_event(self, message: dict[str, Any]) -> None:
        self.events.append(message)
        del self.events[:-MAX_EVENTS]

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run one command; return its ``return`` value or raise :class:`QmpError`."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        with self._lock:
            if self._sock is None:
                raise QmpError("QMP connection is closed", disconnected=True)
            try:
                self._sock.sendall(json.dumps(request).encode() + b"\n")
            except OSError as exc:
                self.close()
                raise QmpError(f"QMP connection failed: {exc}", disconnected=True) from exc
            deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
            while True:
                message = self._read_message(deadline)
                if "event" in message:
                    self._keep_event(message)
                    continue
                if "error" in message:
                    error = message["error"]
                    raise QmpError(
                        f"{command}: {error.get('desc', error)}",
                        error_class=str(error.get("class", "")),
                    )
                if "return" in message:
                    return message["return"]

    def poll_events(self, timeout: float = 0.0) -> list[dict[str, Any]]:
        """Read the events that arrived, waiting up to ``timeout`` for the first one."""
        with self._lock:
            deadline = time.monotonic() + max(timeout, 0.001)
            try:
                while True:
                    message = self._read_message(deadline)
                    if "event" in message:
                        self._keep_event(message)
                    deadline = time.monotonic() + 0.001  # then only what is already there
            except QmpError:
                pass  # nothing more within the time, or QEMU is gone
        return list(self.events)

    def wait_event(self, name: str, timeout: float) -> dict[str, Any] | None:
        """The first kept or newly arriving event called ``name`` (removed from the list)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("event") == name:
                    return self.events.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.closed:
                return None
            self.poll_events(min(remaining, 0.2))

    # --- commands ------------------------------------------------------------------------------

    def query_status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.execute("query-status")
        return result

    def screendump(self, path: str) -> None:
        """Write the console as a PNG (QEMU >= 7.1 with ``format``)."""
        self.execute("screendump", {"filename": path, "format": "png"})

    def system_powerdown(self) -> None:
        self.execute("system_powerdown")

    def quit(self) -> None:
        try:
            self.execute("quit")
        except QmpError as exc:
            if not exc.disconnected:
                raise  # QEMU exiting may close the socket before or after its reply

    def blockdev_add(self, options: dict[str, Any]) -> None:
        self.execute("blockdev-add", options)

    def blockdev_del(self, node_name: str) -> None:
        self.execute("blockdev-del", {"node-name": node_name})

    def blockdev_mirror(self, job_id: str, device: str, target: str, sync: str = "full") -> None:
        self.execute(
            "blockdev-mirror", {"job-id": job_id, "device": device, "target": target, "sync": sync}
        )

    def drive_mirror(self, job_id: str, device: str, target: str, fmt: str = "qcow2") -> None:
        self.execute(
            "drive-mirror",
            {
                "job-id": job_id,
                "device": device,
                "target": target,
                "format": fmt,
                "sync": "full",
                "mode": "absolute-paths",
            },
        )

    def block_job_complete(self, job_id: str) -> None:
        self.execute("block-job-complete", {"device": job_id})

    def block_job_cancel(self, job_id: str) -> None:
        self.execute("block-job-cancel", {"device": job_id, "force": True})

    def query_block_jobs(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.execute("query-block-jobs")
        return result

    def query_named_block_nodes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.execute("query-named-block-nodes", {"flat": True})
        return result
