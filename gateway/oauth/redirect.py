"""Where the browser flow's redirect comes back: a loopback HTTP listener and pasted lines.

Glue around :class:`~gateway.oauth.authcode.AuthorizationCodeFlow`. The provider sends the
browser to ``http://127.0.0.1:PORT/?state=...&code=...``. When the browser runs on this host
the listener below catches it; when it runs elsewhere (popgate on a server, over SSH, in a
container) the page fails to load and the operator pastes the address from the browser's
address bar on stdin. Whichever comes first with the right ``state`` wins; the code is never
logged or shown (twisted.web's access log is switched off: the request line carries it).
"""

from __future__ import annotations

import html
import os
import threading
from collections.abc import Callable
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from gateway.oauth.authcode import (
    MAX_REDIRECT,
    AuthorizationCodeFlow,
    AuthorizationFailed,
    NotARedirect,
)

__all__ = ["RedirectCatcher"]

LOOPBACK = "127.0.0.1"


class RedirectCatcher:
    """Offers every candidate redirect to the flow; ``code`` fires once, with the
    authorization code or AuthorizationFailed."""

    def __init__(self, reactor: Any, out: TextIO) -> None:
        self.reactor = reactor
        self.out = out
        self.flow: AuthorizationCodeFlow | None = None
        self.code: Deferred[str] = Deferred()

    def offer(self, text: str) -> tuple[int, str]:
        """An HTTP status and a sentence for whoever sent ``text``."""
        if self.flow is None or self.code.called:
            return 404, "popgate is not waiting for a sign-in here (any more)."
        try:
            code = self.flow.redirect_received(text)
        except NotARedirect as exc:
            return 404, f"This is not the answer to popgate's sign-in request ({exc})."
        except AuthorizationFailed as failed:
            # Fired from the reactor, not from inside the caller (an HTTP render).
            self.reactor.callLater(0, self.code.errback, failed)
            return 400, f"popgate: {failed}"
        self.reactor.callLater(0, self.code.callback, code)
        return 200, "popgate received the sign-in. You can close this window."

    # ------------------------------------------------------------------ the loopback listener
    def listen(self, port: int) -> IListeningPort:
        """Listen on 127.0.0.1:``port`` (0: any free port); CannotListenError if taken."""
        site = _QuietSite(_RedirectPage(self.offer))
        listening: IListeningPort = self.reactor.listenTCP(port, site, interface=LOOPBACK)
        return listening

    # ------------------------------------------------------------------ pasted lines
    def read_pasted(self, fd: int) -> None:
        """Read lines from file descriptor ``fd`` (stdin) in a daemon thread. Blocking reads
        (stdin is often the terminal stdout writes to, which must not become non-blocking)
        with ``os.read``: no lock of ``sys.stdin`` is held when the process exits."""

        def pasted(line: str) -> None:
            if not line.strip() or self.code.called:
                return
            status, text = self.offer(line)
            if status == 404:
                self.out.write(f"{text} Paste the whole address the browser ended on.\n")
                self.out.flush()

        def read() -> None:
            pending = b""
            while True:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # stdin closed under us: the listener still works
                    return
                if not chunk:
                    return
                pending += chunk
                *lines, pending = pending.split(b"\n")
                if len(pending) > MAX_REDIRECT:  # no newline in sight: not a pasted address
                    pending = b""
                for line in lines:
                    text = line.decode("utf-8", "replace")
                    self.reactor.callFromThread(pasted, text)

        threading.Thread(target=read, name="oauth-paste", daemon=True).start()


class _RedirectPage(Resource):
    isLeaf = True

    def __init__(self, offer: Callable[[str], tuple[int, str]]) -> None:
        super().__init__()
        self.offer = offer

    def render_GET(self, request: Request) -> bytes:
        status, text = self.offer(request.uri.decode("ascii", "replace"))
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        page = (
            "<!doctype html><meta charset=utf-8><title>popgate sign-in</title>"
            f"<p>{html.escape(text)}</p>\n"
        )
        return page.encode()


class _QuietSite(Site):
    """No access log (the request line holds the authorization code), no factory chatter."""

    noisy = False

    def log(self, request: Any) -> None:
        pass
