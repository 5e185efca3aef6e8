"""Agentless pulls: a host's folder read over SFTP and stored as an ordinary ``files`` point.

The appliance connects with its own key (:func:`~appliance.sources.ssh_identity.appliance_identity`)
and nothing else: no agent, no keys of root's ``~/.ssh``. The host's key must already be pinned
(:func:`~appliance.sources.ssh_identity.pin_host_key`, after the operator saw its fingerprint); an
unpinned host or one offering another key is refused before anything is authenticated, and the error
names both fingerprints. Nothing here ever adds a host key.

:class:`SftpFS` is a :class:`~appliance.sources.tree_source.SourceFS` over one SFTP session rooted at
an absolute folder of the host; :class:`~appliance.sources.tree_source.TreeReader` walks it like a
local tree, so incrementals are by metadata as for local folders. What SFTP (version 3, OpenSSH's
``sftp-server``) cannot tell:

- mtimes are whole seconds; there is no ctime, inode, device or link count, so hardlinks are stored
  as separate files (their content deduplicated), ``one_file_system`` cannot apply, and a file
  rewritten within the same second at the same size looks unchanged;
- owner names and extended attributes: only numeric uid/gid are stored.

The host is not trusted with paths: the root must be absolute without ``.``/``..`` components, and a
listed name is only ever used as one component. A name with ``/`` or NUL (a hostile or broken
server) is kept out of the tree: :meth:`SftpFS.listdir` returns it as a marker starting with NUL that
:meth:`SftpFS.lstat` refuses with ``OSError``, which the walk records as a warning. ``.`` and ``..``
(sent by every server) are dropped. Names are bytes on the wire; non-UTF-8 bytes round-trip through
``surrogateescape`` like local names do.

Errors: a status from the server (no such file, permission denied) is an ``OSError`` (a warning for
that entry); a lost or broken connection is :class:`SftpConnectionLost`, which fails the backup.
Packs completed before the loss are indexed already, so a retry does not read them again.

Listing uses paramiko's request primitives (``SFTPClient._request``) because its ``listdir_attr``
decodes names as strict UTF-8; this module is the only importer of paramiko.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import stat
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar, cast

import paramiko
from paramiko import sftp as sftp_wire

from appliance.errors import InvalidInput, SourceError
from appliance.sources.points import ProgressCallback, backup_from_fs
from appliance.sources.ssh_identity import (
    HostKey,
    appliance_identity,
    check_host,
    check_port,
    check_user,
    pinned_host_key,
)
from appliance.sources.tree_source import EntryStat

if TYPE_CHECKING:
    from appliance.engine import Appliance, BackupOutcome

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 15
#: A request unanswered this long means the link is gone (the backup fails, a retry resumes).
IO_TIMEOUT = 60
KEEPALIVE_INTERVAL = 15
#: Read requests in flight per file (32 KiB each): about 4 MiB, so a WAN link stays full.
PREFETCH_REQUESTS = 128
#: Smaller files are read with plain requests: a prefetch costs a thread start (about 1 ms).
PREFETCH_MIN = 64 * 1024
#: paramiko's largest SFTP read (one reply).
READ_PIECE = 32768
#: The SSH channel's receive window: larger than paramiko's 2 MiB default, so the host never
#: waits for window adjustments on a fast link (71 → 91 MiB/s on loopback).
WINDOW_SIZE = 16 * 1024 * 1024

#: paramiko's host key algorithms for the key type a host is pinned with.
_ALGORITHMS = {
    "ssh-ed25519": ("ssh-ed25519",),
    "ecdsa-sha2-nistp256": ("ecdsa-sha2-nistp256",),
    "ecdsa-sha2-nistp384": ("ecdsa-sha2-nistp384",),
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256"),
}

T = TypeVar("T")


class HostKeyNotPinned(SourceError):
    """The host's SSH key is not pinned yet; confirm its fingerprint first."""

    code = "ssh_host_not_pinned"
    kind = "conflict"


class HostKeyMismatch(SourceError):
    """The host offered another SSH key than the one pinned; it was refused."""

    code = "ssh_host_key_mismatch"
    kind = "conflict"


class SshAuthRefused(SourceError):
    """The host refused the appliance's SSH key."""

    code = "ssh_auth_refused"
    kind = "forbidden"


