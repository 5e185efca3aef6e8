"""Pure parts of failover: the QEMU argv builder and the small decisions around it.

No QEMU runs here: every function under test is a plain function of its arguments.
"""

from __future__ import annotations

import json
import struct
import zlib
from datetime import UTC, datetime, timedelta

import pytest

from appliance.catalog.records import PointRecord
from appliance.errors import InvalidInput
from image import boot_proof, testguest
from image.failover import (
    QEMU_OVERHEAD_MIB,
    changed_ranges_from_map,
    check_memory,
    network_from_dict,
    network_to_dict,
    pick_point,
    resolve_forwards,
)
from image.nbd_client import STATE_HOLE, STATE_ZERO
from image.nbd_export import allocation_descriptors, zero_runs
from image.qemu import (
    Bridged,
    DiskAttachment,
    Firmware,
    Isolated,
    PortForward,
    QemuFiles,
    build_qemu_argv,
    convert_argv,
    create_overlay_argv,
    overlay_map_argv,
)

FILES = QemuFiles(
    qmp_socket="/run/s/qmp.sock", serial_log="/run/s/serial.log", pidfile="/run/s/pid"
)
SPEC = {
    "name": "web",
    "vcpus": 2,
    "memory_mib": 768,
    "firmware": "bios",
    "machine": "q35",
    "disks": [{"name": "root", "bus": "virtio", "format": "raw"}],
    "nics": [{"model": "e1000", "mac": "52:54:00:aa:bb:cc", "network": None}],
}


def argv_for(spec=None, disks=None, **kwargs):
    kwargs.setdefault("accel", "tcg")
    kwargs.setdefault("network", Isolated())
    kwargs.setdefault("files", FILES)
    return build_qemu_argv(
        spec or SPEC, disks or [DiskAttachment("/s/root.qcow2", "/s/0.sock", "root")], **kwargs
    )


def values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def devices(argv: list[str]) -> list[dict]:
    out = []
    for value in values(argv, "-device"):
        if value.startswith("{"):
            out.append(json.loads(value))
        else:
            driver, *opts = value.split(",")
            out.append({"driver": driver, **dict(o.split("=", 1) for o in opts)})
    return out


def test_disk_chain_is_nbd_backing_under_a_qcow2_overlay():
    argv = argv_for()
    nbd, top = (json.loads(v) for v in values(argv, "-blockdev"))
    assert nbd == {
        "driver": "nbd",
        "node-name": "d0-nbd",
        "server": {"type": "unix", "path": "/s/0.sock"},
        "export": "root",
        "read-only": True,
    }
    assert top == {
        "driver": "qcow2",
        "node-name": "d0",
        "file": {"driver": "file", "filename": "/s/root.qcow2"},
        "backing": "d0-nbd",
    }
    # The backing is wired before the overlay that names it.
    assert argv.index(values(argv, "-blockdev")[0]) < argv.index(values(argv, "-blockdev")[1])
    assert {"driver": "virtio-blk-pci", "drive": "d0", "bootindex": 0} in devices(argv)


def test_machine_memory_cpus_display_and_control_files():
    argv = argv_for()
    assert argv[0] == "qemu-system-x86_64"
    assert values(argv, "-machine") == ["q35"]
    assert values(argv, "-m") == ["768"]
    assert values(argv, "-smp") == ["2"]
    assert values(argv, "-display") == ["none"]
    assert "-nodefaults" in argv
    assert values(argv, "-pidfile") == ["/run/s/pid"]
    assert "socket,id=qmp,path=/run/s/qmp.sock,server=on,wait=off" in values(argv, "-chardev")
    assert "file,id=serial0,path=/run/s/serial.log" in values(argv, "-chardev")
    assert values(argv, "-serial") == ["chardev:serial0"]
    assert values(argv, "-mon") == ["chardev=qmp,mode=control"]
    assert values(argv, "-name") == ["guest=web"]


def test_commas_in_paths_are_escaped_in_option_strings():
    files = QemuFiles(qmp_socket="/a,b/qmp.sock", serial_log="/a,b/serial.log")
    argv = argv_for(files=files, name="x,y")
    assert "socket,id=qmp,path=/a,,b/qmp.sock,server=on,wait=off" in values(argv, "-chardev")
    assert values(argv, "-name") == ["guest=x,,y"]
    disks = [DiskAttachment("/a,b/root.qcow2", "/a,b/0.sock", "root")]
    top = json.loads(values(argv_for(disks=disks), "-blockdev")[1])
    assert top["file"]["filename"] == "/a,b/root.qcow2"  # JSON needs no escaping


