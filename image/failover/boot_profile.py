"""Boot profiles: which chunks a VM's last proven boot read, in order, to warm the next boot.

One JSON file per asset under ``<state dir>/boot-profiles/`` (the asset's name when it is usable
as a file name as it is, else its SHA-256): ``{"asset", "point", "recorded_at", "disks": {disk
name: [chunk index, ...]}}``. The file is a cache, never a source of truth: one that cannot be
read is an empty profile, one that cannot be written only costs the next boot its head start,
and it is replaced atomically (written beside it, renamed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re

from image.failover.records import now_iso

#: Asset names usable as file names as they are (others are hashed).
SAFE_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def profile_path(state_dir: str, asset: str) -> str:
    safe = asset if SAFE_FILE_NAME.match(asset) else hashlib.sha256(asset.encode()).hexdigest()
    return os.path.join(state_dir, "boot-profiles", f"{safe}.json")


def load_boot_profile(state_dir: str, asset: str) -> dict[str, list[int]]:
    """{disk name: chunk indices} the last proven boot of ``asset`` read, in order (or {})."""
    try:
        with open(profile_path(state_dir, asset), encoding="utf-8") as f:
            disks = json.load(f).get("disks") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(disks, dict):
        return {}
    return {
        str(name): [i for i in indices if isinstance(i, int)]
        for name, indices in disks.items()
        if isinstance(indices, list)
    }


def save_boot_profile(
    state_dir: str, asset: str, point_id: str, disks: dict[str, list[int]]
) -> None:
    """Keep what a proven boot read; the next failover of ``asset`` warms its cache with it.
    A profile that cannot be written only costs the next boot its head start."""
    if not any(disks.values()):
        return
    path = profile_path(state_dir, asset)
    document = {"asset": asset, "point": point_id, "recorded_at": now_iso(), "disks": disks}
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(document, f)
        os.replace(tmp, path)
