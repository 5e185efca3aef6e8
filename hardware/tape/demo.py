"""The demo's tape library: a virtual library and a media pool, so the Tape screen is populated.

``appliance demo seed`` (:func:`api.cli.cmd_demo_seed`) calls :func:`seed_demo_tape` after the
demo VM: a virtual library ``demo`` in ``<data dir>/tape/demo`` (8 slots, 1 drive, 1 mail slot,
4 blank cartridges of 64 MiB, barcodes ``DEMO01L8`` .. ``DEMO04L8`` as LTO-8 labels read),
registered as an administrator registers one, its cartridges recorded in the catalog, and the
pool ``weekly`` (append to the open set, 28 days' retention) scheduled every Saturday at 03:00
on the library's drive, writing the newest point of each asset. A new user can press "Back up to
tape" at once. Each step is done only when missing: a second seed changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import NotFound
from hardware.tape.library import (
    Cartridge,
    VirtualLibrary,
    create_virtual_library,
    register_library,
    registered,
)

if TYPE_CHECKING:
    from appliance.engine import Appliance

DEMO_LIBRARY = "demo"
DEMO_POOL = "weekly"
DEMO_BARCODES = tuple(f"DEMO{n:02d}L8" for n in range(1, 5))
DEMO_CAPACITY = 64 * 1024 * 1024
DEMO_SCHEDULE = "0 3 * * 6"


def demo_library_dir(data_dir: str) -> Path:
    return Path(data_dir).resolve() / "tape" / DEMO_LIBRARY


def seed_demo_tape(app: Appliance, *, log: Callable[[str], None] = lambda line: None) -> list[str]:
    """Give ``app`` the demo library and pool (see the module doc); returns the steps done now
    (``tape_library``, ``tape_registered``, ``tape_media``, ``tape_pool``)."""
    created: list[str] = []
    root = demo_library_dir(app.data_dir.path)
    if (root / "library.json").is_file():
        library = VirtualLibrary(root)
    else:
        library = create_virtual_library(
            root,
            slots=8,
            drives=1,
            ie=1,
            cartridges=[Cartridge(code, DEMO_CAPACITY) for code in DEMO_BARCODES],
            name=DEMO_LIBRARY,
        )
        created.append("tape_library")
        log(f"virtual tape library {DEMO_LIBRARY} made in {root}")
    if not any(Path(e["path"]).resolve() == library.root for e in registered(app.catalog)):
        register_library(app.catalog, library.root)
        created.append("tape_registered")
    recorded = False
    for slot in library.status().all_slots():
        if not (slot.full and slot.barcode):
            continue
        try:
            app.catalog.get_tape_medium(slot.barcode)
        except NotFound:
            app.catalog.put_tape_medium(slot.barcode, place="library", slot=slot.number)
            recorded = True
    if recorded:
        created.append("tape_media")
    if DEMO_POOL not in {p.name for p in app.catalog.list_tape_pools()}:
        app.catalog.put_tape_pool(DEMO_POOL, allocation="continue", retention_days=28)
        app.catalog.set_tape_pool_schedule(
            DEMO_POOL,
            schedule=DEMO_SCHEDULE,
            drive=library.drive_identity(0),
            points_rule={"rule": "newest"},
        )
        created.append("tape_pool")
        log(f"tape pool {DEMO_POOL}: every Saturday at 03:00 on {library.drive_identity(0)}")
    return created
