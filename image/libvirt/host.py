"""A libvirt host reached over SSH with the appliance's own identity: virsh calls and NBD tunnels.

Every connection goes through OpenSSH with the appliance's ``ssh -F`` file
(:func:`appliance.sources.ssh_identity.appliance_identity`): its own key, its own pinned host
keys, ``StrictHostKeyChecking yes``. libvirt's ``qemu+ssh`` transport cannot take ``-F``, but its
URI names the ssh binary to run (``command=``); that binary is a two-line wrapper,
``<data>/secrets/ssh/libvirt-ssh``, that execs ``ssh -F <config> "$@"``. ``no_verify`` is never
set, so libvirt adds nothing that weakens the host-key check.

Before any connection the host's key must be pinned (``pin_host_key``): an unpinned host is
refused here with the step to take, and a host whose key changed is refused by ssh itself; both
are :class:`HostKeyRefused` with the pinned fingerprint.

A virsh call is one SSH connection (~0.2-0.4 s on loopback), so readers batch several virsh
commands into one call (virsh runs ``cmd1 ; cmd2`` in one session). Domains are named by UUID in
those command lines: UUIDs need no quoting.

:class:`NbdTunnel` forwards a unix socket of the host (the NBD server of a backup job) to a unix
socket on the appliance (``ssh -N -L local:remote``). It is our own child, stopped by its pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Sequence

from appliance.errors import InvalidInput, SourceError
from appliance.sources.ssh_identity import (
    appliance_identity,
    check_host,
    check_port,
    check_user,
    pinned_host_key,
    ssh_argv,
    ssh_dir,
)

#: Seconds a virsh call may take (a backup-begin on a busy host included).
VIRSH_TIMEOUT = 120
#: Seconds ssh may take to authenticate and bind a forwarded socket.
TUNNEL_TIMEOUT = 20
INSTALL_HINT = "apt-get install libvirt-clients openssh-client"


class HostKeyRefused(SourceError):
    """The libvirt host's SSH key is not the one pinned for it (or none is pinned)."""

    code = "host_key_refused"


def _wrapper_text(config: str) -> str:
    return f'#!/bin/sh\n# Written by the appliance: libvirt\'s ssh, with its own identity.\nexec ssh -F "{config}" "$@"\n'


def ssh_wrapper(data_dir: str) -> str:
    """Path of the ssh wrapper libvirt runs (written on first use, rewritten if it differs)."""
    ident = appliance_identity(data_dir)
    if '"' in ident.config or "$" in ident.config or "`" in ident.config:
        raise InvalidInput(f"data directory path {data_dir!r} cannot be used in a shell script")
    path = os.path.join(ssh_dir(data_dir), "libvirt-ssh")
    text = _wrapper_text(ident.config)
    try:
        with open(path) as f:
            current = f.read()
    except FileNotFoundError:
        current = None
    if current != text:
        with open(path + ".new", "w") as f:
            f.write(text)
        os.chmod(path + ".new", 0o700)
        os.replace(path + ".new", path)
    return path


def libvirt_uri(host: str, port: int, user: str, wrapper: str) -> str:
    """``qemu+ssh://`` URI of a host's system daemon, through the appliance's ssh wrapper."""
    query = urllib.parse.urlencode({"command": wrapper, "no_tty": "1"}, safe="/")
    return f"qemu+ssh://{user}@{host}:{port}/system?{query}"


def explain_failure(
    host: str, port: int, stderr: str, public_line: str, pinned: str
) -> SourceError:
    """A domain error a person can act on, from what virsh/ssh printed (pure)."""
    text = " ".join(stderr.split())
    if (
        "Host key verification failed" in text
        or "REMOTE HOST IDENTIFICATION HAS CHANGED" in text
        or "No ED25519 host key is known" in text
    ):
        return HostKeyRefused(
            f"{host}:{port} offered an SSH host key that is not the one pinned for it "
            f"({pinned}); the connection was refused. If the host was reinstalled, scan its new "
            "key and pin it again after checking the fingerprint",
            host=host,
            pinned=pinned,
        )
    if "Permission denied" in text:
        return SourceError(
            f"{host}:{port} does not accept the appliance's SSH key; add this line to the "
            f"user's authorized_keys there: {public_line}",
            host=host,
        )
    if "Connection refused" in text or "No route to host" in text or "timed out" in text:
        return SourceError(f"cannot reach SSH on {host}:{port}: {text[-300:]}", host=host)
    return SourceError(f"libvirt on {host}:{port} failed: {text[-500:] or 'no message'}", host=host)


