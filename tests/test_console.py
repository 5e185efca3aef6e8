"""The console's decisions, without a VM: text to QEMU key codes, when a console may open, which
noVNC files are served, and which origins may open a console with the page's sign-in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from api.console import NovncMissing, idle_words, novnc_file, same_origin
from appliance.errors import InvalidInput, NotFound
from image.console import (
    MAX_CONSOLES,
    MAX_TEXT,
    ConsoleLimit,
    ConsoleUnavailable,
    check_console,
    key_chord,
    text_to_keys,
)
from image.qemu import DiskAttachment, Isolated, QemuFiles, build_qemu_argv


def test_letters_digits_and_punctuation_map_to_us_keys() -> None:
    assert text_to_keys("az09") == [("a",), ("z",), ("0",), ("9",)]
    assert text_to_keys("Hi!") == [("shift", "h"), ("i",), ("shift", "1")]
    assert text_to_keys("a b\tc") == [("a",), ("spc",), ("b",), ("tab",), ("c",)]
    assert key_chord("/") == ("slash",)
    assert key_chord("?") == ("shift", "slash")
    assert key_chord('"') == ("shift", "apostrophe")
    assert key_chord("~") == ("shift", "grave_accent")
    assert key_chord("é") is None


def test_every_printable_ascii_character_has_a_key() -> None:
    printable = "".join(chr(c) for c in range(32, 127))
    chords = text_to_keys(printable)
    assert len(chords) == len(printable)
    # each character is one chord of one key, with Shift only in front
    assert all(len(c) == 1 or (len(c) == 2 and c[0] == "shift") for c in chords)
    # no two characters type the same chord
    assert len(set(chords)) == len(chords)


def test_line_endings_are_one_enter_each() -> None:
    assert text_to_keys("a\r\nb\rc\n") == [("a",), ("ret",), ("b",), ("ret",), ("c",), ("ret",)]


def test_text_without_keys_is_refused_whole() -> None:
    with pytest.raises(InvalidInput) as caught:
        text_to_keys("password€ and ünïcode")
    assert "€" in caught.value.message and "ü" in caught.value.message
    assert caught.value.details["characters"] == ["€", "ü", "ï"]
    with pytest.raises(InvalidInput, match="no text"):
        text_to_keys("")
    with pytest.raises(InvalidInput, match=f"at most {MAX_TEXT}"):
        text_to_keys("a" * (MAX_TEXT + 1))
    assert len(text_to_keys("a" * MAX_TEXT)) == MAX_TEXT


def test_a_console_opens_only_for_a_running_vm_with_a_socket_below_the_limit() -> None:
    check_console("s1", state="running", running_here=True, has_socket=True, open_consoles=0)
    check_console("s1", state="booting", running_here=True, has_socket=True, open_consoles=3)
    for state in ("starting", "stopping", "stopped", "failed"):
        with pytest.raises(ConsoleUnavailable, match="not running"):
            check_console("s1", state=state, running_here=True, has_socket=True, open_consoles=0)
    with pytest.raises(ConsoleUnavailable, match="not running"):
        check_console("s1", state="running", running_here=False, has_socket=True, open_consoles=0)
    with pytest.raises(ConsoleUnavailable, match="without a console") as caught:
        check_console("s1", state="running", running_here=True, has_socket=False, open_consoles=0)
    assert caught.value.code == "console_unavailable"
    with pytest.raises(ConsoleLimit) as limit:
        check_console(
            "s1", state="running", running_here=True, has_socket=True, open_consoles=MAX_CONSOLES
        )
    assert limit.value.code == "console_limit" and limit.value.details["limit"] == MAX_CONSOLES


def test_qemu_serves_vnc_on_the_unix_socket_only() -> None:
    spec = {"name": "web", "memory_mib": 256, "disks": [{"bus": "virtio"}]}
    disks = [DiskAttachment("/s/web.qcow2", "/s/run/0.sock", "web")]
    files = QemuFiles(qmp_socket="/s/run/qmp.sock", serial_log="/s/serial.log")
    plain = build_qemu_argv(spec, disks, accel="tcg", network=Isolated(), files=files)
    assert "-vnc" not in plain
    with_vnc = build_qemu_argv(
        spec,
        disks,
        accel="tcg",
        network=Isolated(),
        files=QemuFiles("/s/run/qmp.sock", "/s/serial.log", vnc_socket="/s/run/v,nc.sock"),
    )
    i = with_vnc.index("-vnc")
    assert with_vnc[i + 1] == "unix:/s/run/v,,nc.sock"  # QEMU's option escaping
    assert with_vnc[with_vnc.index("-display") + 1] == "none"
    assert with_vnc.count("-vnc") == 1


# --- noVNC's files -----------------------------------------------------------------------------


def fake_novnc(root: Path) -> Path:
    (root / "core" / "util").mkdir(parents=True)
    (root / "vendor" / "pako").mkdir(parents=True)
    (root / "app").mkdir()
    (root / "core" / "rfb.js").write_text("export default class RFB {}\n")
    (root / "core" / "util" / "events.js").write_text("export {};\n")
    (root / "vendor" / "pako" / "inflate.js").write_text("export {};\n")
    (root / "app" / "ui.js").write_text("export {};\n")
    (root / "core" / "notes.txt").write_text("not a script\n")
    return root


def test_only_core_and_vendor_scripts_inside_the_novnc_folder_are_served(tmp_path: Path) -> None:
    root = fake_novnc(tmp_path / "novnc")
    assert novnc_file("core/rfb.js", root) == (root / "core" / "rfb.js").resolve()
    assert novnc_file("core/util/events.js", root).name == "events.js"
    assert novnc_file("vendor/pako/inflate.js", root).name == "inflate.js"
    for bad in (
        "app/ui.js",
        "core/../app/ui.js",
        "core/../../etc/passwd.js",
        "/etc/passwd",
        "core//rfb.js",
        "core/.hidden.js",
        "core/notes.txt",
        "rfb.js",
        "",
    ):
        with pytest.raises(InvalidInput):
            novnc_file(bad, root)
    with pytest.raises(NotFound):
        novnc_file("core/missing.js", root)
    # a link inside core/ that leads out of it is refused
    secret = tmp_path / "secret.js"
    secret.write_text("export const key = 1;\n")
    os.symlink(secret, root / "core" / "leak.js")
    with pytest.raises(NotFound):
        novnc_file("core/leak.js", root)


def test_missing_novnc_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(NovncMissing) as caught:
        novnc_file("core/rfb.js", tmp_path / "absent")
    assert caught.value.code == "novnc_missing"
    assert "apt-get install novnc" in caught.value.message


def test_debians_novnc_is_served_when_installed() -> None:
    path = novnc_file("core/rfb.js")
    assert path == Path("/usr/share/novnc/core/rfb.js").resolve()
    assert "export default class RFB" in path.read_text()


def test_only_the_pages_own_origin_may_use_the_sign_in_cookie() -> None:
    assert same_origin("http://127.0.0.1:8443", "127.0.0.1:8443")
    assert same_origin("https://Backup.Example:443", "backup.example:443")
    assert not same_origin("http://evil.example", "127.0.0.1:8443")
    assert not same_origin("http://127.0.0.1:9999", "127.0.0.1:8443")
    assert not same_origin("null", "127.0.0.1:8443")
    assert not same_origin(None, "127.0.0.1:8443")
    assert not same_origin("http://127.0.0.1:8443", None)


def test_idle_time_in_words() -> None:
    assert idle_words(1) == "1 second"
    assert idle_words(45) == "45 seconds"
    assert idle_words(900) == "15 minutes"
