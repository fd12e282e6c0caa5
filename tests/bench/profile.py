"""py-spy profiles of the gateway process while a workload runs.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;frame COUNT``); without
``--idle`` only samples where the thread was running count, so samples / (rate x wall time)
is the share of the workload's wall time the gateway spent on the CPU.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

RATE = 250
T = TypeVar("T")
_LINE_NO = re.compile(r":\d+\)$")
_PATH_NOISE = re.compile(r"\(/.*?/(site-packages|lib/python3\.\d+|work/main)/")


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


async def record(pid: int, work: Awaitable[T], out: Path) -> tuple[T, dict[str, Any]]:
    """Run ``work`` while py-spy samples ``pid``; returns its result and the summary."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed (pip install -e '.[bench]')")
    # --nonblocking: sampling must not slow the gateway down (it stops it otherwise)
    argv = [exe, "record", "--pid", str(pid), "--rate", str(RATE), "--format", "raw"]
    proc = subprocess.Popen(
        [*argv, "--nonblocking", "--output", str(out)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    await asyncio.sleep(1.0)  # attach
    start = time.perf_counter()
    try:
        result = await work
    finally:
        wall = time.perf_counter() - start
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    if not out.exists():
        raise RuntimeError(f"py-spy wrote no profile: {err.decode(errors='replace')}")
    return result, summarize(out, wall)


def _frame(raw: str) -> str:
    return _PATH_NOISE.sub("(", _LINE_NO.sub(")", raw.strip()))


#: leaf frames that mean "waiting", not working (py-spy's idle detection misses some)
_IDLE_LEAVES = ("EpollSelector.select (", "Condition.wait (", "Queue.get (")


def summarize(path: Path, wall: float, top: int = 15) -> dict[str, Any]:
    """Top frames of the reactor thread; other threads (Twisted's thread pool, which
    resolves host names for outgoing connections) are only counted."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = other_threads = idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        if frames[0].startswith("Thread._bootstrap ("):
            if not frames[-1].startswith(_IDLE_LEAVES):
                other_threads += n
            continue
        if frames[-1].startswith(_IDLE_LEAVES):
            idle += n
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    return {
        "samples": total,
        "idle_samples": idle,
        "other_thread_samples": other_threads,
        "wall_seconds": wall,
        "rate_hz": RATE,
        # share of the wall time the reactor thread was working (it does all of popgate's work)
        "busy_share": total / (RATE * wall) if wall > 0 else 0.0,
        "self": [(f, n / total) for f, n in own.most_common(top)] if total else [],
        "inclusive": [(f, n / total) for f, n in inclusive.most_common(top)] if total else [],
        "file": str(path),
    }


def format_summary(name: str, s: dict[str, Any]) -> str:
    lines = [
        f"### {name}: reactor thread busy {s['busy_share'] * 100:.0f}% of "
        f"{s['wall_seconds']:.2f}s ({s['samples']} samples at {s['rate_hz']} Hz; other "
        f"threads {s['other_thread_samples']})",
        "",
        "self time (% of the reactor thread's busy samples):",
    ]
    lines += [f"  {share * 100:5.1f}%  {frame}" for frame, share in s["self"]]
    lines += ["", "inclusive:"]
    lines += [f"  {share * 100:5.1f}%  {frame}" for frame, share in s["inclusive"]]
    return "\n".join(lines) + "\n"
