"""The domain errors of a failover, each with a stable code (never change one: API clients and
job results carry them)."""

from __future__ import annotations

from appliance.errors import ApplianceError


class FailoverFailed(ApplianceError):
    """The failover could not be completed."""

    code = "failover_failed"


class BootProofFailed(FailoverFailed):
    """The VM started but its boot could not be proven."""

    code = "boot_proof_failed"


class InsufficientMemory(ApplianceError):
    """There is not enough free memory on the appliance to run this VM."""

    code = "insufficient_memory"
    kind = "conflict"


class PointNotLocal(ApplianceError):
    """The recovery point's data is not in the local store; bring it back first."""

    code = "point_not_local"
    kind = "conflict"
