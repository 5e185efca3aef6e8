"""A peer appliance as a backend (kind ``peer``): the object protocol of docs/replication.md.

The source reaches its peer over HTTPS at ``https://HOST:PORT`` and speaks only the replication
object routes (``/api/replication/store/...``) with the replication token the peer gave at
pairing. Everything it sends is already encrypted by the source's store; the peer holds the
source's objects byte for byte in a replica store of its own.

What the contract asks, and how the peer gives it:

- Trust and errors: :mod:`api.peer_link` (the pinned HTTPS link every peer conversation uses).
- Atomic, checked puts: ``PUT objects/{name}`` carries ``X-Content-SHA256`` (lowercase hex of the
  body) for everything but a pack, whose name is already its BLAKE3; the peer checks either
  before it makes the object visible (``checks_pack_names``: a copy does not hash a pack first). A retried put of the same bytes
  is harmless (packs are named by their content; the peer answers 409 only for *other* bytes).
- Reads: ``GET`` with ``Range: bytes=a-b``, ``HEAD`` for the size, paged listings, and
  :meth:`PeerBackend.present_many`, the batch question "which of these do you hold?" that a copy
  asks instead of listing the whole replica (:func:`appliance.locations.copy.copy_point`).
- Deletes are refused (:class:`InvalidInput`): a replication token cannot delete; the peer keeps
  its own retention. ``retain`` is a no-op (after checking the object exists): the peer locks
  nothing on the source's say. Nothing is cold: ``warm_up``/``wait_warm`` are no-ops.
- Bandwidth: limited by the ``RateLimit`` wrapper that ``location_backend`` composes around every
  location (``put_bytes_per_second``), not here.

Two puts in flight (``puts_in_flight``): each ends in a write and an fsync on the peer, which
the next upload's body overlaps; more race for the CPU on a small box. (With the peer hashing
each body on its event loop, one at a time was faster; since it hashes beside the fsync, two
measured 0.88x against 0.72x of plain PUTs on 2 cores.) A copy's threads read the next packs
meanwhile.
"""

from __future__ import annotations

import email.utils
import hashlib
import urllib.parse
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

from api.peer_link import (
    BACKEND_OPTIONS,
    CONNECT_TIMEOUT,
    LOCATION_OPTIONS,
    REQUEST_TIMEOUT,
    PeerCertificateChanged,
    PeerFull,
    PeerLink,
    PeerTokenRefused,
    PeerUnreachable,
    answer_json,
    fetch_certificate,
    malformed_answer,
    open_link,
    parse_address,
    pem_fingerprint,
    pinned_context,
    short_fingerprint,
)
from appliance.errors import IntegrityError, InvalidInput, TransientBackendError
from appliance.store.backend import (
    BackendCapabilities,
    ObjectInfo,
    PutOptions,
    WarmUpStatus,
    check_name,
    hot_warm_up,
)

__all__ = [
    "BACKEND_OPTIONS",
    "CONNECT_TIMEOUT",
    "LOCATION_OPTIONS",
    "REQUEST_TIMEOUT",
    "PeerBackend",
    "PeerCertificateChanged",
    "PeerFull",
    "PeerLink",
    "PeerTokenRefused",
    "PeerUnreachable",
    "fetch_certificate",
    "open_link",
    "open_peer",
    "parse_address",
    "pem_fingerprint",
    "pinned_context",
    "short_fingerprint",
]

#: Where the object protocol lives on a peer.
STORE_ROUTES = "/api/replication/store/"
#: The most names one ``present`` request or one listing page carries (the contract's limit).
BATCH = 10000
#: Object folders a replica never holds: bundles go to cold classes only, never to a peer.
NEVER_AT_PEER = ("bundles/",)


class PeerBackend:
    """The source's store at a peer, through the object protocol; see the module docstring."""

    capabilities = BackendCapabilities(
        ranged_reads=True, listing_cost="expensive", checks_pack_names=True, puts_in_flight=2
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
            page = answer_json(response, "a listing", self.describe())
            objects = page.get("objects") if isinstance(page, dict) else None
            if not isinstance(objects, list):
                malformed_answer(self.describe(), "a listing")
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
                malformed_answer(self.describe(), "a presence query")
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


def open_peer(address: str, **options: Any) -> PeerBackend:
    """The ``peer`` backend kind (entry point): ``address`` is ``https://HOST:PORT``.

    Options: ``cert_pem`` (the pinned certificate), ``fingerprint`` (its SHA-256, for messages),
    ``token`` (the replication token: a secret option), ``peer_name``, ``timeout``; the location's
    other options (:data:`LOCATION_OPTIONS`) are accepted and left to the layers above. Nothing
    is asked at open: ``location_backend`` reads the identity file next, which is the first
    request (and fails with the pinned handshake when the certificate changed).
    """
    return PeerBackend(open_link(address, **options))
