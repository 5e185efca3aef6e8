"""The app factory: ``create_app(settings) -> FastAPI``; nothing is created at import time.

The lifespan starts the :class:`~api.service.Service` (store, job runner, scheduler) before the
first request and stops it after the last one: running jobs end ``interrupted`` and resume on
the next start. Routers live under ``/api`` (plus ``/metrics``); the admin page's static files
are served at ``/``. Every response carries defensive headers; API responses are never cached.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from anyio import to_thread
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import Viewer
from api.errors import install_error_handlers
from api.limits import BodySizeLimit
from api.routers import (
    alerts,
    assets,
    auth,
    client,
    console,
    failover,
    failover_points,
    hardware,
    hosts,
    jobs,
    locations,
    maintenance,
    peers,
    plans,
    points,
    policies,
    protection,
    replication,
    restores,
    status,
    system,
    takeover,
    tape,
    tape_jobs,
    tiering,
    updates,
    users,
    verify_schedule,
)
from api.schemas import ErrorPublic
from api.service import Clock, Service
from api.settings import Settings

STATIC_DIR = Path(__file__).with_name("static")

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
]
#: Sent only over TLS (RFC 6797 has browsers ignore it on plain HTTP anyway): for a year, the
#: browser reaches this host by HTTPS only. No ``includeSubDomains``: the appliance speaks for
#: its own name, not for a domain's other hosts.
HSTS_HEADER = (b"strict-transport-security", b"max-age=31536000")


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` (and :data:`HSTS_HEADER` when ``tls``) to every response
    and ``no-store`` to API responses.

    A plain ASGI middleware (not ``BaseHTTPMiddleware``), so streamed downloads and event
    streams pass through untouched.
    """

    def __init__(self, app: ASGIApp, *, tls: bool = False) -> None:
        self.app = app
        self.headers = [*SECURITY_HEADERS, HSTS_HEADER] if tls else SECURITY_HEADERS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_api = str(scope.get("path", "")).startswith(("/api/", "/metrics"))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                headers += [(n, v) for n, v in self.headers if n not in names]
                if b"cache-control" not in names:
                    # API answers are never stored; the page's files are revalidated (ETag) on
                    # each load, so an updated appliance never runs yesterday's script.
                    headers.append((b"cache-control", b"no-store" if is_api else b"no-cache"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(settings: Settings, *, clock: Clock | None = None) -> FastAPI:
    """The service's ASGI app. ``clock`` (default: UTC wall clock) is the time the appliance,
    the scheduler and the dashboard use; tests pass one they control."""
    service = Service(settings, clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await to_thread.run_sync(service.start)
        try:
            yield
        finally:
            await to_thread.run_sync(service.stop)

    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorPublic, "description": text}
        for code, text in (
            (400, "invalid input"),
            (401, "not signed in"),
            (403, "role too low or CSRF token missing"),
            (404, "not found"),
            (409, "conflict"),
            (422, "request validation failed"),
        )
    }
    app = FastAPI(
        title="Backup appliance",
        version="1",
        description="The appliance's JSON API. See docs/api.md for the auth model and roles.",
        lifespan=lifespan,
        openapi_url=None,  # served below, behind authentication
        docs_url=None,  # the Swagger UI would load scripts from a CDN; the page works offline
        redoc_url=None,
    )
    app.state.service = service
    install_error_handlers(app)
    # Replication first: a source's pack uploads are the busiest requests, and routes are
    # matched in this order (with ~250 routes, matching the upload last cost ~0.5 ms each).
    for module in (
        replication,
        client,
        auth,
        assets,
        failover,
        failover_points,
        policies,
        points,
        locations,
        peers,
        restores,
        maintenance,
        jobs,
        status,
        protection,
        tiering,
        hardware,
        tape,
        tape_jobs,
        users,
        takeover,
        alerts,
        verify_schedule,
        plans,
        console,
        system,
        updates,
        hosts,
    ):
        app.include_router(module.router, prefix="/api", responses=errors)
    app.include_router(status.metrics_router, responses=errors)

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi(principal: Viewer) -> dict[str, Any]:
        return app.openapi()

    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static")
    app.add_middleware(BodySizeLimit)  # inside SecurityHeaders: its 413s carry them too
    app.add_middleware(SecurityHeaders, tls=settings.tls)
    return app
