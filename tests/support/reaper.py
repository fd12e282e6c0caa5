"""A watchdog that stops the test servers of a pytest run that died before stopping them.

The fixtures stop their servers by pid in ``finally``; SIGKILL, an OOM kill or a CI timeout
skips that, and Dovecot, Cyrus, Postfix (sessions of their own), HAProxy and gateways run on
with ppid 1, their directories left in /tmp. So each pytest process starts one watchdog
(:func:`start`, from tests/conftest.py): a small process in a session of its own whose stdin is
the read end of a pipe that only pytest holds the write end of. The support modules announce
what they start over that pipe (:func:`watch_process`, :func:`watch_directory`,
:func:`watch_command`) and withdraw it once they stopped it (:func:`unwatch`). When the pipe
reads EOF -- pytest exited, however it exited -- the watchdog stops whatever is still announced
and exits. After a clean run nothing is left to stop.

Only what was announced is touched, never anything found by name (other sessions' servers run
on this host): a process is signalled only while it is the one announced (pid and start time
from /proc), together with its descendants and, for a server started in a session of its own,
the members of its process group.

Without a watchdog (the support modules' CLIs, a pytest run that never started one) the
announcements do nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

#: how long the processes of a dead run get after SIGTERM before SIGKILL
TERM_GRACE = 10.0

_channel: IO[bytes] | None = None
_watchdog: subprocess.Popen[bytes] | None = None
_lock = threading.Lock()
_tokens = itertools.count(1)


# --------------------------------------------------------------------- /proc
def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on, or None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()  # comm may hold spaces and parentheses


def start_time(pid: int) -> str | None:
    """The process' start time (clock ticks after boot): tells it apart from a later process
    that reuses its pid. None when it is gone."""
    fields = _stat_fields(pid)
    return None if fields is None or fields[0] in ("Z", "X") else fields[19]


def _processes() -> dict[int, list[str]]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[0] not in ("Z", "X"):
                found[int(entry.name)] = fields
    return found


# --------------------------------------------------------------------- pytest's side
def start() -> None:
    """Start this process' watchdog (once; later calls do nothing)."""
    global _channel, _watchdog
    with _lock:
        if _channel is not None:
            return
        read_end, write_end = os.pipe()  # not inherited by other children (PEP 446)
        try:
            _watchdog = subprocess.Popen(
                [sys.executable, "-m", "tests.support.reaper"],
                stdin=read_end,
                # Its own session: a signal for pytest's process group (Ctrl-C, `timeout`)
                # must not end the watchdog before it did its work.
                start_new_session=True,
                cwd=Path(__file__).resolve().parents[2],
            )
        finally:
            os.close(read_end)
        _channel = os.fdopen(write_end, "wb", buffering=0)


def stop(timeout: float = 30.0) -> None:
    """Close the pipe (the watchdog stops what is still announced) and wait for it."""
    global _channel, _watchdog
    with _lock:
        channel, _channel = _channel, None
        watchdog, _watchdog = _watchdog, None
    if channel is not None:
        channel.close()
    if watchdog is not None:
        # Leftovers of a run that ended normally are stopped too (a test that forgot one);
        # a slow `podman rm` may outlast the wait: the watchdog finishes on its own.
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(timeout)


def watchdog_pid() -> int | None:
    return _watchdog.pid if _watchdog is not None else None


def _send(entry: dict[str, Any]) -> int | None:
    with _lock:
        if _channel is None:
            return None
        token = next(_tokens)
        try:
            _channel.write(json.dumps({"token": token, **entry}).encode() + b"\n")
        except BrokenPipeError:
            raise RuntimeError(
                "the reaper's watchdog is gone: servers of this run would not be stopped if it "
                "died; see tests/support/reaper.py"
            ) from None
        return token


def watch_process(pid: int, *, group: bool = False) -> int | None:
    """Announce a server process (stopped with its descendants). ``group``: it leads a
    session/process group of its own (``start_new_session``), whose members go too.
    Returns the token for :func:`unwatch`."""
    started = start_time(pid)
    if started is None:
        return None
    return _send({"kind": "process", "pid": pid, "start": started, "group": group})


def watch_directory(path: str | os.PathLike[str]) -> int | None:
    """Announce a directory to remove (after the processes are gone)."""
    return _send({"kind": "directory", "path": os.fspath(Path(path).absolute())})


def watch_command(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int | None:
    """Announce a command that undoes something (``podman rm -f NAME``), run before the
    directories are removed."""
    return _send({"kind": "command", "argv": list(argv), "env": dict(env) if env else None})


def unwatch(token: int | None) -> None:
    """Withdraw an announcement: its thing was stopped or removed the ordinary way."""
    if token is not None:
        _send({"kind": "done", "of": token})


# --------------------------------------------------------------------- the watchdog
def _targets(entry: Mapping[str, Any], table: dict[int, list[str]]) -> set[tuple[int, str]]:
    """(pid, start time) of the announced process, its descendants and its group members."""
    pid, started = entry["pid"], entry["start"]
    leader = table.get(pid)
    found: set[tuple[int, str]] = set()
    if leader is not None and leader[19] == started:
        found.add((pid, started))
        frontier = [pid]
        while frontier:
            parent = frontier.pop()
            for child, fields in table.items():
                if int(fields[1]) == parent and (child, fields[19]) not in found:
                    found.add((child, fields[19]))
                    frontier.append(child)
    if entry["group"]:
        # A group outlives its leader while members remain; its id is not handed out again
        # until then. Members started before the leader are not its own.
        found |= {
            (p, f[19]) for p, f in table.items() if int(f[2]) == pid and int(f[19]) >= int(started)
        }
    return found


def _signal_all(targets: set[tuple[int, str]], sig: signal.Signals) -> None:
    for pid, started in targets:
        if start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def _wait_gone(targets: set[tuple[int, str]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(start_time(pid) == started for pid, started in targets):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # polling /proc for the processes' exit
    return True


def reap(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """Stop the announced processes (SIGTERM, then SIGKILL), run the commands, remove the
    directories. Returns what was done, for the log."""
    done = []
    table = _processes()
    targets: set[tuple[int, str]] = set()
    for entry in entries:
        if entry["kind"] == "process":
            mine = _targets(entry, table)
            if mine:
                done.append(f"stopped pid {entry['pid']} ({len(mine)} processes)")
            targets |= mine
    if targets:
        _signal_all(targets, signal.SIGTERM)
        if not _wait_gone(targets, TERM_GRACE):
            _signal_all(targets, signal.SIGKILL)
            _wait_gone(targets, 5)
    for entry in entries:
        if entry["kind"] == "command":
            env = entry["env"]
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    entry["argv"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=120,
                    check=False,
                )
                done.append("ran " + " ".join(entry["argv"]))
    for entry in entries:
        if entry["kind"] == "directory" and os.path.isdir(entry["path"]):
            shutil.rmtree(entry["path"], ignore_errors=True)
            done.append(f"removed {entry['path']}")
    return done


def watch(stream: IO[bytes]) -> list[str]:
    """Read announcements until EOF, then reap what is left."""
    live: dict[int, dict[str, Any]] = {}
    for line in stream:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short by pytest's death
        if entry["kind"] == "done":
            live.pop(entry["of"], None)
        else:
            live[entry["token"]] = entry
    return reap(list(live.values()))


def main() -> int:
    # The terminal's Ctrl-C or hangup is for pytest: the watchdog ends when the pipe does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    done = watch(sys.stdin.buffer)
    if done:
        with contextlib.suppress(OSError):
            print(
                "tests/support/reaper.py: pytest left servers behind: " + "; ".join(done),
                file=sys.stderr,
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
