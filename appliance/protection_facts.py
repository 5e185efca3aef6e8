"""The edge of protection status: reads the catalog and the filesystem once, hands facts on.

:mod:`appliance.protection_status` decides from records alone; the two things it cannot know
from records are gathered here: which locations sit on the appliance's system disk (a folder
location whose path is on the same device as the root filesystem, like the data directory's
default pool) and the catalog's records of every asset, in one pass.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable

from appliance.catalog import Catalog
from appliance.catalog.records import (
    ACTIVE_FAILOVER_STATES,
    FailoverSessionRecord,
    LocationRecord,
    PointRecord,
)
from appliance.protection import last_good_point
from appliance.protection_status import AssetFacts

#: Location kinds whose address is a folder of the appliance's own filesystem tree.
_FOLDER_KINDS = frozenset({"pool_dir"})


def system_disk_locations(locations: Iterable[LocationRecord], root: str = "/") -> frozenset[str]:
    """IDs of the folder locations on the same device as ``root``. A folder that cannot be
    read is left out: an unreachable location says nothing about the system disk."""
    try:
        root_device = os.stat(root).st_dev
    except OSError:
        return frozenset()
    found = set()
    for location in locations:
        if location.kind not in _FOLDER_KINDS:
            continue
        try:
            if os.stat(location.address).st_dev == root_device:
                found.add(location.id)
        except OSError:
            continue
    return frozenset(found)


def gather_facts(catalog: Catalog, root: str = "/") -> list[AssetFacts]:
    """The facts of every asset in the catalog, in the catalog's asset order."""
    points_by_asset: dict[str, list[PointRecord]] = defaultdict(list)
    for point in catalog.list_points():
        points_by_asset[point.asset].append(point)
    policies = catalog.list_policies()
    locations = {loc.id: loc for loc in catalog.list_locations()}
    system_disk = system_disk_locations(locations.values(), root)
    last_tests = catalog.last_boot_tests(per="asset")
    last_proven = catalog.last_boot_tests(per="asset", proven_only=True)
    active: dict[str, list[FailoverSessionRecord]] = defaultdict(list)
    for session in catalog.list_failover_sessions(states=ACTIVE_FAILOVER_STATES, limit=1000):
        active[session.asset].append(session)
    out = []
    for asset in catalog.list_assets():
        mine = points_by_asset.get(asset.name, [])
        good = last_good_point(mine)
        out.append(
            AssetFacts(
                asset=asset,
                policies=policies,
                points=mine,
                copies=catalog.copies_of(good.id) if good else [],
                locations=locations,
                system_disk=system_disk,
                last_boot_test=last_tests.get(asset.name),
                last_proven_boot=last_proven.get(asset.name),
                active_sessions=active.get(asset.name, []),
            )
        )
    return out
