"""FormPoster, popgate's HTTP client for the provider, over real sockets: a silent server times
out, an oversized answer is refused, a refused connection is ProviderDown; nothing blocks."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import pytest_twisted
from twisted.internet import reactor

from gateway.oauth.http import MAX_ANSWER, FormPoster
from gateway.oauth.protocol import ProviderDown
from tests.support.oauth_provider import OAuthProvider, free_port_refused

pytest_plugins = ("tests.support.oauth_fixtures",)


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/token"


class _Huge(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b'{"access_token": "' + b"A" * (MAX_ANSWER + 10) + b'"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def huge_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Huge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/token"
    finally:
        server.shutdown()
        server.server_close()


@pytest_twisted.ensureDeferred
async def test_a_silent_provider_times_out(silent_server: str) -> None:
    with pytest.raises(ProviderDown, match=r"no answer from .* within 0\.5 s"):
        await FormPoster(reactor, timeout=0.5).post(silent_server, b"grant_type=x")


@pytest_twisted.ensureDeferred
async def test_an_oversized_answer_is_refused(huge_server: str) -> None:
    with pytest.raises(ProviderDown, match=f"answer larger than {MAX_ANSWER} bytes"):
        await FormPoster(reactor).post(huge_server, b"grant_type=x")


@pytest_twisted.ensureDeferred
async def test_refused_connection_and_a_normal_answer(oauth_provider: OAuthProvider) -> None:
    with pytest.raises(ProviderDown):
        await FormPoster(reactor).post(f"http://127.0.0.1:{free_port_refused()}/t", b"")
    status, body = await FormPoster(reactor).post(
        oauth_provider.introspection_url, b"token=nothing"
    )
    assert (status, body) == (200, b'{"active": false}')