class SshUnreachable(SourceError):
    """The host could not be reached over SSH."""

    code = "ssh_unreachable"


class SftpConnectionLost(SourceError):
    """The SSH connection to the host was lost; what was stored so far is kept for a retry."""

    code = "sftp_connection_lost"


def remote_root(path: str) -> bytes:
    """The folder to pull, as sent to the host: absolute, no ``.``/``..`` components, no NUL."""
    if not path.startswith("/") or "\0" in path:
        raise InvalidInput(f"{path[:200]!r} is not an absolute path")
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise InvalidInput(f"{path[:200]!r} has . or .. components")
    return ("/" + "/".join(parts)).encode("utf-8", "surrogateescape")


def sftp_source(host: str, port: int, user: str, path: str) -> str:
    """The point's ``source``: ``ssh://USER@HOST:PORT/PATH`` (IPv6 in brackets)."""
    shown = f"[{host}]" if ":" in host else host
    root = remote_root(path).decode("utf-8", "surrogateescape")
    return f"ssh://{user}@{shown}:{port}{root}"


def listed_name(raw: bytes) -> str | None:
    """A name from the host's listing as the walk uses it: None for ``.``/``..``; a name that
    cannot be a path component becomes a NUL-prefixed marker :meth:`SftpFS.lstat` refuses."""
    if raw in (b".", b".."):
        return None
    if not raw or b"/" in raw or b"\0" in raw:
        return "\0" + raw.hex()
    return raw.decode("utf-8", "surrogateescape")


def entry_stat(attrs: paramiko.SFTPAttributes) -> EntryStat:
    """An SFTP v3 attribute set as the walk's :class:`EntryStat` (mtime seconds → ns)."""
    if attrs.st_mode is None:
        raise OSError(errno.EIO, "the host gave no file type")
    return EntryStat(
        mode=attrs.st_mode,
        uid=attrs.st_uid or 0,
        gid=attrs.st_gid or 0,
        size=attrs.st_size or 0,
        mtime_ns=(attrs.st_mtime or 0) * 1_000_000_000,
    )


