"""The replication phase's baseline server: plain HTTPS PUTs written to files, nothing more.

``python https_sink.py PORT DIR CERT KEY`` serves on 127.0.0.1:PORT under the same uvicorn
configuration as ``appliance serve`` (uvloop, httptools, TLS with the hardened context of
``api.serve``: TLS 1.2+, ECDHE AEAD suites), the same allocator settings (``appliance.allocator``;
without them each 16 MiB body costs fresh pages, a slower baseline that would flatter us) and the
certificate the bench generated the way the appliance does (``api.tls.ensure_certificate``). ``PUT /<path>`` reads the whole body (as the
peer's object route does) and writes it to ``DIR/<path with / as _>`` with an fsync (in a worker
thread, as the peer does), then answers 201. That is the work a peer does for an upload minus our
protocol: no token, no name checks, no SHA-256 or BLAKE3 check, no temporary file and rename.
Any other request is 404. The bench stops it by its pid.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import uvicorn

from api.tls import TLS12_CIPHERS, harden_server_context
from appliance.allocator import tune_allocator


def _write(path: Path, body: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def make_app(root: Path) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] != "PUT":
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        name = str(scope["path"]).strip("/").replace("/", "_") or "body"
        await asyncio.to_thread(_write, root / name, b"".join(chunks))
        await send(
            {"type": "http.response.start", "status": 201, "headers": [(b"content-length", b"0")]}
        )
        await send({"type": "http.response.body", "body": b""})

    return app


def main(argv: list[str]) -> int:
    tune_allocator()
    port, root, cert, key = int(argv[0]), Path(argv[1]), argv[2], argv[3]
    root.mkdir(parents=True, exist_ok=True)
    config = uvicorn.Config(
        make_app(root),
        host="127.0.0.1",
        port=port,
        lifespan="off",
        loop="uvloop",
        http="httptools",
        access_log=False,
        server_header=False,
        log_level="warning",
        ssl_certfile=cert,
        ssl_keyfile=key,
        ssl_ciphers=TLS12_CIPHERS,
    )
    config.load()
    if config.ssl is not None:
        harden_server_context(config.ssl)
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