@pytest.mark.parametrize(
    ("accel", "expected", "cpu"),
    [("tcg", ["tcg"], []), ("kvm", ["kvm"], ["host"]), ("kvm:tcg", ["kvm", "tcg"], [])],
)
def test_accelerators(accel, expected, cpu):
    argv = argv_for(accel=accel)
    assert values(argv, "-accel") == expected
    assert values(argv, "-cpu") == cpu


def test_unknown_accelerator_is_refused():
    with pytest.raises(InvalidInput):
        argv_for(accel="hvf")


def test_nic_model_and_mac_from_the_spec_and_isolated_forwards_on_127_0_0_1():
    network = Isolated((PortForward(18080, 80), PortForward(12222, 22)))
    argv = argv_for(network=network)
    assert values(argv, "-netdev") == [
        "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:18080-:80,hostfwd=tcp:127.0.0.1:12222-:22"
    ]
    nic = next(d for d in devices(argv) if d.get("netdev") == "net0")
    assert nic == {"driver": "e1000", "netdev": "net0", "romfile": "", "mac": "52:54:00:aa:bb:cc"}


def test_a_spec_without_nics_gets_one_virtio_nic():
    spec = {**SPEC, "nics": []}
    nic = next(d for d in devices(argv_for(spec)) if d.get("netdev") == "net0")
    assert nic["driver"] == "virtio-net-pci" and "mac" not in nic


def test_forwards_go_to_the_first_nic_only_and_every_nic_is_restricted():
    spec = {**SPEC, "nics": [{"model": "virtio"}, {"model": "rtl8139", "mac": None}]}
    argv = argv_for(spec, network=Isolated((PortForward(1, 80),)))
    assert values(argv, "-netdev") == [
        "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:1-:80",
        "user,id=net1,restrict=on",
    ]
    assert [d["driver"] for d in devices(argv) if "netdev" in d] == ["virtio-net-pci", "rtl8139"]


def test_bridged_network():
    argv = argv_for(network=Bridged("br0"))
    assert values(argv, "-netdev") == [
        "bridge,id=net0,br=br0,helper=/usr/lib/qemu/qemu-bridge-helper"
    ]


def test_unknown_nic_model_is_refused():
    with pytest.raises(InvalidInput):
        argv_for({**SPEC, "nics": [{"model": "ne2k"}]})


@pytest.mark.parametrize(
    ("bus", "controller", "device"),
    [
        ("virtio", None, {"driver": "virtio-blk-pci", "drive": "d0", "bootindex": 0}),
        (
            "scsi",
            {"driver": "virtio-scsi-pci", "id": "scsi0"},
            {"driver": "scsi-hd", "bus": "scsi0.0", "scsi-id": 0, "drive": "d0", "bootindex": 0},
        ),
        (
            "sata",
            {"driver": "ahci", "id": "sata0"},
            {"driver": "ide-hd", "bus": "sata0.0", "drive": "d0", "bootindex": 0},
        ),
        ("ide", None, {"driver": "ide-hd", "bus": "ide.0", "drive": "d0", "bootindex": 0}),
        (
            "nvme",
            None,
            {"driver": "nvme", "serial": "disk0", "drive": "d0", "bootindex": 0},
        ),
        (
            "usb",
            {"driver": "qemu-xhci", "id": "xhci0"},
            {"driver": "usb-storage", "bus": "xhci0.0", "drive": "d0", "bootindex": 0},
        ),
    ],
)
def test_disk_buses(bus, controller, device):
    spec = {**SPEC, "disks": [{"name": "root", "bus": bus}]}
    found = devices(argv_for(spec))
    assert device in found
    if controller is not None:
        assert controller in found


def test_two_disks_share_one_controller_and_only_the_first_boots():
    spec = {**SPEC, "disks": [{"name": "a", "bus": "scsi"}, {"name": "b", "bus": "scsi"}]}
    disks = [
        DiskAttachment("/s/a.qcow2", "/s/0.sock", "a"),
        DiskAttachment("/s/b.qcow2", "/s/1.sock", "b"),
    ]
    found = devices(argv_for(spec, disks))
    assert sum(d["driver"] == "virtio-scsi-pci" for d in found) == 1
    hds = [d for d in found if d["driver"] == "scsi-hd"]
    assert [(d["drive"], d["scsi-id"], d.get("bootindex")) for d in hds] == [
        ("d0", 0, 0),
        ("d1", 1, None),
    ]


