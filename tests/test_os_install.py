"""The appliance OS's system files and ``install.py``: checked by the tools that will read them.

Units pass ``systemd-analyze verify`` in a root where their programs exist, the udev rules go
through udev's own parser, the firewall through ``nft -c`` (check only: nothing is loaded on this
host), the sshd drop-in through ``sshd -t``, and installing twice into a temporary root (the way
the image build does, with ``systemctl --root``) changes nothing the second time. Each check is
first shown to fail on a broken copy, so a check that passes proves something.

Needs root (``unshare -m`` for udev's parser, mounts for the kernel hook) and systemd, udev,
nftables and openssh-server installed: a missing tool fails the test with the install step.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from image.appliance_os import install as os_install
from image.appliance_os.install import FILES, InstallReport, install, system_files, uninstall
from image.appliance_os.layout import Layout

UNITS_DIR = FILES / "usr/local/lib/systemd/system"
RULES = FILES / "etc/udev/rules.d/70-appliance.rules"
FIREWALL = FILES / "etc/appliance/firewall.nft"
SSHD = FILES / "etc/ssh/sshd_config.d/appliance.conf"
HOST_UNITS = Path("/usr/lib/systemd/system")
#: Template units are verified through an instance of them.
INSTANCES = {"appliance-installer@.service": "appliance-installer@tty1.service"}


def need(tool: str, package: str) -> str:
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if found is None:
        pytest.fail(f"{tool} is missing: apt-get install {package}", pytrace=False)
    return found


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (mount namespaces, mounts): run the tests as root", pytrace=False)


# --- systemd units ----------------------------------------------------------------------------


def exec_paths(unit: Path) -> set[str]:
    """The programs a unit's Exec*= lines run (their prefixes ``-@:+!`` stripped)."""
    paths = set()
    for line in unit.read_text().splitlines():
        match = re.match(r"^Exec\w+=([-@:+!]*)(\S+)", line)
        if match:
            paths.add(match.group(2))
    return paths


def verify_root(tmp_path: Path) -> Path:
    """A root with systemd's own units, ours, and stub programs where our units run them."""
    if not (HOST_UNITS / "multi-user.target").exists():
        pytest.fail("systemd's units are missing: apt-get install systemd", pytrace=False)
    root = tmp_path / "root"
    shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    shutil.copytree(FILES, root, dirs_exist_ok=True)
    for unit in UNITS_DIR.glob("*.service"):
        for program in exec_paths(unit):
            stub = root / program.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\n")
            stub.chmod(0o755)
    return root


def analyze_verify(root: Path, units: list[str]) -> str:
    need("systemd-analyze", "systemd")
    unit_dir = root / "usr/local/lib/systemd/system"
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", *(str(unit_dir / u) for u in units)],
        capture_output=True,
        text=True,
        check=False,
    )
    return (result.stdout + result.stderr).strip() + ("" if result.returncode == 0 else " (rc)")


