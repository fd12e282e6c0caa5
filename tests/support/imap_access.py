"""imaplib helpers shared by the private test servers (Dovecot, Cyrus).

The servers differ in how they are started and how users are added; how a test reads and
writes a mailbox through them is the same, so it lives here once.
"""

from __future__ import annotations

import contextlib
import datetime
import imaplib
import re
import ssl
from collections.abc import Iterable, Iterator, Sequence

_APPENDUID_RE = re.compile(rb"\[APPENDUID (\d+) (\d+)\]")
_FETCH_UID_RE = re.compile(rb"\bUID (\d+)")
_FETCH_FLAGS_RE = re.compile(rb"\bFLAGS \(([^)]*)\)")


class ImapCommandError(RuntimeError):
    """An IMAP command a test helper sent was not answered OK."""


def quote_mailbox(name: str) -> str:
    """An IMAP quoted string for an ASCII mailbox name (imaplib does no quoting)."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check(result: tuple[str, Sequence[object]], what: str) -> None:
    typ, data = result
    if typ != "OK":
        raise ImapCommandError(f"{what} failed: {typ} {data!r}")


def append_message(
    conn: imaplib.IMAP4,
    message: bytes,
    mailbox: str = "INBOX",
    flags: Iterable[str] = (),
    internaldate: datetime.datetime | float | None = None,
) -> int:
    """APPEND on an open connection; returns the UID from APPENDUID."""
    flag_str = "(" + " ".join(flags) + ")" if flags else None
    date = imaplib.Time2Internaldate(internaldate) if internaldate is not None else None
    typ, data = conn.append(quote_mailbox(mailbox), flag_str, date, message)
    _check((typ, data), f"APPEND to {mailbox}")
    m = _APPENDUID_RE.search(data[0] if isinstance(data[0], bytes) else b"")
    if not m:
        raise ImapCommandError(f"no APPENDUID in {data!r}")
    return int(m.group(2))


def fetch_flags(conn: imaplib.IMAP4, mailbox: str = "INBOX") -> dict[int, set[str]]:
    _check(conn.select(quote_mailbox(mailbox), readonly=True), f"EXAMINE {mailbox}")
    typ, data = conn.uid("FETCH", "1:*", "(FLAGS)")
    _check((typ, data), "UID FETCH FLAGS")
    out: dict[int, set[str]] = {}
    for item in data:
        if not isinstance(item, bytes):
            continue
        uid = _FETCH_UID_RE.search(item)
        flags = _FETCH_FLAGS_RE.search(item)
        if uid and flags:
            out[int(uid.group(1))] = {f.decode() for f in flags.group(1).split()}
    return out


def fetch_bodies(conn: imaplib.IMAP4, mailbox: str = "INBOX") -> dict[int, bytes]:
    _check(conn.select(quote_mailbox(mailbox), readonly=True), f"EXAMINE {mailbox}")
    typ, data = conn.uid("FETCH", "1:*", "(UID BODY.PEEK[])")
    _check((typ, data), "UID FETCH BODY[]")
    out: dict[int, bytes] = {}
    for item in data:
        if isinstance(item, tuple):
            uid = _FETCH_UID_RE.search(item[0])
            if uid:
                out[int(uid.group(1))] = item[1]
    return out


class ImapAccess:
    """Logged-in imaplib connections and mailbox reads for a test server.

    The server class provides the address, the ports, the trust anchors and the master
    identity.
    """

    _host: str
    imap_port: int
    imaps_port: int
    _master_user: str
    _master_password: str

    def client_ssl_context(self) -> ssl.SSLContext:
        raise NotImplementedError

    @contextlib.contextmanager
    def imap(
        self, user: str, password: str, *, security: str = "starttls"
    ) -> Iterator[imaplib.IMAP4]:
        """A logged-in ``imaplib.IMAP4``; ``security`` is "starttls", "tls" or "none"."""
        conn = self._connect(security)
        try:
            conn.login(user, password)
            yield conn
        finally:
            with contextlib.suppress(Exception):
                conn.logout()

    @contextlib.contextmanager
    def imap_as_master(self, user: str, *, security: str = "starttls") -> Iterator[imaplib.IMAP4]:
        """Logged in as ``user`` through the master user (SASL PLAIN with authzid)."""
        conn = self._connect(security)
        token = f"{user}\0{self._master_user}\0{self._master_password}".encode()
        try:
            conn.authenticate("PLAIN", lambda _challenge: token)
            yield conn
        finally:
            with contextlib.suppress(Exception):
                conn.logout()

    def _connect(self, security: str) -> imaplib.IMAP4:
        if security == "tls":
            return imaplib.IMAP4_SSL(
                self._host, self.imaps_port, ssl_context=self.client_ssl_context(), timeout=30
            )
        conn = imaplib.IMAP4(self._host, self.imap_port, timeout=30)
        if security == "starttls":
            conn.starttls(ssl_context=self.client_ssl_context())
        elif security != "none":
            raise ValueError(f"security must be starttls, tls or none: {security!r}")
        return conn

    def append(
        self,
        user: str,
        password: str,
        message: bytes,
        mailbox: str = "INBOX",
        flags: Iterable[str] = (),
        internaldate: datetime.datetime | float | None = None,
    ) -> int:
        """APPEND ``message`` and return its UID (from APPENDUID)."""
        with self.imap(user, password) as conn:
            return append_message(conn, message, mailbox, flags, internaldate)

    def append_many(
        self, user: str, password: str, messages: Iterable[bytes], mailbox: str = "INBOX"
    ) -> list[int]:
        """APPEND several messages over one connection; returns their UIDs in order."""
        with self.imap(user, password) as conn:
            return [append_message(conn, m, mailbox) for m in messages]

    def list_uids(self, user: str, password: str, mailbox: str = "INBOX") -> list[int]:
        with self.imap(user, password) as conn:
            _check(conn.select(quote_mailbox(mailbox), readonly=True), "EXAMINE")
            typ, data = conn.uid("SEARCH", "ALL")
            _check((typ, data), "UID SEARCH")
            return sorted(int(x) for x in (data[0] or b"").split())

    def fetch_flags(self, user: str, password: str, mailbox: str = "INBOX") -> dict[int, set[str]]:
        with self.imap(user, password) as conn:
            return fetch_flags(conn, mailbox)

    def fetch_bodies(self, user: str, password: str, mailbox: str = "INBOX") -> dict[int, bytes]:
        """UID → ``BODY[]`` (fetched with BODY.PEEK, so no flag changes)."""
        with self.imap(user, password) as conn:
            return fetch_bodies(conn, mailbox)

    def list_mailboxes(self, user: str, password: str) -> list[tuple[set[str], str]]:
        """(attributes, name) for every mailbox, from LIST."""
        with self.imap(user, password) as conn:
            typ, data = conn.list()
            _check((typ, data), "LIST")
            out = []
            for line in data:
                if not isinstance(line, bytes):
                    continue
                m = re.match(rb'\(([^)]*)\) (?:"[^"]*"|NIL) (.*)$', line)
                if m:
                    attrs = {a.decode() for a in m.group(1).split()}
                    name = m.group(2).decode()
                    if name.startswith('"') and name.endswith('"'):
                        name = name[1:-1]
                    out.append((attrs, name))
            return out