def test_ide_on_the_pc_machine_uses_two_buses_with_two_units():
    spec = {**SPEC, "machine": "pc", "disks": [{"bus": "ide"}] * 3}
    disks = [DiskAttachment(f"/s/{i}.qcow2", f"/s/{i}.sock") for i in range(3)]
    hds = [d for d in devices(argv_for(spec, disks)) if d["driver"] == "ide-hd"]
    assert [(d["bus"], d["unit"]) for d in hds] == [("ide.0", 0), ("ide.0", 1), ("ide.1", 0)]


def test_a_local_raw_disk_has_no_backing_node():
    argv = argv_for(disks=[DiskAttachment("/d/vm.raw", fmt="raw")])
    (only,) = (json.loads(v) for v in values(argv, "-blockdev"))
    assert only == {
        "driver": "raw",
        "node-name": "d0",
        "file": {"driver": "file", "filename": "/d/vm.raw"},
    }


def test_nbd_backing_needs_a_qcow2_overlay():
    with pytest.raises(InvalidInput):
        argv_for(disks=[DiskAttachment("/d/vm.raw", "/s/0.sock", fmt="raw")])


def test_uefi_needs_firmware_and_wires_pflash_with_a_private_vars_copy():
    spec = {**SPEC, "firmware": "uefi"}
    with pytest.raises(InvalidInput, match="OVMF"):
        argv_for(spec)
    argv = argv_for(spec, firmware=Firmware("/usr/share/OVMF/OVMF_CODE_4M.fd", "/s/vars.fd"))
    assert values(argv, "-machine") == ["q35,pflash0=fw-code,pflash1=fw-vars"]
    code, vars_ = (json.loads(v) for v in values(argv, "-blockdev")[:2])
    assert code == {
        "driver": "file",
        "node-name": "fw-code",
        "filename": "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "read-only": True,
    }
    assert vars_ == {"driver": "file", "node-name": "fw-vars", "filename": "/s/vars.fd"}


def test_guest_agent_channel():
    files = QemuFiles(qmp_socket="/s/q", serial_log="/s/l", agent_socket="/s/qga.sock")
    argv = argv_for(files=files)
    assert "socket,id=qga0,path=/s/qga.sock,server=on,wait=off" in values(argv, "-chardev")
    assert {
        "driver": "virtserialport",
        "bus": "vser0.0",
        "chardev": "qga0",
        "name": "org.qemu.guest_agent.0",
    } in devices(argv)


def test_no_disks_is_refused():
    with pytest.raises(InvalidInput):
        build_qemu_argv(SPEC, [], accel="tcg", network=Isolated(), files=FILES)


def test_qemu_img_argvs():
    assert create_overlay_argv("/s/o.qcow2", 1024, "nbd+unix:///d?socket=/s/0.sock") == [
        "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw",
        "-b", "nbd+unix:///d?socket=/s/0.sock", "/s/o.qcow2", "1024",
    ]  # fmt: skip
    assert create_overlay_argv("/s/l.qcow2", 5, None) == [
        "qemu-img", "create", "-q", "-f", "qcow2", "/s/l.qcow2", "5",
    ]  # fmt: skip
    assert convert_argv("/s/o.qcow2", "qcow2", "/t/x.img", "raw") == [
        "qemu-img", "convert", "-f", "qcow2", "-O", "raw", "/s/o.qcow2", "/t/x.img",
    ]  # fmt: skip
    argv = overlay_map_argv("/s/o.qcow2", force_share=True)
    assert argv[:4] == ["qemu-img", "map", "--force-share", "--output=json"]
    assert json.loads(argv[4][len("json:") :]) == {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": "/s/o.qcow2"},
        "backing": None,
    }


# --- decisions -----------------------------------------------------------------------------------


def test_check_memory():
    assert check_memory(1024, 8192, 512, 0) is None
    reason = check_memory(8192, 8192, 512, 0)
    assert reason is not None and "8192 MiB" in reason and "reserved" in reason
    assert check_memory(1024, 2048 + QEMU_OVERHEAD_MIB, 512, 512) is None
    assert check_memory(1024, 2048 + QEMU_OVERHEAD_MIB, 512, 513) is not None


def _point(pid, minutes, verify=None, kind="image"):
    return PointRecord(
        id=pid,
        asset="vm",
        kind=kind,
        mode="full",
        created_at=datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=minutes),
        parent_id=None,
        base_full_id=None,
        source="",
        logical_bytes=0,
        stored_bytes=0,
        file_count=0,
        warning_count=0,
        status="complete",
        verified_at=None,
        verify_status=verify,
        labels={},
    )


