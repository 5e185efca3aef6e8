"""The API load phase of ``scripts/bench`` at its smallest: a real service, real clients.

The benchmark's numbers are only as good as its harness: this runs the phase against a real
``appliance serve`` with a few clients on a small tree and checks that it measured something
(requests answered, latencies, three timed backups) and that its minimal HTTP client reads the
service's answers correctly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bench_support import load_benchlib

CLI = Path(sys.executable).with_name("appliance")


apiload = load_benchlib("apiload")


def test_api_load_phase_measures_a_loaded_backup(tmp_path: Path) -> None:
    assert CLI.exists(), f"{CLI} is missing: run scripts/setup"
    tree = tmp_path / "tree"
    for d in range(5):
        (tree / f"d{d}").mkdir(parents=True)
        for f in range(40):
            (tree / f"d{d}" / f"f{f}.bin").write_bytes(os.urandom(4096 + f))
    result = apiload.run(
        CLI,
        tmp_path / "work",
        tree,
        files=200,
        tree_bytes=200 * 4096,
        clients=5,
        interval=0.05,
        min_seconds=1.0,
    )
    assert result.problem is None, result.problem
    assert result.errors == 0, result.error_samples
    assert result.requests > 0 and result.p50_ms is not None and result.p99_ms is not None
    assert result.p50_ms <= result.p99_ms <= result.max_ms
    # As many backups under load as unloaded before it, and as many again after it.
    runs = len(result.loaded)
    assert runs >= 1 and all(s > 0 for s in result.loaded)
    assert len(result.unloaded) == 2 * runs and all(s > 0 for s in result.unloaded)
    assert sum(result.unloaded[:runs]) >= 1.0
    assert result.server_cpu is not None and result.server_cpu > 0
    assert result.server_cpu_unloaded is not None and result.server_cpu_unloaded > 0
    assert result.server_ms_per_request_net is not None
    rows = {k: v for k, v in apiload.rows(result)}
    assert rows["errors"] == "0"
    assert {verdict for _, _, verdict in apiload.targets(result)} <= {"PASS", "FAIL"}
    # Only the data dir the phase made was removed; its work dir (logs) stays.
    assert not any((tmp_path / "work").glob("api-load-*"))