class SftpFS:
    """One SFTP session's view of ``root`` on a host; see the module docstring. Close it (or use
    it as a context manager) to end the SSH connection."""

    def __init__(
        self,
        transport: paramiko.Transport,
        client: paramiko.SFTPClient,
        root: bytes,
        where: str,
    ) -> None:
        self._transport = transport
        self._sftp = client
        self._root = root
        self.where = where
        self.root = f"{where}{root.decode('utf-8', 'surrogateescape')}"

    # --- SourceFS ----------------------------------------------------------------------------

    def lstat(self, rel: str) -> EntryStat:
        path = self._remote(rel)
        # The root itself is followed if it is a symlink, as for local folders.
        call = self._sftp.stat if not rel else self._sftp.lstat
        return entry_stat(self._io(rel, call, path))

    def listdir(self, rel: str) -> list[str]:
        return self._io(rel, self._listdir, self._remote(rel))

    def open_file(self, rel: str, expected: EntryStat) -> BinaryIO:
        """The file, prefetched. It must still be a regular file; a size or mtime that moved
        since the walk listed it is read as it is now (the walk's after-check warns)."""
        handle = self._io(rel, self._sftp.open, self._remote(rel), "rb")
        try:
            now = entry_stat(self._io(rel, handle.stat))
            if not stat.S_ISREG(now.mode):
                raise OSError(0, "changed while it was backed up")
            if (now.size, now.mtime_ns) != (expected.size, expected.mtime_ns):
                log.info("%s: %s changed between listing and reading", self.where, rel)
            if expected.size > PREFETCH_MIN:
                self._io(rel, handle.prefetch, expected.size, PREFETCH_REQUESTS)
        except BaseException:
            self._close_quietly(handle)
            raise
        return cast(BinaryIO, _RemoteFile(self, rel, handle))

    def readlink(self, rel: str) -> str:
        target = self._io(rel, self._sftp.readlink, self._remote(rel))
        if target is None:
            raise OSError(errno.EINVAL, "not a symlink")
        if isinstance(target, bytes):
            target = target.decode("utf-8", "surrogateescape")
        if not target or "\0" in target:
            raise OSError(errno.EINVAL, "the host sent an unusable symlink target")
        return str(target)

    def owner_names(self, uid: int, gid: int) -> tuple[str | None, str | None]:
        return None, None  # SFTP v3 carries numeric ids only

    # --- session -----------------------------------------------------------------------------

    def close(self) -> None:
        try:
            self._sftp.close()
        finally:
            self._transport.close()

    def __enter__(self) -> SftpFS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------------

    def _remote(self, rel: str) -> bytes:
        if not rel:
            return self._root
        name = rel.rsplit("/", 1)[-1]
        if name.startswith("\0"):
            raw = bytes.fromhex(name[1:])
            raise OSError(errno.EINVAL, f"the host listed an invalid name {raw!r}; skipped")
        if "\0" in rel:  # only markers carry NUL, and a marker is never listed as a folder
            raise OSError(errno.EINVAL, "invalid path")
        return self._root.rstrip(b"/") + b"/" + rel.encode("utf-8", "surrogateescape")

    def _io(self, rel: str, call: Callable[..., T], *args: Any) -> T:
        """Run one SFTP call: a status from the server stays an ``OSError`` (that entry only);
        anything that means the session is gone becomes :class:`SftpConnectionLost`."""
        try:
            return call(*args)
        except TimeoutError as exc:
            raise self._lost(rel, f"no answer within {IO_TIMEOUT} s") from exc
        except OSError as exc:
            if self._transport.is_active():
                raise
            raise self._lost(rel, exc.strerror or str(exc)) from exc
        except (paramiko.SSHException, paramiko.SFTPError, EOFError) as exc:
            raise self._lost(rel, str(exc) or type(exc).__name__) from exc

    def _lost(self, rel: str, why: str) -> SftpConnectionLost:
        return SftpConnectionLost(
            f"the SFTP connection to {self.where} was lost while reading "
            f"{rel or '/'!r} ({why}); what was stored so far is kept, run the backup again",
            host=self.where,
            path=rel,
        )

    def _listdir(self, path: bytes) -> list[str]:
        kind, msg = self._sftp._request(sftp_wire.CMD_OPENDIR, path)
        if kind != sftp_wire.CMD_HANDLE:
            raise paramiko.SFTPError("Expected handle")
        handle = msg.get_binary()
        names: set[str] = set()
        try:
            while True:
                try:
                    kind, msg = self._sftp._request(sftp_wire.CMD_READDIR, handle)
                except EOFError:  # SSH_FX_EOF: the listing is complete
                    break
                if kind != sftp_wire.CMD_NAME:
                    raise paramiko.SFTPError("Expected name response")
                for _ in range(msg.get_int()):
                    raw = msg.get_string()
                    msg.get_string()  # the ls -l style long name
                    paramiko.SFTPAttributes._from_msg(msg)
                    name = listed_name(raw)
                    if name is not None:
                        if name.startswith("\0"):
                            log.warning("%s listed an invalid name %r", self.where, raw)
                        names.add(name)
        finally:
            if self._transport.is_active():
                self._sftp._request(sftp_wire.CMD_CLOSE, handle)
        return sorted(names)

    @staticmethod
    def _close_quietly(handle: Any) -> None:
        with contextlib.suppress(Exception):  # the session may be gone; the caller says why
            handle.close()


