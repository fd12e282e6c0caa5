"""Shared pieces of the POP3 integration tests: a raw-socket POP3 client that shows the exact
bytes on the wire, a gateway that lives for a whole test module, and views of the upstream
mailbox through the server helper's imaplib (the ground truth the gateway must not disturb).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import re
import select
import socket
import ssl
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.maildrop.device_state import DeviceState
from tests import conftest
from tests.support.gateway import GatewayProcess, merge_config
from tests.support.imap_access import fetch_bodies, fetch_flags, quote_mailbox
from tests.support.upstreams import Upstream

STATE_MAILBOX = "POP Device State"
POP_DELETED = "$POPDeleted"
GREETING = b"+OK popgate ready\r\n"
TERMINATOR = b".\r\n"
# Generous: a healthy gateway answers in milliseconds; this only bounds a hang.
TIMEOUT = 15.0

_user_counter = itertools.count(1)
_RFC822_SIZE_RE = re.compile(rb"UID (\d+) RFC822\.SIZE (\d+)|RFC822\.SIZE (\d+) UID (\d+)")


# --------------------------------------------------------------------- the raw client
class ConnectionClosed(AssertionError):
    """The server closed the connection where the test expected more bytes."""


class PopWire:
    """A POP3 client on a raw socket: every byte the server sends is seen as sent.

    Reads are buffered here (not in a ``makefile``) so STLS can take over the socket without
    losing or hiding bytes, and every read has a deadline instead of blocking for ever.
    """

    def __init__(self, sock: socket.socket, timeout: float = TIMEOUT) -> None:
        self.sock = sock
        self.timeout = timeout
        self.buffer = bytearray()
        self.sock.settimeout(timeout)
        self.greeting = self.line()

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: str = "localhost",
        timeout: float = TIMEOUT,
        rcvbuf: int | None = None,
    ) -> PopWire:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect, so the TCP window is negotiated small (slow-reader tests).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect((host, port))
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=server_hostname)
        return cls(sock, timeout)

    def __enter__(self) -> PopWire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    # ---------------------------------------------------------------- raw I/O
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        """Read what is there into the buffer; False at EOF."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no answer within {self.timeout}s; have {bytes(self.buffer)!r}")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise TimeoutError(
                f"no answer within {self.timeout}s; have {bytes(self.buffer)!r}"
            ) from None
        if not chunk:
            return False
        self.buffer += chunk
        return True

    def line(self) -> bytes:
        """One line with its CRLF; ConnectionClosed if the server closes before one is whole."""
        deadline = time.monotonic() + self.timeout
        while (end := self.buffer.find(b"\n")) < 0:
            if not self._fill(deadline):
                raise ConnectionClosed(f"connection closed; unterminated {bytes(self.buffer)!r}")
        data = bytes(self.buffer[: end + 1])
        del self.buffer[: end + 1]
        return data

    def read_exactly(self, n: int) -> bytes:
        deadline = time.monotonic() + self.timeout
        while len(self.buffer) < n:
            if not self._fill(deadline):
                raise ConnectionClosed(f"connection closed after {len(self.buffer)} of {n} bytes")
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def read_to_eof(self, timeout: float | None = None) -> bytes:
        """Everything until the server closes; TimeoutError if it does not within ``timeout``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            while self._fill(deadline):
                pass
        except ConnectionResetError:
            pass
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    def is_closed_by_peer(self) -> bool:
        """Whether the server has closed (EOF is readable now), without waiting."""
        if self.buffer:
            return False
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:
            return False
        try:
            self.sock.setblocking(False)
            chunk = self.sock.recv(65536, socket.MSG_PEEK)
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        except OSError:
            return True
        finally:
            self.sock.setblocking(True)
        return chunk == b""

    # ---------------------------------------------------------------- POP3
    def command(self, text: str | bytes) -> bytes:
        """Send one command line; return the status line (with CRLF)."""
        self.send((text.encode() if isinstance(text, str) else text) + b"\r\n")
        return self.line()

    def multiline_raw(self) -> bytes:
        """The raw bytes of a multi-line body up to and including the terminator line."""
        out = bytearray()
        while True:
            line = self.line()
            out += line
            if line == TERMINATOR:
                return bytes(out)

    def lines(self) -> list[bytes]:
        """The lines of a multi-line body (CRLF stripped, terminator excluded, un-stuffed)."""
        raw = self.multiline_raw()
        return [unstuff_line(line)[:-2] for line in raw.splitlines(keepends=True)[:-1]]

    def listing(self, text: str) -> tuple[bytes, list[bytes]]:
        """A command with a multi-line answer: (status line, body lines) — body empty on -ERR."""
        status = self.command(text)
        return status, (self.lines() if status.startswith(b"+OK") else [])

    def fetch(self, text: str) -> tuple[bytes, bytes]:
        """RETR/TOP: (status line, body with the dot-stuffing undone, terminator removed)."""
        status = self.command(text)
        if not status.startswith(b"+OK"):
            return status, b""
        return status, unstuff(self.multiline_raw())

    def login(self, user: str, password: str) -> bytes:
        """USER/PASS; asserts success and returns the PASS answer."""
        assert self.command(f"USER {user}") == b"+OK Send your password\r\n"
        answer = self.command(f"PASS {password}")
        assert answer.startswith(b"+OK Logged in, "), answer
        return answer

    def auth_plain(
        self, authcid: str | bytes, password: str | bytes, authzid: bytes = b""
    ) -> bytes:
        """AUTH PLAIN with an initial response; returns the answer line."""
        return self.command(b"AUTH PLAIN " + plain_response(authcid, password, authzid))

    def stls(self, context: ssl.SSLContext, server_hostname: str = "localhost") -> None:
        assert self.command("STLS") == b"+OK Begin TLS negotiation\r\n"
        assert not self.buffer, f"bytes after the STLS answer: {bytes(self.buffer)!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)

    def quit(self) -> bytes:
        answer = self.command("QUIT")
        rest = self.read_to_eof()
        assert rest == b"", f"bytes after the QUIT answer: {rest!r}"
        return answer


def plain_response(authcid: str | bytes, password: str | bytes, authzid: bytes = b"") -> bytes:
    """The base64 SASL PLAIN response for these fields (bytes pass through unchanged)."""
    user = authcid.encode() if isinstance(authcid, str) else authcid
    pw = password.encode() if isinstance(password, str) else password
    return base64.b64encode(authzid + b"\0" + user + b"\0" + pw)


def unstuff_line(line: bytes) -> bytes:
    return line[1:] if line.startswith(b".") else line


def unstuff(raw: bytes) -> bytes:
    """A multi-line body as received (terminator included) back to the message bytes."""
    assert raw.endswith(b"\r\n" + TERMINATOR) or raw == TERMINATOR, raw[-20:]
    lines = raw.splitlines(keepends=True)[:-1]
    return b"".join(unstuff_line(line) for line in lines)


def on_the_wire(message: bytes) -> bytes:
    """What a client gets for RETR after un-stuffing: the message, its last line ended."""
    return message if message.endswith(b"\r\n") else message + b"\r\n"


def top_of(message: bytes, lines: int) -> bytes:
    """What TOP n ``lines`` must give (RFC 1939): the header, the blank line, ``lines`` lines."""
    header, sep, body = message.partition(b"\r\n\r\n")
    assert sep, "test messages have a header/body separator"
    kept = b"".join(body.splitlines(keepends=True)[:lines])
    return on_the_wire(header + sep + kept)


# --------------------------------------------------------------------- users
@dataclass(frozen=True)
class Account:
    name: str
    password: str
    uids: list[int]
    #: BODY[] as stored upstream, in APPEND order
    messages: list[bytes]


def make_account(upstream: Upstream, messages: Sequence[bytes] = (), tag: str = "p") -> Account:
    """A fresh user on the upstream server holding ``messages`` in INBOX (usable from module
    fixtures)."""
    n = next(_user_counter)
    name, password = f"pop3-{tag}-{n}", f"pop3-secret-{n}-{tag}"
    upstream.add_user(name, password)
    uids = upstream.append_many(name, password, messages) if messages else []
    stored = upstream.fetch_bodies(name, password) if messages else {}
    return Account(name, password, uids, [stored[u] for u in uids])


# --------------------------------------------------------------------- upstream views
@dataclass(frozen=True)
class UpstreamView:
    """What an IMAP client sees of one user: the evidence that POP did (or did not) act."""

    mailboxes: frozenset[str]
    inbox_flags: dict[int, frozenset[str]]
    state_messages: dict[int, bytes]  # the gateway's state mailbox (empty if absent)

    def system_flags(self) -> dict[int, frozenset[str]]:
        return {
            uid: frozenset(f for f in fl if f.startswith("\\"))
            for uid, fl in self.inbox_flags.items()
        }

    def hidden_uids(self) -> set[int]:
        return {uid for uid, fl in self.inbox_flags.items() if POP_DELETED in fl}

    def states(self) -> dict[str, DeviceState]:
        """Each device's state, its copies merged."""
        found: dict[str, DeviceState] = {}
        for raw in self.state_messages.values():
            state = DeviceState.parse(raw)
            found.setdefault(state.device, DeviceState(state.mailbox, state.device)).merge(state)
        return found

    def mail(self) -> tuple[frozenset[str], dict[int, frozenset[str]], dict[str, frozenset[int]]]:
        """What deletes change: the mailboxes but the gateway's own, the flags, and what each
        device hides. Not the state's record of downloads and logins, which every QUIT of a
        device that can hide (on_delete hide or seen) updates."""
        hidden = {d: frozenset(s.uids) for d, s in self.states().items() if s.uids}
        return self.mailboxes - {STATE_MAILBOX}, self.inbox_flags, hidden