def our_units() -> list[str]:
    return sorted(INSTANCES.get(u.name, u.name) for u in UNITS_DIR.glob("*.service"))


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    units = our_units()
    assert {"appliance.service", "appliance-banner.service", "appliance-firewall.service"} <= set(
        units
    )
    root = verify_root(tmp_path)
    # Instances of templates are verified from a file of the instance's name.
    for template, instance in INSTANCES.items():
        if (root / "usr/local/lib/systemd/system" / template).exists():
            shutil.copy(
                root / "usr/local/lib/systemd/system" / template,
                root / "usr/local/lib/systemd/system" / instance,
            )
    assert analyze_verify(root, units) == ""


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("ProtectHome=read-only", "ProtectHom=read-only"), "Unknown key"),
        (("SystemCallFilter=~@clock", "SystemCallFilter=~@clck"), "Unknown system call group"),
    ],
)
def test_verify_catches_a_broken_unit(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    root = verify_root(tmp_path)
    unit = root / "usr/local/lib/systemd/system/appliance.service"
    assert change[0] in unit.read_text()
    unit.write_text(unit.read_text().replace(*change))
    assert expected in analyze_verify(root, ["appliance.service"])


def test_verify_catches_a_missing_program(tmp_path: Path) -> None:
    root = verify_root(tmp_path)
    (root / "opt/appliance/current/venv/bin/appliance").unlink()
    assert "is not executable" in analyze_verify(root, ["appliance.service"])


def test_service_runs_the_current_release_with_the_env_file() -> None:
    text = (UNITS_DIR / "appliance.service").read_text()
    assert "ExecStart=/opt/appliance/current/venv/bin/appliance serve\n" in text
    assert "EnvironmentFile=/etc/appliance/appliance.env\n" in text
    assert "ConditionKernelCommandLine=!appliance.installer\n" in text
    # ProtectClock= would turn on a device allow-list on systemd 252 (no disks, no /dev/kvm).
    assert "\nProtectClock=" not in text and "\nDeviceAllow=" not in text
    # The page renames files over /etc/timezone and /etc/localtime: /etc must stay writable.
    assert "\nProtectSystem=yes\n" in text


# --- udev rules -------------------------------------------------------------------------------


def udev_test(rules: Path, device: Path) -> str:
    """``udevadm test`` of ``device`` with ``rules`` installed as 70-appliance.rules.

    udev 252 has no ``udevadm verify``; ``test`` parses every rules file and runs them on one
    device. It runs in a private mount namespace with the file bound into /etc/udev/rules.d and
    a private /run, so the host's rules and udev database are never touched."""
    need_root()
    need("udevadm", "udev")
    need("unshare", "util-linux")
    script = (
        "set -e; mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /etc/udev/rules.d; "
        f'cp "{rules}" /etc/udev/rules.d/70-appliance.rules; '
        f'udevadm test "{device}" 2>&1'
    )
    result = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        check=False,
    )
    output = result.stdout + result.stderr
    assert "Reading rules file: /etc/udev/rules.d/70-appliance.rules" in output, output[-2000:]
    return output


def udev_complaints(rules: Path) -> list[str]:
    """What udev's parser says about ``rules`` (its lines naming the file)."""
    device = next(iter(sorted(Path("/sys/class/block").iterdir())), None)
    assert device is not None, "no block device in /sys/class/block to run udevadm test on"
    output = udev_test(rules, device)
    return [line for line in output.splitlines() if line.startswith("/etc/udev/rules.d/70-")]


def test_udev_rules_parse() -> None:
    assert udev_complaints(RULES) == []


def test_udev_parser_catches_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "broken.rules"
    text = RULES.read_text()
    assert 'ENV{APPLIANCE_MEDIA}="tape"' in text
    broken.write_text(
        text.replace('ENV{APPLIANCE_MEDIA}="tape"', 'ENV{APPLIANCE_MEDIA}=="tape" GROUP+="x"')
    )
    complaints = udev_complaints(broken)
    assert any("GROUP key takes" in line for line in complaints), complaints


