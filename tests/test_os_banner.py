"""The console banner: what it says in each state of a fresh box, and that the service leaves
the marks it reads (the set-up code while no admin exists, then the "set-up done" mark)."""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

from api_support import bootstrap_accounts, live_server, service_settings

from api.tls import ensure_certificate
from image.appliance_os import banner
from image.appliance_os.layout import SETUP_DONE_MARK


def _facts(data: Path) -> banner.Facts:
    return banner.gather(data, 443)


def test_the_banner_never_says_done_while_the_service_starts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert "not generated yet" in banner.render(_facts(data))
    ensure_certificate(data / "tls" / "cert.pem", data / "tls" / "key.pem")
    # The certificate exists, the set-up code not yet: neither a code nor "done".
    starting = banner.render(_facts(data))
    assert "Certificate:  SHA-256 " in starting
    assert "Set-up" not in starting
    (data / "secrets").mkdir()
    (data / "secrets" / "setup-code").write_text("ab12cd34\n")
    assert "Set-up code:  ab12cd34" in banner.render(_facts(data))
    (data / "secrets" / "setup-code").unlink()
    (data / "secrets" / SETUP_DONE_MARK).write_text("")
    assert "Set-up:       done; sign in on the page" in banner.render(_facts(data))


def test_the_banner_shows_the_certificate_the_page_serves(tmp_path: Path) -> None:
    cert = tmp_path / "tls" / "cert.pem"
    ensure_certificate(cert, tmp_path / "tls" / "key.pem")
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    expected = hashlib.sha256(der).hexdigest().upper()
    assert banner.fingerprint(cert.read_text()).replace(":", "") == expected
    assert banner.page_url("10.0.2.15", 443) == "https://10.0.2.15/"
    assert banner.page_url("fd00::1", 8443) == "https://[fd00::1]:8443/"


def test_the_service_marks_set_up_done_when_the_admin_exists(tmp_path: Path) -> None:
    settings = service_settings(tmp_path / "data")
    secrets = settings.secrets_dir
    with live_server(settings) as live:
        assert (secrets / "setup-code").exists()
        assert not (secrets / SETUP_DONE_MARK).exists()
        bootstrap_accounts(live)
        assert not (secrets / "setup-code").exists()
        assert (secrets / SETUP_DONE_MARK).exists()
    # A restart with the admin present keeps the mark (and writes no code).
    (secrets / SETUP_DONE_MARK).unlink()
    with live_server(settings):
        assert (secrets / SETUP_DONE_MARK).exists()
        assert not (secrets / "setup-code").exists()
