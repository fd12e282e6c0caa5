"""How fast can one client address guess passwords through popgate, and what does an idle
connection cost? (issue 9, bug 6). Not a test: a measurement, run by hand.

    .venv/bin/python -m tests.bench.guessing [--seconds 20] [--gateway-src DIR]

``--gateway-src`` runs the gateway from another checkout (e.g. a worktree of main) to compare.
A private Dovecot with its own penalties off stands for a permissive upstream; the guesses that
reach it are counted from its log ("Password mismatch"), so a client that hangs up before its
answer still counts. Scenarios, each for ``--seconds``:

- serial: one connection at a time, USER/PASS until the gateway closes it, reconnect;
- parallel: 30 such connections from the same address;
- impatient: 30 connections that hang up when no answer came within 0.2 s, and reconnect.

Then ``--idle`` connections (spread over 127.0.0.0/24, so the per-address limit is not in the
way) are opened and left idle; the gateway's RSS before and after gives the cost of one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

from tests.support.dovecot import Dovecot
from tests.support.gateway import GatewayProcess

USER, PASSWORD = "victim", "the-right-password-1"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def guesser(port: int, stop: threading.Event, patience: float | None, counts: list[int]) -> None:
    """Guess until ``stop``; ``counts[0]`` += failures answered after a check upstream."""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), 30) as sock:
                reader = sock.makefile("rb")
                if not reader.readline().startswith(b"+OK"):
                    time.sleep(0.05)  # refused: the limits said so
                    continue
                while not stop.is_set():
                    sock.sendall(f"USER {USER}\r\n".encode())
                    reader.readline()
                    sock.sendall(b"PASS wrong-guess\r\n")
                    sock.settimeout(patience if patience is not None else 60)
                    try:
                        answer = reader.readline()
                    except TimeoutError:
                        break  # hang up and try again on a new connection
                    sock.settimeout(30)
                    if not answer:
                        break
                    if answer.startswith(b"-ERR [AUTH]"):
                        counts[0] += 1  # not the unchecked [SYS/TEMP] refusals
        except OSError:
            time.sleep(0.01)


def mismatches(dovecot: Dovecot) -> int:
    return dovecot.log_text().count("Password mismatch")


def scenario(
    gw: GatewayProcess, dovecot: Dovecot, connections: int, patience: float | None, seconds: float
) -> tuple[float, float]:
    """(answered failures per second, guesses checked upstream per second)."""
    stop = threading.Event()
    counts = [0]
    before = mismatches(dovecot)
    threads = [
        threading.Thread(target=guesser, args=(gw.pop3_port, stop, patience, counts), daemon=True)
        for _ in range(connections)
    ]
    for t in threads:
        t.start()
    time.sleep(seconds)  # a measurement window, not a test assertion
    stop.set()
    checked = mismatches(dovecot) - before
    for t in threads:
        t.join(5)
    return counts[0] / seconds, checked / seconds


def idle_cost(gw: GatewayProcess, count: int) -> float:
    """KiB of gateway RSS per idle connection (greeted, then silent)."""
    assert gw.pid is not None
    base = rss_kib(gw.pid)
    socks = []
    try:
        for n in range(count):
            source = f"127.0.0.{2 + n % 200}"
            sock = socket.create_connection(("127.0.0.1", gw.pop3_port), 30, (source, 0))
            sock.makefile("rb").readline()
            socks.append(sock)
        time.sleep(1)
        return (rss_kib(gw.pid) - base) / count
    finally:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--gateway-src", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="popgate-guessing-"))
    work.chmod(0o755)  # Dovecot's own users must reach the users and mail below it
    dovecot = Dovecot(work / "dovecot")
    dovecot.start()
    try:
        dovecot.add_user(USER, PASSWORD)
        env = {}
        if args.gateway_src is not None:
            env["PYTHONPATH"] = str(args.gateway_src.absolute())
        config = {
            "upstream.imap": {"host": dovecot.host, "port": dovecot.imap_port, "security": "none"},
            "pop3": {"listen": ["127.0.0.1:0"]},
            "tls": {"cert_file": str(work / "popgate.crt"), "key_file": str(work / "popgate.key")},
            "log": {"level": "info"},
        }
        for name, connections, patience in (
            ("serial", 1, None),
            ("parallel x30", 30, None),
            ("impatient x30", 30, 0.2),
        ):
            # A fresh gateway per scenario: no failures on record from the one before.
            gw = GatewayProcess(config, work / "popgate.toml", env=env).start()
            try:
                answered, checked = scenario(gw, dovecot, connections, patience, args.seconds)
            finally:
                gw.stop()
            print(
                f"{name:14s} answered failures {answered:7.2f}/s"
                f"   guesses checked upstream {checked:7.2f}/s",
                flush=True,
            )
        gw = GatewayProcess(config, work / "popgate.toml", env=env).start()
        try:
            print(f"idle connection: {idle_cost(gw, args.idle):.1f} KiB RSS each ({args.idle})")
        finally:
            gw.stop()
    finally:
        dovecot.stop()
    print(f"gateway code: {args.gateway_src or os.getcwd()}")


if __name__ == "__main__":
    main()
