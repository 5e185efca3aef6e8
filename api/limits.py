"""A cap on request bodies: no client makes the service read more than it will ever accept.

The JSON API's largest legitimate body (an asset with 64 disk paths, a policy with 50 schedule
entries) is a few hundred KiB at most, so every request body is capped at :data:`MAX_BODY_BYTES`.
The one upload route is the exception (:data:`LARGE_BODY_ROUTES`): a replication source puts the
store's objects, packs of up to :data:`MAX_REPLICA_OBJECT_BYTES`, with
``PUT /api/replication/store/objects/{name}`` (docs/replication.md). :class:`BodySizeLimit` is a
plain ASGI middleware that never buffers:

- a ``Content-Length`` over the cap is answered 413 ``too_large`` at once, before a byte of the
  body is read, and the connection is closed (``Connection: close``) so uvicorn does not read the
  rest of the body to reuse it;
- a body without a length (``Transfer-Encoding: chunked``) or one longer than it said is counted
  as the app receives it; the chunk that crosses the cap raises a 413 ``HTTPException``, which
  FastAPI's body parsing passes through and :mod:`api.errors` answers like any other error.
  Once the response has started (an event stream whose client keeps sending) a 413 cannot be
  sent any more: the app is told the client went away instead, and stops.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body
from appliance.client.wire import MAX_BATCH

#: The most bytes any request body may have (1 MiB).
MAX_BODY_BYTES = 1 << 20
#: The most bytes one object of a replica store may have: a pack is cut at 16 MiB and may overrun
#: by one blob; 64 MiB leaves room for a store made with bigger packs, plus 1 MiB of margin.
MAX_REPLICA_OBJECT_BYTES = (64 << 20) + (1 << 20)
#: (method, path prefix, cap): the routes whose bodies may exceed :data:`MAX_BODY_BYTES`.
#: A release bundle uploaded for an update (``POST /api/system/update``): the project's wheel
#: and every dependency's, ~45 MB today.
MAX_BUNDLE_BYTES = 512 << 20

LARGE_BODY_ROUTES: tuple[tuple[str, str, int], ...] = (
    ("PUT", "/api/replication/store/objects/", MAX_REPLICA_OBJECT_BYTES),
    ("POST", "/api/system/update", MAX_BUNDLE_BYTES),
    # A backup client's chunk batches (and records batches) of up to about a pack each.
    ("POST", "/api/client/sessions/", MAX_BATCH + 1024 * 1024),
)


def _too_large_message(limit: int) -> str:
    return f"the request body is larger than {limit} bytes"


class BodySizeLimit:
    """Refuses request bodies over ``max_bytes`` with 413, early when their length says so."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int = MAX_BODY_BYTES,
        large_routes: tuple[tuple[str, str, int], ...] = LARGE_BODY_ROUTES,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.large_routes = large_routes

    def limit_for(self, scope: Scope) -> int:
        """The cap of this request: a large-body route's own, else ``max_bytes``."""
        method, path = scope.get("method", ""), str(scope.get("path", ""))
        for route_method, prefix, cap in self.large_routes:
            if method == route_method and path.startswith(prefix):
                return cap
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, limit)
            return
        received = 0
        responding = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if responding:
                        return {"type": "http.disconnect"}
                    raise HTTPException(
                        413, _too_large_message(limit), headers={"Connection": "close"}
                    )
            return message

        async def watching_send(message: Message) -> None:
            nonlocal responding
            responding = True
            await send(message)

        await self.app(scope, counting_receive, watching_send)


def _content_length(scope: Scope) -> int | None:
    """The declared body length; None when absent (uvicorn has rejected malformed ones)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _refuse(send: Send, limit: int) -> None:
    body = json.dumps(error_body("too_large", _too_large_message(limit))).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