def test_pick_point_prefers_the_newest_verified_image_point():
    points = [
        _point("a", 1, "ok"),
        _point("b", 2, "ok"),
        _point("c", 3),
        _point("d", 4, "ok", "files"),
    ]
    assert pick_point(points).id == "b"
    # A point known to be damaged is passed over for one not known to be (test_point_check.py).
    assert pick_point([_point("a", 1), _point("c", 3, "damaged")]).id == "a"
    assert pick_point([_point("d", 4, "ok", "files")]) is None


def test_network_settings():
    assert network_from_dict(None) == Isolated()
    network = network_from_dict({"mode": "isolated", "port_forwards": [[8080, 80], {"guest": 22}]})
    assert network == Isolated((PortForward(8080, 80), PortForward(0, 22)))
    assert network_from_dict({"mode": "bridged", "bridge": "br0"}) == Bridged("br0")
    for bad in (
        {"mode": "routed"},
        {"mode": "bridged"},
        {"port_forwards": [[1, 0]]},
        {"port_forwards": [["x", 80]]},
    ):
        with pytest.raises(InvalidInput):
            network_from_dict(bad)
    assert network_to_dict(Isolated((PortForward(1, 2),))) == {
        "mode": "isolated",
        "port_forwards": [[1, 2]],
    }


def test_resolve_forwards_adds_the_proofs_ports_on_free_host_ports():
    proof = boot_proof.BootProofSpec(http_port=80, tcp=22)
    network = resolve_forwards(Isolated((PortForward(18080, 80),)), proof)
    assert isinstance(network, Isolated)
    by_guest = {f.guest_port: f.host_port for f in network.port_forwards}
    assert by_guest[80] == 18080
    assert 1024 <= by_guest[22] <= 65535
    assert resolve_forwards(Bridged("br0"), proof) == Bridged("br0")


def test_changed_ranges_from_an_overlay_map():
    text = json.dumps(
        [
            {"start": 0, "length": 65536, "depth": 0, "present": True, "zero": False, "data": True, "offset": 327680},
            {"start": 65536, "length": 65536, "depth": 0, "present": True, "zero": True, "data": False},
            {"start": 131072, "length": 1048576, "depth": 0, "present": False, "zero": True, "data": False},
            {"start": 1179648, "length": 65536, "depth": 0, "present": True, "zero": False, "data": True, "offset": 393216},
        ]
    )  # fmt: skip
    assert changed_ranges_from_map(text) == [(0, 131072), (1179648, 65536)]


def test_zero_runs_and_block_status_descriptors():
    zero, data = bytes(32), b"\x01" * 32
    table = [data, zero, zero, data, data, zero]
    runs = zero_runs(table)
    assert runs == [(0, False), (1, True), (3, False), (5, True)]
    chunk, size = 100, 550  # the last chunk is short
    hole = STATE_HOLE | STATE_ZERO
    assert allocation_descriptors(runs, chunk, size, 0, size, 100) == [
        (100, 0),
        (200, hole),
        (200, 0),
        (50, hole),
    ]
    assert allocation_descriptors(runs, chunk, size, 150, 200, 100) == [(150, hole), (50, 0)]
    assert allocation_descriptors(runs, chunk, size, 150, 200, 1) == [(150, hole)]
    assert allocation_descriptors(runs, chunk, size, 540, 100, 100) == [(10, hole)]
    assert allocation_descriptors(runs, chunk, size, 600, 10, 100) == []


# --- the test guest's recipe ---------------------------------------------------------------------


def test_module_load_order_puts_dependencies_first():
    deps = testguest.parse_modules_dep(
        "kernel/a/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2.ko\n"
        "kernel/lib/crc16.ko:\nkernel/fs/mbcache.ko:\nkernel/fs/jbd2.ko:\n"
        "kernel/v/virtio_blk.ko: kernel/v/virtio.ko kernel/v/virtio_ring.ko\n"
        "kernel/v/virtio.ko: kernel/v/virtio_ring.ko\nkernel/v/virtio_ring.ko:\n"
        "kernel/c/crc32c-generic.ko:\n"
    )
    order = testguest.module_load_order(deps, ["virtio_blk", "ext4", "crc32c_generic"])
    names = [p.rsplit("/", 1)[1] for p in order]
    assert names == [
        "virtio_ring.ko",
        "virtio.ko",
        "virtio_blk.ko",
        "jbd2.ko",
        "mbcache.ko",
        "crc16.ko",
        "ext4.ko",
        "crc32c-generic.ko",
    ]
    for i, path in enumerate(order):
        assert all(order.index(dep) < i for dep in deps[path])
    with pytest.raises(InvalidInput):
        testguest.module_load_order(deps, ["nope"])


