"""Soak: many concurrent POP3 connections of mixed behaviour against popgate + a private Dovecot.

    tests/soak/run [--connections 500] [--duration 120] [--set section.key=value ...]

Behaviours (share of the connections):
  idle      connect, read the greeting, then say nothing (and read nothing) until the end
  slow      log in, RETR a large message at 64 kB/s, check it byte for byte, again
  flood     log in, RETR a large message without reading it and send junk as fast as taken
  vanish    log in, DELE, then go silent without closing (no FIN), while the same device
            logs in again on a new connection and downloads
  valid     log in, LIST, RETR every message, check each byte for byte, QUIT; again
Every 5 s the gateway's RSS and open descriptors are sampled. At the end: the samples, the
number of sessions of each kind, any byte mismatch or protocol error, and the gateway's
ERROR/Traceback log lines. Exit status 1 if a valid or slow download was not byte-exact, a
client got an unexpected answer, or the gateway logged a traceback.

Not part of CI (it runs for minutes); see docs/security.md ("Soak") for results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests import conftest
from tests.support import messages
from tests.support.client_faults import process_fds, process_rss
from tests.support.dovecot import Dovecot
from tests.support.gateway import GatewayProcess, merge_config

MIX = {"idle": 0.40, "slow": 0.15, "flood": 0.10, "vanish": 0.05, "valid": 0.30}
USERS = 20
SLOW_RATE = 64_000


@dataclass
class Mailbox:
    user: str
    password: str
    wire: list[bytes]  # each message as RETR delivers it, dot-stuffed, terminator included


@dataclass
class Tally:
    sessions: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    flood_bytes: int = 0
    samples: list[dict[str, float]] = field(default_factory=list)


def stuffed_answer(message: bytes) -> bytes:
    body = message if message.endswith(b"\r\n") else message + b"\r\n"
    lines = body.splitlines(keepends=True)
    return b"".join(b"." + ln if ln.startswith(b".") else ln for ln in lines) + b".\r\n"


class UpstreamBusy(Exception):
    """The gateway answered a login with -ERR [SYS/TEMP]: the IMAP server did not serve it."""


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n.\r\n")


async def login(
    host: str, port: int, box: Mailbox, device: str = "soak"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port, limit=16 << 20)
    greeting = await reader.readline()
    assert greeting.startswith(b"+OK"), greeting
    writer.write(f"USER {box.user}#{device}\r\nPASS {box.password}\r\n".encode())
    assert (await reader.readline()).startswith(b"+OK"), "USER"
    answer = await reader.readline()
    if answer.startswith(b"-ERR [SYS/TEMP]"):
        writer.close()
        raise UpstreamBusy(answer.decode().strip())
    assert answer.startswith(b"+OK Logged in"), answer
    return reader, writer


async def retr(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bytes:
    writer.write(f"RETR {n}\r\n".encode())
    status = await reader.readline()
    assert status.startswith(b"+OK"), status
    return await read_answer(reader)


async def valid(host: str, port: int, box: Mailbox, tally: Tally, end: float) -> None:
    while time.monotonic() < end:
        # A device of its own per session: they overlap, and a gateway with a per-device lock
        # (before issue 9) can be soaked for comparison.
        reader, writer = await login(host, port, box, f"valid{random.randrange(10**9)}")
        writer.write(b"LIST\r\n")
        assert (await reader.readline()).startswith(b"+OK")
        listing = await read_answer(reader)
        count = listing.count(b"\r\n") - 1
        assert count == len(box.wire), (count, len(box.wire))
        for n, expected in enumerate(box.wire, start=1):
            got = await retr(reader, writer, n)
            if got != expected:
                tally.problems.append(f"valid: {box.user} message {n} differs")
        writer.write(b"QUIT\r\n")
        assert (await reader.readline()).startswith(b"+OK Bye")
        writer.close()
        tally.sessions["valid"] += 1


async def slow(host: str, port: int, box: Mailbox, tally: Tally, end: float) -> None:
    big = len(box.wire)  # the last message is the large one
    while time.monotonic() < end:
        reader, writer = await login(host, port, box, f"slow{random.randrange(10**9)}")
        writer.write(f"RETR {big}\r\n".encode())
        assert (await reader.readline()).startswith(b"+OK")
        got = bytearray()
        start = time.monotonic()
        while not got.endswith(b"\r\n.\r\n"):
            chunk = await reader.read(4096)
            if not chunk:
                raise ConnectionError(f"closed after {len(got)} bytes")
            got += chunk
            ahead = len(got) / SLOW_RATE - (time.monotonic() - start)
            if ahead > 0:
                await asyncio.sleep(ahead)  # the reader's pace
        if bytes(got) != box.wire[-1]:
            tally.problems.append(f"slow: {box.user} large message differs")
        writer.write(b"QUIT\r\n")
        await reader.readline()
        writer.close()
        tally.sessions["slow"] += 1


async def flood(host: str, port: int, box: Mailbox, tally: Tally, end: float) -> None:
    _reader, writer = await login(host, port, box)
    writer.write(f"RETR {len(box.wire)}\r\n".encode())
    junk = b"NOOP\r\n" * 10_000
    tally.sessions["flood"] += 1
    while time.monotonic() < end:
        writer.write(junk)
        try:
            await asyncio.wait_for(writer.drain(), timeout=max(0.1, end - time.monotonic()))
        except TimeoutError:
            break
        tally.flood_bytes += len(junk)
    writer.transport.abort()


async def idle(host: str, port: int, box: Mailbox, tally: Tally, end: float) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    assert (await reader.readline()).startswith(b"+OK")
    tally.sessions["idle"] += 1
    await asyncio.sleep(max(0.0, end - time.monotonic()))
    if reader.at_eof():
        tally.problems.append("idle: closed before the idle timeout")
    writer.transport.abort()


async def vanish(host: str, port: int, box: Mailbox, tally: Tally, end: float) -> None:
    silent = []
    while time.monotonic() < end:
        device = f"roamer{random.randrange(1000)}"
        reader, writer = await login(host, port, box, device)
        writer.write(b"DELE 1\r\n")
        assert (await reader.readline()).startswith(b"+OK")
        silent.append(writer)  # never read, written or closed again: no FIN
        again_reader, again_writer = await login(host, port, box, device)
        got = await retr(again_reader, again_writer, 1)
        if got != box.wire[0]:
            tally.problems.append(f"vanish: {box.user} message 1 differs after re-login")
        again_writer.write(b"QUIT\r\n")
        await again_reader.readline()
        again_writer.close()
        tally.sessions["vanish"] += 1
        await asyncio.sleep(1.0)  # one vanished connection per second per client
    for writer in silent:
        writer.transport.abort()


class MemtracedGateway(GatewayProcess):
    """The gateway under tests/soak/memtrace.py, which samples its memory on SIGUSR2."""

    def command(self) -> list[str]:
        probe = Path(__file__).with_name("memtrace.py")
        return [sys.executable, str(probe), "serve", "-c", str(self.config_path)]


BEHAVIOURS = {"idle": idle, "slow": slow, "flood": flood, "vanish": vanish, "valid": valid}


async def run_client(kind: str, host: str, port: int, box: Mailbox, tally: Tally, end: float):
    try:
        await BEHAVIOURS[kind](host, port, box, tally, end)
    except UpstreamBusy:
        tally.sessions["login_sys_temp"] += 1  # counted, not a gateway failure: see docs
    except (AssertionError, ConnectionError, asyncio.IncompleteReadError, OSError, ValueError) as e:
        if time.monotonic() < end - 1:  # the gateway being stopped at the end is not a problem
            tally.problems.append(f"{kind}: {type(e).__name__}: {e}"[:200])


async def sample(
    pid: int, tally: Tally, end: float, start: float, memtrace: bool, interval: float
) -> None:
    while time.monotonic() < end:
        if memtrace:
            # tests/soak/memtrace.py appends a sample; the last one (SIGUSR1) also collects
            last = time.monotonic() + interval >= end
            os.kill(pid, signal.SIGUSR1 if last else signal.SIGUSR2)
        tally.samples.append(
            {
                "t": round(time.monotonic() - start, 1),
                "rss_mib": round(process_rss(pid) / 2**20, 1),
                "fds": process_fds(pid),
            }
        )
        await asyncio.sleep(interval)


async def soak(args: argparse.Namespace, gw: GatewayProcess, boxes: list[Mailbox]) -> Tally:
    tally = Tally()
    assert gw.pid is not None
    start = time.monotonic()
    end = start + args.duration
    mix = {k: float(v) for k, v in (item.split("=") for item in args.mix.split(","))}
    kinds = random.Random(1).choices(list(mix), weights=list(mix.values()), k=args.connections)
    tasks = [
        asyncio.create_task(
            sample(gw.pid, tally, end, start, args.memtrace is not None, args.interval)
        )
    ]
    for i, kind in enumerate(kinds):
        box = boxes[i % len(boxes)]
        tasks.append(asyncio.create_task(run_client(kind, gw.host, gw.pop3_port, box, tally, end)))
        if i % 50 == 49:
            await asyncio.sleep(0.2)  # ramp up rather than 500 SYNs at once
    await asyncio.gather(*tasks)
    tally.sessions.update({f"clients_{k}": v for k, v in Counter(kinds).items()})
    return tally


def seed(dovecot: Dovecot) -> list[Mailbox]:
    boxes = []
    for u in range(USERS):
        user, password = f"soak{u}", f"soak-secret-{u}"
        dovecot.add_user(user, password)
        msgs = [messages.plain(f"soak {u}/{i}", n=i) for i in range(1, 6)]
        msgs += [messages.dotted(), messages.with_attachment(2 * 2**20, seed=u)]
        uids = dovecot.append_many(user, password, msgs)
        stored = dovecot.fetch_bodies(user, password)
        boxes.append(Mailbox(user, password, [stuffed_answer(stored[uid]) for uid in uids]))
    return boxes


def main() -> int:
    parser = argparse.ArgumentParser(prog="tests/soak/run", description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="extra popgate setting, value as TOML (e.g. security.max_connections_per_ip=100000)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--memtrace",
        type=Path,
        metavar="FILE",
        help="run the gateway under tests/soak/memtrace.py (tracemalloc, object counts by type)"
        " and append one JSON sample to FILE at every RSS sample",
    )
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument(
        "--mix",
        default=",".join(f"{k}={v}" for k, v in MIX.items()),
        help="behaviour shares, e.g. valid=1 or idle=0.5,slow=0.5 (default: %(default)s)",
    )
    args = parser.parse_args()

    import tomllib

    # Every soak connection comes from 127.0.0.1: the connection limits must let them all in.
    room = args.connections + 100
    overrides: dict[str, dict[str, object]] = {
        "log": {"level": "info"},
        "pop3": {"listen_tls": []},
        "security": {"max_connections": room, "max_connections_per_ip": room},
    }
    for item in args.set:
        name, _, value = item.partition("=")
        section, _, key = name.rpartition(".")
        overrides.setdefault(section, {})[key] = tomllib.loads(f"v = {value}")["v"]

    work = Path(tempfile.mkdtemp(prefix="popgate-soak-"))
    # Each logged-in session holds one IMAP connection, so one Dovecot imap process.
    dovecot = Dovecot(extra_config="default_process_limit = 5000\ndefault_client_limit = 5000\n")
    dovecot.start()
    try:
        boxes = seed(dovecot)
        config = merge_config(
            conftest.base_gateway_config(dovecot, work),
            overrides,
        )
        gw = GatewayProcess(config, work / "popgate.toml")
        if args.memtrace is not None:
            gw = MemtracedGateway(
                config,
                work / "popgate.toml",
                env={
                    "POPGATE_MEMTRACE": str(args.memtrace.resolve()),
                    **{k: v for k, v in os.environ.items() if k.startswith("POPGATE_MEMTRACE_")},
                },
            )
        gw.start()
        try:
            before = {"rss_mib": process_rss(gw.pid or 0) / 2**20, "fds": process_fds(gw.pid or 0)}
            tally = asyncio.run(soak(args, gw, boxes))
        finally:
            rc = gw.stop()
        log = gw.log_text()
    finally:
        dovecot.stop()

    bad_log = [ln for ln in log.splitlines() if " ERROR " in ln or "Traceback" in ln]
    rss = [s["rss_mib"] for s in tally.samples]
    fds = [s["fds"] for s in tally.samples]
    result = {
        "connections": args.connections,
        "duration_s": args.duration,
        "gateway_before": before,
        "rss_mib_max": max(rss, default=0),
        "rss_mib_last": rss[-1] if rss else 0,
        "fds_max": max(fds, default=0),
        "sessions": dict(tally.sessions),
        "flood_mib_accepted": round(tally.flood_bytes / 2**20, 1),
        "problems": tally.problems[:50],
        "problem_count": len(tally.problems),
        "gateway_error_lines": bad_log[:20],
        "gateway_exit": rc,
        "samples": tally.samples,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    failed = tally.problems or any("Traceback" in ln for ln in bad_log) or rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
