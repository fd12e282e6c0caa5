"""The workloads, each run the same way against any of the three systems.

Times are wall-clock seconds measured by the client from before ``connect`` to the answer to
``QUIT`` (the RETR alone for the big message). Every RETR body is compared, byte for byte and
still dot-stuffed, with the expected wire form of the stored message; every UIDL listing with
the store's UIDs and UIDVALIDITY. A mismatch is recorded in the :class:`Checker` and fails the
run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import ssl
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.bench.corpus import dot_stuff
from tests.bench.pop3client import PopClient, PopError, pipelined_retr
from tests.bench.systems import PASSWORD, Mailbox, Store, children_named, proc_status

#: one round's measurements of one workload on one system (strings are notes, not numbers)
Result = dict[str, float | str]

WORKLOADS = ("full", "pipelined", "poll", "devices", "big")
WORKLOAD_TITLES = {
    "full": "full download (login, STAT, UIDL, RETR all, QUIT)",
    "pipelined": "pipelined download (all RETRs sent at once)",
    "poll": "poll (login, UIDL, QUIT)",
    "devices": "many devices (concurrent polls)",
    "big": "big message (one RETR)",
}


@dataclass
class Target:
    """One system under test, as the client sees it."""

    name: str  # "direct" | "popgate" | "imapc"
    host: str
    port: int
    #: the process that speaks POP3 to the client for a session, found after login
    #: (popgate: the gateway; Dovecot: the session's own pop3 process)
    pop3_process: Callable[[set[int]], int | None]
    #: pids to ignore when looking for a session's process (those that existed before it)
    existing: Callable[[], set[int]] = lambda: set()
    #: popgate logs a device in as USER#DEVICE; Dovecot knows only USER
    devices: bool = False
    #: POP3S: the client's TLS context (None: plain POP3)
    tls: ssl.SSLContext | None = None

    def login_name(self, user: str, device: int | None = None) -> str:
        if device is not None and self.devices:
            return f"{user}#dev{device:03d}"
        return user


def client_tls() -> ssl.SSLContext:
    """What a device does: TLS 1.2 or newer, the servers' default choice of cipher. Not
    verified (each system has its own test certificate); the handshake costs the same."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def gateway_target(
    name: str, host: str, port: int, pid: int, tls: ssl.SSLContext | None = None
) -> Target:
    return Target(name, host, port, lambda _before: pid, devices=True, tls=tls)


def dovecot_target(
    name: str, host: str, port: int, master_pid: int, tls: ssl.SSLContext | None = None
) -> Target:
    def existing() -> set[int]:
        return set(children_named(master_pid, "pop3"))

    def find(before: set[int]) -> int | None:
        new = [p for p in children_named(master_pid, "pop3") if p not in before]
        return max(new) if new else None

    return Target(name, host, port, find, existing, tls=tls)


@dataclass
class Checker:
    """Counts what was verified and keeps every mismatch (any one fails the run)."""

    retr_checked: int = 0
    retr_bytes: int = 0
    uidl_checked: int = 0
    mismatches: list[str] = field(default_factory=list)
    #: whether each system's UIDL values are byte-identical to Dovecot's own (case included)
    uidl_exact: dict[str, bool] = field(default_factory=dict)

    def retr(self, system: str, box: Mailbox, number: int, body: bytes, expected: bytes) -> None:
        self.retr_checked += 1
        self.retr_bytes += len(body)
        if body != expected:
            where = _first_difference(body, expected)
            self.mismatches.append(
                f"{system}: RETR {number} of {box.user} differs from the store at octet {where} "
                f"(got {len(body)} octets, want {len(expected)})"
            )

    def uidl(self, system: str, box: Mailbox, body: bytes, expected: bytes) -> None:
        self.uidl_checked += 1
        exact = body == expected
        self.uidl_exact[system] = self.uidl_exact.get(system, True) and exact
        # Dovecot's %X is lower-case hex: a case difference is reported, not failed.
        if not exact and body.lower() != expected.lower():
            self.mismatches.append(
                f"{system}: UIDL of {box.user} differs from the store at octet "
                f"{_first_difference(body, expected)}"
            )


def _first_difference(a: bytes, b: bytes) -> int:
    for i in range(min(len(a), len(b))):
        if a[i] != b[i]:
            return i
    return min(len(a), len(b))


class Expected:
    """Expected wire bytes, computed once per run from the (regenerated, verified) corpus."""

    def __init__(self, store: Store) -> None:
        self.boxes = store.mailboxes
        self.retr: dict[str, list[bytes]] = {}
        for name in ("full", "big"):
            box = store.mailboxes[name]
            self.retr[name] = [dot_stuff(store.messages[m.bench_id].data) for m in box.messages]
        self.uidl = {
            name: b"".join(
                b"%d %s\r\n" % (n, box.uidl(n).encode()) for n in range(1, len(box.messages) + 1)
            )
            + b".\r\n"
            for name, box in store.mailboxes.items()
        }
        self.octets = {
            name: sum(m.size for m in box.messages) for name, box in store.mailboxes.items()
        }


# --------------------------------------------------------------------- the workloads
async def _login(t: Target, box: Mailbox, device: int | None = None) -> PopClient:
    client = await PopClient.connect(t.host, t.port, tls=t.tls)
    await client.login(t.login_name(box.user, device), PASSWORD)
    return client


async def _stat_uidl(t: Target, client: PopClient, exp: Expected, name: str, chk: Checker) -> int:
    box = exp.boxes[name]
    stat = await client.command("STAT")
    count = int(stat.split()[1])
    if count != len(box.messages) or int(stat.split()[2]) != exp.octets[name]:
        chk.mismatches.append(f"{t.name}: STAT of {box.user} says {stat!r}")
    _, uidl = await client.multiline("UIDL")
    chk.uidl(t.name, box, uidl, exp.uidl[name])
    return count


