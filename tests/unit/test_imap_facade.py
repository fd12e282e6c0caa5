"""Only the facade, ``gateway.upstream.account.ImapAccount``, issues IMAP commands.

Everything else asks it by name (``account.append(...)``, ``account.search_header(...)``), so
every command popgate sends, and the decoding of its answer, is found in one module.
"""

from __future__ import annotations

import ast
from pathlib import Path

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"
FACADE = GATEWAY / "upstream" / "account.py"
# The glue and the sans-IO core it drives; the decoders read the core's Response type.
CONNECTION_MODULES = {
    GATEWAY / "upstream" / "imap_client.py",
    GATEWAY / "proto" / "imap_connection.py",
    GATEWAY / "proto" / "imap_responses.py",
}


def violations(path: Path, source: str) -> list[str]:
    """What in ``source`` goes around the facade: a ``.command(...)`` call, the account's
    ``.proto``, or an import of the IMAP client protocol or connection."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "command":
                found.append(f"{where}: calls .command(...)")
        elif isinstance(node, ast.Attribute) and node.attr == "proto":
            if not (isinstance(node.value, ast.Name) and node.value.id == "gateway"):
                found.append(f"{where}: uses .proto")
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = {alias.name for alias in node.names}
            if node.module == "gateway.proto.imap_connection" or (
                node.module == "gateway.upstream.imap_client" and "ImapClientProtocol" in names
            ):
                found.append(f"{where}: imports {node.module}")
    return found


def test_only_the_facade_issues_imap_commands() -> None:
    offenders = []
    for path in sorted(GATEWAY.rglob("*.py")):
        if path == FACADE or path in CONNECTION_MODULES:
            continue
        offenders += violations(path, path.read_text())
    assert offenders == []


def test_the_check_sees_what_it_looks_for() -> None:
    assert violations(FACADE, FACADE.read_text())  # the facade does all three
    sneaky = (
        "from gateway.upstream.imap_client import ImapClientProtocol\n"
        "async def f(account):\n"
        "    await account.proto.command(Atom('EXPUNGE'))\n"
    )
    assert len(violations(Path("x.py"), sneaky)) == 3
