"""The hardware API against a live uvicorn on 127.0.0.1, on real loop devices: the disks with
their pool eligibility in words, a btrfs raid1 pool made of two loop devices by the API's job and
listed healthy, a scrub job, USB media and rotation sets, and who may do what.

The service's device monitor runs (periodic rescans every half second here: this host has no
udevd). Every loop device is attached by this module and detached by it (found by its backing
file), every mount below the module's folder is unmounted, even when a test fails.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import LiveServer, bootstrapped_server, wait_job
from usb_support import mounts_below, unmount_below, until

GIB = 1 << 30

pytestmark = pytest.mark.root


class LoopDisks:
    """Sparse image files attached as loop devices; :meth:`cleanup` detaches exactly theirs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(exist_ok=True)
        self.files: list[Path] = []

    def make(self, name: str, size: int = GIB) -> str:
        """A new disk; its identity (``loop:<file>``, as discovery keys it)."""
        path = self.folder / f"{name}.img"
        with open(path, "wb") as f:
            f.truncate(size)
        self.files.append(path)
        subprocess.run(["losetup", "--find", "--show", str(path)], check=True, capture_output=True)
        return f"loop:{path}"

    def devnode(self, identity: str) -> str:
        path = identity.removeprefix("loop:")
        out = subprocess.run(["losetup", "-j", path], capture_output=True, text=True).stdout
        return out.split(":", 1)[0]

    def cleanup(self) -> None:
        for path in self.files:
            out = subprocess.run(["losetup", "-j", str(path)], capture_output=True, text=True)
            for line in out.stdout.splitlines():
                devnode = line.split(":", 1)[0]
                subprocess.run(
                    ["btrfs", "device", "scan", "--forget", devnode], capture_output=True
                )
                subprocess.run(["losetup", "-d", devnode], capture_output=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, LoopDisks]]:
    root = tmp_path_factory.mktemp("hardware-api")
    disks = LoopDisks(root / "disks")
    try:
        with bootstrapped_server(root, device_monitor_interval=0.5) as live:
            yield live, disks
    finally:
        unmount_below(root)
        disks.cleanup()
        assert not mounts_below(root)


@pytest.fixture(scope="module")
def server(site: tuple[LiveServer, LoopDisks]) -> LiveServer:
    return site[0]


@pytest.fixture(scope="module")
def disks(site: tuple[LiveServer, LoopDisks]) -> LoopDisks:
    return site[1]


def listed(client: httpx.Client, identity: str) -> dict[str, Any]:
    """The disk as ``GET /api/disks`` shows it, once the monitor has seen it."""
    found: dict[str, Any] = {}

    def seen() -> bool:
        found.update({d["identity"]: d for d in client.get("/api/disks").json()["disks"]})
        return identity in found

    until(seen, 20)
    return found[identity]


