"""The appliance's own SSH identity and the host keys it has pinned.

Agentless sources (SFTP pulls, libvirt hosts) are reached with OpenSSH semantics:

- one key pair per appliance, ``<data>/secrets/ssh/id_ed25519`` (0600), made on first use; its
  public line is what the page shows for a host's ``authorized_keys``;
- ``<data>/secrets/ssh/known_hosts``: host keys pinned on first use (TOFU). A host is added only
  by :func:`pin_host_key` with the key the operator was shown (its SHA256 fingerprint), never by
  an SSH client that meets a new key: every connection runs with ``StrictHostKeyChecking yes``;
- ``<data>/secrets/ssh/config``: an ``ssh -F`` file naming the two above, so any OpenSSH client
  (ssh itself, libvirt's ``qemu+ssh`` transport through its ``command=`` wrapper) connects the
  same way and never reads root's ``~/.ssh``.

Host names are checked by :func:`check_host` before they reach an argv or a file line.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
from dataclasses import dataclass

from appliance.errors import Conflict, InvalidInput, SourceError

#: Host names and addresses an operator may give: DNS names, IPv4, bracket-free IPv6.
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-:]{0,252}$")
_USER = re.compile(r"^[a-z_][a-z0-9_.\-]{0,31}$")
KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ssh-rsa")
SCAN_TIMEOUT = 10


def check_host(host: str) -> str:
    if not _HOST.match(host) or ".." in host:
        raise InvalidInput(f"{host[:80]!r} is not a host name or address")
    return host


def check_user(user: str) -> str:
    if not _USER.match(user):
        raise InvalidInput(f"{user[:40]!r} is not a user name")
    return user


def check_port(port: int) -> int:
    if not 1 <= port <= 65535:
        raise InvalidInput(f"port {port} is out of range")
    return port


def ssh_dir(data_dir: str) -> str:
    return os.path.join(data_dir, "secrets", "ssh")


@dataclass(frozen=True)
class SshIdentity:
    private_key: str
    public_line: str
    fingerprint: str
    known_hosts: str
    config: str


def fingerprint_of(key_b64: str) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a base64 public key blob."""
    digest = hashlib.sha256(base64.b64decode(key_b64)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def appliance_identity(data_dir: str) -> SshIdentity:
    """The appliance's key pair and client files, made on first use."""
    folder = ssh_dir(data_dir)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    key = os.path.join(folder, "id_ed25519")
    if not os.path.exists(key):
        tmp = key + ".new"
        for leftover in (tmp, tmp + ".pub"):
            if os.path.exists(leftover):
                os.unlink(leftover)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "backup-appliance", "-f", tmp],
            check=True,
            capture_output=True,
        )
        os.replace(tmp + ".pub", key + ".pub")
        os.replace(tmp, key)
    with open(key + ".pub") as f:
        public = f.read().strip()
    known = os.path.join(folder, "known_hosts")
    if not os.path.exists(known):
        with open(known, "a"):
            pass
        os.chmod(known, 0o600)
    config = os.path.join(folder, "config")
    text = (
        "# Written by the appliance: its own key, its own pinned host keys.\n"
        "Host *\n"
        f"  IdentityFile {key}\n"
        "  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {known}\n"
        "  GlobalKnownHostsFile /dev/null\n"
        "  StrictHostKeyChecking yes\n"
        "  BatchMode yes\n"
        "  ConnectTimeout 15\n"
        "  ServerAliveInterval 15\n"
        "  ServerAliveCountMax 4\n"
    )
    current = None
    if os.path.exists(config):
        with open(config) as f:
            current = f.read()
    if current != text:
        with open(config + ".new", "w") as f:
            f.write(text)
        os.replace(config + ".new", config)
    return SshIdentity(key, public, fingerprint_of(public.split()[1]), known, config)


def known_host_name(host: str, port: int) -> str:
    """How OpenSSH names ``host:port`` in known_hosts."""
    return host if port == 22 else f"[{host}]:{port}"


@dataclass(frozen=True)
class HostKey:
    key_type: str
    key_b64: str

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.key_b64)


def scan_host_key(host: str, port: int) -> HostKey:
    """The host's key as it offers it now (``ssh-keyscan``), to show before pinning."""
    check_host(host)
    check_port(port)
    try:
        done = subprocess.run(
            [
                "ssh-keyscan",
                "-T",
                str(SCAN_TIMEOUT),
                "-t",
                "ed25519,ecdsa,rsa",
                "-p",
                str(port),
                host,
            ],
            capture_output=True,
            text=True,
            timeout=SCAN_TIMEOUT + 5,
        )
    except subprocess.TimeoutExpired:
        raise SourceError(f"{host}:{port} did not answer SSH within {SCAN_TIMEOUT} s") from None
    keys = {}
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and not line.startswith("#") and parts[1] in KEY_TYPES:
            keys[parts[1]] = parts[2]
    for key_type in KEY_TYPES:
        if key_type in keys:
            return HostKey(key_type, keys[key_type])
    raise SourceError(f"{host}:{port} offered no SSH host key (is sshd running there?)")


def pinned_host_key(data_dir: str, host: str, port: int) -> HostKey | None:
    name = known_host_name(host, port)
    path = os.path.join(ssh_dir(data_dir), "known_hosts")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[0] == name:
                return HostKey(parts[1], parts[2])
    return None


def pin_host_key(
    data_dir: str, host: str, port: int, key: HostKey, *, replace: bool = False
) -> None:
    """Trust ``key`` for ``host:port`` from now on. A different key already pinned is a
    Conflict unless ``replace`` (the operator confirmed the host's new key)."""
    check_host(host)
    check_port(port)
    if key.key_type not in KEY_TYPES or not re.match(r"^[A-Za-z0-9+/=]+$", key.key_b64):
        raise InvalidInput("not an SSH public key")
    ident = appliance_identity(data_dir)
    name = known_host_name(host, port)
    current = pinned_host_key(data_dir, host, port)
    if current == key:
        return
    if current is not None and not replace:
        raise Conflict(
            f"{host}:{port} is pinned to {current.fingerprint}, not {key.fingerprint}; "
            "confirm the new key only if the host was reinstalled",
            pinned=current.fingerprint,
            offered=key.fingerprint,
        )
    with open(ident.known_hosts) as f:
        lines = [line for line in f if line.split()[:1] != [name]]
    lines.append(f"{name} {key.key_type} {key.key_b64}\n")
    with open(ident.known_hosts + ".new", "w") as f:
        f.writelines(lines)
    os.chmod(ident.known_hosts + ".new", 0o600)
    os.replace(ident.known_hosts + ".new", ident.known_hosts)


def ssh_argv(data_dir: str, host: str, port: int, user: str) -> list[str]:
    """``ssh`` with the appliance's identity and pinned keys; append the remote command."""
    ident = appliance_identity(data_dir)
    check_user(user)
    return ["ssh", "-F", ident.config, "-p", str(check_port(port)), "-l", user, check_host(host)]
