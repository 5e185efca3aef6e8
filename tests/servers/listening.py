"""Start a server process on a loopback port and wait until it listens; stop it by its pid.

Shared by the tests (tests/s3_support.py) and the benchmarks (scripts/benchlib/tiering.py),
which start the same S3 server script. Only the process started here is ever stopped.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Any


@contextmanager
def listening_process(
    argv: Sequence[str],
    port: int,
    *,
    stdout: IO[Any] | int | None = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    what: str = "the server",
    error: type[Exception] = RuntimeError,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` until 127.0.0.1:``port`` accepts connections (``error`` if it exits or
    ``timeout`` passes first), yield it, and terminate it on leaving (kill after 10 s)."""
    process = subprocess.Popen(
        list(argv),
        stdout=stdout,
        stderr=subprocess.STDOUT
        if stdout not in (None, subprocess.DEVNULL)
        else subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=dict(env) if env is not None else None,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise error(f"{what} did not start on port {port}") from None
                time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
