"""The service's TLS certificate: a self-signed one generated on first start.

The key is EC P-256 (fast handshakes, supported by every browser), written with mode 0600 before
any byte of it is; the certificate names ``localhost``, the host name, 127.0.0.1 and ::1 (and
the listening address when it is a specific one), and is valid for 825 days, the longest
lifetime browsers accept. An existing certificate (generated earlier, or installed by the
operator) is used as it is.

The server speaks TLS 1.2 and 1.3 only (:func:`harden_server_context`). TLS 1.3's suites are
all AEAD with forward secrecy; TLS 1.2 is held to the same: ECDHE key exchange with AES-GCM or
ChaCha20-Poly1305 (:data:`TLS12_CIPHERS`), so no CBC suite (Lucky13-style padding oracles) and no
static-RSA key exchange is ever negotiated. Every browser of the last decade offers these.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=825)
#: The TLS 1.2 cipher suites the server accepts (OpenSSL names; TLS 1.3 has its own list).
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


def harden_server_context(context: ssl.SSLContext) -> ssl.SSLContext:
    """Restrict a server context to TLS >= 1.2 and, for TLS 1.2, to :data:`TLS12_CIPHERS`.

    Python's default minimum is TLS 1.2 already; it is set here so that it does not depend on
    the interpreter's or OpenSSL's defaults. Compression stays off (CRIME) and the server's
    order of suites wins.
    """
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_certificate(cert_path: Path, key_path: Path, host: str = "127.0.0.1") -> bool:
    """Generate a self-signed certificate unless both files exist; True if one was made."""
    if cert_path.exists() and key_path.exists():
        return False
    key = ec.generate_private_key(ec.SECP256R1())
    hostname = socket.gethostname() or "appliance"
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    if hostname != "localhost":
        names.append(x509.DNSName(hostname))
    addresses = {"127.0.0.1", "::1"}
    try:
        if not ipaddress.ip_address(host).is_unspecified:
            addresses.add(host)
    except ValueError:
        if host and host not in (hostname, "localhost"):
            names.append(x509.DNSName(host))
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in sorted(addresses)]
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Backup appliance (self-signed)"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return True
