"""A real S3 server process on 127.0.0.1 (moto's server) and clients for it.

The server runs as a child process started by the test session and stopped by its pid; boto3
talks HTTP to it. Missing moto fails loudly with the install step.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servers.listening import listening_process

SERVER = os.path.join(os.path.dirname(__file__), "servers", "s3_server.py")
CREDENTIALS = {"access_key_id": "appliance-test", "secret_access_key": "appliance-test-secret"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen[bytes]

    def options(self, **extra: Any) -> dict[str, Any]:
        """Location options for a bucket on this server."""
        return {"endpoint_url": self.endpoint, "region": "us-east-1", **CREDENTIALS, **extra}

    def client(self) -> Any:
        from tiering.s3 import make_client

        return make_client(endpoint_url=self.endpoint, region="us-east-1", **CREDENTIALS)

    def bucket(self, *, lock: bool = False) -> str:
        """A new, empty bucket (versioned with Object Lock when ``lock``)."""
        name = f"t-{uuid.uuid4().hex[:20]}"
        client = self.client()
        if lock:
            client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
        else:
            client.create_bucket(Bucket=name)
        client.close()
        return name


@contextmanager
def s3_server(restore_seconds: float = 2.0, *, authenticate: bool = False) -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port. ``authenticate``: it checks every request's
    credentials against its own IAM, which knows no key, so every request is refused (a bucket
    that refuses the appliance's credentials)."""
    try:
        import moto  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the environment's fault
        raise RuntimeError(
            "the S3 tests need moto's server: scripts/setup (pip install -e '.[dev]')"
        ) from exc
    port = free_port()
    env = dict(os.environ)
    if authenticate:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"  # moto: authenticate from the first request
    with listening_process(
        [sys.executable, SERVER, str(port), str(restore_seconds)],
        port,
        env=env,
        what="the S3 test server",
    ) as process:
        yield S3Server(f"http://127.0.0.1:{port}", process)


def random_tree(path: Path, files: int, size: int) -> Path:
    """A folder of ``files`` incompressible files of ``size`` bytes (packs that do not shrink)."""
    path.mkdir()
    for i in range(files):
        (path / f"f{i:02d}.bin").write_bytes(os.urandom(size))
    return path
