"""Devices resume their TLS sessions: a second connection with the session of the first is
"Reused" by openssl s_client, over TLS 1.3 (tickets), TLS 1.2 (tickets or session IDs) and the
TLS 1.0 that old devices speak. A resumed handshake skips the certificate and the key exchange:
the cheap handshake for devices that poll every few minutes (docs/benchmark.md)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from OpenSSL._util import lib as openssl_lib
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from gateway.config import ImapUpstream
from gateway.tls import _tls_connection
from gateway.upstream.account import connect
from tests.integration.pop3_helpers import report_logs, running_gateway
from tests.support.dovecot import Dovecot
from tests.support.gateway import GatewayProcess
from tests.support.upstreams import Upstream

pytestmark = pytest.mark.integration

VERSIONS = {
    "TLSv1.3": ["-tls1_3"],
    "TLSv1.2": ["-tls1_2"],
    "TLSv1.2 session ID": ["-tls1_2", "-no_ticket"],
    "TLSv1": ["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"],
}


@pytest.fixture(scope="module")
def gateway(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    directory = tmp_path_factory.mktemp("tls-resume")
    with running_gateway(upstream, directory, {"tls": {"min_version": "TLSv1"}}) as gw:
        yield gw


def _s_client(gw: GatewayProcess, options: list[str], *session: str) -> str:
    assert shutil.which("openssl")
    result = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"{gw.host}:{gw.pop3s_port}",
            *options,
            *session,
            "-ign_eof",
        ],
        input=b"QUIT\r\n",
        capture_output=True,
        timeout=30,
        check=False,
    )
    out = result.stdout.decode("utf-8", "replace")
    assert "+OK" in out, out + result.stderr.decode("utf-8", "replace")
    return out


@pytest.mark.parametrize("version", list(VERSIONS))
def test_second_connection_resumes_the_session(
    gateway: GatewayProcess, tmp_path: Path, request: pytest.FixtureRequest, version: str
) -> None:
    report_logs(request, gateway)
    session = tmp_path / "session.pem"
    first = _s_client(gateway, VERSIONS[version], "-sess_out", str(session))
    assert "\nNew, " in first
    assert session.stat().st_size > 0
    second = _s_client(gateway, VERSIONS[version], "-sess_in", str(session))
    assert "\nReused, " in second, second


# ------------------------------------------------- the gateway's own upstream connections


# Dovecot's "high-performance" login mode: one imap-login process serves every connection, so
# its session tickets outlive a connection. The default (service_count = 1, a process per
# connection, each with its own ticket keys) resumes nothing, for any client.
_LONG_LIVED_LOGIN = (
    "service imap-login {\n  service_count = 0\n  process_min_avail = 1\n  process_limit = 1\n}\n"
)


def _when_lost(protocol: Any) -> Deferred[None]:
    """Fires after ``protocol.connectionLost`` has run (the hook removes itself)."""
    done: Deferred[None] = Deferred()
    original = type(protocol).connectionLost

    def lost(reason: Failure | None = None) -> None:
        del protocol.__dict__["connectionLost"]
        original(protocol, reason)
        done.callback(None)

    protocol.connectionLost = lost
    return done


@pytest.fixture(scope="module")
def long_lived_dovecot() -> Iterator[Dovecot]:
    with Dovecot(extra_config=_LONG_LIVED_LOGIN) as dc:
        yield dc


@pytest.mark.parametrize("security", ["tls", "starttls"])
@pytest_twisted.ensureDeferred
async def test_upstream_logins_resume_the_previous_session(
    long_lived_dovecot: Dovecot, security: str
) -> None:
    """Each POP login opens its own IMAP connection; from the second on, the handshake to the
    same upstream resumes the session of the one before (verified by the CA file first)."""
    from twisted.internet import reactor

    port = long_lived_dovecot.imaps_port if security == "tls" else long_lived_dovecot.imap_port
    settings = ImapUpstream(
        host="localhost",
        port=port,
        security=security,  # type: ignore[arg-type]
        ca_file=Path(long_lived_dovecot.ca_file),
    )
    resumed = []
    for _ in range(3):
        protocol = await connect(reactor, settings)
        connection = _tls_connection(protocol.transport)
        assert connection is not None
        resumed.append(bool(openssl_lib.SSL_session_reused(connection._ssl)))
        assert protocol.has("IMAP4REV1")
        lost = _when_lost(protocol)
        protocol.transport.loseConnection()  # type: ignore[union-attr]
        # Closed before the test ends: the reactor does not run between tests, and a client
        # connection left open keeps the module's Dovecot (its one imap-login) from stopping
        # for the whole stop timeout.
        await lost.addTimeout(30, reactor)

    assert resumed == [False, True, True]
