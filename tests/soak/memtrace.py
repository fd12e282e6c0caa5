"""Run the gateway with a memory probe: ``python tests/soak/memtrace.py serve -c CONFIG``.

On SIGUSR2 it appends one JSON line to ``$POPGATE_MEMTRACE``: the RSS and the live objects by
type as the gateway left them. On SIGUSR1 the same, then how many unreachable objects one full
``gc.collect()`` finds (garbage the collector had not reached yet), the RSS after it and the live
objects by type after it. The soak (``--memtrace``) sends the signal at every sample, so a
rising curve can be told apart: garbage waiting for the collector, objects still referenced, or
memory outside Python's objects (the allocator, OpenSSL). ``POPGATE_MEMTRACE_FRAMES=N`` adds
tracemalloc's top allocation sites (it slows the gateway down many times: small runs only).
Debugging aid, not used by the gateway itself.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import sys
import time
import tracemalloc
from collections import Counter
from types import FrameType

FRAMES = int(os.environ.get("POPGATE_MEMTRACE_FRAMES", "0"))
WATCHED = (
    "Pop3Protocol",
    "Pop3Mailbox",
    "ImapAccount",
    "Prefetcher",
    "PrefetchedBody",
    "TLSMemoryBIOProtocol",
    "Connection",
    "Deferred",
    "Failure",
    "bytes",
    "frame",
    "coroutine",
)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def _counts() -> Counter[str]:
    return Counter(type(o).__qualname__ for o in gc.get_objects())


def _sample(signum: int, _frame: FrameType | None) -> None:
    started = time.monotonic()
    line: dict[str, object] = {"time": time.time(), "rss_mib": _rss_mib()}
    before = _counts()
    line["gc_counts"] = gc.get_count()
    line["watched"] = {k: before.get(k, 0) for k in WATCHED}
    line["objects"] = sum(before.values())
    if signum == signal.SIGUSR1:
        line["unreachable_found"] = gc.collect()
        after = _counts()
        line["rss_mib_after_collect"] = _rss_mib()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # what the freed garbage gives back
        line["rss_mib_after_trim"] = _rss_mib()
        line["watched_after_collect"] = {k: after.get(k, 0) for k in WATCHED}
        line["objects_after_collect"] = sum(after.values())
        line["top_after_collect"] = after.most_common(15)
        line["freed_by_collect"] = (before - after).most_common(15)
    if FRAMES:
        snap = tracemalloc.take_snapshot()
        current, _peak = tracemalloc.get_traced_memory()
        line["traced_mib"] = round(current / 2**20, 1)
        line["top_sites"] = [
            [
                " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in s.traceback),
                round(s.size / 2**20, 2),
                s.count,
            ]
            for s in snap.statistics("traceback")[:15]
        ]
    line["probe_s"] = round(time.monotonic() - started, 2)
    with open(os.environ["POPGATE_MEMTRACE"], "a") as out:
        out.write(json.dumps(line) + "\n")


def main() -> int:
    if FRAMES:
        tracemalloc.start(FRAMES)
    signal.signal(signal.SIGUSR2, _sample)
    signal.signal(signal.SIGUSR1, _sample)
    from gateway.cli import main as gateway_main

    return gateway_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
