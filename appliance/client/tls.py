"""Certificate pinning for the client: the appliance's certificate is trusted by its SHA-256
fingerprint, never by a CA or a host name (the appliance's certificate is self-signed)."""

from __future__ import annotations

import hashlib
import ssl
import urllib.parse


class PinError(Exception):
    pass


def normalise_fingerprint(text: str) -> str:
    """``AB:CD:...`` upper case, from any of ``ab:cd...``, ``abcd...`` or ``SHA256:`` prefixed."""
    raw = text.strip().removeprefix("SHA256:").removeprefix("sha256:").replace(":", "").upper()
    if len(raw) != 64 or any(c not in "0123456789ABCDEF" for c in raw):
        raise PinError(f"{text[:80]!r} is not a SHA-256 fingerprint (64 hex digits)")
    return ":".join(raw[i : i + 2] for i in range(0, 64, 2))


def pem_fingerprint(cert_pem: str) -> str:
    der = ssl.PEM_cert_to_DER_cert(cert_pem)
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def split_server(address: str) -> tuple[str, int]:
    parsed = urllib.parse.urlsplit(address.strip())
    if parsed.scheme != "https" or not parsed.hostname:
        raise PinError(f"the appliance is reached as https://host[:port], not {address!r}")
    return parsed.hostname, parsed.port or 443


def fetch_certificate(address: str, timeout: float = 15.0) -> str:
    host, port = split_server(address)
    try:
        return ssl.get_server_certificate((host, port), timeout=timeout)
    except (OSError, ssl.SSLError) as exc:
        raise PinError(f"the appliance at {address} cannot be reached: {exc}") from exc


def pinned_context(cert_pem: str) -> ssl.SSLContext:
    """Trusts exactly ``cert_pem``; host names are not checked (the pin is the identity)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=cert_pem)
    return context


def pin(address: str, fingerprint: str) -> str:
    """The appliance's certificate (PEM) if it has ``fingerprint``; else PinError naming both."""
    wanted = normalise_fingerprint(fingerprint)
    pem = fetch_certificate(address)
    found = pem_fingerprint(pem)
    if found != wanted:
        raise PinError(
            f"the appliance at {address} presents certificate {found}, not the expected "
            f"{wanted}: refusing to send anything (another machine, or a man in the middle)"
        )
    return pem
