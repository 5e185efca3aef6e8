"""Take over on the peer: a source's replica opened as a store of this appliance's own.

The peer holds each paired source's store byte for byte (``<data>/replicas/<store id>/``) and
cannot read it, unless the source granted a take-over: its recovery key sealed to this peer's
X25519 key (:mod:`api.takeover_keys`), kept in ``<data>/replicas/<store id>.grant.json`` (0600).
The private key is made on first need in ``<data>/secrets/takeover-x25519.pem`` (0600, written
atomically; never in the catalog or an answer).

Taking over (:meth:`Takeovers.open`) unseals the grant, opens the replica in place as a
:class:`~appliance.store.repository.Repository` with the recovery key, gives it a catalog of its
own (``<data>/takeovers/<store id>/catalog.sqlite``) rebuilt from the store, assets made from the
points' manifests, a job runner (in-process) and a failover manager (state in
``<data>/takeovers/<store id>/failover``). The store-scoped routes reach it through a *view*: a
:class:`~api.service.Service` object, never started, whose appliance, runner and manager are the
take-over's (``api.deps.StoreService``, ``?store=<store id>``).

Invariants:

- The take-over's appliance uses this data directory's path rules: its restore areas and
  devices are read from the main catalog (:class:`TakeoverCatalog`) and its default restore area
  is this data directory's, so nothing a request names reaches outside this appliance's rules.
  (Failover settings, per asset, are the take-over's own.)
  Its assets have no registered source (a folder or disk the *source* named means nothing here):
  an in-place restore is refused, and so is a failback written to the "original" disks.
- Every audit line goes to the main catalog's log, naming the store.
- Open take-overs are kept in the main catalog's settings document ``replication_takeovers``
  and opened again at service start; one whose grant is gone or no longer opens is dropped.
- One lock serialises opening and closing, so two opens of one store never race.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from api.identity import appliance_id
from api.pairing import SourceRecord, get_source
from api.replica_store import replica_root, replicas_dir
from api.takeover_keys import (
    load_private_key,
    new_private_key,
    parse_public_key,
    parse_sealed,
    private_key_pem,
    public_key_text,
    unseal,
)
from appliance.catalog import Catalog
from appliance.catalog.records import ACTIVE_FAILOVER_STATES
from appliance.engine import Appliance, DataDir
from appliance.engine_restore import RESTORE_SETTINGS_KEY
from appliance.errors import ApplianceError, Conflict, InvalidInput, NotFound
from appliance.jobs import JobRunner
from appliance.store.backend import LocalDirectoryBackend
from appliance.store.repository import Repository
from appliance.vmspec import vm_source
from image.failover import (
    FailoverManager,
    bind_failover_manager,
    unbind_failover_manager,
)

if TYPE_CHECKING:
    from api.service import Service

log = logging.getLogger("appliance.takeover")

KEY_FILE = "takeover-x25519.pem"
TAKEOVERS_DIR = "takeovers"
#: The main catalog's settings document of the open take-overs.
TAKEOVERS_KEY = "replication_takeovers"
#: Settings the take-over's catalog reads from the main one: this appliance's own rules.
SHARED_SETTINGS = frozenset({RESTORE_SETTINGS_KEY})

_key_lock = threading.Lock()


class TakeoverNotGranted(ApplianceError):
    """The source has not granted this appliance a take-over of its store."""

    code = "takeover_not_granted"
    kind = "conflict"


class TakeoverOpen(ApplianceError):
    """The source's store is taken over here: its replica cannot be deleted until it is closed."""

    code = "takeover_open"
    kind = "conflict"


class StoreNotOpen(ApplianceError):
    """No taken-over store of that id is open on this appliance."""

    code = "store_not_open"
    kind = "not_found"


# --- files: the private key and the grants ----------------------------------------------------


