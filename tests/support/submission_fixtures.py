"""Fixtures of the submission tests; a test module loads them with
``pytest_plugins = ("tests.support.submission_fixtures",)``.

``smtp_sink``
    a running :class:`~tests.support.smtp_sink.SmtpSink` (the upstream relay).
``submission_gateway``
    factory ``submission_gateway(user, sink=None, **overrides) -> GatewayProcess``: popgate with
    POP3 and submission listeners (plain + implicit TLS, certificate from the test CA), relaying
    to the sink (AUTH passthrough, the user's password registered there), its spool in its work
    directory, fast retries. ``overrides`` merge per section like ``start_gateway``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.gateway import GatewayProcess
from tests.support.smtp_sink import SmtpSink


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def submission_gateway(
    start_gateway: Callable[..., GatewayProcess], smtp_sink: SmtpSink
) -> Callable[..., GatewayProcess]:
    def start(user: Any, sink: SmtpSink | None = None, **overrides: Any) -> GatewayProcess:
        relay = sink or smtp_sink
        relay.users[user.name] = user.password
        sections: dict[str, Any] = {
            "submission": {
                "listen": ["127.0.0.1:0"],
                "listen_tls": ["127.0.0.1:0"],
                "spool_dir": "spool",
                "retry_initial_delay": 0.3,
                "retry_max_delay": 1.0,
            },
            "upstream.smtp": {"host": relay.host, "port": relay.port, "security": "none"},
        }
        for name, values in overrides.items():
            section = name.replace("_", ".", 1) if name.startswith("upstream_") else name
            if values is None:
                sections[section] = None
            else:
                sections.setdefault(section, {}).update(values)
        return start_gateway(sections, ca_signed_cert=True)

    return start
