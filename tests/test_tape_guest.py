"""Tape with the real Linux st, ch and sg drivers: a QEMU guest against tgt's tape library.

The development host has no SCSI. Debian's ``tgt`` serves a file-backed tape drive and a changer
with three 8 MiB cartridges over iSCSI on 127.0.0.1 (``tests/tape_support.py``); the tape guest
(:mod:`image.tape_guest`: the host's kernel and, over virtio-9p, the host's root as a chroot)
attaches them through QEMU's iSCSI driver. One boot then runs, against the real drivers:

* udev (the host's rules) on the drive and the changer: discovery's pure converter must make a
  ``TapeDrive`` keyed by the drive's serial and a ``Changer``; ``hardware.udev.scan()`` itself
  runs in the guest too;
* ``mtx status`` / ``load`` recorded, and :class:`hardware.tape.changer.MtxChanger` moving
  cartridges (unload, transfer to the mail slot, a load from an empty slot refused);
* the drive helper's conformance scenario (``tests/tape_conformance.py``) on the drive's ``nst``
  node, with a second, write-protected drive; what tgt cannot do (:data:`TGT_LACKS`) is passed
  as ``--without`` and reported by the scenario as not run.

The pure parts (the console markers, QEMU's argv, the recorded ``mtx`` and udev text) are tested
without booting, on what a real boot printed (``tests/fixtures/tape/*-tgt*.txt``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from tape_conformance import CAPABILITIES
from tape_support import (
    CHANGER_MODEL,
    CHANGER_SERIAL,
    DRIVE_MODEL,
    DRIVE_SERIAL,
    PROTECTED_DRIVE_SERIAL,
    TARGET,
    VENDOR,
    Cartridge,
    require_tgt,
    tgt_library,
)

from appliance.errors import InvalidInput
from hardware.records import Changer, TapeDrive
from hardware.tape.mtx import parse_status
from hardware.udev import record_from_properties
from image.probe_guest import QEMU, parse_udev_database
from image.tape_guest import (
    BEGIN,
    END,
    EXIT,
    GUEST_WORK,
    IscsiLun,
    TapeGuest,
    build_tape_guest,
    guest_output,
    render_rc,
    run_in_tape_guest,
    tape_guest_argv,
    tape_guest_modules,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "tape"
BARCODES = ("TAPE01L6", "TAPE02L6", "TAPE03L6")
#: One boot: ~8 s for the drivers and mtx, plus Python starts over 9p and the conformance run.
BOOT_TIMEOUT = 420.0


# --- the pure parts, on recorded output ---------------------------------------------------------


def test_the_console_markers_give_the_scripts_output_and_status() -> None:
    console = (
        "Starting systemd-udevd version 252.39-1~deb12u2\r\n"
        f"{BEGIN}\r\nchanger=/dev/sg0\r\nLoading media from Storage Element 1 into drive 0...done\r\n"
        f"{EXIT} 3\r\n{END}\r\n[    3.739290] reboot: Power down\r\n"
    )
    assert guest_output(console) == (
        "changer=/dev/sg0\nLoading media from Storage Element 1 into drive 0...done\n",
        3,
    )
    assert guest_output(console.replace(END, "cut")) is None  # powered off early
    assert guest_output(console.replace(f"{EXIT} 3", "")) is None  # no status: not finished
    assert guest_output("no markers at all") is None
    assert guest_output(f"{BEGIN}\n{EXIT} 0\n{END}\n") == ("", 0)


def test_the_qemu_command_line_shares_the_host_read_only_and_attaches_each_lun() -> None:
    guest = TapeGuest(kernel="/boot/vmlinuz-x", initrd="/cache/tape,1.initrd")
    portal = "127.0.0.1:3260"
    luns = [IscsiLun(portal, TARGET, 1), IscsiLun(portal, TARGET, 2)]
    argv = tape_guest_argv(guest, luns, "/tmp/w,1", "/tmp/log")
    joined = " ".join(argv)
    assert argv[0] == QEMU
    assert "-nic none" in joined and "-no-reboot" in joined and "-accel tcg" in joined
    assert argv[argv.index("-initrd") + 1] == "/cache/tape,1.initrd"
    virtfs = [argv[i + 1] for i, a in enumerate(argv) if a == "-virtfs"]
    assert virtfs == [
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "local,path=/tmp/w,,1,mount_tag=tapework,security_model=none,multidevs=remap",
    ]
    assert "virtio-scsi-pci,id=scsi0" in argv
    assert (
        f"driver=iscsi,node-name=lun1,transport=tcp,portal={portal},target={TARGET},lun=2"
    ) in argv
    assert "scsi-generic,drive=lun1,bus=scsi0.0,channel=0,scsi-id=0,lun=2" in argv
    assert argv.count("-blockdev") == 2


def test_the_guest_loads_its_drivers_in_order_and_runs_the_script_in_the_hosts_root() -> None:
    _, version, modules = tape_guest_modules()
    names = [os.path.basename(p).split(".ko", 1)[0] for p in modules]
    assert all(p.startswith(f"/lib/modules/{version}/") for p in modules)
    for before, after in (("scsi_mod", "st"), ("scsi_mod", "ch"), ("virtio_scsi", "st")):
        assert names.index(before) < names.index(after)
    assert names.index("9pnet") < names.index("9pnet_virtio") < names.index("9p")
    assert {"sg", "ch", "st", "virtio_pci"} <= set(names)
    rc = render_rc()
    mounts = [
        line.split(" 2>")[0].split()[-1] for line in rc.splitlines() if line.startswith("mount ")
    ]
    assert mounts[:4] == ["/proc", "/sys", "/dev", "/host"]
    assert {"/host/proc", "/host/sys", "/host/dev", "/host/run"} <= set(mounts)
    assert "/host/tmp" not in mounts  # a checkout under /tmp stays visible in the chroot
    assert mounts[-1] == f"/host{GUEST_WORK}"  # the work share, inside the chroot's /run
    assert "SYSTEMD_IGNORE_CHROOT=1" in rc  # else udevadm trigger/settle refuse in a chroot
    assert rc.index(BEGIN) < rc.index(f"/bin/sh {GUEST_WORK}/script.sh") < rc.index(EXIT)
    assert rc.rstrip().endswith("poweroff -f")


def test_the_recorded_mtx_status_of_tgts_library_parses() -> None:
    empty = parse_status((FIXTURES / "mtx-status-tgt.txt").read_text())
    assert [(d.index, d.full) for d in empty.drives] == [(0, False)]
    assert [(s.number, s.full, s.barcode) for s in empty.slots] == [
        (1, True, "TAPE01L6"),
        (2, True, "TAPE02L6"),
        (3, True, "TAPE03L6"),
        (4, False, None),
    ]
    assert [(s.number, s.full) for s in empty.import_export] == [(5, False)]
    assert empty.empty_slots() == [4]

    loaded = parse_status((FIXTURES / "mtx-status-tgt-loaded.txt").read_text())
    [drive] = loaded.drives
    assert (drive.full, drive.barcode, drive.source_slot) == (True, "TAPE01L6", 1)
    assert loaded.find("TAPE01L6") == drive
    assert loaded.empty_slots() == [1, 4]
    assert loaded.barcodes() == list(BARCODES)

    # After MtxChanger's unload (home to slot 1) and a transfer of slot 2 to the mail slot.
    mailed = parse_status((FIXTURES / "mtx-status-tgt-mail-slot.txt").read_text())
    assert not mailed.drives[0].full and mailed.empty_slots() == [2, 4]
    assert [(s.number, s.barcode) for s in mailed.import_export] == [(5, "TAPE02L6")]
    assert mailed.find("TAPE02L6") == mailed.import_export[0]


def test_the_recorded_udev_view_of_tgts_library_makes_a_tape_drive_and_a_changer() -> None:
    devices = parse_udev_database((FIXTURES / "udev-tgt-library.txt").read_text())
    records = [record_from_properties(d.properties, d.attributes) for d in devices.values()]
    tapes = [r for r in records if isinstance(r, TapeDrive)]
    changers = [r for r in records if isinstance(r, Changer)]
    assert len(tapes) == 2 and len(changers) == 1, records
    _check_udev_records(tapes, changers[0])


def _check_udev_records(tapes: list[TapeDrive], changer: Changer) -> None:
    by_serial = {t.serial or "": t for t in tapes}
    assert sorted(by_serial) == [DRIVE_SERIAL, PROTECTED_DRIVE_SERIAL]
    for serial, tape in by_serial.items():
        assert tape.identity == f"serial:{serial}"
        assert tape.devnode in ("/dev/nst0", "/dev/nst1")
        assert (tape.vendor, tape.model) == (VENDOR, DRIVE_MODEL)
        assert f"/dev/tape/by-id/scsi-{serial}-nst" in tape.links
    assert changer.identity == f"serial:{CHANGER_SERIAL}" and changer.serial == CHANGER_SERIAL
    assert changer.devnode.startswith("/dev/sg")
    assert (changer.vendor, changer.model) == (VENDOR, CHANGER_MODEL)
    assert f"/dev/tape/by-id/scsi-{CHANGER_SERIAL}" in changer.links


# --- for real: st, ch, sg, udev and mtx in a QEMU guest against tgt -----------------------------

#: The guest's script (``/bin/sh`` in the host's root; the work directory is ``$W``). Nodes are
#: found by serial (udev's by-id links): st numbers drives in probe order, not by LUN.
GUEST_SCRIPT = """\
W={work}
REPO={repo}
cd "$REPO"
ch=$(readlink -f /dev/tape/by-id/scsi-{changer_serial})
nst=$(readlink -f /dev/tape/by-id/scsi-{drive_serial}-nst)
protected=$(readlink -f /dev/tape/by-id/scsi-{protected_serial}-nst)
echo "changer $ch, drive $nst, protected drive $protected"
# What udev says about the drives and the changer, with the attributes discovery reads.
for node in "$nst" "$protected" /dev/sg*; do
  udevadm info --query=all --name="$node"
  dev=/sys$(udevadm info --query=path --name="$node")
  echo "P: ${{dev#/sys}}"
  for attr in device/type device/vendor device/model device/wwid; do
    [ -f "$dev/$attr" ] && echo "A: $attr=$(cat "$dev/$attr")"
  done
  echo
