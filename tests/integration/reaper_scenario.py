"""Not collected by the suite: tests/integration/test_reaper.py runs this file in a pytest
process of its own and SIGKILLs it. It starts the servers the way the fixtures do (Dovecot,
Cyrus with its log sink, a gateway, HAProxy, Postfix), writes what it started to the JSON file
named by ``POPGATE_REAPER_SCENARIO`` and blocks until it is killed (or its stdin closes)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from tests.support import reaper
from tests.support.cyrus import Cyrus
from tests.support.dovecot import Dovecot, free_port
from tests.support.gateway import GatewayProcess
from tests.support.haproxy import HAProxy, Route
from tests.support.postfix import Postfix


def _group(leader: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process in the process group ``leader`` leads."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == leader and fields[0] not in ("Z", "X"):
                found.append((int(entry.name), fields[19]))
    return found


def _one(pid: int | None) -> list[tuple[int, str]]:
    assert pid is not None
    started = reaper.start_time(pid)
    assert started is not None
    return [(pid, started)]


def test_start_servers_then_wait_to_be_killed(
    dovecot: Dovecot,
    cyrus: Cyrus,
    start_gateway: Callable[..., GatewayProcess],
    tmp_path: Path,
) -> None:
    gateway = start_gateway()
    route = Route("pop3", [(gateway.host, gateway.pop3_port)], None)
    # with blocks: a failing scenario stops them; the SIGKILL it waits for skips that
    with HAProxy(tmp_path, [route]) as hap, Postfix(lmtp=(dovecot.host, free_port())) as mta:
        _report_and_wait(dovecot, cyrus, gateway, hap, mta, tmp_path)


def _report_and_wait(
    dovecot: Dovecot,
    cyrus: Cyrus,
    gateway: GatewayProcess,
    hap: HAProxy,
    mta: Postfix,
    tmp_path: Path,
) -> None:
    postfix_master = int((mta.queue_dir / "pid" / "master.pid").read_text().split()[0])
    marker = tmp_path / "command-ran"
    reaper.watch_command(["sh", "-c", f"echo reaped > {marker}"])
    assert dovecot.pid is not None and cyrus.pid is not None
    started = {
        "processes": {
            "dovecot": _group(dovecot.pid),
            "cyrus": _group(cyrus.pid),
            "cyrus log sink": _one(cyrus._sink_pid),  # the private pid: no public accessor
            "postfix": _group(postfix_master),
            "gateway": _one(gateway.pid),
            "haproxy": _one(hap.pid),
        },
        "watchdog": _one(reaper.watchdog_pid()),
        "directories": [str(dovecot.base_dir), str(cyrus.base_dir), str(mta.base_dir)],
        "marker": str(marker),
    }
    out = Path(os.environ["POPGATE_REAPER_SCENARIO"])
    out.with_suffix(".tmp").write_text(json.dumps(started))
    out.with_suffix(".tmp").replace(out)
    sys.stdin.buffer.read()  # the event that ends the wait is this process' death
    raise AssertionError("the scenario was not killed (its stdin closed first)")