def _write_private(path: str, data: bytes, *, replace: bool) -> bool:
    """Write ``data`` to ``path`` (0600) atomically: a temporary file, fsync, then a rename
    (``replace``) or a hard link that fails when ``path`` exists (False then: another writer
    won, and its file is the one to use)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if replace:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)
            except FileExistsError:
                return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return True


def private_key(data_dir: str) -> X25519PrivateKey:
    """This appliance's take-over private key, made on first need."""
    path = os.path.join(data_dir, "secrets", KEY_FILE)
    with _key_lock:
        try:
            return load_private_key(Path(path).read_bytes())
        except FileNotFoundError:
            pass
        key = new_private_key()
        if _write_private(path, private_key_pem(key), replace=False):
            return key
        return load_private_key(Path(path).read_bytes())  # another process made it first


def grant_path(data_dir: str, store_id: str) -> str:
    # Beside the replica, never in it: the replica folder holds exactly the source's store.
    return os.path.join(
        replicas_dir(data_dir), f"{os.path.basename(replica_root(data_dir, store_id))}.grant.json"
    )


def store_grant(
    data_dir: str, source: SourceRecord, sealed: object, public_key: str, now: datetime
) -> dict[str, Any]:
    """Keep a grant sent by ``source``. 400 when ``public_key`` is not this appliance's current
    one (sealed to an older key, it would never open) or ``sealed`` is malformed."""
    grant = parse_sealed(sealed)
    parse_public_key(public_key)
    if public_key != public_key_text(private_key(data_dir)):
        raise InvalidInput(
            "the grant is sealed to another key than this appliance's current one; fetch it again"
        )
    document = {
        "sealed": grant.to_dict(),
        "public_key": public_key,
        "source": source.appliance_id,
        "store_id": source.store_id,
        "granted_at": now.isoformat(),
    }
    _write_private(
        grant_path(data_dir, source.store_id), json.dumps(document).encode(), replace=True
    )
    return document


def read_grant(data_dir: str, store_id: str) -> dict[str, Any] | None:
    """The stored grant of ``store_id`` (None when there is none; a damaged file is returned as
    it is read, so opening it fails with words rather than reading as "not granted")."""
    try:
        text = Path(grant_path(data_dir, store_id)).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        document = json.loads(text)
    except ValueError:
        return {"damaged": True}
    return document if isinstance(document, dict) else {"damaged": True}


def delete_grant(data_dir: str, store_id: str) -> bool:
    try:
        os.unlink(grant_path(data_dir, store_id))
    except FileNotFoundError:
        return False
    return True


def recovery_key_of(data_dir: str, store_id: str, peer_id: str) -> str:
    """The recovery key the stored grant of ``store_id`` seals for this appliance (``peer_id``);
    409 without a grant, 409 ``takeover_grant_unreadable`` when it does not open."""
    grant = read_grant(data_dir, store_id)
    if grant is None:
        raise TakeoverNotGranted(
            f"the source of store {store_id} has not granted this appliance a take-over",
            store_id=store_id,
        )
    try:
        sealed = parse_sealed(grant.get("sealed"))
    except InvalidInput as exc:
        raise Conflict(
            f"the take-over grant of store {store_id} is damaged: {exc.message}", store_id=store_id
        ) from None
    return unseal(sealed, private_key(data_dir), store_id, peer_id)


# --- the take-over's catalog ------------------------------------------------------------------


class TakeoverCatalog(Catalog):
    """A taken-over store's own catalog whose audit lines go to the main catalog (naming the
    store) and whose restore settings are the main catalog's."""

    main: Catalog
    store_id: str

    def bind(self, main: Catalog, store_id: str) -> None:
        self.main = main
        self.store_id = store_id

    def audit(
        self, actor: str, action: str, target: str, details: dict[str, Any] | None = None
    ) -> None:
        self.main.audit(actor, action, target, {**(details or {}), "store": self.store_id})

    def get_settings(self, key: str) -> dict[str, Any]:
        if key in SHARED_SETTINGS:
            return self.main.get_settings(key)
        return super().get_settings(key)

    def put_settings(self, key: str, value: dict[str, Any]) -> dict[str, Any]:
        if key in SHARED_SETTINGS:
            raise InvalidInput(
                "restore settings are the appliance's own; change them without ?store="
            )
        return super().put_settings(key, value)