done > "$W/udev.txt"
mtx -f "$ch" status > "$W/mtx-status.txt" 2>&1
mtx -f "$ch" load 1 0 > "$W/mtx-load.txt" 2>&1
mtx -f "$ch" status > "$W/mtx-status-loaded.txt" 2>&1
mt -f "$nst" status > "$W/mt-status.txt" 2>&1
mt -f "$protected" status > "$W/mt-status-protected.txt" 2>&1
if [ -f tests/tape_conformance.py ]; then
  PYTHONPATH="$REPO" PYTHONDONTWRITEBYTECODE=1 timeout 240 /usr/bin/python3 \\
    tests/tape_conformance.py "$nst" --protected "$protected" \\
    --load-command "mtx -f $ch unload 1 0; mtx -f $ch load 1 0" {without} \\
    > "$W/conformance.txt" 2>&1
  echo $? > "$W/conformance.rc"
fi
PYTHONPATH="$REPO" PYTHONDONTWRITEBYTECODE=1 "$REPO/.venv/bin/python" "$W/checks.py" "$ch" \\
  > "$W/checks.json" 2> "$W/checks.err"
mtx -f "$ch" status > "$W/mtx-status-after.txt" 2>&1
echo done
"""

#: Run by the venv's Python in the guest: discovery's scan() and the MtxChanger adapter.
GUEST_CHECKS = """\
import json, sys
from dataclasses import asdict
from hardware.tape.changer import ChangerError, MtxChanger
from hardware.udev import scan