def upstream_view(upstream: Upstream, user: str) -> UpstreamView:
    """The user's mailboxes and flags, read through the master user (so passwords imaplib
    cannot send work too). ``\\Recent`` is left out: it belongs to whichever IMAP session saw
    the message first, not to the message."""
    with upstream.imap_as_master(user) as conn:
        typ, data = conn.list()
        assert typ == "OK", data
        names = set()
        for line in data:
            if isinstance(line, bytes):
                m = re.match(rb'\([^)]*\) (?:"[^"]*"|NIL) (.*)$', line)
                assert m, line
                names.add(m.group(1).decode().strip('"'))
        flags = {uid: frozenset(f) - {"\\Recent"} for uid, f in fetch_flags(conn).items()}
        state = fetch_bodies(conn, STATE_MAILBOX) if STATE_MAILBOX in names else {}
    return UpstreamView(frozenset(names), flags, state)


def rfc822_sizes(upstream: Upstream, user: str, password: str) -> dict[int, int]:
    """UID → RFC822.SIZE as the IMAP server reports it."""
    with upstream.imap(user, password) as conn:
        typ, data = conn.select(quote_mailbox("INBOX"), readonly=True)
        assert typ == "OK", data
        typ, data = conn.uid("FETCH", "1:*", "(UID RFC822.SIZE)")
        assert typ == "OK", data
    sizes = {}
    for item in data:
        assert isinstance(item, bytes), item
        m = _RFC822_SIZE_RE.search(item)
        assert m, item
        if m.group(1):
            sizes[int(m.group(1))] = int(m.group(2))
        else:
            sizes[int(m.group(4))] = int(m.group(3))
    return sizes


