"""The engine demo behind ``scripts/demo`` (see that script)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("APPLIANCE_DATA_DIR", os.path.join(ROOT, ".appliance-demo", "data"))
WORK = os.path.join(os.path.dirname(DATA), "samples")
CLI = os.path.join(ROOT, ".venv", "bin", "appliance")


def run(*args: str, capture: bool = False) -> str:
    cmd = [CLI, "--data-dir", DATA, *args]
    print(f"\n$ appliance {shlex.join(args)}", flush=True)
    result = subprocess.run(cmd, check=True, text=True, capture_output=capture)
    if capture:
        return result.stdout
    return ""


def make_tree(root: str) -> None:
    rng = random.Random(7)
    words = [
        "backup",
        "restore",
        "pool",
        "chunk",
        "pack",
        "index",
        "manifest",
        "verify",
        "retention",
        "point",
        "asset",
    ]
    for d in range(6):
        os.makedirs(os.path.join(root, f"dept-{d}", "docs"), exist_ok=True)
        for f in range(40):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 4000)))
            with open(os.path.join(root, f"dept-{d}", "docs", f"note-{f}.txt"), "w") as out:
                out.write(text)
        with open(os.path.join(root, f"dept-{d}", "photo.jpg"), "wb") as out:
            out.write(rng.randbytes(2 * 1024 * 1024))
    os.symlink("dept-0/docs/note-0.txt", os.path.join(root, "latest-note"))


def make_disk(path: str) -> None:
    rng = random.Random(11)
    with open(path, "wb") as disk:
        disk.truncate(256 * 1024 * 1024)
        for _region in range(40):
            disk.seek(rng.randrange(0, 250) * 1024 * 1024)
            disk.write(rng.randbytes(256 * 1024) + b"filesystem block " * 8000)


def digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> int:
    if not os.environ.get("APPLIANCE_PASSPHRASE"):
        os.environ["APPLIANCE_PASSPHRASE"] = "demo-passphrase"
        print("Using the demo passphrase 'demo-passphrase' (set APPLIANCE_PASSPHRASE to choose).")
    os.makedirs(WORK, exist_ok=True)
    tree = os.path.join(WORK, "fileserver")
    disk = os.path.join(WORK, "web-vm.img")
    spec = os.path.join(WORK, "web-vm.json")
    if not os.path.isdir(tree):
        make_tree(tree)
    if not os.path.exists(disk):
        make_disk(disk)
    with open(spec, "w") as f:
        json.dump(
            {
                "name": "web-vm",
                "vcpus": 1,
                "memory_mib": 256,
                "firmware": "bios",
                "disks": [{"name": "web-vm", "bus": "virtio"}],
                "nics": [{"model": "virtio", "mac": "52:54:00:12:34:56"}],
            },
            f,
        )
    if not os.path.exists(os.path.join(DATA, "pools", "default", "store", "config")):
        run("init")
    run("backup", "files", tree, "--asset", "fileserver")
    with open(os.path.join(tree, "dept-1", "docs", "note-3.txt"), "a") as f:
        f.write(" changed after the first backup")
    run("backup", "files", tree, "--asset", "fileserver")
    run("backup", "image", disk, "--asset", "web-vm", "--vm", spec)
    run("points")
    points = json.loads(run("--json", "points", capture=True))
    files_point = [p for p in points if p["asset"] == "fileserver"][-1]["id"]
    image_point = [p for p in points if p["asset"] == "web-vm"][-1]["id"]
    restored = os.path.join(os.path.dirname(DATA), "restored")
    subprocess.run(["rm", "-rf", restored], check=True)
    run("restore", files_point, os.path.join(restored, "fileserver"))
    same = (
        subprocess.run(["diff", "-r", tree, os.path.join(restored, "fileserver")]).returncode == 0
    )
    run("restore", image_point, os.path.join(restored, "web-vm.img"))
    disk_same = digest(disk) == digest(os.path.join(restored, "web-vm.img"))
    run("verify")
    print(f"\nFile tree restored identical: {same}; disk restored byte-exact: {disk_same}")
    print(f"Data directory: {DATA}")
    return 0 if same and disk_same else 1


if __name__ == "__main__":
    sys.exit(main())
