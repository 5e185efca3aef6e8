"""A "lost" appliance for the recovery-from-tapes tests: it backed a tree up, wrote the point to
a virtual library, and then its data directory was removed; the library and the recovery key are
what is left (as after a fire, with the tapes off-site)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from engine_support import PASSPHRASE

from appliance.engine import Appliance
from hardware.tape.deck import open_deck
from hardware.tape.jobs import backup_to_tape
from hardware.tape.library import create_virtual_library, register_library

KiB = 1024
MiB = 1024 * KiB


@dataclass
class Lost:
    library: Path
    drive: str
    recovery_key: str
    store_id: str
    point: str
    files: dict[str, bytes]


def lost_appliance(root: Path, files: dict[str, bytes], *, barcodes: tuple[str, ...]) -> Lost:
    """Write ``files`` as a tree, back it up on an appliance in ``root/first``, write the point
    to a new virtual library ``root/lib`` (named ``lost``, 4 MiB tapes), then remove the
    appliance."""
    for name, data in files.items():
        (root / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "src" / name).write_bytes(data)
    library = create_virtual_library(
        root / "lib",
        slots=3,
        drives=1,
        cartridges=[(code, 4 * MiB) for code in barcodes],
        name="lost",
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APPLIANCE_TEST_WEAK_KDF", "1")
        mp.delenv("APPLIANCE_CATALOG_URL", raising=False)
        app, recovery_key = Appliance.init(str(root / "first"), PASSPHRASE, pack_size=256 * KiB)
        with app:
            point = app.backup_files(str(root / "src"), "docs").point.id
            register_library(app.catalog, library.root)
            app.catalog.put_tape_pool("weekly")
            deck = open_deck(app.catalog, library.drive_identity(0))
            assert backup_to_tape(app, deck, "weekly")["points_written"] == [point]
            store_id = app.repo.store_id
    shutil.rmtree(root / "first")
    return Lost(
        library=library.root,
        drive=library.drive_identity(0),
        recovery_key=recovery_key,
        store_id=store_id,
        point=point,
        files=files,
    )