def test_disks_are_listed_with_their_refusals_in_words(
    disks: LoopDisks, viewer: httpx.Client, operator: httpx.Client, tmp_path: Path
) -> None:
    fresh = disks.make("fresh")
    small = disks.make("small", 256 << 20)
    busy = disks.make("busy")
    subprocess.run(["mkfs.ext4", "-q", "-L", "HOLIDAY", disks.devnode(busy)], check=True)
    where = tmp_path / "elsewhere"
    where.mkdir()
    subprocess.run(["mount", disks.devnode(busy), str(where)], check=True)
    try:
        answer = operator.post("/api/disks/rescan")
        assert answer.status_code == 200, answer.text
        assert answer.json()["rescan_seconds"] == 0.5
        assert viewer.post("/api/disks/rescan").json()["code"] == "forbidden"
        shown = listed(viewer, fresh)
        assert shown["eligible"] and shown["refusals"] == [] and shown["kind"] == "loop"
        assert shown["devnode"] == disks.devnode(fresh) and shown["size_bytes"] == GIB
        assert listed(viewer, small)["refusals"] == [
            "is too small (256 MiB; a pool disk needs at least 1 GiB)"
        ]
        mounted = listed(viewer, busy)
        assert not mounted["eligible"]
        assert f"mounted at {where}" in mounted["refusals"]
        assert mounted["warnings"] == [
            "holds a ext4 filesystem labelled 'HOLIDAY': a pool erases it"
        ]
        assert (mounted["fs_type"], mounted["fs_label"]) == ("ext4", "HOLIDAY")
        # SMART on request: a loop device has none, which is said in words, not an error.
        smart = viewer.get("/api/disks", params={"smart": 1}).json()["disks"]
        loop = next(d for d in smart if d["identity"] == fresh)
        assert loop["smart"]["status"] == "unknown" and loop["smart"]["reason"]
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_mirror_pool_is_made_from_two_loop_disks_by_a_job_and_scrubbed(
    server: LiveServer,
    disks: LoopDisks,
    admin: httpx.Client,
    operator: httpx.Client,
    viewer: httpx.Client,
) -> None:
    a, b = disks.make("mirror-a"), disks.make("mirror-b")
    listed(viewer, a), listed(viewer, b)
    body = {"name": "mirror", "disks": [a, b], "fs_type": "btrfs", "profile": "raid1"}
    for client in (viewer, operator):
        refused = client.post("/api/pools", json=body)
        assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
    bad = admin.post("/api/pools", json={**body, "profile": "single"})
    assert bad.status_code == 400 and "choose raid1 or raid10" in bad.json()["message"]
    gone = admin.post("/api/pools", json={**body, "disks": [a, "loop:/nowhere.img"]})
    assert gone.status_code == 404 and "no disk 'loop:/nowhere.img'" in gone.json()["message"]

    started = admin.post("/api/pools", json=body)
    assert started.status_code == 202, started.text
    assert started.headers["location"] == f"/api/jobs/{started.json()['id']}"
    job = wait_job(admin, started.json()["id"])
    assert job["state"] == "succeeded", job
    pools = {p["name"]: p for p in viewer.get("/api/pools").json()}
    assert list(pools) == ["default", "mirror"]
    mirror = pools["mirror"]
    assert (mirror["kind"], mirror["fs_type"], mirror["profile"]) == ("block", "btrfs", "raid1")
    assert mirror["health"] == "ok" and mirror["health_reasons"] == [] and mirror["mounted"]
    assert [m["identity"] for m in mirror["members"]] == [a, b]
    assert not any(m["missing"] for m in mirror["members"])
    assert [m["devnode"] for m in mirror["members"]] == [disks.devnode(a), disks.devnode(b)]
    assert mirror["total_bytes"] > mirror["free_bytes"] > 0 and not mirror["degraded"]
    assert mirror["mountpoint"] == str(server.settings.data_dir / "pools" / "mirror")
    default = pools["default"]
    shares = os.stat(default["path"]).st_dev == os.stat("/").st_dev
    assert ("shares the system disk" in default["warnings"]) == shares
    assert default["kind"] == "directory" and default["health"] == "ok"

    # The disks are the pool's now: refused for another pool, in words.
    assert "already a pool member" in listed(viewer, a)["refusals"]
    assert listed(viewer, a)["pool"] == "mirror"
    again = admin.post("/api/pools", json={**body, "name": "second"})
    assert again.status_code == 409 and "already a pool member" in again.json()["message"]
    assert admin.get("/api/pools/importable").json() == []

    scrub = operator.post("/api/pools/mirror/scrub")
    assert scrub.status_code == 202, scrub.text
    done = wait_job(operator, scrub.json()["id"])
    assert done["state"] == "succeeded" and done["kind"] == "pool_scrub", done
    assert done["result"]["scrub"]["uncorrectable"] == 0
    scrubbed = {p["name"]: p for p in viewer.get("/api/pools").json()}["mirror"]
    assert scrubbed["last_scrub"] is not None and scrubbed["health"] == "ok"
    assert viewer.post("/api/pools/mirror/scrub").status_code == 403
    folder = operator.post("/api/pools/default/scrub")
    assert folder.status_code == 400 and "only a btrfs pool" in folder.json()["message"]
    replace = admin.post("/api/pools/mirror/replace", json={"member": "loop:/x", "disk": a})
    assert replace.status_code == 404 and "has no disk" in replace.json()["message"]

    actions = [(e["action"], e["target"]) for e in admin.get("/api/audit").json()]
    assert ("pool.create", "mirror") in actions and ("pool.scrub", "mirror") in actions


def test_usb_media_and_rotation_sets(
    disks: LoopDisks, admin: httpx.Client, operator: httpx.Client, viewer: httpx.Client
) -> None:
    plain = disks.make("not-usb")
    listed(viewer, plain)
    refused = admin.post("/api/media", json={"disk": plain, "label": "OFFSITE-Z"})
    assert refused.status_code == 409, refused.text
    assert "is not a USB disk" in refused.json()["message"]
    assert refused.json()["details"]["refusals"][0] == "is not a USB disk (bus unknown)"
    label = admin.post("/api/media", json={"disk": plain, "label": "bad label"})
    assert label.status_code == 400 and "disk label 'bad label'" in label.json()["message"]
    assert viewer.post("/api/media", json={"disk": plain}).status_code == 403
    assert viewer.get("/api/media").json() == []
    assert viewer.get("/api/media/offered").json() == []
    missing = operator.post("/api/media/OFFSITE-Q/export")
    assert missing.status_code == 404 and "no USB disk 'OFFSITE-Q'" in missing.json()["message"]

    sets = {"sets": [{"name": "Offsite", "assets": [], "rotate_days": 14, "verify": True}]}
    assert operator.put("/api/rotation", json=sets).status_code == 403
    saved = admin.put("/api/rotation", json=sets)
    assert saved.status_code == 200, saved.text
    (offsite,) = viewer.get("/api/rotation").json()
    assert (offsite["name"], offsite["rotate_days"], offsite["keep_newest"]) == ("Offsite", 14, 1)
    assert offsite["members"] == [] and offsite["status"]["overdue"] == []
    bad = admin.put("/api/rotation", json={"sets": [{"name": "Offsite", "rotate_days": 0}]})
    assert bad.status_code == 422
    twice = admin.put("/api/rotation", json={"sets": [{"name": "A"}, {"name": "a"}]})
    assert twice.status_code == 400 and "same name" in twice.json()["message"]
    named = admin.put("/api/rotation", json={"sets": [{"name": "!bad"}]})
    assert named.status_code == 400 and "rotation set name" in named.json()["message"]
