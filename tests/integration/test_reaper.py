"""A pytest run killed mid-way leaves no server behind (tests/support/reaper.py).

The fixtures stop their servers in ``finally``, which SIGKILL skips. The watchdog that every
pytest process starts (tests/conftest.py) notices its pytest's death by EOF on a pipe and stops
exactly the processes the support modules announced, then removes their directories."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support import reaper

REPO = Path(__file__).resolve().parents[2]
SCENARIO = Path(__file__).with_name("reaper_scenario.py")


def _alive(identities: list[tuple[int, str]]) -> list[tuple[int, str]]:
    return [(pid, started) for pid, started in identities if reaper.start_time(pid) == started]


def test_servers_of_a_sigkilled_pytest_run_are_stopped_and_their_directories_removed(
    tmp_path: Path,
) -> None:
    report = tmp_path / "started.json"
    output = tmp_path / "inner-pytest.out"
    env = {**os.environ, "POPGATE_REAPER_SCENARIO": str(report)}
    env["POPGATE_TEST_UPSTREAMS"] = "dovecot"  # the gateway's upstream; Cyrus starts anyway
    argv = [sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider"]
    # in this very process (the one killed below), even with -n in PYTEST_ADDOPTS
    argv += ["-p", "no:xdist", str(SCENARIO)]
    identities: list[tuple[int, str]] = []
    with output.open("wb") as out:
        inner = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # signals for our group do not reach it
        )
    try:
        deadline = time.monotonic() + 180
        while not report.exists():
            assert inner.poll() is None, f"the scenario ended:\n{output.read_text()}"
            assert time.monotonic() < deadline, f"no servers in 180 s:\n{output.read_text()}"
            time.sleep(0.05)  # polling for the report file the scenario writes when ready
        started = json.loads(report.read_text())
        for name, procs in started["processes"].items():
            procs = [tuple(p) for p in procs]
            assert procs and _alive(procs) == procs, f"{name} not running: {procs}"
            identities += procs
        watchdog = [tuple(p) for p in started["watchdog"]]
        assert _alive(watchdog) == watchdog
        for directory in started["directories"]:
            assert Path(directory).is_dir()

        inner.kill()  # SIGKILL the pytest process only: no finally, no atexit
        assert inner.wait(30) == -signal.SIGKILL

        deadline = time.monotonic() + 60  # the reaper's SIGTERM grace (10 s) and SIGKILL
        while _alive(identities + watchdog):
            assert time.monotonic() < deadline, (
                f"left running 60 s after pytest died: {_alive(identities + watchdog)}\n"
                + output.read_text()
            )
            time.sleep(0.05)  # polling /proc for the processes' exit
        for directory in started["directories"]:
            assert not Path(directory).exists(), directory
        assert Path(started["marker"]).read_text() == "reaped\n"
        assert "pytest left servers behind" in output.read_text()
    finally:
        # If the reaper failed, do its work here (only these pids, proven by start time).
        with contextlib.suppress(ProcessLookupError):
            inner.kill()
        inner.wait(30)
        for pid, _ in _alive(identities):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
