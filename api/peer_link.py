"""The HTTPS link to a peer appliance: pinned trust, the errors in the appliance's terms.

Shared by everything that talks to a peer (:mod:`api.peer_backend`'s object protocol, pairing,
the take-over grant, pulling points back):

- Trust: the SSL context's only trust anchor is the certificate pinned at pairing (PEM kept in
  the location's options); the host name is not checked (the pin is the identity). A peer that
  presents any other certificate fails the handshake, and that is reported as
  :class:`PeerCertificateChanged` with both fingerprints, never re-pinned: re-pairing is the only
  way to accept a new certificate.
- Errors: a refused connection, a reset, a timeout are :class:`PeerUnreachable`, which is both
  :class:`LocationUnavailable` (a job waits for the peer to come back) and
  :class:`TransientBackendError` (the retry wrapper tries again first); 5xx and 429 are
  transient; 507 is :class:`PeerFull`; 401/403 are :class:`PeerTokenRefused` ("unpaired?");
  404 is :class:`ObjectMissing`; a pack refused as ``name_mismatch`` is an
  :class:`IntegrityError`.

:mod:`api.peer_wire` counts the bytes each peer address was sent and answered, and keeps how
far the peer's clock is from ours: every request carries our time in ``X-Appliance-Time``, and
every answer is read for the peer's (that header, else ``Date``).
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import urllib.parse
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, NoReturn

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from api import peer_wire
from appliance.errors import (
    IntegrityError,
    InvalidInput,
    LocationUnavailable,
    ObjectMissing,
    StoreError,
    StoreFull,
    TransientBackendError,
)

#: Seconds to wait for a connection (a peer that is down answers at once; a cut cable does not).
CONNECT_TIMEOUT = 10.0
#: Seconds to wait for a request's answer (a pack of 16 MiB on a slow link takes a while).
REQUEST_TIMEOUT = 120.0
#: Options of a peer location that the backend takes (``token`` is kept apart from the catalog).
BACKEND_OPTIONS = frozenset({"cert_pem", "fingerprint", "token", "peer_name", "timeout"})
#: Options of a peer location used above the backend (pairing, the replicate job, the page).
LOCATION_OPTIONS = frozenset(
    {"peer_appliance_id", "replicate_new", "bandwidth_mib_s", "catch_up_minutes", "window"}
)


class PeerUnreachable(LocationUnavailable, TransientBackendError):
    """The peer did not answer (connection refused or reset, a timeout); it may come back."""

    code = LocationUnavailable.code
    kind = LocationUnavailable.kind


class PeerCertificateChanged(LocationUnavailable):
    """The peer presented another certificate than the one pinned at pairing; re-pair to accept it."""

    code = "peer_certificate_changed"


class PeerTokenRefused(LocationUnavailable):
    """The peer refused the replication token (unpaired?)."""

    code = "peer_token_refused"


class PeerFull(StoreFull):
    """The peer is full: its free space would fall under its reserve."""

    code = "peer_full"


# --- certificates ---------------------------------------------------------------------------------


def pem_fingerprint(cert_pem: str) -> str:
    """The SHA-256 fingerprint of a PEM certificate, ``AB:CD:...`` (as ``api.identity`` writes)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
    except ValueError as exc:
        raise InvalidInput(f"the pinned certificate cannot be read: {exc}") from exc
    der = cert.public_bytes(serialization.Encoding.DER)
    return ":".join(f"{byte:02X}" for byte in hashlib.sha256(der).digest())


def short_fingerprint(fingerprint: str) -> str:
    """The first four pairs of a fingerprint and an ellipsis, for messages."""
    return ":".join(fingerprint.split(":")[:4]) + "…"


def pinned_context(cert_pem: str) -> ssl.SSLContext:
    """A client context whose only trust anchor is ``cert_pem``; host names are not checked."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cadata=cert_pem)
    except (ssl.SSLError, ValueError) as exc:
        raise InvalidInput(f"the pinned certificate cannot be used: {exc}") from exc
    return context


def parse_address(address: str) -> tuple[str, str, int]:
    """``https://HOST[:PORT]`` as (the normalised address, host, port); anything else is refused."""
    try:
        parsed = urllib.parse.urlsplit(address.strip())
        host = parsed.hostname
        port = parsed.port or 443
    except ValueError as exc:
        raise InvalidInput(f"{address!r} is not an address https://host:port: {exc}") from exc
    if parsed.scheme != "https":
        raise InvalidInput(f"a peer is reached over HTTPS (https://host:port), not {address!r}")
    if not host or parsed.path.strip("/") or parsed.query or parsed.fragment:
        raise InvalidInput(
            f"a peer's address is https://host:port and nothing more, not {address!r}"
        )
    if parsed.username or parsed.password:
        raise InvalidInput("a peer's address carries no user name or password")
    if not all(c.isascii() and (c.isalnum() or c in ".-:_") for c in host):
        raise InvalidInput(f"{host!r} is not a host name or address")
    shown = f"[{host}]" if ":" in host else host
    return f"https://{shown}:{port}", host, port


