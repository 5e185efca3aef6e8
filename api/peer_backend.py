"""A peer appliance as a backend (kind ``peer``): the object protocol of docs/replication.md.

The source reaches its peer over HTTPS at ``https://HOST:PORT`` and speaks only the replication
object routes (``/api/replication/store/...``) with the replication token the peer gave at
pairing. Everything it sends is already encrypted by the source's store; the peer holds the
source's objects byte for byte in a replica store of its own.

What the contract asks, and how the peer gives it:

- Trust: the SSL context's only trust anchor is the certificate pinned at pairing (PEM kept in
  the location's options); the host name is not checked (the pin is the identity). A peer that
  presents any other certificate fails the handshake, and that is reported as
  :class:`PeerCertificateChanged` with both fingerprints, never re-pinned: re-pairing is the only
  way to accept a new certificate.
- Atomic, checked puts: ``PUT objects/{name}`` carries ``X-Content-SHA256`` (lowercase hex of the
  body), which the peer checks before it makes the object visible. A retried put of the same bytes
  is harmless (packs are named by their content; the peer answers 409 only for *other* bytes).
- Reads: ``GET`` with ``Range: bytes=a-b``, ``HEAD`` for the size, paged listings, and
  :meth:`PeerBackend.present_many`, the batch question "which of these do you hold?" that a copy
  asks instead of listing the whole replica (:func:`appliance.locations.copy.copy_point`).
- Deletes are refused (:class:`InvalidInput`): a replication token cannot delete; the peer keeps
  its own retention. ``retain`` is a no-op (after checking the object exists): the peer locks
  nothing on the source's say. Nothing is cold: ``warm_up``/``wait_warm`` are no-ops.
- Errors: a refused connection, a reset, a timeout are :class:`PeerUnreachable`, which is both
  :class:`LocationUnavailable` (a job waits for the peer to come back) and
  :class:`TransientBackendError` (the retry wrapper tries again first); 5xx and 429 are
  transient; 507 is :class:`PeerFull`; 401/403 are :class:`PeerTokenRefused` ("unpaired?");
  404 is :class:`ObjectMissing`.
- Bandwidth: limited by the ``RateLimit`` wrapper that ``location_backend`` composes around every
  location (``put_bytes_per_second``), not here.

:mod:`api.peer_wire` counts the bytes each peer address was sent and answered, and keeps how
far the peer's clock is from ours: every request carries our time in ``X-Appliance-Time``, and
every answer is read for the peer's (that header, else ``Date``).
"""

from __future__ import annotations

import email.utils
import hashlib
import socket
import ssl
import urllib.parse
from collections.abc import Iterable, Iterator
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
from appliance.store.backend import (
    BackendCapabilities,
    ObjectInfo,
    PutOptions,
    WarmUpStatus,
    check_name,
    hot_warm_up,
)

#: Where the object protocol lives on a peer.
STORE_ROUTES = "/api/replication/store/"
#: The most names one ``present`` request or one listing page carries (the contract's limit).
BATCH = 10000
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
#: Object folders a replica never holds: bundles go to cold classes only, never to a peer.
NEVER_AT_PEER = ("bundles/",)


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
        answer = _json(response, what, self.describe())
        if not isinstance(answer, dict):
            _malformed(self.describe(), what)
        return answer

    def get_json(self, path: str, *, what: str) -> dict[str, Any]:
        answer = _json(self.request("GET", path, what=what), what, self.describe())
        if not isinstance(answer, dict):
            _malformed(self.describe(), what)
        return answer

    def probe(self) -> None:
        """Raise unless the peer answers over the pinned link (its health route, no token)."""
        self.request("GET", "/api/health", what="a health check")


def _json(response: httpx.Response, what: str, where: str) -> Any:
    try:
        return response.json()
    except ValueError:
        _malformed(where, what)


def _malformed(where: str, what: str) -> NoReturn:
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


