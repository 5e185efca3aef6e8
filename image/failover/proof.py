"""Proving a failover's boot, and its RTO.

The checks themselves live in :mod:`image.boot_proof`; here they are built for one session
(which host address and port reach each probed guest port) and polled until all pass or the
proof's timeout runs out. While they are polled, the boot fails at once when:

- the export hit a read error (a damaged pack): the VM could not read its disk, and the error
  names the point;
- QEMU exited (its log's tail is in the message);
- the job was cancelled.

A proof that times out raises :class:`BootProofFailed` naming the checks that did not pass
(``failed_checks`` in its details, so readers need not parse the message). A screenshot is
taken every couple of seconds while booting, so a failed boot keeps its last screen.

The RTO is the time from the request (the job's creation: the click) to the proof; the boot
time counts from QEMU's start; each check's time counts from the start of proving.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from appliance.errors import ApplianceError, InvalidInput
from image.boot_proof import (
    AgentCheck,
    BootProofSpec,
    Check,
    HttpCheck,
    ScreenStableCheck,
    SerialCheck,
    TcpCheck,
    poll_checks,
)
from image.failover.errors import BootProofFailed, FailoverFailed
from image.qemu import Bridged, Network

if TYPE_CHECKING:
    from image.failover.session import FailoverSession

SCREENSHOT_INTERVAL = 2.0
POLL_INTERVAL = 0.1


def build_checks(
    proof: BootProofSpec,
    network: Network,
    serial_log: str,
    agent_socket: str | None,
    capture: Callable[[], bytes | None],
) -> list[Check]:
    """The checks ``proof`` asks for, reaching guest ports through ``network``'s forwards (or
    the guest's address when bridged); ``capture`` returns a screenshot's bytes."""
    checks: list[Check] = []
    forwards = {f.guest_port: f for f in getattr(network, "port_forwards", ())}

    def reach(port: int) -> tuple[str, int]:
        if isinstance(network, Bridged):
            if not proof.address:
                raise InvalidInput(
                    "a bridged failover's TCP/HTTP boot proof needs the guest's address"
                )
            return proof.address, port
        forward = forwards[port]
        return forward.host_address, forward.host_port

    if proof.serial is not None:
        checks.append(SerialCheck(serial_log, proof.serial))
    if proof.tcp is not None:
        host, port = reach(proof.tcp)
        checks.append(TcpCheck(host, port, proof.tcp))
    if proof.http_port is not None:
        host, port = reach(proof.http_port)
        checks.append(HttpCheck(host, port, proof.http_port, proof.http_path, proof.http_expect))
    if agent_socket is not None:
        checks.append(AgentCheck(agent_socket))
    if proof.screen_stable is not None:
        checks.append(ScreenStableCheck(capture, proof.screen_stable))
    return checks


def prove_boot(
    session: FailoverSession,
    checks: list[Check],
    proof: BootProofSpec,
    cancel: threading.Event | None,
) -> tuple[float, float]:
    """Poll ``checks`` until all pass; raise if the boot fails (see the module docstring).

    Returns (monotonic start of proving, monotonic time of the poll that passed)."""
    deadline = time.monotonic() + proof.timeout
    last_shot = 0.0
    while True:
        now = time.monotonic()
        errors = session.export_errors()
        if errors:
            raise FailoverFailed(
                f"{errors[0]}; the VM could not read its disk",
                session=session.id,
                point=session.point_id,
            )
        code = session.process.poll()
        if code is not None:
            raise FailoverFailed(
                f"QEMU exited with status {code} while the VM was booting"
                + (f": {tail}" if (tail := session.process.log_tail()) else ""),
                session=session.id,
            )
        if cancel is not None and cancel.is_set():
            raise FailoverFailed("the failover was cancelled during the boot", session=session.id)
        pending = poll_checks(checks, now)
        if not pending:
            return deadline - proof.timeout, now
        if now >= deadline:
            raise BootProofFailed(
                f"boot proof failed after {proof.timeout:g} s: "
                + "; ".join(c.failure() for c in pending),
                session=session.id,
                failed_checks=[c.name for c in pending],
            )
        if now - last_shot >= SCREENSHOT_INTERVAL:
            last_shot = now
            session.screenshot("latest")
        time.sleep(POLL_INTERVAL)


def proof_timings(
    checks: list[Check],
    *,
    requested_at: float,
    boot_started: float,
    proven: float,
    proving_started: float,
    passed: float,
) -> dict[str, Any]:
    """RTO, boot time (epoch seconds in) and each check's time (monotonic seconds in)."""
    return {
        "rto_seconds": round(proven - requested_at, 2),
        "boot_seconds": round(proven - boot_started, 2),
        "checks": {c.name: round((c.passed_at or passed) - proving_started, 2) for c in checks},
    }


def failed_checks(exc: ApplianceError) -> list[str]:
    """The names of the boot-proof checks ``exc`` says did not pass (none for other errors)."""
    checks = exc.details.get("failed_checks")
    return [str(name) for name in checks] if isinstance(checks, list) else []
