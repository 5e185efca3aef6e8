"""Run the service under uvicorn: TLS with a generated certificate, graceful shutdown.

uvicorn turns SIGTERM and SIGINT into a graceful shutdown: it stops accepting connections,
gives open requests :data:`GRACEFUL_SECONDS` to finish (event streams are cut after that), then
runs the app's lifespan shutdown, which interrupts running jobs so that they resume on the next
start.

With TLS, the SSL context uvicorn builds is hardened before the server starts (TLS 1.2+, AEAD
suites with ECDHE only: :func:`api.tls.harden_server_context`). :func:`uvicorn_config` is what
``serve`` runs, so tests can start the very same configuration on a free port.
"""

from __future__ import annotations

import logging

import uvicorn
from starlette.types import ASGIApp

from api.app import create_app
from api.settings import Settings
from api.tls import TLS12_CIPHERS, ensure_certificate, harden_server_context

GRACEFUL_SECONDS = 5

log = logging.getLogger("appliance.service")


def uvicorn_config(settings: Settings, app: ASGIApp | None = None) -> uvicorn.Config:
    """The server's configuration (``app``: default, ``create_app(settings)``), loaded, with
    its TLS context hardened; a certificate is generated first if there is none."""
    ssl: dict[str, str] = {}
    if settings.tls:
        if ensure_certificate(settings.cert_path, settings.key_path, settings.host):
            log.warning("generated a self-signed TLS certificate: %s", settings.cert_path)
        ssl = {
            "ssl_certfile": str(settings.cert_path),
            "ssl_keyfile": str(settings.key_path),
            "ssl_ciphers": TLS12_CIPHERS,
        }
    config = uvicorn.Config(
        app if app is not None else create_app(settings),
        host=settings.host,
        port=settings.effective_port,
        lifespan="on",
        loop="uvloop",
        http="httptools",
        access_log=settings.access_log,
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
        server_header=False,
        proxy_headers=False,  # no proxy in front: the client address must not be spoofable
        log_config=None,  # keep the logging configured by the caller
        **ssl,  # type: ignore[arg-type]
    )
    # Loading builds the SSL context (uvicorn has no option for a minimum version); the server
    # uses a loaded configuration as it is.
    config.load()
    if config.ssl is not None:
        harden_server_context(config.ssl)
    return config


def serve(settings: Settings) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    server = uvicorn.Server(uvicorn_config(settings))
    scheme = "https" if settings.tls else "http"
    log.info("serving on %s://%s:%s/", scheme, settings.host, settings.effective_port)
    server.run()
    # uvicorn exits non-zero itself when start-up fails; a clean stop is 0.
    return 0 if server.started else 3
