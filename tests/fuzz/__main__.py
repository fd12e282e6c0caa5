"""The long fuzz run: ``./tests/fuzz/run [--seconds N] [--jobs N] [TARGET ...]``.

Runs every target (``--list`` names them) under atheris for ``--seconds`` each. The corpus of
each target is kept under run/fuzz/corpus/ and grows from run to run; an input that breaks a
property is written to run/fuzz/crashes/ and makes the exit status 1. CI runs the same
properties with a small Hypothesis budget (tests/unit); this is the run for finding what that
budget misses.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from tests.fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "run" / "fuzz"


def run_target(name: str, seconds: int, rss_limit_mb: int) -> tuple[bool, str]:
    corpus = OUT / "corpus" / name
    crashes = OUT / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    log = OUT / f"{name}.log"
    argv = [
        sys.executable,
        "-m",
        "tests.fuzz.one",
        name,
        f"-max_total_time={seconds}",
        f"-rss_limit_mb={rss_limit_mb}",
        "-timeout=60",
        f"-artifact_prefix={crashes}/{name}-",
        "-print_final_stats=1",
        str(corpus),
    ]
    with log.open("w") as out:
        result = subprocess.run(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    text = log.read_text(errors="replace")
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
    cov = re.findall(r"\bcov: (\d+)", text)
    units = len(list(corpus.iterdir()))
    summary = (
        f"{name:18} {'ok' if result.returncode == 0 else 'FOUND A FAILURE':16}"
        f" runs {runs[-1] if runs else '?':>9}  coverage {cov[-1] if cov else '?':>6}"
        f"  corpus {units:>5}  log {log.relative_to(ROOT)}"
    )
    return result.returncode == 0, summary


def main() -> int:
    parser = argparse.ArgumentParser(prog="tests/fuzz/run", description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET", help="default: all")
    parser.add_argument("--seconds", type=int, default=300, help="per target (default 300)")
    parser.add_argument("--rss-limit-mb", type=int, default=2048)
    parser.add_argument("--list", action="store_true", help="name the targets and stop")
    args = parser.parse_args()
    if args.list:
        for name, (module, function) in TARGETS.items():
            print(f"{name:18} tests/unit/{module}.py::{function}")
        return 0
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s): {', '.join(unknown)} (see --list)")
    all_ok = True
    for name in args.targets or list(TARGETS):
        ok, summary = run_target(name, args.seconds, args.rss_limit_mb)
        print(summary, flush=True)
        all_ok &= ok
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
