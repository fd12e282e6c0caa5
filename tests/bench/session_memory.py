"""What an open POP3 session costs the gateway in memory: ``python -m tests.bench.session_memory``.

    python -m tests.bench.session_memory [--sessions 500,2000] [--tls both|plain|tls] [--json F]

Against a private Dovecot, for each count and each mode: the gateway's RSS before, with that
many sessions connected and logged in (idle), and with each of them in the middle of a RETR of
an 8 MiB message that its client does not read (the gateway holds what the kernel will not
take, and pauses the IMAP side). ``plain`` is POP3 and IMAP without TLS; ``tls`` is POP3S
towards the client and STARTTLS upstream. With ``--memtrace`` the gateway runs under
tests/soak/memtrace.py with tracemalloc (slow: small counts), and each step's Python-level
allocations by site are written next to the RSS. Not part of CI: a measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import sys
import tempfile
import time
from pathlib import Path

from tests import conftest
from tests.support import messages
from tests.support.client_faults import process_rss
from tests.support.dovecot import Dovecot
from tests.support.gateway import GatewayProcess, merge_config

BIG = 8 * 2**20
CONCURRENT_LOGINS = 20
USERS = 10  # sessions spread over them: Dovecot limits connections per user and address
# Room for an imap process per session (as in tests/bench/systems.py).
DOVECOT_EXTRA = """default_process_limit = 2500
default_client_limit = 5000
"""


class MemtracedGateway(GatewayProcess):
    def command(self) -> list[str]:
        probe = Path(__file__).parent.parent / "soak" / "memtrace.py"
        return [sys.executable, str(probe), "serve", "-c", str(self.config_path)]


async def settle(pid: int, seconds: float = 2.0) -> float:
    """RSS in MiB once it stopped moving for ``seconds`` (a bench, not a test: it may wait)."""
    last = process_rss(pid)
    stable_since = time.monotonic()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        now = process_rss(pid)
        if abs(now - last) > 256 * 1024:
            stable_since = time.monotonic()
        last = now
        if time.monotonic() - stable_since >= seconds:
            break
    return last / 2**20


class UpstreamBusy(Exception):
    pass


async def open_session(
    host: str, port: int, user: str, password: str, device: str, tls: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port, ssl=tls, limit=2**20)
    assert (await reader.readline()).startswith(b"+OK")
    writer.write(f"USER {user}#{device}\r\nPASS {password}\r\n".encode())
    assert (await reader.readline()).startswith(b"+OK")
    answer = await reader.readline()
    if answer.startswith(b"-ERR [SYS/TEMP]"):
        writer.close()
        raise UpstreamBusy(answer.decode().strip())
    assert answer.startswith(b"+OK"), answer
    return reader, writer


async def measure(
    gw: GatewayProcess, users: list[tuple[str, str]], count: int, tls: bool, trace: Path | None
) -> dict[str, object]:
    assert gw.pid is not None
    client_tls = None
    port = gw.pop3_port
    if tls:
        client_tls = ssl.create_default_context()
        client_tls.check_hostname = False
        client_tls.verify_mode = ssl.CERT_NONE
        port = gw.pop3s_port
    result: dict[str, object] = {"sessions": count, "mode": "tls" if tls else "plain"}

    def probe(step: str) -> None:
        if trace is not None:
            os.kill(gw.pid or 0, signal.SIGUSR1)
            result[f"trace_{step}"] = True

    before = await settle(gw.pid)
    probe("before")
    limit = asyncio.Semaphore(CONCURRENT_LOGINS)

    retries = 0

    async def one(i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        nonlocal retries
        async with limit:
            for _attempt in range(30):
                try:
                    user, password = users[i % len(users)]
                    return await open_session(gw.host, port, user, password, f"m{i}", client_tls)
                except UpstreamBusy:  # a loaded machine: its upstream login timed out
                    retries += 1
                    await asyncio.sleep(1)
            errors = [ln for ln in gw.log_text().splitlines() if " ERROR " in ln]
            raise RuntimeError(f"the gateway's upstream logins keep failing: {errors[-3:]}")

    started = time.monotonic()
    sessions = await asyncio.gather(*(one(i) for i in range(count)))
    result["login_s"] = round(time.monotonic() - started, 1)
    result["login_retries"] = retries
    idle = await settle(gw.pid)
    probe("idle")
    for _reader, writer in sessions:
        writer.write(b"RETR 2\r\n")
    # Each client reads the status line and the first chunk, then nothing more.
    for reader, _writer in sessions:
        assert (await reader.readline()).startswith(b"+OK")
        await reader.read(4096)
    mid = await settle(gw.pid, 3.0)
    probe("retr")
    for _reader, writer in sessions:
        writer.transport.abort()
    closed = await settle(gw.pid, 3.0)
    probe("closed")
    result.update(
        rss_before_mib=round(before, 1),
        rss_idle_mib=round(idle, 1),
        rss_retr_mib=round(mid, 1),
        rss_after_close_mib=round(closed, 1),
        idle_kib_per_session=round((idle - before) * 1024 / count),
        retr_kib_per_session=round((mid - before) * 1024 / count),
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", default="500,2000")
    parser.add_argument("--tls", choices=["both", "plain", "tls"], default="both")
    parser.add_argument("--memtrace", type=Path, help="tracemalloc samples go to this file")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    counts = [int(c) for c in args.sessions.split(",")]
    modes = {"both": [False, True], "plain": [False], "tls": [True]}[args.tls]

    dovecot = Dovecot(extra_config=DOVECOT_EXTRA)
    dovecot.start()
    results = []
    try:
        users = [(f"mem{u}", f"mem-secret-{u}") for u in range(USERS)]
        for user, password in users:
            dovecot.add_user(user, password)
            dovecot.append_many(
                user, password, [messages.plain("small"), messages.with_attachment(BIG, seed=1)]
            )
        room = max(counts) + 100
        for tls in modes:
            for count in counts:
                work = Path(tempfile.mkdtemp(prefix="popgate-memory-"))
                overrides: dict[str, dict[str, object] | None] = {
                    "log": {"level": "info"},
                    "security": {"max_connections": room, "max_connections_per_ip": room},
                }
                if not tls:
                    overrides["upstream.imap"] = {"security": "none", "ca_file": None}
                config = merge_config(conftest.base_gateway_config(dovecot, work), overrides)
                env = None
                cls = GatewayProcess
                if args.memtrace is not None:
                    cls = MemtracedGateway
                    env = {
                        "POPGATE_MEMTRACE": str(args.memtrace.resolve()),
                        "POPGATE_MEMTRACE_FRAMES": os.environ.get("POPGATE_MEMTRACE_FRAMES", "4"),
                    }
                gw = cls(config, work / "popgate.toml", env=env)
                gw.start(180 if args.memtrace else 30)
                try:
                    r = asyncio.run(measure(gw, users, count, tls, args.memtrace))
                finally:
                    gw.stop()
                print(json.dumps(r), flush=True)
                results.append(r)
    finally:
        dovecot.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