class _RemoteFile:
    """A read-only stream over an open SFTP file; errors as :meth:`SftpFS._io` makes them."""

    def __init__(self, fs: SftpFS, rel: str, handle: paramiko.SFTPFile) -> None:
        self._fs = fs
        self._rel = rel
        self._handle = handle

    def read(self, size: int = -1) -> bytes:
        # One SFTP reply at a time: paramiko's own read(n) grows one bytes object per reply,
        # quadratic for the multi-MiB reads the tree reader makes.
        parts = []
        left = size if size >= 0 else 1 << 62
        while left > 0:
            piece = self._fs._io(self._rel, self._handle.read, min(left, READ_PIECE))
            if not piece:
                break
            parts.append(piece)
            left -= len(piece)
        return b"".join(parts)

    def close(self) -> None:
        SftpFS._close_quietly(self._handle)

    def __enter__(self) -> _RemoteFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_sftp(data_dir: str, host: str, port: int, user: str, root: str) -> SftpFS:
    """An SFTP session on ``user@host:port`` rooted at the folder ``root``, authenticated with
    the appliance's key only, after checking the host's key against the pinned one."""
    check_host(host)
    check_port(port)
    check_user(user)
    root_b = remote_root(root)
    ident = appliance_identity(data_dir)
    pinned = pinned_host_key(data_dir, host, port)
    where = f"{user}@{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        raise SshUnreachable(
            f"cannot reach {host}:{port}: {exc.strerror or exc}", host=host, port=port
        ) from None
    transport = paramiko.Transport(sock, default_window_size=WINDOW_SIZE)
    try:
        if pinned is not None:
            # Ask for the pinned key's type first, so a host with several keys offers that one.
            preferred = _ALGORITHMS.get(pinned.key_type, ())
            options = transport.get_security_options()
            options.key_types = [*preferred, *(k for k in options.key_types if k not in preferred)]
        try:
            transport.start_client(timeout=CONNECT_TIMEOUT)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise SshUnreachable(
                f"SSH handshake with {host}:{port} failed: {exc}", host=host, port=port
            ) from None
        server_key = transport.get_remote_server_key()
        offered = HostKey(server_key.get_name(), server_key.get_base64())
        if pinned is None:
            raise HostKeyNotPinned(
                f"{host}:{port} is not a known host: it offers {offered.key_type} key "
                f"{offered.fingerprint}; pin it after checking that fingerprint on the host",
                offered=offered.fingerprint,
                pinned=None,
            )
        if offered != pinned:
            raise HostKeyMismatch(
                f"{host}:{port} offered {offered.key_type} key {offered.fingerprint}, but "
                f"{pinned.fingerprint} is pinned; refused. Confirm the new key only if the host "
                "was reinstalled",
                offered=offered.fingerprint,
                pinned=pinned.fingerprint,
            )
        try:
            key = paramiko.Ed25519Key(filename=ident.private_key)
            transport.auth_publickey(user, key)
        except paramiko.AuthenticationException:
            raise SshAuthRefused(
                f"{where} refused the appliance's key; add this key to ~{user}/.ssh/"
                f"authorized_keys on the host: {ident.public_line}",
                public_key=ident.public_line,
            ) from None
        except (paramiko.SSHException, OSError) as exc:
            raise SshUnreachable(f"SSH login to {where} failed: {exc}") from None
        try:
            client = paramiko.SFTPClient.from_transport(transport)
        except (paramiko.SSHException, OSError) as exc:
            raise SourceError(f"{where} offers no SFTP service: {exc}") from None
        if client is None:
            raise SourceError(f"{where} offers no SFTP service")
        channel = client.get_channel()
        if channel is not None:
            channel.settimeout(IO_TIMEOUT)
        transport.set_keepalive(KEEPALIVE_INTERVAL)
        fs = SftpFS(transport, client, root_b, where)
        try:
            top = fs.lstat("")
        except OSError as exc:
            reason = "does not exist" if exc.errno == errno.ENOENT else "cannot be read"
            raise SourceError(
                f"{root} {reason} on {where} ({exc.strerror or exc})", path=root
            ) from None
        if not stat.S_ISDIR(top.mode):
            raise SourceError(f"{root} on {where} is not a folder", path=root)
        return fs
    except BaseException:
        transport.close()
        raise


def backup_sftp(
    app: Appliance,
    *,
    host: str,
    port: int,
    user: str,
    path: str,
    asset: str,
    mode: str = "incremental",
    excludes: tuple[str, ...] = (),
    one_file_system: bool = False,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> BackupOutcome:
    """Pull ``path`` from ``user@host:port`` over SFTP into a point of ``asset`` (source
    ``ssh://USER@HOST:PORT/PATH``); files whose size and mtime match the previous point are
    not read. ``one_file_system`` has no effect: SFTP does not tell file systems apart."""
    source = sftp_source(host, port, user, path)
    with connect_sftp(app.data_dir.path, host, port, user, path) as fs:
        return backup_from_fs(
            app,
            fs,
            asset,
            source=source,
            mode=mode,
            excludes=excludes,
            one_file_system=one_file_system,
            progress=progress,
            cancel=cancel,
        )
