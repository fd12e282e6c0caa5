"""The benchmark still works: its tiny mode (20 messages, a 2 MB "big" message, 10 devices,
one round) against all three systems. No timing is asserted here; ``./tests/bench/run`` is
the measurement (docs/benchmark.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.bench.systems import SYSTEMS
from tests.bench.workloads import WORKLOADS

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def test_quick_bench_runs_every_workload_on_every_system(tmp_path: Path) -> None:
    out = tmp_path / "results"
    # Dovecot's unix sockets live under the work dir: keep its path short (108-octet limit)
    work = Path(tempfile.mkdtemp(prefix="pgbench-"))
    os.chmod(work, 0o755)  # Dovecot's auth and mail processes must get through it
    argv = [sys.executable, "-m", "tests.bench", "--quick", "--work-dir", str(work)]
    try:
        proc = subprocess.run(
            [*argv, "--out", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())

    checks = report["checks"]
    assert checks["bytes_ok"], checks["mismatches"]
    assert checks["mismatch_count"] == 0
    # full + pipelined: 20 RETRs each, big: 1, per system (warm-up pass included)
    assert checks["retr_checked"] == 2 * len(SYSTEMS) * (2 * 20 + 1)
    assert report["failures"] == []

    for workload in WORKLOADS:
        for system in SYSTEMS:
            assert len(report["results"][workload][system]) == 1, (workload, system)
        assert workload in report["medians"]
    assert {t["target"] for t in report["targets"]}
    assert (out / "table.md").read_text().startswith("| workload |")
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "ratios.png").stat().st_size > 0


def test_quick_bench_over_tls_checks_every_byte(tmp_path: Path) -> None:
    """One TLS round: POP3S to all three systems, IMAPS upstream for popgate and the peer."""
    out = tmp_path / "results"
    work = Path(tempfile.mkdtemp(prefix="pgbench-"))
    os.chmod(work, 0o755)
    argv = [sys.executable, "-m", "tests.bench", "--quick", "--tls", "--no-warmup"]
    argv += ["--workloads", "full,poll", "--work-dir", str(work), "--out", str(out)]
    try:
        proc = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["tls"] == "both"
    checks = report["checks"]
    assert checks["mismatch_count"] == 0, checks["mismatches"]
    assert checks["retr_checked"] == len(SYSTEMS) * 20  # full: 20 RETRs per system
    assert checks["uidl_checked"] > 0
    assert report["failures"] == []
    log = (out / "popgate.log").read_text()
    assert "tls=implicit" in log  # the clients really came in over POP3S
