"""Stores the Sent copy of a relayed submission in the user's IMAP Sent mailbox, once.

Runs on Twisted (the IMAP client is Twisted); :meth:`SentWriter.store` is the asyncio face the
spool calls. The mailbox is the SPECIAL-USE ``\\Sent`` one (matched case-insensitively: Cyrus
says ``\\sent``), else ``Sent``, or what ``[submission] sent_folder`` names; it is created when
missing.

A retry first looks for the copy an earlier attempt may have stored before it lost its
connection or the gateway died: same Message-ID *and* same bytes. The Message-ID alone is not
enough (some senders reuse one for different messages), and every send gets its copy.
"""

from __future__ import annotations

import asyncio
import time

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from gateway.config import ImapUpstream
from gateway.proto.imap import Atom, encode_mailbox, fetch_items
from gateway.submission.message import digest, envelope_only, sent_copy
from gateway.submission.spool import SpoolEntry
from gateway.upstream.account import ImapAccount, LoginRejected, search_result
from gateway.upstream.imap_client import BodyCollector, ImapCommandFailed

DEFAULT_SENT = "Sent"
# A Message-ID shared by more messages than this in one Sent mailbox is not worth comparing.
MAX_CANDIDATES = 50

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def internaldate(when: float) -> str:
    """RFC 3501 date-time in UTC, independent of the locale: ``23-Nov-2026 06:00:00 +0000``."""
    t = time.gmtime(when)
    day = f"{t.tm_mday:02d}-{_MONTHS[t.tm_mon - 1]}-{t.tm_year}"
    return f"{day} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"


def copy_for(entry: SpoolEntry) -> bytes:
    """The bytes of the Sent copy: the relayed message plus the envelope-only recipients."""
    return sent_copy(entry.message, envelope_only(entry.recipients, entry.message))


class SentWriter:
    def __init__(
        self,
        reactor: IReactorTime,
        settings: ImapUpstream,
        sent_folder: str,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        self.sent_folder = sent_folder
        self.loop = loop

    async def store(self, entry: SpoolEntry, retry: bool) -> str:
        """asyncio entry point: store the copy (looking for an earlier one when ``retry``)."""
        d = Deferred.fromCoroutine(self._store(entry, retry))
        return await d.asFuture(self.loop)

    async def _login(self, entry: SpoolEntry) -> ImapAccount:
        if entry.password is not None:
            peer_ip = entry.peer.rpartition(":")[0].strip("[]") or None
            return await ImapAccount.open(
                self.reactor, self.settings, entry.user, entry.password, peer_ip
            )
        if self.settings.master_user:
            return await ImapAccount.open_as_master(self.reactor, self.settings, entry.user)
        raise LoginRejected("no credential for this entry and no master identity configured")

    async def _store(self, entry: SpoolEntry, retry: bool) -> str:
        copy = copy_for(entry)
        account = await self._login(entry)
        try:
            mailbox = await self._mailbox(account)
            if retry:
                uid = await self._find_copy(account, mailbox, entry.message_id, copy)
                if uid is not None:
                    return f"already in {mailbox} (uid {uid}), stored by an earlier attempt"
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
        charset = [] if message_id.isascii() else [Atom("CHARSET"), Atom("UTF-8")]
        response = await account.proto.command(
            Atom("UID"), Atom("SEARCH"), *charset, Atom("HEADER"), "Message-ID", message_id
        )
        candidates = search_result(response)[:MAX_CANDIDATES]
        if not candidates:
            return None
        sizes = await account.proto.command(
            Atom("UID"),
            Atom("FETCH"),
            Atom(",".join(str(u) for u in candidates)),
            [Atom("UID"), Atom("RFC822.SIZE")],
        )
        same_size = []
        for item in sizes.untagged:
            tokens = getattr(item, "tokens", None)
            if not tokens or len(tokens) < 3 or str(tokens[1]).upper() != "FETCH":
                continue
            _, fields = fetch_items(tokens)
            if str(fields.get("RFC822.SIZE")) == str(len(copy)):
                same_size.append(int(str(fields.get("UID"))))
        wanted = digest(copy)
        for uid in sorted(same_size):
            sink = BodyCollector()
            await account.fetch_body(uid, sink)
            if sink.bodies and digest(sink.bodies[0]) == wanted:
                return uid
        return None

    async def _append(self, account: ImapAccount, mailbox: str, copy: bytes, created: float) -> str:
        async def append() -> str:
            response = await account.proto.command(
                Atom("APPEND"),
                encode_mailbox(mailbox),
                [Atom("\\Seen")],
                internaldate(created),
                copy,
            )
            code = response.status.code
            if response.status.code_name == "APPENDUID" and code and len(code) >= 3:
                uid = code[2]
                return f" (uid {uid.decode() if isinstance(uid, bytes) else uid})"
            return ""

        try:
            return await append()
        except ImapCommandFailed as e:
            if e.status.code_name != "TRYCREATE":
                raise
        await account.create_mailbox(mailbox)
        return await append()
