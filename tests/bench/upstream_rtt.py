"""Poll latency with a distant upstream: ``python -m tests.bench.upstream_rtt``.

    python -m tests.bench.upstream_rtt [--rtt 0,20,50] [--polls 12] [--messages 100]
                                      [--base PATH] [--trace]

A private Dovecot sits behind a delay line (every chunk arrives half the RTT after it was
sent, each way, and every connection pays one RTT for the TCP handshake), as an upstream on
another site or a provider would. POP3 and IMAP run in clear, so the numbers are round trips
and not TLS work. For each RTT a gateway polls (login, UIDL, QUIT) ``--polls`` times; the
median of all but the first two (which fill the snapshot cache) is printed. ``--base`` runs
another tree's ``gateway/`` the same way, alternating, for a before/after. ``--trace`` prints
the IMAP commands of the last poll with the time each reached the delay line. Not part of CI:
a measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import poplib
import statistics
import tempfile
import threading
import time
from pathlib import Path

from tests.support import messages
from tests.support.dovecot import Dovecot
from tests.support.gateway import GatewayProcess

USER, PASSWORD = "rtt", "rtt-secret"


class DelayLine:
    """A loopback listener forwarding to ``target`` with ``rtt`` seconds of round trip."""

    def __init__(self, target: tuple[str, int], rtt: float, trace: bool) -> None:
        self.target, self.rtt, self.trace = target, rtt, trace
        self.lines: list[tuple[float, bytes]] = []
        self.port = 0
        ready = threading.Event()
        threading.Thread(target=asyncio.run, args=(self._serve(ready),), daemon=True).start()
        ready.wait(10)

    async def _serve(self, ready: threading.Event) -> None:
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        await server.serve_forever()

    async def _connection(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        started = asyncio.get_running_loop().time()
        self.lines = []
        await asyncio.sleep(self.rtt)  # SYN, SYN-ACK: the connect takes a round trip
        sr, sw = await asyncio.open_connection(*self.target)
        await asyncio.gather(self._pipe(cr, sw, started), self._pipe(sr, cw, None))

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, started: float | None
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                await asyncio.sleep(max(0.0, item[0] - loop.time()))
                writer.write(item[1])
            writer.close()

        delivering = asyncio.create_task(deliver())
        try:
            while data := await reader.read(65536):
                if started is not None:
                    self.lines += [(loop.time() - started, line) for line in data.splitlines()]
                queue.put_nowait((loop.time() + self.rtt / 2, data))
        except ConnectionError:
            pass
        queue.put_nowait(None)
        await delivering


def poll(port: int) -> float:
    start = time.perf_counter()
    client = poplib.POP3("127.0.0.1", port, timeout=30)
    client.user(USER)
    client.pass_(PASSWORD)
    client.uidl()
    client.quit()
    return time.perf_counter() - start


def measure(line: DelayLine, tree: str | None, polls: int, work: Path) -> float:
    config = {
        "upstream.imap": {"host": "127.0.0.1", "port": line.port, "security": "none"},
        "pop3": {"listen": ["127.0.0.1:0"]},
    }
    env = {"PYTHONPATH": tree} if tree else None
    gw = GatewayProcess(config, work / "popgate.toml", env=env).start()
    try:
        times = [poll(gw.pop3_port) for _ in range(polls)]
    finally:
        gw.stop()
    return statistics.median(times[2:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rtt", default="0,20,50", help="round trips in ms, comma-separated")
    parser.add_argument("--polls", type=int, default=12)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--base", type=Path, help="a tree whose gateway/ to measure as well")
    parser.add_argument("--trace", action="store_true")
    args = parser.parse_args()
    dovecot = Dovecot()
    dovecot.start()
    try:
        dovecot.add_user(USER, PASSWORD)
        dovecot.append_many(
            USER, PASSWORD, [messages.plain(f"m{i}", "body\n", n=i) for i in range(args.messages)]
        )
        trees: list[tuple[str, str | None]] = [("head", None)]
        if args.base is not None:
            trees.insert(0, ("base", str(args.base.resolve())))
        print("| RTT | " + " | ".join(name for name, _ in trees) + " |", flush=True)
        for rtt in (float(r) for r in args.rtt.split(",")):
            line = DelayLine((dovecot.host, dovecot.imap_port), rtt / 1000, args.trace)
            results: dict[str, list[float]] = {name: [] for name, _ in trees}
            for _ in range(2):  # alternated
                for name, tree in trees:
                    work = Path(tempfile.mkdtemp(prefix="popgate-rtt-"))
                    results[name].append(measure(line, tree, args.polls, work))
            cells = [f"{statistics.median(results[name]) * 1000:.0f} ms" for name, _ in trees]
            print(f"| {rtt:g} ms | " + " | ".join(cells) + " |", flush=True)
            if args.trace:
                for at, text in line.lines:
                    print(f"    {at * 1000:7.1f} ms  C: {text[:70]!r}")
    finally:
        dovecot.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
