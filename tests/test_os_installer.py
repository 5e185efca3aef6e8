"""The console installer: disk choice on recorded lsblk output, the dialog's every path, the writer
on plain files, the two-console lock, and (as root) a whole installation onto loop devices driven
through a real pty."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from appliance.errors import Conflict, InvalidInput
from image.appliance_os.installer import (
    ConsoleLock,
    OtherConsole,
    Progress,
    TtyInput,
    parse_image_info,
    write_system,
)
from image.appliance_os.installer_dialog import Aborted, Choice, ask
from image.appliance_os.installer_disks import (
    Disk,
    candidate_disks,
    first_pool_doc,
    human_size,
    partition_path,
    root_source,
    stable_name,
)

REPO = Path(__file__).resolve().parents[1]
BOOT_CODE = b"\xeb\x63" + b"gptmbr" * 70  # 422 bytes, within the MBR's 440 bytes of code
GiB = 1 << 30
MiB = 1 << 20

# Recorded shape of `lsblk -J -b -d -o NAME,PATH,SIZE,MODEL,SERIAL,TYPE,RM,TRAN,RO` on a box
# booted from a USB stick (sdc), with a second stick, a DVD drive, a loop, zram and a tiny disk.
LSBLK = {
    "blockdevices": [
        {"name": "sda", "path": "/dev/sda", "size": 2000398934016, "model": "WDC WD20EFRX-68E  ",
         "serial": "WD-WCC4M1234567", "type": "disk", "rm": False, "tran": "sata", "ro": False},
        {"name": "nvme0n1", "path": "/dev/nvme0n1", "size": 512110190592,
         "model": "Samsung SSD 970 EVO Plus 500GB", "serial": "S4EVNX0N123456",
         "type": "disk", "rm": False, "tran": "nvme", "ro": False},
        {"name": "sdb", "path": "/dev/sdb", "size": 15376318464, "model": "Ultra",
         "serial": "4C530001231231", "type": "disk", "rm": True, "tran": "usb", "ro": False},
        {"name": "sdc", "path": "/dev/sdc", "size": 8004304896, "model": "DataTraveler",
         "serial": "BOOT0001", "type": "disk", "rm": True, "tran": "usb", "ro": False},
        {"name": "sr0", "path": "/dev/sr0", "size": 1073741312, "model": "DVD-RW",
         "serial": "X1", "type": "rom", "rm": True, "tran": "sata", "ro": False},
        {"name": "loop0", "path": "/dev/loop0", "size": 4 * 1073741824, "model": None,
         "serial": None, "type": "loop", "rm": False, "tran": None, "ro": False},
        {"name": "zram0", "path": "/dev/zram0", "size": 4294967296, "model": None,
         "serial": None, "type": "disk", "rm": False, "tran": None, "ro": False},
        {"name": "vdb", "path": "/dev/vdb", "size": 8589934592, "model": None,
         "serial": None, "type": "disk", "rm": "0", "tran": None, "ro": "1"},
        {"name": "sdd", "path": "/dev/sdd", "size": 536870912, "model": "tiny",
         "serial": "T1", "type": "disk", "rm": False, "tran": "sata", "ro": False},
    ]
}  # fmt: skip


# --- candidate disks ------------------------------------------------------------------------------


def test_candidates_leave_out_boot_disk_rom_loop_zram_readonly_and_small() -> None:
    disks = candidate_disks(LSBLK, "sdc", 1 * GiB)
    assert [d.name for d in disks] == ["sda", "nvme0n1", "sdb"]
    sda = disks[0]
    assert sda.model == "WDC WD20EFRX-68E"  # lsblk pads models
    assert sda.line == "sda  1.8 TiB  WDC WD20EFRX-68E  serial WD-WCC4M1234567  sata"
    assert disks[2].line == "sdb  14.3 GiB  Ultra  serial 4C530001231231  usb removable"


def test_candidates_boot_disk_by_path_loop_allowed_and_string_flags() -> None:
    disks = candidate_disks(LSBLK, "/dev/sda", 1 * GiB, allow_loop=True)
    assert [d.name for d in disks] == ["nvme0n1", "sdb", "sdc", "loop0"]
    assert disks[-1].line == "loop0  4.0 GiB  unknown model  no serial"
    # Old lsblk prints "0"/"1": vdb is read-only there and stays out even without a size limit.
    assert "vdb" not in [d.name for d in candidate_disks(LSBLK, None, 0)]
    assert "sdd" in [d.name for d in candidate_disks(LSBLK, None, 0)]


def test_no_candidates() -> None:
    assert candidate_disks({"blockdevices": []}, None, 0) == []
    assert candidate_disks(LSBLK, None, 4 * (1 << 40)) == []


def test_human_size() -> None:
    assert human_size(512) == "512 B"
    assert human_size(8 * GiB) == "8.0 GiB"
    assert human_size(512 * MiB) == "512.0 MiB"


@pytest.mark.parametrize(
    ("disk", "part"),
    [
        ("/dev/vdb", "/dev/vdb2"),
        ("/dev/sda", "/dev/sda2"),
        ("/dev/nvme0n1", "/dev/nvme0n1p2"),
        ("/dev/loop0", "/dev/loop0p2"),
        ("/dev/mmcblk0", "/dev/mmcblk0p2"),
    ],
)
def test_partition_path(disk: str, part: str) -> None:
    assert partition_path(disk, 2) == part


def test_root_source_takes_the_last_mount_on_slash() -> None:
    mountinfo = (
        "21 1 8:34 / / ro,relatime shared:1 - ext4 /dev/sdc2 ro\n"
        "22 21 0:21 / /proc rw - proc proc rw\n"
        "30 21 8:34 / / rw,relatime shared:2 - ext4 /dev/sdc3 rw\n"
    )
    assert root_source(mountinfo) == "/dev/sdc3"
    assert root_source("22 21 0:21 / /proc rw - proc proc rw\n") is None


def test_stable_name_prefers_model_serial_links() -> None:
    links = ["wwn-0x50014ee2b5", "ata-WDC_WD20_WD-1", "ata-WDC_WD20_WD-1-part1"]
    assert stable_name(links, "/dev/sda") == "/dev/disk/by-id/ata-WDC_WD20_WD-1"
    assert stable_name(["wwn-0x5"], "/dev/sda") == "/dev/disk/by-id/wwn-0x5"
    assert stable_name([], "/dev/loop3") == "/dev/loop3"


def test_first_pool_doc_names_stable_paths_and_serials() -> None:
    disks = candidate_disks(LSBLK, "sdc", GiB)
    doc = first_pool_doc((disks[0], disks[1]), lambda p: ["ata-X"] if p == "/dev/sda" else [])
    assert doc == {
        "disks": ["/dev/disk/by-id/ata-X", "/dev/nvme0n1"],
        "serials": ["WD-WCC4M1234567", "S4EVNX0N123456"],
    }


# --- the dialog -----------------------------------------------------------------------------------

DISKS = candidate_disks(LSBLK, "sdc", GiB)  # 1 sda, 2 nvme0n1, 3 sdb


def run_dialog(
    answers: list[str], disks: list[Disk] = DISKS, password: tuple[str, ...] = ("",)
) -> tuple[Choice, str]:
    """The dialog over strings; ``password`` answers the console-password questions at the end
    (Enter by default: no console login)."""
    out = io.StringIO()
    lines = [*answers, *password]
    choice = ask(io.StringIO("".join(a + "\n" for a in lines)), out, disks)
    return choice, out.getvalue()


def names(choice: Choice) -> tuple[str | None, list[str]]:
    """The chosen system disk and pool disks by name."""
    return (choice.system.name if choice.system else None), [d.name for d in choice.pool]


def test_dialog_happy_path() -> None:
    choice, text = run_dialog(["2", "ERASE", "1 3"])
    assert choice.action == "install"
    assert names(choice) == ("nvme0n1", ["sda", "sdb"])
    assert "  1) sda  1.8 TiB" in text
    assert "Install the appliance on which disk? [1-3]" in text
    assert "WARNING: everything on this disk will be erased:\n  nvme0n1  476.9 GiB" in text
    assert "Type ERASE to erase it and install" in text
    assert "Which disks become the first pool? Numbers separated by spaces, Enter for none" in text
    assert "Summary:" in text and "system disk (erased now): nvme0n1" in text


def test_dialog_reasks_bad_disk_numbers() -> None:
    choice, text = run_dialog(["0", "x", "4", "", "1", "ERASE", ""])
    assert text.count("Please type a number from 1 to 3.") == 4
    assert names(choice) == ("sda", [])
    assert "first pool: none" in text


def test_dialog_anything_but_erase_goes_back() -> None:
    choice, text = run_dialog(["1", "erase", "1", "yes", "3", "ERASE", "2"])
    assert text.count("Nothing was erased.") == 2
    assert text.count("Install the appliance on which disk?") == 3
    assert names(choice) == ("sdb", ["nvme0n1"])


def test_dialog_reasks_bad_pool_answers_with_the_reason() -> None:
    choice, text = run_dialog(["1", "ERASE", "two", "7", "1", "2 2", "2,3"])
    assert "'two' is not a number." in text
    assert "7 is not in the list (1-3)." in text
    assert "1 is the system disk; it cannot be in the pool." in text
    assert "2 is listed twice." in text
    assert text.count("Which disks become the first pool?") == 5
    assert names(choice) == ("sda", ["nvme0n1", "sdb"])


def test_dialog_single_disk_asks_no_pool() -> None:
    choice, text = run_dialog(["1", "ERASE"], DISKS[:1])
    assert names(choice) == ("sda", [])
    assert "first pool" in text and "Which disks become" not in text


def test_dialog_console_password_typed_twice_or_none() -> None:
    choice, text = run_dialog(["1", "ERASE", ""])
    assert choice.root_password is None
    assert "No console login: root stays locked" in text and "console login: none" in text
    answers = (
        "short",
        "long enough 1",
        "long enough 2",
        "pass:word1",
        "long enough",
        "long enough",
    )
    choice, text = run_dialog(["1", "ERASE", ""], password=answers)
    assert "At least 8 characters, please." in text
    assert "The two passwords differ." in text
    assert "must not contain ':'" in text
    assert text.count("Password for root on the console") == 4
    assert choice.root_password == "long enough"
    assert "console login: root, with the password typed" in text
    assert "long enough" not in text and "long enough" not in repr(choice)


def test_dialog_rescan_and_poweroff() -> None:
    assert run_dialog(["r"])[0].action == "rescan"
    assert run_dialog(["P"])[0].action == "poweroff"


def test_dialog_without_disks_offers_rescan_or_poweroff() -> None:
    choice, text = run_dialog(["1", "r"], [])
    assert "No disk to install on was found" in text
    assert "Please type r or p." in text
    assert choice.action == "rescan"
    assert run_dialog(["p"], [])[0].action == "poweroff"


def test_dialog_end_of_input_aborts() -> None:
    with pytest.raises(Aborted):
        run_dialog(["1"])


# --- two consoles ---------------------------------------------------------------------------------


def test_first_console_typed_on_takes_the_lock_and_the_other_waits(tmp_path: Path) -> None:
    lock_path = tmp_path / "installer.lock"
    a_read, a_write = os.pipe()
    b_read, b_write = os.pipe()
    lock_a, lock_b = ConsoleLock(lock_path, "tty1"), ConsoleLock(lock_path, "ttyS0")
    tty_a, tty_b = TtyInput(a_read, lock_a, 0.05), TtyInput(b_read, lock_b, 0.05)
    try:
        os.write(a_write, b"1\n")
        assert tty_a.readline() == "1\n"
        # ttyS0 has nobody typing: it notices the holder by itself and names it.
        with pytest.raises(OtherConsole, match="tty1"):
            tty_b.readline()
        # Someone types on ttyS0 anyway: refused too.
        os.write(b_write, b"2\n")
        with pytest.raises(OtherConsole):
            tty_b.readline()
        released = threading.Event()

        def wait() -> None:
            lock_b.wait_for_release()
            released.set()

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.2)
        assert not released.is_set()
        lock_a.close()  # the installing console's process ends
        waiter.join(5)
        assert released.is_set()
        # The waiting console does not keep the lock: whoever types first claims it again.
        assert not lock_b.held_by_other()
    finally:
        lock_b.close()
        for fd in (a_read, a_write, b_read, b_write):
            os.close(fd)


# --- the image and the writer on plain files --------------------------------------------------------


def make_image(tmp_path: Path, size: int = 9 * MiB + 512) -> tuple[Path, bytes]:
    raw = bytearray(os.urandom(size // 2) + bytes(size - size // 2))  # zeros must be written too
    raw[512:520] = b"EFI PART"
    path = tmp_path / "system.img.zst"
    path.write_bytes(zstandard.ZstdCompressor(level=1).compress(bytes(raw)))
    return path, bytes(raw)


def target_file(tmp_path: Path, size: int) -> Path:
    target = tmp_path / "target.img"
    target.write_bytes(b"\xa5" * size)  # old data that the image's zeros must overwrite
    return target


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_image_info_is_checked() -> None:
    assert parse_image_info({"size": 1024, "sha256": "a" * 64, "version": "1.2"}).version == "1.2"
    bad: object
    for bad in (
        [],
        {"size": 1000, "sha256": "a" * 64},
        {"size": 0, "sha256": "a" * 64},
        {"size": 1024, "sha256": "A" * 64},
        {"size": 1024},
    ):
        with pytest.raises(InvalidInput):
            parse_image_info(bad)


def test_write_system_writes_zeros_and_verifies(tmp_path: Path) -> None:
    image, raw = make_image(tmp_path)
    target = target_file(tmp_path, 16 * MiB)
    seen: list[Progress] = []
    report = write_system(image, len(raw), sha(raw), str(target), seen.append)
    data = target.read_bytes()
    assert data[: len(raw)] == raw
    assert data[len(raw) : 15 * MiB] == b"\xa5" * (15 * MiB - len(raw))
    assert data[15 * MiB :] == bytes(MiB)  # the old tail (backup GPT, RAID labels) is cleared
    assert {p.phase for p in seen} == {"check", "write", "verify"}
    assert [p.percent for p in seen if p.phase == "write"][-1] == 100
    assert report.size == len(raw) and report.write_mib_per_s > 0


@pytest.mark.parametrize("damage", ["hash", "short", "long", "garbage", "no-gpt"])
def test_damaged_or_hostile_image_leaves_the_target_untouched(tmp_path: Path, damage: str) -> None:
    image, raw = make_image(tmp_path)
    size, digest = len(raw), sha(raw)
    blob = image.read_bytes()
    if damage == "hash":
        digest = sha(raw + b"x")
    elif damage == "short":
        image.write_bytes(blob[: len(blob) // 2])
    elif damage == "long":
        size -= 4 * MiB  # the stream holds more than system.json admits: a decompression bomb
    elif damage == "garbage":
        image.write_bytes(b"not zstd at all" * 100)
    else:
        plain = bytes(4096)
        image.write_bytes(zstandard.ZstdCompressor().compress(plain))
        size, digest = len(plain), sha(plain)
    target = target_file(tmp_path, 16 * MiB)
    before = sha(target.read_bytes())
    with pytest.raises(InvalidInput) as err:
        write_system(image, size, digest, str(target), lambda p: None)
    assert re.search(r"damaged|short|longer|GPT", str(err.value)), err.value
    assert sha(target.read_bytes()) == before


def test_too_small_target_is_refused(tmp_path: Path) -> None:
    image, raw = make_image(tmp_path)
    target = target_file(tmp_path, 8 * MiB)
    with pytest.raises(Conflict, match="the system needs"):
        write_system(image, len(raw), sha(raw), str(target), lambda p: None)
    assert target.read_bytes() == b"\xa5" * (8 * MiB)


# --- as root: a whole installation onto loop devices through a pty ---------------------------------


def _run(*argv: str, stdin: str | None = None) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, input=stdin).stdout


@pytest.fixture(scope="module")
def system_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """A small system image shaped like the build's: GPT, ESP (FAT), ext4 appliance-root last."""
    missing = [t for t in ("sfdisk", "mkfs.vfat", "mke2fs", "partx") if not shutil.which(t)]
    assert not missing, f"missing {missing}: apt-get install fdisk dosfstools e2fsprogs util-linux"
    work = tmp_path_factory.mktemp("system")
    raw = work / "system.img"
    size = 100 * MiB
    with open(raw, "wb") as f:
        f.truncate(size)
    table = 'label: gpt\nsize=32MiB, type=U, attrs="LegacyBIOSBootable"\ntype=L\n'
    _run("sfdisk", "-q", str(raw), stdin=table)
    parts = json.loads(_run("sfdisk", "-J", str(raw)))["partitiontable"]["partitions"]
    tree = work / "tree"
    (tree / "etc/appliance").mkdir(parents=True)
    (tree / "etc/appliance/system.json").write_text('{"version": "test"}\n')
    (tree / "etc/shadow").write_text("root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n")
    (tree / "etc/shadow").chmod(0o640)
    esp, root = work / "esp.fat", work / "root.ext4"
    # FAT labels hold 11 characters at most: layout.ESP_LABEL ("APPLIANCEESP") does not fit.
    _run("mkfs.vfat", "-C", "-n", "APPLESP", str(esp), str(parts[0]["size"] * 512 // 1024))
    with open(root, "wb") as f:
        f.truncate(parts[1]["size"] * 512)
    _run("mke2fs", "-q", "-t", "ext4", "-L", "appliance-root", "-d", str(tree), str(root))
    with open(raw, "r+b") as f:
        for part, fs in zip(parts, (esp, root), strict=True):
            f.seek(part["start"] * 512)
            f.write(fs.read_bytes())
        f.seek(0)
        f.write(BOOT_CODE)  # stands for syslinux's gptmbr.bin
    data = raw.read_bytes()
    image = work / "system.img.zst"
    image.write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    info = work / "system.json"
    info.write_text(json.dumps({"size": len(data), "sha256": sha(data), "version": "test"}))
    return image, info, len(data)


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[list[str]]:
    """Two sparse loop devices (target 512 MiB, pool 256 MiB); only these are detached."""
    assert os.geteuid() == 0, "the installer test needs root (loop devices, mount)"
    attached: list[str] = []
    try:
        for name, size in (("target", 512 * MiB), ("pool", 256 * MiB)):
            backing = tmp_path / f"{name}.img"
            with open(backing, "wb") as f:
                f.truncate(size)
            attached.append(_run("losetup", "-f", "--show", str(backing)).strip())
        yield attached
    finally:
        for dev in attached:
            subprocess.run(["partx", "-d", dev], capture_output=True)
            subprocess.run(["losetup", "-d", dev], capture_output=True)


class Console:
    """The installer in a child process on a pty: what a person at the console sees and types."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, start_new_session=True
        )
        os.close(slave)
        self.text = ""
        self.log = ""  # everything shown, for a transcript

    def expect(self, needle: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            left = deadline - time.monotonic()
            assert left > 0, f"waited for {needle!r}; the console shows:\n{self.text[-3000:]}"
            if select.select([self.master], [], [], min(left, 1))[0]:
                try:
                    chunk = os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # EIO: the child closed the pty
                    chunk = ""
                if not chunk and self.proc.poll() is not None:
                    raise AssertionError(f"exited before {needle!r}:\n{self.text[-3000:]}")
                self.text += chunk
                self.log += chunk
        seen, self.text = self.text, self.text[self.text.index(needle) + len(needle) :]
        return seen

    def send(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        rc = self.proc.wait(timeout)
        while select.select([self.master], [], [], 0.2)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                break
            if not chunk:
                break
            self.text += chunk.decode(errors="replace")
            self.log += chunk.decode(errors="replace")
        os.close(self.master)
        return rc, self.text


def _number_of(listing: str, dev: str) -> str:
    name = os.path.basename(dev)
    found = re.findall(rf"^\s*(\d+)\) {re.escape(name)}  ", listing, re.M)
    assert len(found) == 1, listing
    return found[0]


def _installer(image: Path, info: Path, devices: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "image.appliance_os.installer", "--allow-loop", "--no-reboot"]
    argv += ["--image", str(image), "--image-info", str(info)]
    for dev in devices:  # never offer other processes' loop devices to a test
        argv += ["--only", dev]
    return argv


def _fs_bytes(part: str) -> int:
    head = _run("dumpe2fs", "-h", part)
    count = re.search(r"^Block count:\s+(\d+)", head, re.M)
    block = re.search(r"^Block size:\s+(\d+)", head, re.M)
    assert count and block, head
    return int(count.group(1)) * int(block.group(1))


@pytest.mark.root
@pytest.mark.slow
def test_install_onto_a_loop_disk_through_the_console(
    system_image: tuple[Path, Path, int], loops: list[str], tmp_path: Path
) -> None:
    image, info, size = system_image
    target, pool = loops
    console = Console(_installer(image, info, loops))
    listing = console.expect("Install the appliance on which disk? [1-2]")
    t, p = _number_of(listing, target), _number_of(listing, pool)
    console.send("9")
    console.expect("Please type a number from 1 to 2.")
    console.send(t)
    assert os.path.basename(target) in console.expect("Type ERASE to erase it and install")
    console.send("no")
    console.expect("Nothing was erased.")
    console.expect("Install the appliance on which disk?")
    console.send(t)
    console.expect("Type ERASE")
    console.send("ERASE")
    console.expect("Which disks become the first pool?")
    console.send(t)
    console.expect("is the system disk; it cannot be in the pool.")
    console.send(p)
    console.expect("Password for root on the console")
    console.send("console-pass-1")
    console.expect("The same password again")
    console.send("console-pass-1")
    rc, text = console.finish(180)
    assert "console-pass-1" not in text  # typed without echo
    assert rc == 0, text
    speed = re.search(r"Written .* \(([\d.]+) MiB/s\), verified in ([\d.]+) s", text)
    assert speed, text
    print(f"\nwrite {speed.group(1)} MiB/s, verify {speed.group(2)} s")
    if os.environ.get("INSTALLER_TRANSCRIPT"):
        print(console.log)

    table = json.loads(_run("sfdisk", "-J", target))["partitiontable"]
    sectors = 512 * MiB // 512
    assert table["lastlba"] == sectors - 34  # the backup GPT moved to the disk's end
    root = table["partitions"][1]
    assert root["start"] + root["size"] - 1 >= table["lastlba"] - 2048
    _run("sfdisk", "--verify", target)
    # BIOS boot survives the table's changes: the MBR code and the ESP's legacy-boot attribute.
    with open(target, "rb") as f:
        assert f.read(len(BOOT_CODE)) == BOOT_CODE
    assert table["partitions"][0].get("attrs") == "LegacyBIOSBootable"
    part = partition_path(target, 2)
    assert subprocess.run(["e2fsck", "-fn", part], capture_output=True).returncode == 0
    assert _fs_bytes(part) > 400 * MiB > size
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _run("mount", "-o", "ro", part, str(mnt))
    try:
        chosen = json.loads((mnt / "etc/appliance/first-pool.json").read_text())
        assert json.loads((mnt / "etc/appliance/system.json").read_text()) == {"version": "test"}
        root_entry, daemon = (mnt / "etc/shadow").read_text().splitlines()
        hashed = root_entry.split(":")[1]
        assert hashed.startswith("$6$") and daemon == "daemon:*:19000:0:99999:7:::"
        salt = hashed.split("$")[2]
        again = _run("openssl", "passwd", "-6", "-salt", salt, "console-pass-1").strip()
        assert again == hashed  # the password typed opens the console
        assert (mnt / "etc/shadow").stat().st_mode & 0o777 == 0o640
    finally:
        _run("umount", str(mnt))
    # A loop device has no /dev/disk/by-id name; should udev give it one, it must still be the pool.
    assert [os.path.realpath(d) for d in chosen["disks"]] == [pool]
    assert chosen["serials"] == [None]


@pytest.mark.root
@pytest.mark.slow
def test_damaged_image_is_refused_before_anything_is_asked_or_written(
    system_image: tuple[Path, Path, int], loops: list[str], tmp_path: Path
) -> None:
    image, info, size = system_image
    target = loops[0]
    with open(target, "r+b") as f:
        f.write(b"\x5a" * (2 * MiB))
    before = sha(Path(target).read_bytes())
    bad = tmp_path / "bad.img.zst"
    blob = bytearray(image.read_bytes())
    plain = bytearray(zstandard.ZstdDecompressor().decompress(bytes(blob)))
    plain[50 * MiB] ^= 0xFF  # one flipped bit inside the root file system
    bad.write_bytes(zstandard.ZstdCompressor(level=1).compress(bytes(plain)))
    rc, text = Console(_installer(bad, info, loops)).finish(120)
    assert rc == 2
    assert "INSTALLATION FAILED: the system image is damaged: sha256" in text
    assert "Install the appliance on which disk?" not in text
    # The writer itself refuses as well when called directly on the device.
    with pytest.raises(InvalidInput, match="damaged"):
        write_system(bad, size, json.loads(info.read_text())["sha256"], target, lambda p: None)
    assert sha(Path(target).read_bytes()) == before


def test_two_consoles_over_ptys_first_typed_on_wins(tmp_path: Path) -> None:
    image, raw = make_image(tmp_path)
    info = tmp_path / "system.json"
    info.write_text(json.dumps({"size": len(raw), "sha256": sha(raw), "version": "t"}))
    # No disk is offered (--only names none that exists): the dialog stops at rescan/poweroff.
    argv = [sys.executable, "-m", "image.appliance_os.installer", "--tty", "--no-reboot"]
    argv += ["--image", str(image), "--image-info", str(info), "--lock", str(tmp_path / "lock")]
    argv += ["--only", str(tmp_path / "no-such-disk")]
    first, second = Console(argv), Console(argv)
    try:
        first.expect("Type r to look again or p to power off:")
        second.expect("Type r to look again or p to power off:")
        first.send("r")
        first.expect("Type r to look again")
        second.expect("The installation runs on the other console")
        second.send("r")  # typing there changes nothing
        first.send("p")  # the first console ends (--no-reboot: it exits)
        rc, _ = first.finish()
        assert rc == 0
        second.expect("The other console stopped. Starting again here.")
        second.expect("Type r to look again or p to power off:")
        second.send("p")
        assert second.finish()[0] == 0
    finally:
        for console in (first, second):
            if console.proc.poll() is None:
                console.proc.kill()
                console.proc.wait()


@pytest.mark.root
def test_a_disk_in_use_is_refused(tmp_path: Path, loops: list[str]) -> None:
    image, raw = make_image(tmp_path)
    target = loops[1]
    _run("sfdisk", "-q", target, stdin="label: gpt\nsize=16MiB\ntype=L\n")
    _run("partx", "-a", target)
    part = partition_path(target, 2)
    _run("mkfs.ext4", "-q", part)
    mnt = tmp_path / "busy"
    mnt.mkdir()
    _run("mount", part, str(mnt))
    try:
        with pytest.raises(Conflict, match="cannot be opened for writing"):
            write_system(image, len(raw), sha(raw), target, lambda p: None)
        assert (mnt / "lost+found").is_dir()
    finally:
        _run("umount", str(mnt))
