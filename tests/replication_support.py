"""Two live appliances on 127.0.0.1 for the replication tests: a TLS peer that can be stopped and
started again on one data directory and port, a pairing, and small helpers over store folders."""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import httpx
import uvicorn
from api_support import (
    LiveServer,
    MovableClock,
    bootstrap_accounts,
    bootstrapped_server,
    free_port,
    service_settings,
)

from api.app import create_app
from api.identity import der_fingerprint
from api.peer_backend import pinned_context
from api.serve import uvicorn_config


@dataclass
class TlsServer(LiveServer):
    """A live service over TLS; its clients trust its own certificate alone."""

    def client(self, **kwargs: Any) -> httpx.Client:
        cert = self.settings.cert_path.read_text()
        return httpx.Client(base_url=self.url, timeout=60, verify=pinned_context(cert), **kwargs)


@contextlib.contextmanager
def tls_server(
    data_dir: Path, port: int, tokens: dict[str, str] | None = None
) -> Iterator[TlsServer]:
    """The service as ``appliance serve`` runs it (``api.serve.uvicorn_config``: TLS, a
    generated certificate) on ``port``; ``tokens``: the role tokens of an earlier run."""
    settings = service_settings(data_dir, tls=True, port=port, device_monitor=False)
    clock = MovableClock()
    app = create_app(settings, clock=clock)
    server = uvicorn.Server(uvicorn_config(settings, app))
    thread = threading.Thread(target=server.run, name="uvicorn-peer", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the peer did not start")
        time.sleep(0.02)
    live = TlsServer(app, f"https://127.0.0.1:{port}", clock, settings, thread, server)
    live.tokens.update(tokens or {})
    try:
        yield live
    finally:
        server.should_exit = True
        thread.join(60)


class Peer:
    """The peer appliance: started, stopped and started again on one data directory and port."""

    def __init__(self, root: Path) -> None:
        self.data_dir = root / "data"
        self.port = free_port()
        self.tokens: dict[str, str] = {}
        self._stack: contextlib.ExitStack | None = None
        self.live: TlsServer | None = None

    @property
    def address(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> TlsServer:
        stack = contextlib.ExitStack()
        self.live = stack.enter_context(tls_server(self.data_dir, self.port, self.tokens))
        self._stack = stack
        if not self.tokens:
            bootstrap_accounts(self.live)
            self.tokens.update(self.live.tokens)
        return self.live

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack = None
        self.live = None

    def admin(self) -> httpx.Client:
        assert self.live is not None
        return self.live.as_role("admin")

    def replica(self, store_id: str) -> Path:
        return self.data_dir / "replicas" / store_id


@contextlib.contextmanager
def running_peer(root: Path) -> Iterator[Peer]:
    """A started peer on ``root``, stopped at the end (module fixtures wrap it)."""
    peer = Peer(root)
    peer.start()
    try:
        yield peer
    finally:
        peer.stop()


@dataclass
class Pairing:
    source: LiveServer
    peer: Peer
    location_id: str
    tree: Path
    asset: str = "projects"

    @property
    def app(self) -> Any:
        return self.source.service.app

    @property
    def replica(self) -> Path:
        return self.peer.replica(self.app.repo.store_id)


def until(predicate: Callable[[], Any], timeout: float = 120.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached in time"
        time.sleep(0.05)


def files_of(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def data_packs(root: Path) -> int:
    """Data packs there (not the temporary files of a write under way)."""
    return sum(1 for p in (root / "data").rglob("*") if p.is_file() and ".tmp-" not in p.name)


def packs_of(store: Path) -> dict[str, int]:
    return {n: s for n, s in files_of(store).items() if n.startswith(("data/", "meta/"))}


def digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def pair(source: LiveServer, peer: Peer, label: str = "dr") -> dict[str, Any]:
    """Pair ``source`` with ``peer`` (a code from the peer, entered on the source); returns the
    source's record of the peer (``GET /api/peers`` shape)."""
    with peer.admin() as peer_admin:
        offered = peer_admin.post("/api/replication/pairing-codes")
        assert offered.status_code == 201, offered.text
    with source.as_role("admin") as admin:
        r = admin.post(
            "/api/peers",
            json={"address": peer.address, "code": offered.json()["code"], "label": label},
        )
        assert r.status_code == 201, r.text
    public: dict[str, Any] = r.json()
    assert public["fingerprint"] == offered.json()["fingerprint"]
    return public


# --- a made-up source on a peer's store routes ------------------------------------------------

#: The routes of the replica store (a replication token's).
STORE_ROUTES = "/api/replication/store"


@dataclass
class Source:
    """A source faked with plain HTTP calls shaped as the contract says, paired straight on a
    peer's API (``pair_source``)."""

    appliance_id: str
    store_id: str
    name: str
    token: str
    server: LiveServer

    def client(self) -> httpx.Client:
        return self.server.client(headers={"Authorization": f"Bearer {self.token}"})

    @property
    def replica(self) -> Path:
        return Path(self.server.settings.data_dir) / "replicas" / self.store_id


def source_claim(**overrides: Any) -> dict[str, Any]:
    claim = {
        "appliance_id": uuid.uuid4().hex,
        "name": "Branch office",
        "store_id": secrets.token_hex(8),
        "fingerprint": der_fingerprint(secrets.token_bytes(64)),
    }
    claim.update(overrides)
    return claim


def new_pairing_code(admin: httpx.Client) -> str:
    r = admin.post("/api/replication/pairing-codes")
    assert r.status_code == 201, r.text
    return str(r.json()["code"])


def pair_source(server: LiveServer, admin: httpx.Client, **claim_overrides: Any) -> Source:
    claim = source_claim(**claim_overrides)
    with server.client() as anonymous:
        r = anonymous.post(
            "/api/replication/pair", json={"code": new_pairing_code(admin), "source": claim}
        )
    assert r.status_code == 200, r.text
    return Source(
        claim["appliance_id"], claim["store_id"], claim["name"], r.json()["token"], server
    )


def put_object(
    client: httpx.Client, name: str, data: bytes, sha: str | None = None
) -> httpx.Response:
    digest = sha if sha is not None else hashlib.sha256(data).hexdigest()
    return client.put(
        f"{STORE_ROUTES}/objects/{name}", content=data, headers={"X-Content-SHA256": digest}
    )


def random_pack(kind: str = "data", size: int = 3000) -> tuple[str, bytes]:
    data = secrets.token_bytes(size)
    name = blake3.blake3(data).hexdigest()
    return f"{kind}/{name[:2]}/{name}", data


def audit_entries(server: LiveServer, action: str) -> list[Any]:
    return [a for a in server.service.app.catalog.list_audit(500) if a.action == action]


#: Failed pairings from one address before the peer throttles them (its login throttle's).
FREE_FAILURES = 3


@contextlib.contextmanager
def peer_server(root: Path) -> Iterator[LiveServer]:
    """A plain service to pair made-up sources with (no jobs run), throttling failed pairings
    after :data:`FREE_FAILURES`."""
    with bootstrapped_server(root, login_throttle=FREE_FAILURES, max_parallel_jobs=0) as live:
        yield live


def forget_failed_pairings(server: LiveServer) -> None:
    """No failed pairing counts against 127.0.0.1 any more."""
    state = server.app.state
    if hasattr(state, "pairing_throttle"):
        del state.pairing_throttle
