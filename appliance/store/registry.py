"""Backend kinds, found through the ``appliance.backends`` entry-point group.

A kind is a short name ("pool_dir", "s3", "usb_disk", "tape", "peer") registered by whichever
package implements it, as a factory ``factory(address, **options) -> Backend``. The core registers
``pool_dir`` itself (in ``pyproject.toml``); outer packages (``tiering``, ``hardware``, ``api``)
register theirs the same way, so ``appliance`` opens their backends without importing them.
Entry points are read on every call: an installed plug-in is seen without a restart of the caller.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from appliance.errors import InvalidInput
from appliance.store.backend import Backend

GROUP = "appliance.backends"


def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep)  # the first distribution to claim a name keeps it
    return found


def backend_kinds() -> list[str]:
    """The names of every registered backend kind, sorted."""
    return sorted(_entry_points())


def open_backend(kind: str, address: str, **options: Any) -> Backend:
    """A backend of ``kind`` for ``address`` (a path, a bucket URL, a device serial, ...).

    ``options`` go to the kind's factory unchanged. An unknown kind raises :class:`InvalidInput`
    naming the kinds that are installed.
    """
    ep = _entry_points().get(kind)
    if ep is None:
        known = ", ".join(backend_kinds()) or "none"
        raise InvalidInput(
            f"unknown backend kind {kind!r} (installed: {known}); install the package that "
            "provides it with its entry points (pip install -e .)",
            kind=kind,
        )
    factory = ep.load()
    backend: Backend = factory(address, **options)
    return backend