def test_udev_rules_hide_pool_disks_from_automounting(tmp_path: Path) -> None:
    need("mkfs.ext4", "e2fsprogs")
    losetup = need("losetup", "util-linux")
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    os.truncate(image, 32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-L", "apool-t", str(image)], check=True)
    device = subprocess.run(
        [losetup, "-f", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        sysfs = Path("/sys/class/block") / Path(device).name
        pool = udev_test(RULES, sysfs)
        assert "ID_FS_LABEL=apool-t" in pool and "UDISKS_IGNORE=1" in pool, pool[-2000:]
        subprocess.run(["e2label", device, "other"], check=True)
        other = udev_test(RULES, sysfs)
        assert "ID_FS_LABEL=other" in other and "UDISKS_IGNORE" not in other
    finally:
        subprocess.run([losetup, "-d", device], check=False)


def test_udev_rules_label_the_media_the_service_watches() -> None:
    text = RULES.read_text()
    # hardware/udev.py watches these subsystems; the rules must speak of the same ones.
    for subsystem in ("block", "scsi_tape", "scsi_generic"):
        assert f'SUBSYSTEM=="{subsystem}"' in text
    for media in ("usb", "tape", "changer"):
        assert f'ENV{{APPLIANCE_MEDIA}}="{media}"' in text
    assert 'ENV{ID_FS_LABEL}=="apool-*"' in text  # hardware/pools.py LABEL_PREFIX


# --- firewall, sshd ---------------------------------------------------------------------------


def nft_check(
    ruleset: Path, extra: dict[str, str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """``nft -c -f`` (check only) with the include folder pointed at ``extra``'s files."""
    nft = need("nft", "nftables")
    included = tmp_path / "firewall.d"
    included.mkdir(exist_ok=True)
    for name, text in extra.items():
        (included / name).write_text(text)
    copy = tmp_path / "firewall.nft"
    text = ruleset.read_text()
    assert 'include "/etc/appliance/firewall.d/*.nft"' in text
    copy.write_text(text.replace("/etc/appliance/firewall.d/", f"{included}/"))
    return subprocess.run([nft, "-c", "-f", str(copy)], capture_output=True, text=True, check=False)


def test_firewall_parses(tmp_path: Path) -> None:
    result = nft_check(FIREWALL, {}, tmp_path)
    assert result.returncode == 0, result.stderr


def test_firewall_takes_rules_from_firewall_d(tmp_path: Path) -> None:
    ssh = {"ssh.nft": "add rule inet appliance input tcp dport 22 accept\n"}
    assert nft_check(FIREWALL, ssh, tmp_path).returncode == 0
    typo = {"ssh.nft": "add rule inet appliance input tcp dprot 22 accept\n"}
    assert nft_check(FIREWALL, typo, tmp_path).returncode != 0


def test_firewall_owns_only_its_table() -> None:
    text = FIREWALL.read_text()
    rules = [line.strip() for line in text.splitlines() if not line.strip().startswith("#")]
    assert not any("flush ruleset" in line for line in rules)
    assert "table inet appliance" in rules and "delete table inet appliance" in rules
    assert "type filter hook input priority filter; policy drop;" in rules
    assert "tcp dport 443 accept" in rules
    assert not any("dport 22" in line for line in rules)  # SSH stays closed by default


def test_sshd_drop_in_passes_sshd_t(tmp_path: Path) -> None:
    sshd = need("sshd", "openssh-server")
    keygen = need("ssh-keygen", "openssh-client")
    need_root()
    subprocess.run(
        [keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "key")], check=True
    )
    (tmp_path / "conf.d").mkdir()
    config = tmp_path / "sshd_config"
    config.write_text(f"Include {tmp_path}/conf.d/*.conf\nHostKey {tmp_path}/key\n")

    def check(drop_in: str) -> subprocess.CompletedProcess[str]:
        (tmp_path / "conf.d/appliance.conf").write_text(drop_in)
        # sshd -t wants its privilege separation folder, as on a box where sshd runs.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        return subprocess.run(
            [sshd, "-t", "-f", str(config)], capture_output=True, text=True, check=False
        )

    result = check(SSHD.read_text())
    assert result.returncode == 0, result.stderr
    assert check("PasswordAuthentcation no\n").returncode != 0
    check(SSHD.read_text())
    effective = subprocess.run(
        [sshd, "-T", "-f", str(config)], capture_output=True, text=True, check=True
    ).stdout
    assert "passwordauthentication no" in effective
    assert "kbdinteractiveauthentication no" in effective
    assert "permitrootlogin without-password" in effective


# --- small files ------------------------------------------------------------------------------


def test_auto_upgrades_switch_is_what_the_page_writes() -> None:
    switch = FILES / "etc/apt/apt.conf.d/20auto-upgrades"
    assert switch.read_text() == (
        'APT::Periodic::Update-Package-Lists "1";\nAPT::Periodic::Unattended-Upgrade "1";\n'
    )
    policy = (FILES / "etc/apt/apt.conf.d/52appliance-unattended-upgrades").read_text()
    assert 'Unattended-Upgrade::Automatic-Reboot "false";' in policy
    assert "#clear Unattended-Upgrade::Origins-Pattern;" in policy


def test_network_file_is_for_the_image_only() -> None:
    network = "etc/systemd/network/10-appliance.network"
    assert (FILES / network).read_text() == "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n"
    assert network in {str(p) for p in system_files("image")}
    assert network not in {str(p) for p in system_files("box")}
    assert "usr/local/lib/systemd/system/appliance.service" in {str(p) for p in system_files("box")}


def test_modules_the_service_cannot_load_are_loaded_at_boot() -> None:
    modules = (FILES / "etc/modules-load.d/appliance.conf").read_text().split()
    assert set(modules) >= {"loop", "nbd", "sg", "st", "ch"}


def run_in_namespace(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    need_root()
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize(
    "hook", ["etc/kernel/postinst.d/zz-appliance-esp", "etc/initramfs/post-update.d/appliance-esp"]
)
def test_kernel_hook_copies_the_newest_kernel_to_the_esp(tmp_path: Path, hook: str) -> None:
    boot, esp = tmp_path / "boot", tmp_path / "esp"
    boot.mkdir()
    esp.mkdir()
    for version in ("6.1.0-9-amd64", "6.1.0-10-amd64"):
        (boot / f"vmlinuz-{version}").write_text(f"kernel {version}")
        (boot / f"initrd.img-{version}").write_text(f"initrd {version}")
    main_hook = FILES / "etc/kernel/postinst.d/zz-appliance-esp"
    env = {"APPLIANCE_ESP": str(esp), "APPLIANCE_BOOT": str(boot)}
    # The initramfs hook execs the kernel hook at its installed path: run the copy in the tree.
    program = main_hook if hook.startswith("etc/kernel") else FILES / hook
    if program != main_hook:
        text = program.read_text()
        assert "exec /etc/kernel/postinst.d/zz-appliance-esp" in text
        program = tmp_path / "hook"
        program.write_text(text.replace("/etc/kernel/postinst.d/zz-appliance-esp", str(main_hook)))
        program.chmod(0o755)
    assert os.access(FILES / hook, os.X_OK)
    # Not a mount point: not the appliance's disk layout, nothing happens.
    result = run_in_namespace(f'"{program}" 6.1.0-10-amd64', env)
    assert result.returncode == 0, result.stderr
    assert list(esp.iterdir()) == []
    result = run_in_namespace(
        f'mount -t tmpfs tmpfs "{esp}" && "{program}" 6.1.0-10-amd64 && ls -a "{esp}" && '
        f'cat "{esp}/vmlinuz" "{esp}/initrd.img"',
        env,
    )
    assert result.returncode == 0, result.stderr
    assert "kernel 6.1.0-10-amd64initrd 6.1.0-10-amd64" in result.stdout
    assert ".new" not in result.stdout


# --- install.py -------------------------------------------------------------------------------


def fake_wheel(folder: Path, version: str) -> Path:
    """A real wheel of ``backup-appliance`` with only an ``appliance`` script (no dependencies)."""
    files = {
        "appliance_os_stub/__init__.py": "def main() -> int:\n    return 0\n",
        f"backup_appliance-{version}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: backup-appliance\nVersion: {version}\n"
        ),
        f"backup_appliance-{version}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
        f"backup_appliance-{version}.dist-info/entry_points.txt": (
            "[console_scripts]\nappliance = appliance_os_stub:main\n"
        ),
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record_name = f"backup_appliance-{version}.dist-info/RECORD"
    record.append(f"{record_name},,")
    files[record_name] = "\n".join(record) + "\n"
    wheel = folder / f"backup_appliance-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


def fake_bundle(folder: Path, version: str = "0.0.1") -> Path:
    """A bundle folder laid out like a real one (releases.read_bundle accepts folders)."""
    (folder / "wheels").mkdir(parents=True)
    wheel = fake_wheel(folder / "wheels", version)
    (folder / "CHANGELOG.md").write_text(f"# {version}\n")
    document = {
        "version": version,
        "built": "2026-01-01T00:00:00+00:00",
        "python": "3.11",
        "wheels": {wheel.name: hashlib.sha256(wheel.read_bytes()).hexdigest()},
    }
    (folder / "release.json").write_text(json.dumps(document))
    return folder


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under ``root``: its mode and content hash (or link target)."""
    state = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            what = "-> " + os.readlink(path)
        elif path.is_file():
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            what = "dir"
        state[str(path.relative_to(root))] = (info.st_mode, what)
    return state


def image_root(tmp_path: Path) -> Path:
    """A root like the image build's: systemd's units present, nothing of the appliance yet."""
    need("systemctl", "systemd")
    root = tmp_path / "rootfs"
    shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    return root


def install_image(root: Path, bundle: Path) -> InstallReport:
    return install(Layout(root), bundle=bundle, mode="image", apt=False, enable=True, start=False)


@pytest.mark.slow
def test_install_twice_changes_nothing_the_second_time(tmp_path: Path) -> None:
    root = image_root(tmp_path)
    bundle = fake_bundle(tmp_path / "bundle")
    first = install_image(root, bundle)
    assert first.release == "0.0.1"
    assert "usr/local/lib/systemd/system/appliance.service" in first.changed
    assert "etc/systemd/network/10-appliance.network" in first.changed
    assert set(first.enabled) == set(os_install.units("image"))
    layout = Layout(root)
    assert layout.current_version() == "0.0.1"
    script = root / "opt/appliance/current/venv/bin/appliance"
    assert os.access(script, os.X_OK)
    # The scripts name the path the installed system sees, not the build's root.
    assert script.read_text().splitlines()[0] == "#!/opt/appliance/releases/0.0.1/venv/bin/python"
    assert str(root) not in (root / "opt/appliance/current/venv/bin/activate").read_text()
    # `appliance` is in root's PATH on the box, following the running release.
    command = root / "usr/local/sbin/appliance"
    assert os.readlink(command) == "/opt/appliance/current/venv/bin/appliance"
    assert (root / "etc/systemd/system/multi-user.target.wants/appliance.service").is_symlink()
    assert (
        root / "etc/systemd/system/getty.target.wants/appliance-installer@tty1.service"
    ).is_symlink()
    assert (root / "var/lib/appliance").stat().st_mode & 0o777 == 0o700
    assert (root / "etc/appliance/appliance.env").stat().st_mode & 0o777 == 0o640
    assert (root / "etc/kernel/postinst.d/zz-appliance-esp").stat().st_mode & 0o777 == 0o755
    system = json.loads(layout.system_file.read_text())
    assert system["installed_by"] == "image" and system["version"] == "0.0.1"
    before = snapshot(root)

    second = install_image(root, bundle)
    assert second.empty, second
    assert snapshot(root) == before


@pytest.mark.slow
def test_install_keeps_what_the_operator_and_the_page_changed(tmp_path: Path) -> None:
    root = image_root(tmp_path)
    bundle = fake_bundle(tmp_path / "bundle")
    install_image(root, bundle)
    env = root / "etc/appliance/appliance.env"
    env.write_text("APPLIANCE_PORT=8443\n")
    switch = root / "etc/apt/apt.conf.d/20auto-upgrades"
    switch.write_text(switch.read_text().replace('"1"', '"0"'))
    unit = root / "usr/local/lib/systemd/system/appliance.service"
    unit.write_text("tampered\n")
    report = install_image(root, bundle)
    assert report.changed == ["usr/local/lib/systemd/system/appliance.service"]
    assert unit.read_bytes() == (UNITS_DIR / "appliance.service").read_bytes()
    assert env.read_text() == "APPLIANCE_PORT=8443\n"
    assert '"0"' in switch.read_text()


@pytest.mark.slow
def test_uninstall_keeps_data_unless_purged(tmp_path: Path) -> None:
    root = image_root(tmp_path)
    before = snapshot(root)
    install_image(root, fake_bundle(tmp_path / "bundle"))
    layout = Layout(root)
    (layout.data / "catalog.db").write_text("backups")

    removed = uninstall(layout, purge=False)
    assert "usr/local/lib/systemd/system/appliance.service" in removed
    assert "usr/local/sbin/appliance" in removed
    assert not (root / "usr/local/sbin/appliance").is_symlink()
    assert not (root / "opt/appliance").exists()
    assert not layout.system_file.exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants/appliance.service").exists()
    assert (layout.data / "catalog.db").read_text() == "backups"
    assert layout.env_file.exists()

    uninstall(layout, purge=True)
    assert not layout.data.exists() and not layout.etc.exists()
    left = set(snapshot(root)) - set(before)
    # What stays is systemd-networkd enabled (the image's network, not the appliance's to undo)
    # and empty folders; nothing of the appliance.
    assert [path for path in left if "appliance" in path] == []
    assert all((root / p).is_dir() or "network" in p for p in left), sorted(left)


def test_uninstall_leaves_files_the_box_had_before(tmp_path: Path) -> None:
    root = tmp_path / "root"
    mine = root / "etc/apt/apt.conf.d/20auto-upgrades"
    mine.parent.mkdir(parents=True)
    mine.write_text("the box's own\n")
    (root / os_install.MANIFEST).parent.mkdir(parents=True)
    (root / os_install.MANIFEST).write_text("etc/ssh/sshd_config.d/appliance.conf\n")
    ours = root / "etc/ssh/sshd_config.d/appliance.conf"
    ours.parent.mkdir(parents=True)
    ours.write_text("x")
    removed = uninstall(Layout(root), purge=False, live=False)
    assert removed == ["etc/ssh/sshd_config.d/appliance.conf"]
    assert mine.read_text() == "the box's own\n"


def test_cli_refuses_purge_without_yes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        os_install.main(["uninstall", "--root", str(tmp_path), "--purge"])
    assert exit_.value.code == 2
    assert "--yes" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_box_mode_leaves_the_network_and_the_installer_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = image_root(tmp_path)
    bundle = fake_bundle(tmp_path / "bundle")
    argv = ["--root", str(root), "--mode", "box", "--bundle", str(bundle), "--no-apt"]
    assert os_install.main(argv) == 0
    out = capsys.readouterr().out
    assert "release 0.0.1 installed and made current" in out
    assert "enabled: " + " ".join(os_install.UNITS) in out
    assert not (root / "etc/systemd/network/10-appliance.network").exists()
    assert not (root / "usr/local/lib/systemd/system/appliance-installer@.service").exists()
    assert json.loads(Layout(root).system_file.read_text())["installed_by"] == "box"
    assert os_install.main(argv) == 0
    assert capsys.readouterr().out == "already installed: nothing changed\n"


@pytest.mark.slow
def test_box_install_starts_the_units_after_reloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # systemctl and udevadm stand-ins that log their arguments: this host runs no systemd.
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for tool in ("systemctl", "udevadm"):
        stub = bin_dir / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n')
        stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    root = tmp_path / "root"
    bundle = fake_bundle(tmp_path / "bundle")
    layout = Layout(root)
    report = install(layout, bundle=bundle, mode="box", apt=False, enable=True, start=True)
    calls = [line.replace(f"--root={root} ", "") for line in log.read_text().splitlines()]
    restarts = [c for c in calls if c.startswith("systemctl restart appliance")]
    assert restarts == [f"systemctl restart {unit}" for unit in os_install.UNITS]
    assert calls.index("systemctl daemon-reload") < calls.index(restarts[0])
    assert calls.index("udevadm control --reload") < calls.index(restarts[0])
    assert "systemctl restart systemd-journald.service" in calls  # its drop-in is new
    assert report.started == list(os_install.UNITS)