async def _download(t: Target, exp: Expected, chk: Checker, *, pipelined: bool) -> Result:
    """Login, STAT, UIDL, RETR of every message (sent one by one, or all in one write), QUIT."""
    box = exp.boxes["full"]
    wire = exp.retr["full"]
    start = time.perf_counter()
    client = await _login(t, box)
    count = await _stat_uidl(t, client, exp, "full", chk)
    if pipelined:
        client.send(pipelined_retr(range(1, count + 1)))
    for n in range(1, count + 1):
        if pipelined:
            _, body = await client.read_multiline()
        else:
            _, body = await client.multiline(f"RETR {n}")
        chk.retr(t.name, box, n, body, wire[n - 1])
    await client.quit()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "mb_per_s": exp.octets["full"] / seconds / 1e6}


async def full_download(t: Target, exp: Expected, chk: Checker) -> Result:
    return await _download(t, exp, chk, pipelined=False)


async def pipelined_download(t: Target, exp: Expected, chk: Checker) -> Result:
    return await _download(t, exp, chk, pipelined=True)


async def _one_poll(
    t: Target,
    exp: Expected,
    chk: Checker,
    device: int | None,
    name: str = "poll",
    user: str | None = None,
) -> float:
    """Login, UIDL, QUIT on mailbox ``name`` (as ``user``, another login to the same mailbox,
    if given), the listing checked against the store."""
    box = exp.boxes[name]
    start = time.perf_counter()
    client = await _login(t, dataclasses.replace(box, user=user) if user else box, device)
    try:
        _, uidl = await client.multiline("UIDL")
        await client.quit()
    finally:
        client.close()
    seconds = time.perf_counter() - start
    chk.uidl(t.name, box, uidl, exp.uidl[name])
    return seconds


async def poll(t: Target, exp: Expected, chk: Checker, repeats: int) -> Result:
    """``repeats`` polls one after the other; the round's value is their median."""
    times = [await _one_poll(t, exp, chk, None) for _ in range(repeats)]
    return {"seconds": statistics.median(times), "min": min(times), "max": max(times)}


async def devices(t: Target, exp: Expected, chk: Checker, count: int) -> Result:
    """``count`` devices poll at the same moment; latency is per session, connect to QUIT."""
    start = time.perf_counter()
    results = await asyncio.gather(
        *(_one_poll(t, exp, chk, i) for i in range(count)), return_exceptions=True
    )
    wall = time.perf_counter() - start
    latencies = sorted(r for r in results if isinstance(r, float))
    errors = [r for r in results if not isinstance(r, float)]
    for e in errors[:3]:
        if not isinstance(e, PopError | OSError):
            raise e
    return {
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "max": latencies[-1] if latencies else math.nan,
        "errors": float(len(errors)),
        "sessions_per_s": len(latencies) / wall,
        "wall": wall,
        "first_error": str(errors[0]) if errors else "",
    }


async def scale(
    t: Target,
    exp: Expected,
    chk: Checker,
    count: int,
    users: list[str] | None,
    rss_pids: list[int],
) -> Result:
    """``count`` devices poll the 1,000-message mailbox at once: as ``#device`` logins of one
    user (``users`` None), or each as a user of its own. popgate's RSS (the sum over its
    processes, ``rss_pids``) is sampled meanwhile: its growth over the sessions open at the
    peak is the memory per session."""

    def rss() -> int:
        return sum(proc_status(pid).get("VmRSS", 0) for pid in rss_pids)

    before = rss()
    peak = before
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set() and rss_pids:
            peak = max(peak, rss())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.05)

    sampler = asyncio.create_task(sample())
    start = time.perf_counter()
    results = await asyncio.gather(
        *(_one_poll(t, exp, chk, i, "full", users[i] if users else None) for i in range(count)),
        return_exceptions=True,
    )
    wall = time.perf_counter() - start
    done.set()
    await sampler
    latencies = sorted(r for r in results if isinstance(r, float))
    errors = [r for r in results if not isinstance(r, float)]
    for e in errors[:3]:
        if not isinstance(e, PopError | OSError | TimeoutError):
            raise e
    mb = 1024 * 1024
    return {
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "max": latencies[-1] if latencies else math.nan,
        "errors": float(len(errors)),
        "sessions_per_s": len(latencies) / wall,
        "wall": wall,
        "rss_growth_mb": (peak - before) / mb,
        "first_error": str(errors[0]) if errors else "",
    }


async def big_message(t: Target, exp: Expected, chk: Checker) -> Result:
    box = exp.boxes["big"]
    before = t.existing()
    client = await _login(t, box)
    pid = t.pop3_process(before)
    base = proc_status(pid) if pid else {}
    start = time.perf_counter()
    _, body = await client.multiline("RETR 1")
    seconds = time.perf_counter() - start
    after = proc_status(pid) if pid else {}
    await client.quit()
    chk.retr(t.name, box, 1, body, exp.retr["big"][0])
    mb = 1024 * 1024
    return {
        "retr_seconds": seconds,
        "rss_before_mb": base.get("VmRSS", 0) / mb,
        "hwm_before_mb": base.get("VmHWM", 0) / mb,
        "peak_rss_mb": after.get("VmHWM", 0) / mb,
        "rss_growth_mb": (after.get("VmHWM", 0) - base.get("VmRSS", 0)) / mb,
    }


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted ``values``."""
    if not values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(values)))
    return values[rank - 1]