def fetch_certificate(address: str, timeout: float = CONNECT_TIMEOUT) -> str:
    """The certificate the peer at ``address`` presents now (PEM), read without trusting it.

    Pairing pins it; a failed pinned handshake reads it to say what it changed to. A peer that
    cannot be reached is :class:`PeerUnreachable`."""
    _, host, port = parse_address(address)
    try:
        return ssl.get_server_certificate((host, port), timeout=timeout)
    except (OSError, ssl.SSLError, UnicodeError) as exc:
        raise PeerUnreachable(
            f"the peer at {address} cannot be reached: {exc}",
            location=address,
            reason="unreachable",
        ) from exc


# --- the link -----------------------------------------------------------------------------------------


class PeerLink:
    """HTTPS to one peer: the pinned context, the token, and the errors in the appliance's terms.

    Used by :class:`PeerBackend` for the object protocol and by pairing and the replicate job for
    the rest (``pair``, point summaries, a probe).
    """

    def __init__(
        self,
        address: str,
        *,
        cert_pem: str,
        token: str | None = None,
        fingerprint: str | None = None,
        peer_name: str | None = None,
        timeout: float = REQUEST_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.address, _, _ = parse_address(address)
        self.pinned = fingerprint or pem_fingerprint(cert_pem)
        self.name = peer_name
        # Objects are sent as they are (encrypted, compressed already): a body decoded on the
        # way would no longer match its Content-Length.
        headers = {"Accept-Encoding": "identity"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(
            base_url=self.address,
            verify=pinned_context(cert_pem),
            timeout=httpx.Timeout(float(timeout), connect=min(CONNECT_TIMEOUT, float(timeout))),
            headers=headers,
            transport=transport,
            follow_redirects=False,
            trust_env=False,  # no proxy from the environment: the link is pinned end to end
        )

    def describe(self) -> str:
        return f"peer {self.name} ({self.address})" if self.name else f"peer {self.address}"

    def close(self) -> None:
        self._client.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        what: str,
        name: str | None = None,
        ok: Iterable[int] = (200,),
        **kwargs: Any,
    ) -> httpx.Response:
        """Send one request; an answer whose status is not in ``ok`` raises its domain error."""
        request = self._client.build_request(method, path, **kwargs)
        sent = datetime.now(UTC)
        request.headers[peer_wire.TIME_HEADER] = peer_wire.time_header(sent)
        try:
            response = self._client.send(request)
        except httpx.TransportError as exc:
            peer_wire.count(self.address, request, None)
            self._connection_failed(exc, what, name)
        peer_wire.count(self.address, request, response)
        self._read_clock(response, sent)
        if response.status_code not in set(ok):
            self.refused(response, what, name)
        return response

    def _read_clock(self, response: httpx.Response, sent: datetime) -> None:
        # The wall clock, not the service's: in production they are one, and the link is also
        # opened where no service clock is at hand (a location's backend).
        peer_time = peer_wire.answered_time(response.headers)
        if peer_time is not None:
            received = datetime.now(UTC)
            skew = peer_wire.skew_seconds(peer_time, sent, received)
            peer_wire.PEER_CLOCKS.note(self.address, skew, received)

    def _connection_failed(
        self, exc: httpx.TransportError, what: str, name: str | None
    ) -> NoReturn:
        details: dict[str, Any] = {"location": self.address}
        if name is not None:
            details["name"] = name
        if _certificate_refused(exc):
            self._certificate_failed(exc, details)
        raise PeerUnreachable(
            f"{self.describe()} could not be reached for {what}: {_reason(exc)}",
            reason="unreachable",
            **details,
        ) from exc

    def _certificate_failed(self, exc: Exception, details: dict[str, Any]) -> NoReturn:
        """The pinned handshake failed: find out what the peer presents now, and say so."""
        try:
            now = pem_fingerprint(fetch_certificate(self.address))
        except StoreError:
            now = None
        if now is not None and now == self.pinned:
            raise PeerCertificateChanged(
                f"{self.describe()} presents the pinned certificate ({short_fingerprint(now)}) "
                f"but it is not valid now ({_reason(exc)}): renew it on the peer and re-pair",
                pinned=self.pinned,
                now=now,
                reason="certificate not valid",
                **details,
            ) from exc
        shown = short_fingerprint(now) if now else "unreadable"
        raise PeerCertificateChanged(
            f"the peer's certificate changed (pinned {short_fingerprint(self.pinned)}, now "
            f"{shown}): re-pair to accept it",
            pinned=self.pinned,
            now=now,
            reason="certificate changed",
            **details,
        ) from exc

    def refused(self, response: httpx.Response, what: str, name: str | None) -> NoReturn:
        """Raise the domain error for an answer that is not a success."""
        status = response.status_code
        code, message = _error_of(response)
        details: dict[str, Any] = {"location": self.address, "status": status}
        if code:
            details["code_from_peer"] = code
        if message:
            details["peer_message"] = message
        if name is not None:
            details["name"] = name
        said = f": {message}" if message else ""
        where = self.describe()
        if status in (401, 403):
            raise PeerTokenRefused(
                f"the peer refused the token (unpaired?): {where} answered {status} to "
                f"{what}{said}",
                reason="token refused",
                **details,
            )
        if status == 507:
            raise PeerFull(
                f"{where} is full: it refused {what} to keep its free space above its reserve"
                f"{said}",
                **details,
            )
        if status == 404:
            raise ObjectMissing(f"{name or what} is missing from {where}", **details)
        if status == 416:
            raise IntegrityError(f"{where} refused the range of {what}{said}", **details)
        if status == 409:
            raise IntegrityError(
                f"{where} holds other bytes under {name or 'that name'} ({what} refused){said}",
                **details,
            )
        if status == 400 and code == "name_mismatch":
            raise IntegrityError(
                f"{where} refused {what}: its bytes do not hash to its name{said}", **details
            )
        if status == 400 and "checksum" in f"{code} {message}".lower():
            # The body was damaged on the way: sending it again may work.
            raise TransientBackendError(
                f"{where} refused {what}: checksum mismatch{said}", **details
            )
        if status == 429 or status >= 500:
            raise TransientBackendError(
                f"{where} answered {status} to {what}; retrying may help{said}", **details
            )
        raise StoreError(f"{where} refused {what} ({status}){said}", **details)

    # --- beyond the object protocol ---

    def post_json(self, path: str, body: dict[str, Any], *, what: str) -> dict[str, Any]:
        response = self.request("POST", path, what=what, ok=(200, 201, 204), json=body)
        if response.status_code == 204 or not response.content:
            return {}
        answer = answer_json(response, what, self.describe())
        if not isinstance(answer, dict):
            malformed_answer(self.describe(), what)
        return answer

    def get_json(self, path: str, *, what: str) -> dict[str, Any]:
        answer = answer_json(self.request("GET", path, what=what), what, self.describe())
        if not isinstance(answer, dict):
            malformed_answer(self.describe(), what)
        return answer

    def probe(self) -> None:
        """Raise unless the peer answers over the pinned link (its health route, no token)."""
        self.request("GET", "/api/health", what="a health check")


def answer_json(response: httpx.Response, what: str, where: str) -> Any:
    try:
        return response.json()
    except ValueError:
        malformed_answer(where, what)


def malformed_answer(where: str, what: str) -> NoReturn:
    raise TransientBackendError(f"{where} answered {what} with something that is not JSON")


def _certificate_refused(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        if "CERTIFICATE_VERIFY_FAILED" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _reason(exc: BaseException) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    text = str(exc) or type(exc).__name__
    if isinstance(exc.__cause__, socket.gaierror):
        return f"the name does not resolve ({text})"
    return text


def _error_of(response: httpx.Response) -> tuple[str, str]:
    """The peer's error ``(code, message)`` (the service's error body), or blanks."""
    try:
        body = response.json()
    except ValueError:
        return "", response.text[:200].strip()
    if not isinstance(body, dict):
        return "", ""
    return str(body.get("code") or ""), str(body.get("message") or "")


# --- the backend --------------------------------------------------------------------------------------


def open_link(address: str, **options: Any) -> PeerLink:
    """A :class:`PeerLink` from a peer location's options (and its token)."""
    for name in LOCATION_OPTIONS:
        options.pop(name, None)  # used above the backend (pairing, the job, the page)
    unknown = sorted(set(options) - BACKEND_OPTIONS)
    if unknown:
        raise InvalidInput(f"unknown peer option(s): {', '.join(unknown)}", options=unknown)
    cert_pem = options.get("cert_pem")
    if not isinstance(cert_pem, str) or not cert_pem.strip():
        raise InvalidInput("a peer location needs the peer's certificate (pair with it first)")
    return PeerLink(
        address,
        cert_pem=cert_pem,
        token=options.get("token"),
        fingerprint=options.get("fingerprint"),
        peer_name=options.get("peer_name"),
        timeout=float(options.get("timeout") or REQUEST_TIMEOUT),
    )
