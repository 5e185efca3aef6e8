"""HTTPS to the appliance with the pinned certificate, the client token and retries.

Every request the client makes is idempotent (a chunk batch sent twice is stored once, a records
batch replaces itself), so a dropped connection, a timeout or a restarting appliance (502, 503,
504) is retried with backoff for up to ``retry_for`` seconds. A refusal (400, 401, 403, 404,
409, 413, 507) is not retried: it is raised with the appliance's own message.
"""

from __future__ import annotations

import json
import ssl
import time
from dataclasses import dataclass
from typing import Any

import httpx

from appliance.client.tls import PinError, pem_fingerprint, pinned_context

RETRY_STATUSES = frozenset({502, 503, 504})


class ClientError(Exception):
    """A refusal or failure the user must read; ``code`` is the appliance's error code."""

    def __init__(self, message: str, code: str = "client_error", status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass
class Traffic:
    requests: int = 0
    retries: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


class Connection:
    def __init__(
        self,
        server: str,
        cert_pem: str,
        token: str,
        *,
        retry_for: float = 300.0,
        timeout: float = 120.0,
        log: Any = None,
    ) -> None:
        self.server = server.rstrip("/")
        self.fingerprint = pem_fingerprint(cert_pem)
        self.retry_for = retry_for
        self.log = log
        self.traffic = Traffic()
        self._client = httpx.Client(
            base_url=self.server,
            verify=pinned_context(cert_pem),
            headers={"Authorization": f"Bearer {token}", "User-Agent": "appliance-client/1"},
            timeout=httpx.Timeout(timeout, connect=15.0),
            http2=False,
        )

    def close(self) -> None:
        self._client.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
        params: dict[str, Any] | None = None,
    ) -> httpx.Response:
        deadline = time.monotonic() + self.retry_for
        delay = 0.5
        body = content if content is not None else None
        headers = {}
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        elif content is not None:
            headers["Content-Type"] = "application/octet-stream"
        while True:
            try:
                self.traffic.requests += 1
                response = self._client.request(
                    method, path, content=body, params=params, headers=headers
                )
            except httpx.TransportError as exc:
                if _certificate_refused(exc):
                    raise ClientError(
                        f"the appliance at {self.server} no longer presents the pinned certificate "
                        f"{self.fingerprint}: refusing to send anything. If the appliance was "
                        "reinstalled, enroll again with its new fingerprint.",
                        code="certificate_changed",
                    ) from None
                problem = f"{type(exc).__name__}: {exc}"
            else:
                self.traffic.bytes_sent += len(body or b"")
                self.traffic.bytes_received += len(response.content)
                if response.status_code < 400:
                    return response
                if response.status_code not in RETRY_STATUSES:
                    raise _refusal(response)
                problem = f"HTTP {response.status_code}"
            if time.monotonic() + delay > deadline:
                raise ClientError(
                    f"the appliance at {self.server} could not be reached for {self.retry_for:.0f} s "
                    f"({problem}); run the same command again to resume",
                    code="unreachable",
                )
            self.traffic.retries += 1
            if self.log is not None:
                self.log(f"{problem}; retrying in {delay:.1f} s")
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

    def stream(self, method: str, path: str) -> Any:
        """A streamed response (restores); not retried, the restore is started again."""
        try:
            response = self._client.stream(method, path)
        except httpx.TransportError as exc:
            raise ClientError(f"the appliance at {self.server} cannot be reached: {exc}") from exc
        return _Checked(response)

    def get_json(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw).json()

    def post_json(self, path: str, body: Any, **kw: Any) -> Any:
        return self.request("POST", path, json_body=body, **kw).json()


def _refusal(response: httpx.Response) -> ClientError:
    try:
        document = response.json()
        code, message = str(document.get("code")), str(document.get("message"))
    except (ValueError, AttributeError):
        code, message = "http_error", response.text[:300]
    return ClientError(
        f"the appliance refused ({response.status_code} {code}): {message}",
        code=code,
        status=response.status_code,
    )


def _certificate_refused(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError | PinError):
            return True
        if "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _Checked:
    def __init__(self, manager: Any) -> None:
        self._manager = manager

    def __enter__(self) -> httpx.Response:
        response: httpx.Response = self._manager.__enter__()
        if response.status_code >= 400:
            response.read()
            self._manager.__exit__(None, None, None)
            raise _refusal(response)
        return response

    def __exit__(self, *exc: object) -> None:
        self._manager.__exit__(*exc)
