"""The sans-IO layers stay free of I/O frameworks, so they remain testable in memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gateway

PURE_PACKAGES = ["gateway.proto", "gateway.maildrop"]
PURE_MODULES = [
    "gateway.limits",
    "gateway.addresses",
    "gateway.oauth.protocol",
    "gateway.oauth.errors",
]


def test_pure_layers_import_no_io_framework() -> None:
    root = Path(gateway.__file__).parent
    modules = [
        ".".join(path.relative_to(root.parent).with_suffix("").parts)
        for package in PURE_PACKAGES
        for path in (root.parent / package.replace(".", "/")).glob("*.py")
    ] + PURE_MODULES
    assert len(modules) >= 6
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('twisted', 'aiosmtpd'))\n"
        + "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