def register_assets(app: Appliance) -> int:
    """Assets for the points the store holds, by name and kind from their manifests, with no
    source: a path the source named means nothing on this appliance. Returns how many."""
    seen: dict[str, str] = {}
    for point_id in app.repo.manifest_ids():
        try:
            manifest = app.repo.get_manifest(point_id)
        except ApplianceError:
            continue  # rebuild_catalog names the damaged ones
        seen[str(manifest.get("asset"))] = "vm" if manifest.get("kind") == "image" else "files"
    for name, kind in seen.items():
        source = vm_source([], None) if kind == "vm" else ""
        with contextlib.suppress(ApplianceError):
            app.catalog.ensure_asset(name, kind, source)
    return len(seen)


# --- open take-overs --------------------------------------------------------------------------


@dataclass
class Takeover:
    store_id: str
    source: str
    opened_at: str
    app: Appliance
    runner: JobRunner
    failover: FailoverManager
    view: Service

    def close(self) -> None:
        self.runner.shutdown()
        self.failover.shutdown()
        unbind_failover_manager(self.failover)
        self.app.close()


class Takeovers:
    """The take-overs open in one service (see the module docstring)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self._open: dict[str, Takeover] = {}
        self._lock = threading.Lock()

    @property
    def data_dir(self) -> str:
        return self.service.app.data_dir.path

    def base(self, store_id: str) -> str:
        return os.path.join(
            self.data_dir, TAKEOVERS_DIR, os.path.basename(replica_root(self.data_dir, store_id))
        )

    def _document(self) -> dict[str, dict[str, Any]]:
        stored = self.service.app.catalog.get_settings(TAKEOVERS_KEY).get("takeovers")
        return (
            {k: v for k, v in stored.items() if isinstance(v, dict)}
            if isinstance(stored, dict)
            else {}
        )

    def _remember(self, store_id: str, entry: dict[str, Any] | None) -> None:
        document = self._document()
        if entry is None:
            document.pop(store_id, None)
        else:
            document[store_id] = entry
        self.service.app.catalog.put_settings(TAKEOVERS_KEY, {"takeovers": document})

    def get(self, store_id: str) -> Takeover:
        with self._lock:
            found = self._open.get(store_id)
        if found is None:
            raise StoreNotOpen(
                f"store {store_id[:64]} is not taken over on this appliance", store=store_id[:64]
            )
        return found

    def opened(self, store_id: str) -> Takeover | None:
        with self._lock:
            return self._open.get(store_id)

    def open(self, source_id: str) -> Takeover:
        """Take over the store of paired source ``source_id`` (the open one if it is open)."""
        service = self.service
        source = get_source(service.app, source_id)
        with self._lock:
            if source.store_id in self._open:
                return self._open[source.store_id]
            takeover = self._open_store(source, service.now().isoformat())
            self._open[source.store_id] = takeover
        self._remember(
            source.store_id, {"source": source.appliance_id, "opened_at": takeover.opened_at}
        )
        return takeover

    def _open_store(self, source: SourceRecord, opened_at: str) -> Takeover:
        service = self.service
        main = service.app
        store_id = source.store_id
        recovery_key = recovery_key_of(self.data_dir, store_id, appliance_id(main))
        root = replica_root(self.data_dir, store_id)
        if not os.path.isfile(os.path.join(root, "config")):
            raise Conflict(
                f"the replica of store {store_id} holds no store yet (nothing replicated)",
                store_id=store_id,
            )
        base = self.base(store_id)
        os.makedirs(base, mode=0o700, exist_ok=True)
        data_dir = DataDir(self.data_dir, store_dir=root)
        repo = Repository.open(
            LocalDirectoryBackend(root), data_dir.cache_path, recovery_key=recovery_key
        )
        try:
            if repo.store_id != store_id:
                raise Conflict(f"the replica in {root} holds store {repo.store_id}, not {store_id}")
            catalog = TakeoverCatalog.open("sqlite:///" + os.path.join(base, "catalog.sqlite"))
        except BaseException:
            repo.close()
            raise
        assert isinstance(catalog, TakeoverCatalog)
        catalog.bind(main.catalog, store_id)
        app = Appliance(data_dir, repo, catalog, clock=main.clock)
        runner: JobRunner | None = None
        manager: FailoverManager | None = None
        try:
            register_assets(app)
            app.rebuild_catalog()
            manager = FailoverManager(app, state_dir=os.path.join(base, "failover"))
            bind_failover_manager(manager)
            runner = JobRunner(app, max_parallel=service.settings.max_parallel_jobs)
            runner.start()
        except BaseException:
            if runner is not None:
                runner.shutdown()
            if manager is not None:
                manager.shutdown()
                unbind_failover_manager(manager)
            app.close()
            raise
        view = type(service)(service.settings, service.clock)
        view.appliance, view.runner, view.failover = app, runner, manager
        view.store_taken_over = store_id
        return Takeover(store_id, source.appliance_id, opened_at, app, runner, manager, view)

    def close(self, store_id: str) -> Takeover:
        """Close a take-over (409 while a VM runs from it); the store stays as it is."""
        with self._lock:
            takeover = self._open.get(store_id)
            if takeover is None:
                raise StoreNotOpen(
                    f"store {store_id[:64]} is not taken over on this appliance",
                    store=store_id[:64],
                )
            active = takeover.app.catalog.list_failover_sessions(states=ACTIVE_FAILOVER_STATES)
            if active:
                raise Conflict(
                    f"a VM runs from store {store_id} ({active[0].asset}, session {active[0].id}): stop it first",
                    session=active[0].id,
                )
            del self._open[store_id]
        takeover.close()
        self._remember(store_id, None)
        return takeover

    def reopen(self) -> None:
        """Service start: open again the take-overs open when it stopped. One whose grant is gone
        or no longer opens is dropped (revoking stops future take-overs, restarts included)."""
        for store_id, entry in self._document().items():
            try:
                self.open(str(entry.get("source", "")))
            except (TakeoverNotGranted, NotFound) as exc:
                log.warning("take-over of store %s not reopened, and forgotten: %s", store_id, exc)
                self._remember(store_id, None)
            except ApplianceError as exc:
                log.warning("take-over of store %s not reopened: %s", store_id, exc)

    def shutdown(self) -> None:
        """Service stop: close every take-over, remembered for the next start."""
        with self._lock:
            open_now = list(self._open.values())
            self._open.clear()
        for takeover in open_now:
            try:
                takeover.close()
            except Exception:
                log.exception("closing the take-over of store %s failed", takeover.store_id)

    def forget_files(self, store_id: str) -> None:
        """Remove a closed take-over's own catalog and failover state (not the replica)."""
        with self._lock:
            if store_id in self._open:
                raise Conflict(f"store {store_id} is taken over; close it first")
        shutil.rmtree(self.base(store_id), ignore_errors=True)


def takeover_state(service: Service, record: SourceRecord) -> dict[str, Any]:
    """``{granted, granted_at, open, opened_at}`` of a source, for the peer's sources page."""
    grant = read_grant(service.app.data_dir.path, record.store_id)
    takeovers: Takeovers | None = getattr(service, "takeovers", None)
    opened = takeovers.opened(record.store_id) if takeovers is not None else None
    return {
        "granted": grant is not None,
        "granted_at": grant.get("granted_at") if grant else None,
        "open": opened is not None,
        "opened_at": opened.opened_at if opened is not None else None,
    }
