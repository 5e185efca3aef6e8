"""A real, throwaway PostgreSQL 15 server for the tests.

:class:`ThrowawayPostgres` runs ``initdb`` into a fresh temporary directory, starts the server
with ``pg_ctl`` on a free port of 127.0.0.1 (Unix socket inside the same directory, ``fsync``
off: the data is disposable), hands out fresh databases, and on :meth:`stop` stops exactly that
server (``pg_ctl stop -m fast`` on its own data directory) and deletes the directory. Nothing
else on the machine is touched.

``initdb`` refuses to run as root, so as root every server command runs as the ``postgres``
system user (``runuser -u postgres --``) in a directory that user owns; as any other user the
commands run directly. Authentication is ``trust``: the server listens on loopback only.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg

PG_BIN = Path("/usr/lib/postgresql/15/bin")
INSTALL_HINT = "apt-get install -y postgresql"
SERVER_USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL binaries are missing or the server did not start."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ThrowawayPostgres:
    """One PostgreSQL server in a temporary directory; see the module docstring."""

    def __init__(self) -> None:
        for tool in ("initdb", "pg_ctl", "postgres"):
            if not (PG_BIN / tool).is_file():
                raise PostgresUnavailable(
                    f"PostgreSQL 15 is not installed ({PG_BIN / tool} is missing); "
                    f"install it with: {INSTALL_HINT}"
                )
        self.port = 0
        self.root = Path(tempfile.mkdtemp(prefix="appliance-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as_root = os.geteuid() == 0
        if self._as_root:
            account = pwd.getpwnam(SERVER_USER)
            os.chown(self.root, account.pw_uid, account.pw_gid)
        self._started = False

    def _run(self, *argv: str) -> None:
        command = [str(PG_BIN / argv[0]), *argv[1:]]
        if self._as_root:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        # cwd: runuser keeps root's working directory, which postgres may not be able to read.
        completed = subprocess.run(
            command, cwd=self.root, capture_output=True, text=True, timeout=120, check=False
        )
        if completed.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise PostgresUnavailable(
                f"{' '.join(command)} failed ({completed.returncode}):\n"
                f"{completed.stdout}{completed.stderr}{log}"
            )

    def start(self) -> None:
        self._run(
            "initdb",
            *("-D", str(self.data), "-A", "trust", "-U", SERVER_USER),
            *("-E", "UTF8", "--locale=C", "--no-sync"),
        )
        # The port is free when probed but may be taken before the server binds it; retry.
        for attempt in range(3):
            self.port = _free_port()
            options = (
                f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off"
            )
            try:
                self._run(
                    "pg_ctl",
                    *("-w", "-D", str(self.data), "-l", str(self.log)),
                    "-o",
                    options,
                    "start",
                )
            except PostgresUnavailable:
                if attempt == 2:
                    raise
                continue
            self._started = True
            return

    def stop(self) -> None:
        """Stop this server (if it runs) and delete its directory."""
        try:
            if self._started:
                self._run("pg_ctl", "-w", "-D", str(self.data), "-m", "fast", "stop")
                self._started = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """An SQLAlchemy URL of ``database`` on this server."""
        return f"postgresql+psycopg://{SERVER_USER}@127.0.0.1:{self.port}/{database}"

    def _admin(self) -> psycopg.Connection:
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=SERVER_USER, dbname="postgres", autocommit=True
        )

    def create_database(self) -> str:
        """Create a new, empty database and return its name."""
        name = f"test_{uuid.uuid4().hex[:16]}"
        # FILE_COPY: with fsync off, copying the template's files beats WAL-logging them (2x).
        with self._admin() as connection:
            connection.execute(f'CREATE DATABASE "{name}" STRATEGY FILE_COPY')
        return name

    def drop_database(self, name: str) -> None:
        # FORCE: a test that failed half-way may leave a connection open.
        with self._admin() as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
