"""How many workers the engine starts, and the CPU it reports: the figures that say how a
backup will scale on a machine with more cores than this one."""

from __future__ import annotations

import os
import threading
import time

import pytest

from appliance import cli
from appliance.workers import CpuMeter, default_workers, worker_cpu


def test_default_workers_follow_the_cores_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(32)))
    assert default_workers() == 32  # no cap: a 32-core appliance runs 32 workers
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {5})
    assert default_workers() == 1  # a cpuset of one core, whatever the machine has


def test_the_meter_keeps_each_worker_process_s_latest_figure() -> None:
    meter = CpuMeter()
    meter.process((101, 1.0))
    meter.process((102, 2.0))
    meter.process((101, 3.5))  # cumulative: the newer figure replaces the older
    meter.process((102, 1.5))  # an answer that overtook a later one does not go back
    meter.thread(0.25)
    meter.thread(0.25)
    figures = meter.to_dict()
    assert figures["workers_s"] == pytest.approx(3.5 + 2.0 + 0.5)
    assert figures["worker_processes"] == 2


def test_the_coordinator_is_this_process_less_its_worker_threads() -> None:
    meter = CpuMeter()
    deadline = time.thread_time() + 0.05
    while time.thread_time() < deadline:
        pass
    assert 0.05 <= meter.to_dict()["coordinator_s"] < 1.0

    def work() -> None:
        started = time.thread_time()
        while time.thread_time() < started + 0.2:
            pass
        meter.thread(time.thread_time() - started)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    figures = meter.to_dict()
    assert figures["workers_s"] >= 0.2
    assert figures["coordinator_s"] < 0.05 + 0.1  # the thread's 0.2 s is the workers
    pid, seconds = worker_cpu()
    assert pid == os.getpid() and seconds >= 0.05


@pytest.mark.parametrize(
    "argv, command",
    [
        (["backup", "files", "/srv"], "backup"),
        (["--data-dir", "/d", "--workers", "4", "restore", "p", "/t"], "restore"),
        (["--json", "--passphrase-file", "pf", "points"], "points"),
        (["--data-dir", "backup", "tape", "media"], "tape"),  # an option's value is not it
        (["--help"], None),
        (["-h", "backup"], None),
        ([], None),
    ],
)
def test_the_command_a_command_line_names(argv: list[str], command: str | None) -> None:
    assert cli._command(argv) == command


def test_core_commands_do_not_import_the_plug_ins(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[str] = []
    monkeypatch.setattr(cli, "_cli_plugins", lambda: loaded.append("all") or [])
    cli.build_parser(["--data-dir", "/d", "backup", "files", "/srv", "--asset", "a"])
    assert loaded == []
    cli.build_parser(["tape", "media"])
    cli.build_parser(["--help"])
    assert loaded == ["all", "all"]
    # With the real plug-ins, a plug-in's command parses.
    monkeypatch.undo()
    args = cli.build_parser(["tape", "media"]).parse_args(["tape", "media"])
    assert args.command == "tape"
