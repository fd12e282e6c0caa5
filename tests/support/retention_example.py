"""The PC-and-laptop example of docs/deleting-and-retention.md, run for real.

``.venv/bin/python -m tests.support.retention_example`` starts a private Dovecot (METADATA on)
and popgate with ``delete_after_days = 3``, plays the week with real POP sessions, and prints
the ``popgate device list`` and ``popgate retention --dry-run`` output the docs quote. Time is
compressed: the sessions happen now, and ``--now`` looks at the mailbox days later.
"""

from __future__ import annotations

import poplib
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.conftest import base_gateway_config
from tests.support.dovecot import Dovecot
from tests.support.gateway import GatewayProcess, merge_config

USER, PASSWORD = "alice", "alice-secret"


def pop(gw: GatewayProcess, device: str, *, retr: bool, dele: bool) -> None:
    client = poplib.POP3("127.0.0.1", gw.pop3_port, timeout=30)
    client.user(f"{USER}#{device}")
    client.pass_(PASSWORD)
    for n in range(1, len(client.list()[1]) + 1):
        if retr:
            client.retr(n)
        if dele:
            client.dele(n)
    client.quit()


def popgate(gw: GatewayProcess, *args: str) -> None:
    shown = " ".join(a for a in args)
    print(f"$ popgate {shown} -c popgate.toml")
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *args, "-c", str(gw.config_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    print(done.stdout, end="")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="popgate-example-") as tmp:
        server = Dovecot(metadata=True)  # its own directory, which its auth process can read
        server.start()
        try:
            server.add_user(USER, PASSWORD)
            workdir = Path(tmp) / "gw"
            workdir.mkdir()
            config = merge_config(
                base_gateway_config(server, workdir),
                {
                    "retention": {"delete_after_days": 3, "sweep_interval": 0},
                    "log": {"level": "info"},
                },
            )
            gw = GatewayProcess(config, workdir / "popgate.toml").start()
            try:
                run(server, gw)
            except Exception:
                print(gw.log_text()[-3000:], file=sys.stderr)
                raise
            finally:
                gw.stop()
        finally:
            server.stop()


def run(server: Dovecot, gw: GatewayProcess) -> None:
    now = datetime.now(UTC)
    # Saturday: the laptop polls (nothing new).
    pop(gw, "laptop", retr=True, dele=False)
    # Monday: three messages arrive; the PC downloads and deletes them.
    for i in range(1, 4):
        body = f"From: bob@example.org\r\nSubject: report {i}\r\n\r\nweek {i}\r\n".encode()
        server.append(USER, PASSWORD, body, internaldate=now)
    pop(gw, "pc", retr=True, dele=True)
    friday = (now + timedelta(days=4)).isoformat(timespec="minutes")
    print(f"# Friday ({friday}): the messages are 4 days old, past delete_after_days = 3")
    popgate(gw, "device", "list", USER, "--now", friday)
    popgate(gw, "retention", "--user", USER, "--dry-run", "--now", friday)
    # Saturday: the laptop downloads them (it keeps a copy on the server too).
    pop(gw, "laptop", retr=True, dele=False)
    saturday = (now + timedelta(days=5)).isoformat(timespec="minutes")
    print(f"# Saturday ({saturday}), after the laptop's poll")
    popgate(gw, "device", "list", USER, "--now", saturday)
    popgate(gw, "retention", "--user", USER, "--dry-run", "--now", saturday)
    # One more message, deleted by the PC; then neither device polls for 45 days.
    body = b"From: bob@example.org\r\nSubject: report 4\r\n\r\nweek 4\r\n"
    server.append(USER, PASSWORD, body, internaldate=now)
    pop(gw, "pc", retr=True, dele=True)
    later = (now + timedelta(days=45)).isoformat(timespec="minutes")
    print(f"# {later}: no device has polled for 45 days (device_inactive_days = 30)")
    popgate(gw, "device", "list", USER, "--now", later)
    popgate(gw, "retention", "--user", USER, "--dry-run", "--now", later)


if __name__ == "__main__":
    main()