inventory = scan()
out = {
    "tapes": {k: asdict(v) for k, v in inventory.tapes.items()},
    "changers": {k: asdict(v) for k, v in inventory.changers.items()},
}
changer = MtxChanger(sys.argv[1], "serial:%s")
out["before"] = asdict(changer.status())
out["unloaded_to"] = changer.unload(0)
changer.transfer(2, 5)
try:
    changer.load(4, 0)
except ChangerError as exc:
    out["load_empty"] = [exc.code, exc.message]
out["after"] = asdict(changer.inventory())
print(json.dumps(out))
"""


#: What tgt cannot do at all, measured through st: READ POSITION, LOCATE and ERASE ("Invalid
#: command operation code"); no end of medium; SPACE backward over a filemark ends on its far
#: side; SPACE into blank tape gives no sense st can report as end of data. The scenario's
#: checks that need these are reported as not run (names the scenario knows are passed).
TGT_LACKS = (
    "position",
    "erase",
    "end-of-medium",
    "backward-file-spacing",
    "eod-spacing",
    "end-of-data",
)


@pytest.mark.root
@pytest.mark.qemu
@pytest.mark.slow
def test_the_real_st_ch_and_sg_drivers_run_tgts_library(tmp_path: Path) -> None:
    guest = _guest()
    work = tmp_path / "work"
    work.mkdir()
    (work / "checks.py").write_text(GUEST_CHECKS % CHANGER_SERIAL)
    without = " ".join(f"--without {c}" for c in TGT_LACKS if c in CAPABILITIES)
    script = GUEST_SCRIPT.format(
        work=GUEST_WORK,
        repo=REPO,
        changer_serial=CHANGER_SERIAL,
        drive_serial=DRIVE_SERIAL,
        protected_serial=PROTECTED_DRIVE_SERIAL,
        without=without,
    )
    cartridges = [Cartridge(b) for b in BARCODES]
    with tgt_library(tmp_path / "library", cartridges, protected=Cartridge("PROT01L6")) as library:
        started = time.monotonic()
        result = run_in_tape_guest(
            script, library.luns, str(work), guest=guest, timeout=BOOT_TIMEOUT
        )
        print(f"tape guest: QEMU ran {result.seconds:.1f} s ({time.monotonic() - started:.1f} s)")
        written = os.path.getsize(library.cartridge_path("TAPE01L6"))
    assert result.status == 0 and result.output.rstrip().endswith("done"), result.output

    # udev: what the pure converter makes of it, and what scan() found in the guest.
    devices = parse_udev_database((work / "udev.txt").read_text())
    records = [record_from_properties(d.properties, d.attributes) for d in devices.values()]
    tapes = [r for r in records if isinstance(r, TapeDrive)]
    [changer] = [r for r in records if isinstance(r, Changer)]
    _check_udev_records(tapes, changer)
    checks = _read_checks(work)
    assert sorted(checks["tapes"]) == sorted(t.identity for t in tapes)
    assert list(checks["changers"]) == [changer.identity]
    for tape in tapes:
        found = checks["tapes"][tape.identity]
        assert found["devnode"] == tape.devnode and found["generic"].startswith("/dev/sg")
    assert checks["changers"][changer.identity]["devnode"] == changer.devnode

    # mtx, recorded: the parser reads what the real mtx printed.
    empty = parse_status((work / "mtx-status.txt").read_text())
    assert [(s.number, s.barcode) for s in empty.all_slots() if s.full] == [
        (1, "TAPE01L6"),
        (2, "TAPE02L6"),
        (3, "TAPE03L6"),
    ]
    assert not empty.drives[0].full and [s.number for s in empty.import_export] == [5]
    loaded = parse_status((work / "mtx-status-loaded.txt").read_text())
    assert (loaded.drives[0].barcode, loaded.drives[0].source_slot) == ("TAPE01L6", 1)
    assert "ONLINE" in (work / "mt-status.txt").read_text()
    assert "WR_PROT" in (work / "mt-status-protected.txt").read_text()

    # MtxChanger: unload goes home, a transfer reaches the mail slot, an empty slot is refused.
    assert checks["before"]["drives"][0]["barcode"] == "TAPE01L6"
    assert checks["unloaded_to"] == 1
    assert checks["load_empty"][0] == "changer_slot_empty", checks["load_empty"]
    after = parse_status((work / "mtx-status-after.txt").read_text())
    assert not after.drives[0].full
    assert [(s.number, s.barcode) for s in after.all_slots() if s.full] == [
        (1, "TAPE01L6"),
        (3, "TAPE03L6"),
        (5, "TAPE02L6"),
    ]
    assert [s["barcode"] for s in checks["after"]["import_export"]] == ["TAPE02L6"]

    # The conformance scenario against the real st driver (the drive helper's file): every step
    # passes, what tgt cannot do reported as not run.
    report = (work / "conformance.txt").read_text()
    print(report[-3000:])
    steps = [line for line in report.splitlines() if line.startswith("step ")]
    assert len(steps) >= 16 and all(": ok (" in line for line in steps), report[-4000:]
    assert int((work / "conformance.rc").read_text()) == 0 and "CONFORMANCE OK" in report
    assert written > 1200  # the scenario's blocks reached tgt's cartridge file on the host


def _guest() -> TapeGuest:
    """The tape guest, built once and cached; fails (never skips) naming the install step."""
    require_tgt()
    try:
        return build_tape_guest()
    except InvalidInput as exc:
        pytest.fail(f"cannot build the tape guest: {exc.message}", pytrace=False)


def _read_checks(work: Path) -> dict[str, Any]:
    text = (work / "checks.json").read_text()
    if not text.strip():
        pytest.fail(f"the guest's checks printed nothing: {(work / 'checks.err').read_text()}")
    found: dict[str, Any] = json.loads(text)
    return found
