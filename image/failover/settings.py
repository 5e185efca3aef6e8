"""Per-asset failover settings: catalog settings, key ``failover``.

``{"memory_reserve_mib": n, "assets": {asset: {"proof": {...}, "network": {...}}}}``. Module
functions, not only manager methods: a CLI command (the demo VM's seed) configures an asset
without starting a manager, which would take the manager lock a running service holds. Values
are validated before they are stored, so a failover never meets a setting it cannot parse.
"""

from __future__ import annotations

from typing import Any

from appliance.errors import InvalidInput
from image.boot_proof import BootProofSpec
from image.failover.network import check_network_on_host, network_from_dict, network_to_dict
from image.host_network import HostNetwork, read_host_network

SETTINGS_KEY = "failover"


def failover_settings(catalog: Any) -> dict[str, Any]:
    get = getattr(catalog, "get_settings", None)
    return dict(get(SETTINGS_KEY)) if get is not None else {}


def asset_failover_settings(catalog: Any, asset: str) -> dict[str, Any]:
    """``{"proof": {...}, "network": {...}}`` configured for ``asset`` (may be empty)."""
    return dict((failover_settings(catalog).get("assets") or {}).get(asset) or {})


def put_asset_failover_settings(
    catalog: Any,
    asset: str,
    *,
    proof: dict[str, Any] | None = None,
    network: dict[str, Any] | None = None,
    host: HostNetwork | None = None,
) -> dict[str, Any]:
    """Store the boot proof and network of an asset's failovers (validated first; a network
    must also be one this host can give: ``host``, default the host's network read now)."""
    put = getattr(catalog, "put_settings", None)
    if put is None:
        raise InvalidInput("this catalog cannot store settings")
    entry: dict[str, Any] = {}
    if proof is not None:
        entry["proof"] = BootProofSpec.from_dict(proof).to_dict()
    if network is not None:
        parsed = network_from_dict(network)
        if parsed.mode != "isolated":
            check_network_on_host(parsed, host if host is not None else read_host_network())
        entry["network"] = network_to_dict(parsed)
    settings = failover_settings(catalog)
    assets = dict(settings.get("assets") or {})
    assets[asset] = {**dict(assets.get(asset) or {}), **entry}
    settings["assets"] = assets
    put(SETTINGS_KEY, settings)
    return dict(assets[asset])
