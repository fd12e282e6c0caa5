"""The sans-IO layers stay free of I/O, so they remain testable in memory and never block.

``gateway/proto/`` and ``gateway/maildrop/`` (and the pure policy modules) import no I/O
framework, no sockets, TLS, DNS, threads or event loops, and read no clock: what they need of
the outside world (the time, a host name) is passed in by the caller.
"""

from __future__ import annotations

import ast
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
    "gateway.oauth.authcode",
]

# Modules a pure layer must not import at all (nor anything from them).
FORBIDDEN_IMPORTS = {
    "twisted",
    "aiosmtpd",
    "asyncio",
    "socket",
    "ssl",
    "select",
    "selectors",
    "threading",
    "subprocess",
    "time",
    "urllib.request",
    "http.client",
}
# Calls that read a clock or the host name, whatever module they come from: make_msgid and
# getfqdn wait on DNS (socket.getfqdn), the others read the time.
FORBIDDEN_CALLS = {
    "make_msgid",
    "getfqdn",
    "gethostname",
    "gethostbyname",
    "getaddrinfo",
    "now",
    "utcnow",
    "today",
    "monotonic",
    "perf_counter",
    "localtime",
}


def _pure_files() -> list[Path]:
    root = Path(gateway.__file__).parent.parent
    files = [
        path
        for package in PURE_PACKAGES
        for path in sorted((root / package.replace(".", "/")).glob("*.py"))
    ]
    files += [root / (module.replace(".", "/") + ".py") for module in PURE_MODULES]
    return files


def _module_names() -> list[str]:
    root = Path(gateway.__file__).parent.parent
    return [".".join(path.relative_to(root).with_suffix("").parts) for path in _pure_files()]


def _forbidden(name: str) -> bool:
    return any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN_IMPORTS)


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def io_in_source(source: str) -> list[str]:
    """What in this module's source touches sockets, DNS, threads or clocks."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if _forbidden(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if _forbidden(node.module):
                found.append(f"from {node.module} import ...")
            found += [
                f"from {node.module} import {a.name}"
                for a in node.names
                if a.name in FORBIDDEN_CALLS
            ]
        elif isinstance(node, ast.Call):
            name = _called_name(node)
            if name in FORBIDDEN_CALLS:
                found.append(f"{name}() on line {node.lineno}")
            elif name == "formatdate" and not node.args:
                found.append(f"formatdate() without a time on line {node.lineno}")
    return found


def test_pure_layers_import_no_io_framework() -> None:
    modules = _module_names()
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


def test_pure_layers_use_no_sockets_dns_threads_or_clocks() -> None:
    root = Path(gateway.__file__).parent.parent
    files = _pure_files()
    assert len(files) >= 8
    found = {str(path.relative_to(root)): io_in_source(path.read_text()) for path in files}
    assert {path: what for path, what in found.items() if what} == {}


def test_the_source_check_finds_what_it_looks_for() -> None:
    """The check above cannot pass by finding nothing anywhere."""
    sample = (
        "import socket\n"
        "import time as t\n"
        "from asyncio import sleep\n"
        "from email.utils import make_msgid\n"
        "from datetime import datetime\n"
        "x = datetime.now()\n"
        "y = formatdate(localtime=False)\n"
        "z = formatdate(0.0)\n"
        "import threading.local\n"
    )
    assert sorted(io_in_source(sample)) == [
        "formatdate() without a time on line 7",
        "from asyncio import ...",
        "from email.utils import make_msgid",
        "import socket",
        "import threading.local",
        "import time",
        "now() on line 6",
    ]
