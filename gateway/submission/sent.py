"""Stores the Sent copy of a relayed submission in the user's IMAP Sent mailbox, once.

Runs on Twisted (the IMAP client is Twisted); :meth:`SentWriter.store` is the asyncio face the
spool calls. The mailbox is the SPECIAL-USE ``\\Sent`` one (matched case-insensitively: Cyrus
says ``\\sent``), else ``Sent``, or what ``[submission] sent_folder`` names; it is created when
missing.

Every copy is stored once. Before appending, the Sent mailbox is searched for the same copy:
the same Message-ID *and* byte for byte the same copy (the message as relayed plus the same
blind recipients). That one check covers both ways a copy can come twice:

- a spool retry after an earlier attempt stored the copy but lost its connection, or the
  gateway died, before it could forget the entry (the crash window between APPEND and spool
  removal);
- a device that never heard its ``250`` and sends the same message again: the relay gets it
  twice (de-duplication never drops a send), the Sent mailbox once.

The Message-ID alone is not enough (some senders reuse one for different messages), and every
different message gets its copy. Looking upstream, not in local memory, makes the check hold
across restarts and replicas; within one process, copies of one Message-ID are stored one after
the other, so two of them never both miss each other. The cost is bounded: one SEARCH, the sizes
of at most ``MAX_CANDIDATES`` newest matches, and bodies only of those of the same size, streamed
through a hash, newest first.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from gateway.config import ImapUpstream
from gateway.metrics import DISCARD, Metrics, since
from gateway.submission.message import envelope_only, sent_copy
from gateway.submission.spool import SpoolEntry
from gateway.upstream.account import ImapAccount, LoginRejected
from gateway.upstream.imap_client import ImapCommandFailed, ImapConnectionLost
from gateway.upstream.logins import UpstreamLogins

log = logging.getLogger("popgate.submission")

DEFAULT_SENT = "Sent"
# Only the newest messages with one Message-ID are compared: a copy stored twice is a recent
# one, and a Message-ID that a device reuses for everything must not make each send read the
# whole Sent mailbox.
MAX_CANDIDATES = 20

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def internaldate(when: float) -> str:
    """RFC 3501 date-time in UTC, independent of the locale: ``23-Nov-2026 06:00:00 +0000``."""
    t = time.gmtime(when)
    day = f"{t.tm_mday:02d}-{_MONTHS[t.tm_mon - 1]}-{t.tm_year}"
    return f"{day} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"


def copy_for(entry: SpoolEntry) -> bytes:
    """The bytes of the Sent copy: the relayed message plus the envelope-only recipients."""
    return sent_copy(entry.message, envelope_only(entry.recipients, entry.message))


class DigestSink:
    """A BodySink that keeps only the SHA-256 of each body: comparing costs no memory."""

    def __init__(self) -> None:
        self.digests: list[bytes] = []
        self._hash = hashlib.sha256()

    def literal_begin(self, size: int) -> None:
        self._hash = hashlib.sha256()

    def literal_data(self, data: bytes) -> None:
        self._hash.update(data)

    def literal_end(self) -> None:
        self.digests.append(self._hash.digest())


class KeyedLocks:
    """One asyncio lock per key, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: tuple[str, str]) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