def imap_expunge(upstream: Upstream, user: str, password: str, uids: Sequence[int]) -> None:
    with upstream.imap(user, password) as conn:
        assert conn.select("INBOX")[0] == "OK"
        uid_set = ",".join(str(u) for u in uids)
        assert conn.uid("STORE", uid_set, "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
        assert conn.uid("EXPUNGE", uid_set)[0] == "OK"


def imap_add_flags(upstream: Upstream, user: str, password: str, uid: int, flags: str) -> None:
    with upstream.imap(user, password) as conn:
        assert conn.select("INBOX")[0] == "OK"
        assert conn.uid("STORE", str(uid), "+FLAGS.SILENT", f"({flags})")[0] == "OK"


# --------------------------------------------------------------------- gateways
def gateway_config(
    upstream: Upstream, directory: Path, overrides: Mapping[str, Mapping[str, Any] | None]
) -> dict[str, dict[str, Any]]:
    """The fixtures' base configuration with per-section ``overrides`` (section names real)."""
    return merge_config(conftest.base_gateway_config(upstream, directory), overrides)


@contextlib.contextmanager
def running_gateway(
    upstream: Upstream, directory: Path, overrides: Mapping[str, Mapping[str, Any] | None] = {}
) -> Iterator[GatewayProcess]:
    """A gateway subprocess for as long as the ``with`` lasts (for module-scoped fixtures)."""
    directory.mkdir(parents=True, exist_ok=True)
    gw = GatewayProcess(gateway_config(upstream, directory, overrides), directory / "popgate.toml")
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


def report_logs(request: pytest.FixtureRequest, *gateways: GatewayProcess) -> None:
    """Have the conftest failure report attach these gateways' logs too."""
    key = getattr(conftest, "_gateways_key", None)
    if key is not None:
        request.node.stash.setdefault(key, []).extend(gateways)


def wait_until(condition: Any, timeout: float = TIMEOUT, what: str = "condition") -> None:
    """Bounded polling for a state change another process makes (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.02)


def trust_gateway_cert(gw: GatewayProcess) -> tuple[ssl.SSLContext, str]:
    """A client context that trusts the gateway's self-signed certificates (the file named in
    its config, and the ECDSA one generated beside it, which is what this client is shown)
    as the only anchors, and the host name to check them against (the name the gateway
    generated them for)."""
    from cryptography import x509

    cert_file = Path(gw.config["tls"]["cert_file"])
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = san.get_values_for_type(x509.DNSName)
    assert names, f"no DNS name in {cert_file}"
    context = ssl.create_default_context(cafile=str(cert_file))
    second = cert_file.with_name(f"{cert_file.stem}-ecdsa{cert_file.suffix}")
    if second.exists():
        context.load_verify_locations(cafile=str(second))
    return context, names[0]