class PeerBackend:
    """The source's store at a peer, through the object protocol; see the module docstring."""

    capabilities = BackendCapabilities(
        ranged_reads=True, listing_cost="expensive", checks_pack_names=True, puts_in_flight=1
    )

    def __init__(self, link: PeerLink) -> None:
        self.link = link

    def describe(self) -> str:
        return self.link.describe()

    def close(self) -> None:
        self.link.close()

    @staticmethod
    def _path(name: str) -> str:
        return f"{STORE_ROUTES}objects/{urllib.parse.quote(check_name(name), safe='/')}"

    def put(
        self, name: str, data: bytes | bytearray | memoryview, options: PutOptions | None = None
    ) -> None:
        """See the module docstring; ``options`` are ignored (the peer keeps its own retention,
        in its one class). A pack goes without ``X-Content-SHA256``: the peer checks its bytes
        against its name (BLAKE3), the stronger check, and one hash of 16 MiB fewer on each side
        is a tenth of the transfer's CPU on a small box."""
        body = bytes(data)
        headers = {"Content-Type": "application/octet-stream"}
        if not name.startswith(("data/", "meta/")):
            headers["X-Content-SHA256"] = hashlib.sha256(body).hexdigest()
        self.link.request(
            "PUT",
            self._path(name),
            what=f"a put of {name}",
            name=name,
            ok=(200, 201, 204),
            content=body,
            headers=headers,
        )

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if offset < 0 or (length is not None and length < 0):
            raise InvalidInput("offsets and lengths are never negative")
        if length == 0:
            size = self.stat(name).size
            if offset > size:
                raise IntegrityError(f"{name}: offset {offset} is past its end ({size})", name=name)
            return b""
        headers = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            headers["Range"] = f"bytes={offset}-{end}"
        try:
            response = self.link.request(
                "GET",
                self._path(name),
                what=f"a read of {name}",
                name=name,
                ok=(200, 206),
                headers=headers,
            )
        except IntegrityError as exc:
            if exc.details.get("status") != 416:
                raise
            size = self.stat(name).size
            if offset == size and length is None:
                return b""
            raise IntegrityError(
                f"{name} at {self.describe()}: the range {offset}+{length} is past its end "
                f"({size} bytes)",
                name=name,
            ) from exc
        data = response.content
        if response.status_code == 200 and headers:
            data = data[offset:] if length is None else data[offset : offset + length]
        declared = response.headers.get("content-length")
        if declared is not None and int(declared) != len(response.content):
            raise TransientBackendError(
                f"{self.describe()} cut the answer about {name} short", name=name
            )
        if length is not None and len(data) != length:
            raise IntegrityError(
                f"{name} at {self.describe()}: asked {length} bytes at {offset}, got {len(data)}",
                name=name,
            )
        return data

    def stat(self, name: str) -> ObjectInfo:
        response = self.link.request("HEAD", self._path(name), what=f"a stat of {name}", name=name)
        size = response.headers.get("content-length")
        if size is None:
            raise TransientBackendError(
                f"{self.describe()} answered a stat of {name} without a size", name=name
            )
        return ObjectInfo(name, int(size), _mtime(response.headers.get("last-modified")))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if prefix:
            check_name(prefix.rstrip("/") or "x")  # a prefix need not be a whole name
        if prefix.startswith(NEVER_AT_PEER):
            return iter(())
        found: list[ObjectInfo] = []
        after: str | None = None
        while True:
            params: dict[str, Any] = {"prefix": prefix, "limit": BATCH}
            if after:
                params["after"] = after
            response = self.link.request(
                "GET",
                f"{STORE_ROUTES}objects",
                what=f"a listing of {prefix or 'the store'}",
                params=params,
            )
            page = _json(response, "a listing", self.describe())
            objects = page.get("objects") if isinstance(page, dict) else None
            if not isinstance(objects, list):
                _malformed(self.describe(), "a listing")
            for item in objects:
                found.append(ObjectInfo(check_name(str(item["name"])), int(item["size"]), 0.0))
            after = page.get("next_after")
            if not after or not objects:
                return iter(found)

    def present_many(self, names: Iterable[str]) -> dict[str, int]:
        """Which of ``names`` the peer holds, with their sizes: asked in batches of
        :data:`BATCH` (the missing set is the rest)."""
        wanted = [check_name(n) for n in names]
        present: dict[str, int] = {}
        for start in range(0, len(wanted), BATCH):
            batch = wanted[start : start + BATCH]
            answer = self.link.post_json(
                f"{STORE_ROUTES}present", {"names": batch}, what="a presence query"
            )
            held = answer.get("present")
            if not isinstance(held, dict):
                _malformed(self.describe(), "a presence query")
            asked = set(batch)
            present.update({str(n): int(s) for n, s in held.items() if n in asked})
        return present

    def delete(self, name: str) -> None:
        """Refused: a replication token cannot delete (the peer keeps its own retention)."""
        raise InvalidInput(
            f"{self.describe()} cannot be asked to delete {name}: a replication token cannot "
            "delete; the peer keeps its own retention",
            name=name,
        )

    def warm_up(self, names: Iterable[str]) -> WarmUpStatus:
        return hot_warm_up(names)

    def wait_warm(self, names: Iterable[str], timeout: float) -> None:
        for name in names:
            check_name(name)

    def retain(self, name: str, until: datetime) -> None:
        """A no-op (the peer locks nothing on the source's say); a missing object is still
        :class:`ObjectMissing`."""
        self.stat(name)

    # --- beyond the Backend contract ---

    def post_point(self, point_id: str, summary: dict[str, Any]) -> None:
        """Tell the peer what a replicated point is (asset, kind, created_at, bytes)."""
        self.link.post_json(
            f"{STORE_ROUTES}points/{urllib.parse.quote(point_id, safe='')}",
            summary,
            what=f"the summary of point {point_id}",
        )


def _mtime(header: str | None) -> float:
    if not header:
        return 0.0
    try:
        return email.utils.parsedate_to_datetime(header).timestamp()
    except (TypeError, ValueError):
        return 0.0


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


def open_peer(address: str, **options: Any) -> PeerBackend:
    """The ``peer`` backend kind (entry point): ``address`` is ``https://HOST:PORT``.

    Options: ``cert_pem`` (the pinned certificate), ``fingerprint`` (its SHA-256, for messages),
    ``token`` (the replication token: a secret option), ``peer_name``, ``timeout``; the location's
    other options (:data:`LOCATION_OPTIONS`) are accepted and left to the layers above. Nothing
    is asked at open: ``location_backend`` reads the identity file next, which is the first
    request (and fails with the pinned handshake when the certificate changed).
    """
    return PeerBackend(open_link(address, **options))