class SentWriter:
    def __init__(
        self,
        reactor: IReactorTime,
        settings: ImapUpstream,
        sent_folder: str,
        loop: asyncio.AbstractEventLoop,
        logins: UpstreamLogins | None = None,
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        self.logins = logins or UpstreamLogins(reactor, settings)
        self.sent_folder = sent_folder
        self.loop = loop
        self._storing = KeyedLocks()
        self.metrics: Metrics = DISCARD
        # Connections the submission's AUTH logged in with, by spool entry (lend)
        self._lent: dict[str, ImapAccount] = {}

    def lend(self, entry_id: str, account: ImapAccount) -> None:
        """The user's connection that checked the password at AUTH, for this entry's copy.

        The copy is stored over it instead of over a login of its own: the same user, the same
        credentials, checked seconds ago, so one upstream login per submission, not two. A
        connection that turns out to be gone is replaced by a fresh login in the same attempt;
        the duplicate check makes that safe even if the APPEND had gone through.
        """
        old = self._lent.pop(entry_id, None)
        if old is not None:
            old.abort()
        self._lent[entry_id] = account

    async def close_lent(self) -> None:
        """Log out of connections no attempt took (the spool was stopping)."""
        lent, self._lent = list(self._lent.values()), {}
        for account in lent:
            await Deferred.fromCoroutine(account.logout()).asFuture(self.loop)

    async def store(self, entry: SpoolEntry) -> str:
        """asyncio entry point: store the copy unless the same copy is in Sent already.

        Copies of one user's Message-ID go one at a time, so the second one finds the first.
        """
        async with self._storing.hold((entry.user, entry.message_id)):
            d = Deferred.fromCoroutine(self._store(entry))
            return await d.asFuture(self.loop)

    async def _login(self, entry: SpoolEntry) -> ImapAccount:
        if entry.password is not None and not self.logins.oauth:
            peer_ip = entry.peer.rpartition(":")[0].strip("[]") or None
            return await ImapAccount.open(
                self.reactor, self.settings, entry.user, entry.password, peer_ip
            )
        if self.logins.unattended:  # the master identity, or the user's OAuth grant
            return await self.logins.without_device(entry.user)
        raise LoginRejected("no credential for this entry and no master identity configured")

    async def _store(self, entry: SpoolEntry) -> str:
        copy = copy_for(entry)
        lent = self._lent.pop(entry.id, None)
        if lent is not None:
            try:
                return await self._store_over(lent, entry, copy)
            except ImapConnectionLost as e:
                log.info(
                    "Sent copy: the AUTH connection is gone (%s); logging in again",
                    e,
                    extra={"user": entry.user, "spool_entry": entry.id},
                )
        return await self._store_over(await self._login(entry), entry, copy)

    async def _store_over(self, account: ImapAccount, entry: SpoolEntry, copy: bytes) -> str:
        """Store the copy over ``account`` and log out of it, whatever happens."""
        try:
            mailbox = await self._mailbox(account)
            uid = await self._find_copy(account, mailbox, entry.message_id, copy)
            if uid is not None:
                return f"already in {mailbox} (uid {uid}): the same message, stored before"
            uid_text = await self._append(account, mailbox, copy, entry.created)
            return f"appended to {mailbox}{uid_text}"
        finally:
            await account.logout()

    async def _mailbox(self, account: ImapAccount) -> str:
        if self.sent_folder != "auto":
            return self.sent_folder
        return await account.find_special_use("\\Sent") or DEFAULT_SENT

    async def _find_copy(
        self, account: ImapAccount, mailbox: str, message_id: str, copy: bytes
    ) -> int | None:
        """UID of a message in ``mailbox`` with this Message-ID and exactly these bytes."""
        try:
            await account.examine(mailbox)
        except ImapCommandFailed:
            return None  # no such mailbox yet: no earlier copy either
        charset = None if message_id.isascii() else "UTF-8"
        found = await account.search_header("Message-ID", message_id, charset=charset)
        candidates = found[-MAX_CANDIDATES:]
        if not candidates:
            return None
        sizes = await account.fetch_sizes(candidates)
        same_size = [uid for uid, size in sizes if size == len(copy)]
        wanted = hashlib.sha256(copy).digest()
        for uid in sorted(same_size, reverse=True):  # newest first: a copy stored twice is recent
            sink = DigestSink()
            await account.fetch_body(uid, sink)
            if sink.digests == [wanted]:
                return uid
        return None

    async def _append(self, account: ImapAccount, mailbox: str, copy: bytes, created: float) -> str:
        async def append() -> str:
            started = time.perf_counter()
            uid = await account.append(mailbox, copy, ["\\Seen"], internaldate(created))
            self.metrics.sent_append_seconds.observe(since(started))
            return f" (uid {uid})" if uid is not None else ""

        try:
            return await append()
        except ImapCommandFailed as e:
            if e.status.code_name != "TRYCREATE":
                raise
        await account.create_mailbox(mailbox)
        return await append()
