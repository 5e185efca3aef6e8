"""Schemathesis against the OpenAPI schema, as a viewer, an operator and an admin: no input
makes the service fail (5xx).

Each role fuzzes its own throw-away service and data directory (module-scoped fixture, one role
after the other, admin last), so a generated request that demotes, disables or deletes (the
admin run once demoted itself and deleted every asset) spoils nothing but its own run. The
servers keep jobs queued (``max_parallel_jobs=0``): generated requests may name any folder as a
backup source or restore target, and none of that must actually run on this machine, as root.
A seeded point lets the point routes get past "not found". The event streams are left out: they
stream until their jobs end (their behaviour is covered in test_api.py and test_api_limits.py).

About 30 s a role on two cores (90 s in all).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from api_support import LiveServer, bootstrap_accounts, live_server, service_settings
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

EXAMPLES_PER_OPERATION = 10
#: The admin last: were the servers ever shared, its changes could not spoil the others' runs.
ROLES = ("viewer", "operator", "admin")

pytestmark = pytest.mark.slow

# The update upload (POST /api/system/update) takes a bundle as raw bytes; generated bodies are
# sent as such (it answers 409 in a checkout).
schemathesis.serializer.alias("application/x-tar", "application/octet-stream")


@pytest.fixture(scope="module", params=ROLES)
def role(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def fuzz_server(role: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp(f"fuzz-{role}")
    source = root / "seed"
    source.mkdir()
    (source / "a.txt").write_text("seed data")
    (source / "dir").mkdir()
    (source / "dir" / "b.txt").write_text("more")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APPLIANCE_TEST_WEAK_KDF", "1")
        for name in list(os.environ):
            if name.startswith("APPLIANCE_") and name != "APPLIANCE_TEST_WEAK_KDF":
                mp.delenv(name)
        settings_ = service_settings(root / "data", max_parallel_jobs=0, login_throttle=0)
        with live_server(settings_) as live:
            bootstrap_accounts(live)
            live.service.app.backup_files(str(source), "seed")
            yield live


@pytest.fixture(scope="module")
def api_schema(fuzz_server: LiveServer, role: str) -> Any:
    with fuzz_server.as_role(role) as client:
        raw = client.get("/api/openapi.json").json()
    schema = schemathesis.openapi.from_dict(raw)
    schema.config.update(base_url=fuzz_server.url)
    # Adding a location writes its identity file as root into any empty folder the rules allow
    # (e.g. an empty /mnt): generated paths must not reach the host. Its rules are tested in
    # test_api.py and test_security.py.
    # Adding a location, pairing with a peer or adding an SSH/libvirt host connects to the
    # address given: never fuzzed (the tests talk to 127.0.0.1 only); nor the host routes that
    # reach a host (its VMs, its backup). Hosts are tested in test_hosts_api.py.
    return (
        schema.exclude(path_regex=r"/events$")
        .exclude(path="/api/locations", method="POST")
        .exclude(path="/api/peers", method="POST")
        .exclude(path="/api/hosts", method="POST")
        .exclude(path_regex=r"^/api/hosts/[^/]+/(vms|backup)$")
    )


def _operations(schema: Any) -> list[Any]:
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()
        operations.append(result.ok())
    return operations


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(
    fuzz_server: LiveServer, api_schema: Any, role: str, mode: GenerationMode
) -> None:
    """Each operation, EXAMPLES_PER_OPERATION generated requests of valid (positive) or invalid
    (negative) input, with ``role``'s token. (Driven by hand instead of schemathesis' pytest
    plug-in, which does not load under this pytest.)"""
    token = fuzz_server.tokens[role]
    failures: list[str] = []
    operations = _operations(api_schema)
    assert len(operations) >= 40

    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
        )
        def check(case: Any) -> None:
            response = case.call(
                base_url=fuzz_server.url,
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            )
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} {case.query} {case.body!r:.200}: "
                    f"{response.status_code} {response.text[:300]}"
                )
            elif response.status_code >= 400 and response.text.startswith("{"):
                body = response.json()
                if not {"code", "message", "details"} <= set(body):
                    failures.append(f"{case.method} {case.formatted_path}: error body {body}")

        try:
            check()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # nothing to make invalid (no parameters)
    assert failures == []


def test_the_service_survived(
    fuzz_server: LiveServer, role: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with fuzz_server.as_role(role) as client:
        assert client.get("/api/health").json()["status"] == "ok"
        # The token may be gone (an admin run can revoke or demote it); the answer is no 5xx.
        assert client.get("/api/me").status_code < 500
    # What the run changed was the throw-away data directory's.
    assert fuzz_server.settings.data_dir.is_relative_to(tmp_path_factory.getbasetemp())
