"""Helpers of the backup client's tests: a client host added through the API, enrolment, and a
TCP relay on 127.0.0.1 that cuts its connections once (a dropped link under TLS)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from api_support import free_port
from replication_support import TlsServer

from api.identity import certificate_fingerprint
from appliance.client import cli, wire


def add_client_host(server: TlsServer, name: str, asset: str | None = None) -> dict[str, Any]:
    with server.as_role("admin") as admin:
        body: dict[str, Any] = {"name": name, "kind": "client"}
        if asset:
            body["asset"] = asset
        r = admin.post("/api/hosts", json=body)
        assert r.status_code == 201, r.text
        answer: dict[str, Any] = r.json()
        return answer


def enroll(server: TlsServer, token: str, config: Path, address: str | None = None) -> None:
    fingerprint = certificate_fingerprint(server.settings.cert_path)
    code = cli.main(
        [
            "--config",
            str(config),
            "enroll",
            "--server",
            address or server.url,
            "--fingerprint",
            fingerprint,
            "--token",
            token,
        ]
    )
    assert code == 0
    assert oct(os.stat(config).st_mode & 0o777) == "0o600"


def run_client(config: Path, *args: str, capsys: Any = None) -> tuple[int, dict[str, Any], str]:
    """``appliance-client --config CONFIG ARGS`` in this process: (exit code, JSON, stderr)."""
    code = cli.main(["--config", str(config), *args])
    if capsys is None:
        return code, {}, ""
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 and out.strip() else {}), err


class CuttingRelay:
    """Relays TCP from 127.0.0.1:port to ``upstream``; :meth:`cut_after` closes every open
    connection once the client has sent that many more bytes."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.cuts = 0
        self._cut_at: int | None = None
        self._sent = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def cut_after(self, more_bytes: int) -> None:
        with self._lock:
            self._cut_at = self._sent + more_bytes

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self._sockets += [conn, upstream]
            threading.Thread(target=self._pump, args=(conn, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, conn, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(65536):
                if counted:
                    with self._lock:
                        self._sent += len(data)
                        cut = self._cut_at is not None and self._sent >= self._cut_at
                        if cut:
                            self._cut_at = None
                    if cut:
                        self._cut_all()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def _cut_all(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
            self.cuts += 1
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._listener.close()
        self._cut_all()


@contextlib.contextmanager
def cutting_relay(upstream_port: int) -> Iterator[CuttingRelay]:
    relay = CuttingRelay(upstream_port)
    try:
        yield relay
    finally:
        relay.close()


def make_tree(root: Path, files: int = 20, size: int = 200_000, seed: int = 1) -> None:
    """Folders of compressible and random files (both kinds of chunks)."""
    import random

    rng = random.Random(seed)
    (root / "docs").mkdir(parents=True, exist_ok=True)
    (root / "bin").mkdir(exist_ok=True)
    (root / "empty").mkdir(exist_ok=True)
    for n in range(files):
        words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(size // 6))
        (root / "docs" / f"note-{n}.txt").write_text(words)
        (root / "bin" / f"blob-{n}.bin").write_bytes(rng.randbytes(size))
    (root / "link").symlink_to("docs/note-0.txt")
    os.link(root / "docs" / "note-1.txt", root / "hard")
    (root / "zeros.img").write_bytes(bytes(3 * 1024 * 1024))


def kill_client_mid_upload(argv: list[str], ingest: Path, ids: int, cwd: Path) -> int:
    """Run the client (``argv``), SIGKILL it once the appliance acknowledged ``ids`` chunks of
    its session; returns how many it had acknowledged."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        uploaded = list(ingest.glob("*/uploaded"))
        if uploaded and uploaded[0].stat().st_size >= ids * wire.ID_SIZE:
            break
        time.sleep(0.05)
    else:
        proc.kill()
        raise AssertionError(proc.communicate())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return uploaded[0].stat().st_size // wire.ID_SIZE
