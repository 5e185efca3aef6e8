"""Upgrade the appliance to a release bundle, and roll back by itself when the new one fails.

:func:`apply_update` runs these steps, each timed and recorded in
``<data>/upgrades/state.json`` (the page polls it through ``GET /api/system/release``):

1. validate the bundle (:func:`image.appliance_os.releases.read_bundle`);
2. install it beside the running release (``releases/<version>``);
3. back up the SQLite catalog with SQLite's backup API into
   ``<data>/upgrades/catalog-<old version>-<UTC time>.db`` (PostgreSQL: no copy; the state says so);
4. switch ``current`` to the new release (``previous`` becomes the old one);
5. restart the service;
6. wait until ``/api/health`` answers 200 with the new version.

Up to step 4 nothing the service uses has changed, so a failure there only records "failed".
A failure of 5 or 6 rolls back: ``current`` back to the old release, the catalog restored from
the backup (the new release may have migrated it), restart, and the old release's health
checked; the attempt ends "rolled back" with the reason.

One upgrade at a time: the attempt holds ``<data>/upgrades/lock`` (``flock``), so a state file
left "running" by a killed process reads as "interrupted".

On the box the service's own API starts the upgrade in a transient unit outside the service's
cgroup (``systemd-run --unit=appliance-upgrade --collect``), so restarting the service does not
kill it; ``main()`` is that command line (``apply BUNDLE``, ``rollback``, ``status``).

Standard library only: the upgrade must not depend on what it replaces.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.errors import Conflict, InvalidInput
from image.appliance_os.layout import SERVICE_PORT, SERVICE_UNIT, Layout
from image.appliance_os.releases import install_release, prune, read_bundle, switch_to

STATE_FILE = "state.json"
LOCK_FILE = "lock"
#: Attempts kept in the state file's history.
HISTORY_KEEP = 20
#: Catalog backups of upgrades kept in ``<data>/upgrades``.
CATALOG_BACKUPS_KEEP = 3
HEALTH_POLL_SECONDS = 1.0
UPGRADED, ROLLED_BACK, FAILED, RUNNING = "upgraded", "rolled back", "failed", "running"

Clock = Callable[[], float]


@dataclass(frozen=True)
class UpgradeResult:
    outcome: str
    from_version: str | None
    to_version: str | None
    reason: str | None
    #: Seconds from the start to the end (a rollback included).
    seconds: float
    #: Seconds the rollback took, when there was one.
    rollback_seconds: float | None
    catalog_backup: Path | None


class HealthFailed(Exception):
    pass


def upgrades_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "upgrades"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- the state file ---------------------------------------------------------------------------


def empty_state() -> dict[str, Any]:
    return {"running": False, "current": None, "history": []}


def _lock_is_held(data_dir: Path) -> bool:
    path = upgrades_dir(data_dir) / LOCK_FILE
    if not path.exists():
        return False
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def read_state(data_dir: Path) -> dict[str, Any]:
    """The state file, with ``running`` true only while an upgrade holds the lock."""
    try:
        state = json.loads((upgrades_dir(data_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return empty_state()
    if not isinstance(state, dict):
        return empty_state()
    current = state.get("current")
    held = _lock_is_held(data_dir)
    if isinstance(current, dict) and current.get("outcome") == RUNNING and not held:
        current["outcome"] = "interrupted"
        current["reason"] = "the upgrade process ended before it finished"
    queued = isinstance(current, dict) and current.get("outcome") == "queued"
    state["running"] = held or queued
    state.setdefault("history", [])
    return state


def write_state(data_dir: Path, state: dict[str, Any]) -> None:
    folder = upgrades_dir(data_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = folder / f"{STATE_FILE}.partial"
    partial.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(partial, folder / STATE_FILE)


def mark_queued(data_dir: Path, from_version: str | None, to_version: str) -> dict[str, Any]:
    """Record an upgrade about to be launched (the page shows it until the process takes over)."""
    state = read_state(data_dir)
    if state["running"]:
        raise Conflict("an upgrade is already running")
    state["current"] = {
        "from_version": from_version,
        "to_version": to_version,
        "started": _now(),
        "finished": None,
        "outcome": "queued",
        "reason": None,
        "steps": [],
    }
    state["running"] = True
    write_state(data_dir, state)
    return state


def mark_not_started(data_dir: Path, reason: str) -> None:
    """The queued upgrade could not be launched: it goes to the history as failed."""
    state = read_state(data_dir)
    current = state.get("current")
    if not isinstance(current, dict):
        return
    current.update(outcome=FAILED, reason=reason, finished=_now())
    state["history"] = [current, *state["history"]][:HISTORY_KEEP]
    state["current"], state["running"] = None, False
    write_state(data_dir, state)


class _Attempt:
    """One upgrade's record in the state file, saved after every change."""

    def __init__(self, data_dir: Path, clock: Clock, from_version: str | None) -> None:
        self.data_dir = data_dir
        self.clock = clock
        self.began = clock()
        self.state = read_state(data_dir)
        self.record: dict[str, Any] = {
            "from_version": from_version,
            "to_version": None,
            "started": _now(),
            "finished": None,
            "outcome": RUNNING,
            "reason": None,
            "catalog_backup": None,
            "catalog_note": None,
            "seconds": None,
            "rollback_seconds": None,
            "steps": [],
        }
        self.state["current"] = self.record
        self.save()

    def save(self) -> None:
        write_state(self.data_dir, self.state)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        entry: dict[str, Any] = {"name": name, "state": RUNNING, "started": _now()}
        self.record["steps"].append(entry)
        self.save()
        start = self.clock()
        try:
            yield entry
        except BaseException as exc:
            entry["state"] = "failed"
            entry.setdefault("detail", str(exc) or type(exc).__name__)
            raise
        else:
            entry["state"] = "done"
        finally:
            entry["seconds"] = round(self.clock() - start, 3)
            self.save()

    def finish(self, outcome: str, reason: str | None) -> float:
        self.record["outcome"] = outcome
        self.record["reason"] = reason
        self.record["finished"] = _now()
        seconds = round(self.clock() - self.began, 3)
        self.record["seconds"] = seconds
        self.state["current"] = None
        self.state["running"] = False
        self.state["history"] = [self.record, *self.state.get("history", [])][:HISTORY_KEEP]
        self.save()
        return seconds


