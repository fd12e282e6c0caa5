"""Devices resume their TLS sessions: a second connection with the session of the first is
"Reused" by openssl s_client, over TLS 1.3 (tickets), TLS 1.2 (tickets or session IDs) and the
TLS 1.0 that old devices speak. A resumed handshake skips the certificate and the key exchange:
the cheap handshake for devices that poll every few minutes (docs/benchmark.md)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.pop3_helpers import report_logs, running_gateway
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