class LibvirtHost:
    """A libvirt host: ``qemu+ssh://USER@HOST:PORT/system`` with the appliance's identity.

    ``remote_dir`` is the folder on the host where backup jobs put their NBD socket (QEMU, run by
    libvirt, creates the socket there, so it must be a folder QEMU may write).
    """

    def __init__(
        self,
        data_dir: str,
        host: str,
        port: int = 22,
        user: str = "root",
        *,
        remote_dir: str = "/var/lib/libvirt/qemu",
    ) -> None:
        self.data_dir = os.path.abspath(data_dir)
        self.host = check_host(host)
        self.port = check_port(port)
        self.user = check_user(user)
        if not os.path.isabs(remote_dir) or any(c in remote_dir for c in "'\"\\ $`"):
            raise InvalidInput(f"{remote_dir!r} is not a usable folder on the libvirt host")
        self.remote_dir = remote_dir
        self.identity = appliance_identity(self.data_dir)
        self.wrapper = ssh_wrapper(self.data_dir)
        self.uri = libvirt_uri(self.host, self.port, self.user, self.wrapper)

    @property
    def label(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def _pinned(self) -> str:
        key = pinned_host_key(self.data_dir, self.host, self.port)
        if key is None:
            raise HostKeyRefused(
                f"the SSH host key of {self.host}:{self.port} is not pinned yet: scan it, check "
                "its fingerprint with the host's owner, and pin it before connecting",
                host=self.host,
            )
        return key.fingerprint

    def virsh(self, *commands: Sequence[str], timeout: float = VIRSH_TIMEOUT) -> str:
        """Run one or more virsh commands in one session; their stdout, in order.

        Each command is an argv; arguments must need no quoting in virsh's own command line
        (UUIDs, checkpoint names and paths this package makes, never a user's text).
        """
        pinned = self._pinned()
        if shutil.which("virsh") is None:
            raise SourceError(f"virsh is missing on the appliance: {INSTALL_HINT}")
        for argv in commands:
            for arg in argv:
                if not arg or any(c in arg for c in " ;'\"\\\n#$`"):
                    raise InvalidInput(f"{arg!r} cannot be passed to virsh unquoted")
        line = " ; ".join(" ".join(argv) for argv in commands)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIBVIRT_")}
        try:
            done = subprocess.run(
                ["virsh", "-q", "-c", self.uri, line],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise SourceError(
                f"libvirt on {self.label} did not answer within {timeout:.0f} s", host=self.host
            ) from None
        if done.returncode != 0:
            raise self._failure(done.stderr or done.stdout, pinned)
        return done.stdout

    def _failure(self, text: str, pinned: str) -> SourceError:
        """The error for a failed virsh call. libvirt relays ssh's own messages only now and
        then (a long host-key warning may arrive as "Cannot recv data"), so a failure that does
        not say what went wrong is diagnosed with a plain ``ssh ... true`` to the host."""
        error = explain_failure(self.host, self.port, text, self.identity.public_line, pinned)
        if type(error) is not SourceError or not error.message.startswith("libvirt on"):
            return error
        argv = ssh_argv(self.data_dir, self.host, self.port, self.user)
        try:
            probe = subprocess.run(
                [*argv, "--", "true"],
                capture_output=True,
                text=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return error
        if probe.returncode == 0:
            return error  # SSH is fine: the failure is libvirt's own
        return explain_failure(
            self.host, self.port, probe.stderr, self.identity.public_line, pinned
        )

    def tunnel(self, remote_socket: str, *, command: str | None = None) -> NbdTunnel:
        """Forward ``remote_socket`` of the host to a fresh local socket (see :class:`NbdTunnel`)."""
        return NbdTunnel(self, remote_socket, command=command)


class NbdTunnel:
    """``ssh -N -L LOCAL:REMOTE``: the host's unix socket reachable on the appliance.

    With ``command`` (a shell line for the host) the same SSH session runs it instead of ``-N``
    (the offline copy's ``qemu-nbd``); its stdin stays open until the tunnel closes, so the
    command can end itself when its stdin does (see :mod:`image.libvirt.offline`).
    Each connection to :attr:`socket` opens a new connection to the remote socket; the remote
    socket need not exist until then. ``close`` stops ssh (our child, by pid) and removes the
    local folder; it is idempotent.
    """

    def __init__(
        self, host: LibvirtHost, remote_socket: str, *, command: str | None = None
    ) -> None:
        pinned = host._pinned()
        self._dir = tempfile.mkdtemp(prefix="appliance-libvirt-")
        self.socket = os.path.join(self._dir, "nbd.sock")
        self._log = os.path.join(self._dir, "ssh.log")
        base = ssh_argv(host.data_dir, host.host, host.port, host.user)
        argv = [
            *base[:-1],
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "StreamLocalBindUnlink=yes",
            "-L",
            f"{self.socket}:{remote_socket}",
            base[-1],
        ]
        argv += ["--", command] if command else ["-N"]
        stdin = subprocess.PIPE if command else subprocess.DEVNULL
        with open(self._log, "wb") as log:
            self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                argv, stdin=stdin, stdout=log, stderr=log
            )
        deadline = time.monotonic() + TUNNEL_TIMEOUT
        try:
            while not os.path.exists(self.socket):
                if self._proc.poll() is not None:
                    with open(self._log, errors="replace") as f:
                        raise explain_failure(
                            host.host, host.port, f.read(), host.identity.public_line, pinned
                        )
                if time.monotonic() > deadline:
                    raise SourceError(
                        f"the SSH tunnel to {host.label} was not up within {TUNNEL_TIMEOUT} s",
                        host=host.host,
                    )
                time.sleep(0.02)
        except BaseException:
            self.close()
            raise

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        try:
            with open(self._log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> NbdTunnel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