@contextlib.contextmanager
def upgrade_lock(data_dir: Path) -> Iterator[None]:
    folder = upgrades_dir(data_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    with (folder / LOCK_FILE).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict("an upgrade is already running") from None
        yield


# --- the catalog ------------------------------------------------------------------------------


def sqlite_catalog(data_dir: Path, catalog_url: str | None) -> Path | None:
    """The SQLite catalog's file, or None for a PostgreSQL catalog (``APPLIANCE_CATALOG_URL``)."""
    if not catalog_url:
        return Path(data_dir) / "catalog.sqlite"  # appliance.engine.DataDir.catalog_url
    if not catalog_url.startswith("sqlite"):
        return None
    return Path(catalog_url.split(":///", 1)[1].split("?", 1)[0])


def copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite database (its WAL included), via the backup API."""
    with (
        contextlib.closing(sqlite3.connect(source)) as src,
        contextlib.closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)


def backup_catalog(catalog: Path, folder: Path, version: str | None) -> Path | None:
    """Copy the catalog into ``folder``; None when there is no catalog yet."""
    if not catalog.is_file():
        return None
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    target = folder / f"catalog-{version or 'none'}-{stamp}.db"
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    copy_sqlite(catalog, partial)
    os.chmod(partial, 0o600)
    os.replace(partial, target)
    backups = sorted(folder.glob("catalog-*.db"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in backups[CATALOG_BACKUPS_KEEP:]:
        old.unlink(missing_ok=True)
    return target


# --- the upgrade ------------------------------------------------------------------------------


def wait_healthy(
    health: Callable[[str], bool],
    version: str,
    timeout: float,
    clock: Clock,
    sleep: Callable[[float], None],
) -> bool:
    deadline = clock() + timeout
    while True:
        try:
            if health(version):
                return True
        except Exception:  # a check that raises is a check that failed; keep waiting
            pass
        if clock() >= deadline:
            return False
        sleep(HEALTH_POLL_SECONDS)


def apply_update(
    layout: Layout,
    bundle: Path,
    *,
    restart: Callable[[], None],
    health: Callable[[str], bool],
    health_timeout: float = 180,
    clock: Clock = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    data_dir: Path | None = None,
    catalog_url: str | None = None,
    python: Path = Path("/usr/bin/python3"),
) -> UpgradeResult:
    """Upgrade to ``bundle``, rolling back by itself when the new release is not healthy."""
    data = Path(data_dir) if data_dir is not None else layout.data
    with upgrade_lock(data):
        old = layout.current_version()
        attempt = _Attempt(data, clock, old)
        record = attempt.record
        backup: Path | None = None
        try:
            with attempt.step("validate") as entry:
                version = read_bundle(Path(bundle)).version
                record["to_version"] = version
                entry["detail"] = f"release {version}"
                if version == old:
                    raise InvalidInput(f"release {version} is the one running already")
            with attempt.step("install"):
                install_release(layout, Path(bundle), python=python)
            with attempt.step("back up the catalog") as entry:
                catalog = sqlite_catalog(data, catalog_url)
                if catalog is None:
                    record["catalog_note"] = "PostgreSQL catalog: no backup was taken"
                else:
                    backup = backup_catalog(catalog, upgrades_dir(data), old)
                    record["catalog_note"] = None if backup else "no catalog yet: nothing to copy"
                record["catalog_backup"] = str(backup) if backup else None
                entry["detail"] = record["catalog_backup"] or record["catalog_note"]
            with attempt.step("switch"):
                switch_to(layout, version)
        except Exception as exc:
            seconds = attempt.finish(FAILED, str(exc))
            return UpgradeResult(FAILED, old, record["to_version"], str(exc), seconds, None, None)
        try:
            with attempt.step("restart"):
                restart()
            with attempt.step("health check") as entry:
                if not wait_healthy(health, version, health_timeout, clock, sleep):
                    raise HealthFailed(
                        f"release {version} did not answer /api/health with its version "
                        f"within {health_timeout:g} s"
                    )
                entry["detail"] = f"release {version} answers"
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            if old is None:
                seconds = attempt.finish(FAILED, f"{reason}; no earlier release to go back to")
                return UpgradeResult(FAILED, old, version, reason, seconds, None, backup)
            rollback_start = clock()
            reason += _roll_back(
                attempt,
                layout,
                old,
                backup,
                data,
                catalog_url,
                restart,
                health,
                health_timeout,
                clock,
                sleep,
            )
            rollback_seconds = round(clock() - rollback_start, 3)
            record["rollback_seconds"] = rollback_seconds
            seconds = attempt.finish(ROLLED_BACK, reason)
            return UpgradeResult(
                ROLLED_BACK, old, version, reason, seconds, rollback_seconds, backup
            )
        with attempt.step("remove old releases") as entry:
            removed = prune(layout)
            entry["detail"] = ", ".join(removed) or "none"
        seconds = attempt.finish(UPGRADED, None)
        return UpgradeResult(UPGRADED, old, version, None, seconds, None, backup)


def _roll_back(
    attempt: _Attempt,
    layout: Layout,
    old: str,
    backup: Path | None,
    data: Path,
    catalog_url: str | None,
    restart: Callable[[], None],
    health: Callable[[str], bool],
    health_timeout: float,
    clock: Clock,
    sleep: Callable[[float], None],
) -> str:
    """Go back to ``old``; returns what to add to the reason when that fails too."""
    try:
        with attempt.step("switch back"):
            switch_to(layout, old)
        with attempt.step("restore the catalog") as entry:
            catalog = sqlite_catalog(data, catalog_url)
            if backup is not None and catalog is not None:
                copy_sqlite(backup, catalog)
                entry["detail"] = f"from {backup}"
            else:
                entry["detail"] = "no backup to restore"
        with attempt.step("restart the previous release"):
            restart()
        with attempt.step("health check of the previous release"):
            if not wait_healthy(health, old, health_timeout, clock, sleep):
                raise HealthFailed(f"release {old} did not answer within {health_timeout:g} s")
    except Exception as exc:
        return f"; the rollback failed as well: {exc}"
    return ""


def roll_back_by_hand(
    layout: Layout,
    *,
    restart: Callable[[], None],
    health: Callable[[str], bool],
    health_timeout: float = 180,
    data_dir: Path | None = None,
    catalog_url: str | None = None,
    clock: Clock = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> UpgradeResult:
    """Go back to ``previous`` (the admin asked). The catalog is restored from the backup of
    the last upgrade only when that upgrade went from ``previous`` to ``current``."""
    data = Path(data_dir) if data_dir is not None else layout.data
    with upgrade_lock(data):
        current, previous = layout.current_version(), layout.previous_version()
        if previous is None or previous == current:
            raise InvalidInput("there is no previous release to go back to")
        attempt = _Attempt(data, clock, current)
        attempt.record["to_version"] = previous
        history = attempt.state.get("history") or [{}]
        last = history[0] if isinstance(history[0], dict) else {}
        backup = None
        if (
            last.get("outcome") == UPGRADED
            and last.get("from_version") == previous
            and last.get("to_version") == current
            and last.get("catalog_backup")
        ):
            backup = Path(last["catalog_backup"])
        start = clock()
        failure = _roll_back(
            attempt,
            layout,
            previous,
            backup,
            data,
            catalog_url,
            restart,
            health,
            health_timeout,
            clock,
            sleep,
        )
        outcome = FAILED if failure else ROLLED_BACK
        attempt.record["rollback_seconds"] = round(clock() - start, 3)
        reason = "rolled back by hand" + failure
        seconds = attempt.finish(outcome, reason)
        return UpgradeResult(
            outcome, current, previous, reason, seconds, attempt.record["rollback_seconds"], backup
        )


# --- the box's command line -------------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a systemd EnvironmentFile (quotes stripped, comments skipped)."""
    values: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return values
    for line in lines:
        line = line.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        values[key.strip()] = value.strip().strip("'\"")
    return values


def pinned_context(cert: Path) -> ssl.SSLContext:
    """Trust exactly the service's certificate file: it is the one the service serves, whatever
    names it holds (an admin's own certificate may not name 127.0.0.1), so the chain is checked
    against it as the anchor and the host name is not."""
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def https_health(port: int, cert: Path, timeout: float = 5) -> Callable[[str], bool]:
    """GET https://127.0.0.1:<port>/api/health, verified against the service's certificate:
    True when it answers 200 with ``version``."""
    url = f"https://127.0.0.1:{port}/api/health"

    def check(version: str) -> bool:
        # Read each time: the first start of a fresh box makes the certificate.
        if not cert.exists():
            return False
        try:
            with urllib.request.urlopen(url, timeout=timeout, context=pinned_context(cert)) as r:
                body = json.loads(r.read())
                return r.status == 200 and body.get("version") == version
        except (OSError, ValueError, urllib.error.URLError, ssl.SSLError):
            return False

    return check


def systemctl_restart() -> None:
    subprocess.run(["systemctl", "restart", SERVICE_UNIT], check=True, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m image.appliance_os.upgrade")
    parser.add_argument("--root", type=Path, default=Path("/"))
    parser.add_argument("--data-dir", type=Path, help="default: from appliance.env")
    parser.add_argument("--health-timeout", type=float, default=180)
    parser.add_argument("--python", type=Path, default=Path("/usr/bin/python3"))
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("apply", help="upgrade to a release bundle").add_argument(
        "bundle", type=Path
    )
    commands.add_parser("rollback", help="go back to the previous release")
    commands.add_parser("status", help="print the state file")
    args = parser.parse_args(argv)
    layout = Layout(args.root)
    env = read_env_file(layout.env_file)
    data = args.data_dir or Path(env.get("APPLIANCE_DATA_DIR") or layout.data)
    if args.command == "status":
        state = read_state(data)
        state["current_release"] = layout.current_version()
        state["previous_release"] = layout.previous_version()
        print(json.dumps(state, indent=2))
        return 0
    port = int(env.get("APPLIANCE_PORT") or SERVICE_PORT)
    cert = Path(env.get("APPLIANCE_CERT_FILE") or data / "tls" / "cert.pem")
    common: dict[str, Any] = {
        "restart": systemctl_restart,
        "health": https_health(port, cert),
        "health_timeout": args.health_timeout,
        "data_dir": data,
        "catalog_url": env.get("APPLIANCE_CATALOG_URL"),
    }
    try:
        if args.command == "apply":
            result = apply_update(layout, args.bundle, python=args.python, **common)
        else:
            result = roll_back_by_hand(layout, **common)
    except (Conflict, InvalidInput) as exc:
        print(f"upgrade: {exc}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {k: str(v) if isinstance(v, Path) else v for k, v in result.__dict__.items()}, indent=2
        )
    )
    return 0 if result.outcome == UPGRADED or args.command == "rollback" else 1


if __name__ == "__main__":
    sys.exit(main())
