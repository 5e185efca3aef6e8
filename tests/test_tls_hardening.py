"""TLS of the service as ``appliance serve`` configures it: versions, suites, HSTS.

The server is started from :func:`api.serve.uvicorn_config` (the configuration ``serve`` runs,
self-signed certificate included) on a free loopback port, so what is tested is what ships.
Clients are plain ``ssl`` contexts that offer exactly the versions and suites a test needs.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from api_support import free_port, service_settings, weak_kdf_env
from fastapi.testclient import TestClient

from api.app import create_app
from api.serve import uvicorn_config
from api.settings import Settings

CBC_SUITES = (
    "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES128-SHA256:"
    "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:AES128-SHA"
)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with pytest.MonkeyPatch.context() as mp:
        weak_kdf_env(mp)
        root = tmp_path_factory.mktemp("tls")
        settings = service_settings(root / "data", tls=True, port=free_port())
        server = uvicorn.Server(uvicorn_config(settings))
        thread = threading.Thread(target=server.run, name="uvicorn-tls", daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        try:
            yield settings
        finally:
            server.should_exit = True
            thread.join(60)


def _client_context(settings: Settings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(settings.cert_path))
    context.check_hostname = False  # the certificate names 127.0.0.1 too; not what is tested
    return context


def _handshake(settings: Settings, context: ssl.SSLContext) -> tuple[str | None, str]:
    """(protocol version, cipher suite) the server agrees to with ``context``."""
    address = ("127.0.0.1", settings.effective_port)
    with (
        socket.create_connection(address, timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        cipher = tls.cipher()
        assert cipher is not None
        return tls.version(), cipher[0]


def test_tls12_with_cbc_suites_only_fails_the_handshake(tls_server: Settings) -> None:
    context = _client_context(tls_server)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CBC_SUITES)
    with pytest.raises(ssl.SSLError):
        _handshake(tls_server, context)


@pytest.mark.parametrize(
    "suite", ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"]
)
def test_tls12_with_an_aead_suite_succeeds(tls_server: Settings, suite: str) -> None:
    context = _client_context(tls_server)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(suite)
    assert _handshake(tls_server, context) == ("TLSv1.2", suite)


def test_a_client_offering_cbc_first_gets_an_aead_suite(tls_server: Settings) -> None:
    context = _client_context(tls_server)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CBC_SUITES + ":ECDHE-ECDSA-AES256-GCM-SHA384")
    assert _handshake(tls_server, context) == ("TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384")


def test_tls13_is_the_default(tls_server: Settings) -> None:
    assert _handshake(tls_server, _client_context(tls_server))[0] == "TLSv1.3"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_before_12_is_refused(tls_server: Settings, version: ssl.TLSVersion) -> None:
    context = _client_context(tls_server)
    context.set_ciphers("ALL:@SECLEVEL=0")  # the client would offer anything
    context.minimum_version = version
    context.maximum_version = version
    with pytest.raises(ssl.SSLError):
        _handshake(tls_server, context)


def test_the_server_context_allows_only_aead_with_ecdhe_below_tls13(tmp_path: Path) -> None:
    settings = service_settings(tmp_path / "data", tls=True)
    config = uvicorn_config(settings, create_app(settings))
    assert config.ssl is not None
    assert config.ssl.minimum_version == ssl.TLSVersion.TLSv1_2
    tls12 = [c for c in config.ssl.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(c["aead"] and c["kea"] == "kx-ecdhe" for c in tls12), tls12


def test_tls_responses_carry_hsts(tls_server: Settings) -> None:
    url = f"https://127.0.0.1:{tls_server.effective_port}"
    with httpx.Client(base_url=url, verify=_client_context(tls_server)) as client:
        for path in ("/api/health", "/", "/api/no-such-route"):
            r = client.get(path)
            assert r.headers["strict-transport-security"] == "max-age=31536000", path


def test_plain_http_responses_do_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weak_kdf_env(monkeypatch)
    with TestClient(create_app(service_settings(tmp_path / "data"))) as client:
        r = client.get("/api/health")
        assert r.status_code == 200 and "strict-transport-security" not in r.headers
