"""Settings of the service, from ``APPLIANCE_*`` environment variables (or given in code).

There is no module-level instance: ``create_app(Settings(...))`` and ``appliance serve`` build
one, so tests and several apps in one process never share configuration by accident.

Plain HTTP is refused unless the service listens on a loopback address: passwords, session
cookies and API tokens must never cross a network in clear text.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_TLS_PORT = 8443
DEFAULT_PLAIN_PORT = 8080


def default_data_dir() -> Path:
    return Path(os.path.expanduser("~")) / ".local" / "share" / "appliance"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APPLIANCE_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir)
    host: str = "127.0.0.1"
    #: None: 8443 with TLS, 8080 without.
    port: int | None = Field(default=None, ge=0, le=65535)
    tls: bool = True
    #: None: ``<data_dir>/tls/cert.pem`` and ``key.pem``, generated (self-signed) on first start.
    cert_file: Path | None = None
    key_file: Path | None = None
    #: None: the data directory's own SQLite catalog.
    catalog_url: str | None = None
    #: The store's passphrase. Without it (and without ``passphrase_file``) the service uses
    #: ``<data_dir>/secrets/passphrase``, which it creates on first start.
    passphrase: SecretStr | None = None
    passphrase_file: Path | None = None
    #: Seconds a browser session lasts without activity.
    session_ttl: int = Field(default=12 * 3600, ge=60)
    #: Jobs run at once; 0 keeps jobs queued (maintenance, tests).
    max_parallel_jobs: int = Field(default=2, ge=0, le=64)
    scheduler_enabled: bool = True
    #: Seconds between scheduler ticks.
    scheduler_interval: float = Field(default=30.0, gt=0)
    #: Failed logins allowed per user and client before delays start (0: no throttling).
    login_throttle: int = Field(default=5, ge=0)
    #: Failed logins allowed from one client address across all user names before every sign-in
    #: from it is delayed (0: no per-address budget).
    login_throttle_per_client: int = Field(default=20, ge=0)
    #: One log line per HTTP request. Off by default: the page polls, and the line costs more
    #: CPU than answering a cached poll; changes and downloads are in the audit log anyway.
    access_log: bool = False
    #: Watch the disks (``hardware.udev.DeviceMonitor``): a USB medium plugged in starts its
    #: export, an unknown USB disk is offered on the page. Off: the disks are scanned only when
    #: the API asks (``GET /api/disks``, ``POST /api/disks/rescan``).
    device_monitor: bool = True
    #: Seconds between the monitor's periodic rescans (it also rescans on every udev event
    #: while udevd runs; without udevd only these rescans see a disk come and go).
    device_monitor_interval: float = Field(default=30.0, gt=0, le=3600)
    #: TESTS ONLY: a JSON file ``{"<loop backing file>": {udev properties}}``. A loop device of
    #: such a file is reported with those properties (recorded from a real USB disk) laid over
    #: its own node, size and filesystem, so a loop device stands in for a USB disk on a host
    #: without USB. Never set on an appliance.
    test_usb_overlay: Path | None = None
    #: The root of the appliance OS whose network, time and update settings the page manages
    #: (``image.appliance_os.layout``). None: ``/`` when ``/etc/appliance/system.json`` exists
    #: (the built image, or a box set up by ``scripts/install``), otherwise none (a checkout:
    #: the host's own tools manage them). Tests point it at a temporary folder.
    os_root: Path | None = None

    @model_validator(mode="after")
    def _plain_http_only_on_loopback(self) -> Settings:
        if not self.tls and not is_loopback(self.host):
            raise ValueError(
                f"plain HTTP is allowed only on a loopback address, not on {self.host!r}; "
                "turn TLS on (APPLIANCE_TLS=1) or listen on 127.0.0.1"
            )
        return self

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return DEFAULT_TLS_PORT if self.tls else DEFAULT_PLAIN_PORT

    @property
    def effective_os_root(self) -> Path | None:
        """The appliance OS root the page may manage, or None in a checkout (see ``os_root``)."""
        if self.os_root is not None:
            return self.os_root
        return Path("/") if Path("/etc/appliance/system.json").exists() else None

    @property
    def cert_path(self) -> Path:
        return self.cert_file or self.data_dir / "tls" / "cert.pem"

    @property
    def key_path(self) -> Path:
        return self.key_file or self.data_dir / "tls" / "key.pem"

    @property
    def secrets_dir(self) -> Path:
        return self.data_dir / "secrets"

    @property
    def generated_passphrase_path(self) -> Path:
        return self.secrets_dir / "passphrase"