def test_cpio_newc_entries_are_aligned_and_terminated():
    cpio = testguest.CpioWriter()
    cpio.directory("bin")
    cpio.file("bin/hello", b"hi!", 0o755)
    cpio.symlink("init", "bin/hello")
    cpio.char_device("dev/console", 5, 1)
    data = cpio.finish()
    assert len(data) % 512 == 0
    pos, names = 0, []
    while True:
        header = data[pos : pos + 110]
        assert header[:6] == b"070701"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        names.append((name, fields[1] >> 12, fields[9], fields[10]))
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos : pos + filesize]
        pos += filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            break
        if name == "bin/hello":
            assert body == b"hi!" and fields[1] & 0o777 == 0o755
        if name == "init":
            assert body == b"bin/hello"
    assert [n[0] for n in names] == ["bin", "bin/hello", "init", "dev/console", "TRAILER!!!"]
    assert names[3][2:] == (5, 1)  # rdev of the console


def test_recipe_checks_that_everything_fits():
    with pytest.raises(InvalidInput):
        testguest.GuestRecipe(size=64 * testguest.MIB, extra_data=64 * testguest.MIB)
    recipe = testguest.GuestRecipe(size=4096 * testguest.MIB, extra_data=3072 * testguest.MIB)
    assert recipe.extra_start == (1 + recipe.boot_mib + recipe.data_mib) * testguest.MIB


# --- boot proofs ---------------------------------------------------------------------------------


def _png(width: int, height: int, pixel) -> bytes:
    def chunk(kind, body):
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    rows = b""
    for y in range(height):
        row = b"".join(bytes(pixel(x, y)) for x in range(width))
        # Mix filter types (Sub on even rows) to exercise the unfiltering.
        if y % 2 == 0:
            filtered = bytearray(row)
            for i in range(len(row) - 1, 2, -1):
                filtered[i] = (row[i] - row[i - 3]) & 0xFF
            rows += b"\x01" + bytes(filtered)
        else:
            rows += b"\x00" + row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_png_blank_detection():
    assert boot_proof.png_is_blank(_png(8, 5, lambda x, y: (0, 0, 0)))
    assert boot_proof.png_is_blank(_png(8, 5, lambda x, y: (30, 60, 90)))
    assert not boot_proof.png_is_blank(
        _png(8, 5, lambda x, y: (255, 255, 255) if x == y else (0, 0, 0))
    )
    assert boot_proof.png_is_blank(b"not a png")
    width, height, bpp, pixels = boot_proof.png_pixels(_png(4, 3, lambda x, y: (x, y, 7)))
    assert (width, height, bpp) == (4, 3, 3)
    assert pixels[3 * 5 : 3 * 6] == bytes((1, 1, 7))


def test_boot_proof_spec():
    spec = boot_proof.BootProofSpec.from_dict(
        {"serial": "BOOTED", "http": {"port": 80, "path": "/health", "expect": "OK"}, "timeout": 60}
    )
    assert (spec.http_port, spec.http_path, spec.http_expect, spec.timeout) == (
        80,
        "/health",
        "OK",
        60,
    )
    assert spec.guest_ports() == [80]
    assert boot_proof.BootProofSpec.from_dict(spec.to_dict()) == spec
    assert boot_proof.BootProofSpec().effective().screen_stable == boot_proof.DEFAULT_SCREEN_STABLE
    for bad in ({"serial": "("}, {"tcp": 0}, {"timeout": 0}, {"colour": "red"}, {"http_path": "x"}):
        with pytest.raises(InvalidInput):
            boot_proof.BootProofSpec.from_dict(bad)


def test_serial_check_matches_complete_and_partial_lines(tmp_path):
    log = tmp_path / "serial.log"
    check = boot_proof.SerialCheck(str(log), r"READY boots=\d+")
    assert not check.poll(1.0)
    log.write_bytes(b"noise\r\nREA")
    assert not check.poll(2.0)
    with log.open("ab") as f:
        f.write(b"DY boots=3")
    assert check.poll(3.0)
    assert check.passed_at == 3.0 and check.matched == "READY boots=3"


def test_tcp_check_tells_a_listening_port_from_an_accept_and_close(tmp_path):
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    closing = [True]

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if closing[0]:
                conn.close()
            else:
                threading.Timer(1.0, conn.close).start()

    threading.Thread(target=serve, daemon=True).start()
    check = boot_proof.TcpCheck("127.0.0.1", port, 22)
    try:
        assert not check.poll(1.0)
        assert "closed at once" in check.failure()
        closing[0] = False
        assert check.poll(2.0)
    finally:
        listener.close()
