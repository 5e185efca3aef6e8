"""Who this appliance is to another one: its stable id, its name and its certificate's fingerprint.

Replication pairs two appliances (docs/replication.md). Each side names itself by
:func:`appliance_id`: a uuid4 as 32 lowercase hex digits, made the first time it is needed and
kept in the catalog's settings document :data:`IDENTITY_KEY` (``{"appliance_id": ...}``), so it
survives restarts, renames and new certificates. Nothing else ever changes it: a peer keys its
replica accounts on it (``peer-<appliance id>``).

Certificates are pinned by fingerprint: the SHA-256 of the DER certificate, as colon-separated
upper-case hex pairs (``AB:CD:...``, 95 characters), the form browsers show, so a user can compare
what both pages print. :func:`certificate_fingerprint` reads the service's certificate file (PEM or
DER); :func:`der_fingerprint` takes the DER bytes a TLS handshake returns
(``ssl.SSLSocket.getpeercert(binary_form=True)``).
"""

from __future__ import annotations

import hashlib
import re
import threading
import uuid
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from api.service import DEFAULT_SETTINGS, SETTINGS_KEY
from appliance.engine import Appliance
from appliance.errors import InvalidInput

#: The settings document holding the appliance's id (frozen: peers know the appliance by it).
IDENTITY_KEY = "appliance_id"
#: What an appliance id looks like (a uuid4's hex).
APPLIANCE_ID = re.compile(r"^[0-9a-f]{32}$")
#: What a fingerprint looks like.
FINGERPRINT = re.compile(r"^[0-9A-F]{2}(:[0-9A-F]{2}){31}$")

# Two first requests at once must not make two ids: the second would win the write and the
# first's caller would have handed out an id that no longer exists.
_ID_LOCK = threading.Lock()


def appliance_id(app: Appliance) -> str:
    """This appliance's stable id, made (uuid4 hex) and stored on first need."""
    stored = app.catalog.get_settings(IDENTITY_KEY).get("appliance_id")
    if isinstance(stored, str) and APPLIANCE_ID.match(stored):
        return stored
    with _ID_LOCK:
        stored = app.catalog.get_settings(IDENTITY_KEY).get("appliance_id")
        if isinstance(stored, str) and APPLIANCE_ID.match(stored):
            return stored
        made = uuid.uuid4().hex
        app.catalog.put_settings(IDENTITY_KEY, {"appliance_id": made})
        return made


def appliance_name(app: Appliance) -> str:
    """The name an admin gave the appliance on the settings page (its default otherwise)."""
    name = app.catalog.get_settings(SETTINGS_KEY).get("appliance_name")
    if isinstance(name, str) and name.strip():
        return name
    return str(DEFAULT_SETTINGS["appliance_name"])


def der_fingerprint(der: bytes) -> str:
    """The fingerprint of a DER-encoded certificate: SHA-256, ``AB:CD:...`` upper-case."""
    return ":".join(f"{byte:02X}" for byte in hashlib.sha256(der).digest())


def certificate_fingerprint(cert_path: str | Path) -> str:
    """The fingerprint of the certificate in ``cert_path`` (PEM, or DER).

    :class:`InvalidInput` when the file holds no certificate; ``OSError`` when it cannot be read.
    """
    raw = Path(cert_path).read_bytes()
    try:
        if b"-----BEGIN" in raw:
            cert = x509.load_pem_x509_certificate(raw)
        else:
            cert = x509.load_der_x509_certificate(raw)
    except ValueError as exc:
        raise InvalidInput(f"{cert_path} holds no readable certificate: {exc}") from exc
    return der_fingerprint(cert.public_bytes(serialization.Encoding.DER))
