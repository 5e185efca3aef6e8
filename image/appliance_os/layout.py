"""Where the appliance lives on its own OS (the built image, or a Debian box after ``scripts/install``).

Every path is relative to a root (``/`` on the box; the image's root file system while it is
built; a temporary folder in tests), so the same code installs into any of them.

Releases sit side by side (A/B) and the service runs whatever ``current`` points to::

    /opt/appliance/releases/<version>/venv          the virtual environment of that release
    /opt/appliance/releases/<version>/release.json  its version, build time and wheel hashes
    /opt/appliance/releases/<version>/CHANGELOG.md  what changed (shown on the page)
    /opt/appliance/current  -> releases/<version>   the running release (a symlink)
    /opt/appliance/previous -> releases/<version>   the one to fall back to
    /etc/appliance/appliance.env                    the service's settings (APPLIANCE_*)
    /etc/appliance/system.json                      written by install: this is the appliance OS
    /var/lib/appliance                              the data directory (catalog, store, secrets)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: The page/API port on the appliance OS (replication between appliances uses it too).
SERVICE_PORT = 443
#: File system labels: the kernel finds its root by label, so the disk may be any device.
ROOT_LABEL = "appliance-root"
ESP_LABEL = "APPLIANCE"
INSTALLER_ROOT_LABEL = "appl-installer"
#: On the kernel command line of the installer image: the installer runs, the service does not.
INSTALLER_FLAG = "appliance.installer"
SERVICE_UNIT = "appliance.service"
#: In the service's secrets folder: present once the first admin exists (the console banner
#: then stops showing a set-up code). The code itself is ``setup-code`` beside it.
SETUP_DONE_MARK = "setup-done"


@dataclass(frozen=True)
class Layout:
    root: Path = Path("/")

    def _p(self, relative: str) -> Path:
        return self.root / relative

    @property
    def opt(self) -> Path:
        return self._p("opt/appliance")

    @property
    def releases(self) -> Path:
        return self._p("opt/appliance/releases")

    @property
    def current(self) -> Path:
        return self._p("opt/appliance/current")

    @property
    def previous(self) -> Path:
        return self._p("opt/appliance/previous")

    def release(self, version: str) -> Path:
        return self.releases / version

    def venv(self, version: str) -> Path:
        return self.release(version) / "venv"

    @property
    def etc(self) -> Path:
        return self._p("etc/appliance")

    @property
    def env_file(self) -> Path:
        return self._p("etc/appliance/appliance.env")

    @property
    def system_file(self) -> Path:
        return self._p("etc/appliance/system.json")

    @property
    def data(self) -> Path:
        return self._p("var/lib/appliance")

    @property
    def units(self) -> Path:
        """systemd units the appliance installs (``/usr/local`` so that packages never clash)."""
        return self._p("usr/local/lib/systemd/system")

    def is_appliance_os(self) -> bool:
        return self.system_file.exists()

    def current_version(self) -> str | None:
        """The release ``current`` points to, or None when nothing is installed."""
        try:
            return self.current.resolve(strict=True).name
        except (FileNotFoundError, RuntimeError):
            return None

    def previous_version(self) -> str | None:
        try:
            return self.previous.resolve(strict=True).name
        except (FileNotFoundError, RuntimeError):
            return None
