"""One user's logged-in connection to the upstream IMAP server, and the operations POP needs.

Connection set-up (implicit TLS, STARTTLS or clear), login (SASL PLAIN or LOGIN, never with user
input pasted into the command) and mailbox operations. Errors come out as the specific exception
types below, so the POP3 layer can turn each into the right response code in one place.
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectError, TimeoutError
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

from gateway.config import ImapUpstream
from gateway.maildrop.snapshot_cache import MailboxVersion, SnapshotCache
from gateway.maildrop.uidset import format_uid_set
from gateway.maildrop.views import IndexedMessage
from gateway.proto.imap import (
    Atom,
    CommandPart,
    Data,
    FetchBatch,
    Literal,
    Status,
    StreamedLiteral,
    Token,
    decode_mailbox,
    encode_mailbox,
    fetch_items,
)
from gateway.tls import client_context_factory
from gateway.upstream.imap_client import (
    BodyCollector,
    BodySink,
    ImapClientProtocol,
    ImapCommandFailed,
    ImapConnectionLost,
    ImapError,
    Response,
)

CONNECT_TIMEOUT = 15.0
# Login may involve a slow password backend upstream, but a device should not hang for ever.
LOGIN_TIMEOUT = 60.0
# Sent once per downloaded message, so built once. UID first in the request: servers that
# answer in request order (Dovecot, Cyrus) then name the message before its literal begins, so
# pipelined bodies go to the right sink and stream without being collected first.
_UID, _FETCH, _BODY_ITEMS = Atom("UID"), Atom("FETCH"), Atom("(UID BODY.PEEK[])")
# Set on messages just before they are moved; the copies carry it. A later move that finds it
# on its sources knows an earlier one may have been cut off half way (see ImapAccount.move).
MOVE_MARKER = "$POPMoving"
# Messages per MOVE command: an interrupted move leaves at most this many to reconcile.
MOVE_BATCH = 100


class UpstreamUnavailable(ImapError):
    """The server could not be reached or would not serve us now; worth trying again later."""


class LoginRejected(ImapError):
    """The server refused these credentials."""


@dataclass(frozen=True, slots=True)
class MailboxInfo:
    uidvalidity: int
    exists: int
    keywords_allowed: bool  # PERMANENTFLAGS has \* : the gateway may create its own keywords
    uidnext: int = 0
    highestmodseq: int = 0  # 0: the server reports none (no CONDSTORE)

    @property
    def version(self) -> MailboxVersion:
        return MailboxVersion(self.uidvalidity, self.uidnext, self.exists, self.highestmodseq)


async def connect(reactor: IReactorTime, settings: ImapUpstream) -> ImapClientProtocol:
    """Connect and, for STARTTLS, secure the connection; fails with UpstreamUnavailable."""
    tls = None
    if settings.security != "none":
        tls = client_context_factory(settings.host, settings.verify_certificate, settings.ca_file)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(
        reactor, settings.host, settings.port, timeout=CONNECT_TIMEOUT
    )
    if tls is not None and settings.security == "tls":
        endpoint = wrapClientTLS(tls, endpoint)
    proto = ImapClientProtocol(reactor, settings.timeout)
    try:
        await connectProtocol(endpoint, proto)
        await _with_timeout(proto.greeting, reactor, CONNECT_TIMEOUT)
        if tls is not None and settings.security == "starttls":
            if not proto.capabilities:
                await proto.command(Atom("CAPABILITY"))
            if not proto.has("STARTTLS"):
                raise UpstreamUnavailable("IMAP server does not offer STARTTLS")
            await proto.command(Atom("STARTTLS"))
            proto.start_tls(tls)
        if not proto.capabilities or settings.security == "starttls":
            await proto.command(Atom("CAPABILITY"))
    except UpstreamUnavailable:
        _abort(proto)
        raise
    except (ImapError, ConnectError, TimeoutError, OSError) as e:
        _abort(proto)
        raise UpstreamUnavailable(f"cannot reach IMAP server {settings.host}: {e}") from e
    except Exception as e:  # TLS failures surface as OpenSSL errors of several kinds
        _abort(proto)
        raise UpstreamUnavailable(f"cannot set up IMAP connection to {settings.host}: {e}") from e
    return proto


def _abort(proto: ImapClientProtocol) -> None:
    if proto.transport is not None:
        proto.transport.abortConnection()  # type: ignore[attr-defined]


async def _with_timeout(d: Deferred, reactor: IReactorTime, seconds: float) -> object:
    d.addTimeout(seconds, reactor)
    return await d


@dataclass(frozen=True, slots=True)
class Selected:
    name: str
    readonly: bool
    info: MailboxInfo


class ImapAccount:
    """A logged-in connection; each POP session owns one."""

    def __init__(self, proto: ImapClientProtocol) -> None:
        self.proto = proto
        self.selected: Selected | None = None  # the mailbox the last EXAMINE/SELECT opened

    @classmethod
    async def open(
        cls,
        reactor: IReactorTime,
        settings: ImapUpstream,
        username: str,
        password: str,
        client_ip: str | None = None,
    ) -> ImapAccount:
        """Log in as ``username`` with the user's own password."""
        return await cls._open(reactor, settings, "", username, password, client_ip)

    @classmethod
    async def open_as_master(
        cls, reactor: IReactorTime, settings: ImapUpstream, username: str
    ) -> ImapAccount:
        """Log in to ``username``'s mailbox with the configured master identity.

        SASL PLAIN with the user as authorization identity: a Dovecot master user, a Cyrus
        proxy admin. Used for work without a logged-in device (device reset, retention sweeps,
        Sent-copy retries).
        """
        if not settings.master_user:
            raise LoginRejected("no master identity configured ([upstream.imap] master_user)")
        return await cls._open(
            reactor, settings, username, settings.master_user, settings.master_password, None
        )

    @classmethod
    async def _open(
        cls,
        reactor: IReactorTime,
        settings: ImapUpstream,
        authzid: str,
        username: str,
        password: str,
        client_ip: str | None,
    ) -> ImapAccount:
        proto = await connect(reactor, settings)
        account = cls(proto)
        try:
            login = account._login(authzid, username, password, client_ip)
            await _with_timeout(Deferred.fromCoroutine(login), reactor, LOGIN_TIMEOUT)
        except BaseException:
            _abort(proto)
            raise
        return account

    async def _login(
        self, authzid: str, username: str, password: str, client_ip: str | None
    ) -> None:
        proto = self.proto
        if "\0" in authzid or "\0" in username or "\0" in password:
            # SASL PLAIN separates its fields with NUL; one inside a field could shift them.
            raise LoginRejected("NUL in credentials")
        if client_ip and proto.has("ID"):
            # Dovecot applies its per-IP login penalties to the device, not to the gateway, when
            # the gateway is in login_trusted_networks. Pipelined with the login: its answer
            # changes nothing, so nobody waits for it, and a refusal is ignored.
            ident = proto.command(Atom("ID"), ["x-originating-ip", client_ip])
            ident.addErrback(lambda failure: failure.trap(ImapError))
        if proto.has("LOGINDISABLED") and not proto.has("AUTH=PLAIN"):
            raise UpstreamUnavailable("IMAP server refuses login on this connection")
        if authzid and not proto.has("AUTH=PLAIN"):
            raise UpstreamUnavailable("IMAP server offers no SASL PLAIN for the master identity")
        try:
            if proto.has("AUTH=PLAIN"):
                await self._authenticate_plain(authzid, username, password)
            else:
                await proto.command(Atom("LOGIN"), username, password)
        except ImapCommandFailed as e:
            if e.status.code_name in ("UNAVAILABLE", "SERVERBUG", "LIMIT", "INUSE"):
                raise UpstreamUnavailable(f"IMAP login deferred: {e.status.text}") from e
            raise LoginRejected(e.status.text) from e
        except ImapConnectionLost as e:
            raise UpstreamUnavailable(str(e)) from e
        if not proto.capabilities or not any(c.startswith("IMAP4") for c in proto.capabilities):
            await proto.command(Atom("CAPABILITY"))

    async def _authenticate_plain(self, authzid: str, username: str, password: str) -> None:
        blob = "\0".join((authzid, username, password)).encode("utf-8")
        response = Atom(base64.b64encode(blob).decode("ascii") or "=")
        if self.proto.has("SASL-IR"):
            await self.proto.command(Atom("AUTHENTICATE"), Atom("PLAIN"), response)
        else:
            await self.proto.command(
                Atom("AUTHENTICATE"), Atom("PLAIN"), continuation=response.encode("ascii")
            )

    async def examine(self, mailbox: str, *, readonly: bool = True) -> MailboxInfo:
        verb = Atom("EXAMINE" if readonly else "SELECT")
        if self.proto.has("CONDSTORE"):
            # Reports HIGHESTMODSEQ: what lets a poll of an unchanged mailbox skip its FETCH.
            response = await self.proto.command(verb, encode_mailbox(mailbox), [Atom("CONDSTORE")])
        else:
            response = await self.proto.command(verb, encode_mailbox(mailbox))
        uidvalidity, exists, keywords, uidnext, modseq = 0, 0, False, 0, 0
        for item in response.untagged:
            if isinstance(item, Data):
                if len(item.tokens) >= 2 and str(item.tokens[1]).upper() == "EXISTS":
                    exists = int(str(item.tokens[0]))
            elif not isinstance(item, Status):
                continue
            elif item.code_name == "UIDVALIDITY" and item.code and len(item.code) > 1:
                uidvalidity = int(str(item.code[1]))
            elif item.code_name == "UIDNEXT" and item.code and len(item.code) > 1:
                uidnext = int(str(item.code[1]))
            elif item.code_name == "HIGHESTMODSEQ" and item.code and len(item.code) > 1:
                modseq = int(str(item.code[1]))
            elif item.code_name == "PERMANENTFLAGS" and item.code and len(item.code) > 1:
                flags = item.code[1]
                keywords = isinstance(flags, list) and "\\*" in flags
        info = MailboxInfo(uidvalidity, exists, keywords, uidnext, modseq)
        self.selected = Selected(mailbox, readonly, info)
        return info

    async def snapshot(
        self,
        mailbox: str,
        *,
        readonly: bool = True,
        cache: SnapshotCache | None = None,
        cache_key: tuple[str, str] = ("", ""),
    ) -> tuple[MailboxInfo, Sequence[IndexedMessage]]:
        """Open ``mailbox`` and index it.

        Without a usable cached index both commands go out in one round trip (``UID FETCH
        1:*`` on an empty mailbox is simply answered OK; if the open fails, the FETCH fails
        with it and the open's error is reported). With one, the open is awaited first: if the
        mailbox is unchanged the FETCH is not needed at all.
        """
        if cache is not None and cache.known(cache_key) and self.proto.has("CONDSTORE"):
            info = await self.examine(mailbox, readonly=readonly)
            index = cache.get(cache_key, info.version)
            if index is None:
                index = self._index_entries(await self._fetch_index())
                cache.put(cache_key, info.version, index)
            return info, index
        opened = Deferred.fromCoroutine(self.examine(mailbox, readonly=readonly))
        indexed = self._fetch_index()
        try:
            info = await opened
        except BaseException:
            indexed.addErrback(lambda failure: failure.trap(ImapError))
            raise
        entries = self._index_entries(await indexed)
        if cache is not None:
            cache.put(cache_key, info.version, entries)
        return info, entries

    def _fetch_index(self) -> Deferred[Response]:
        items = [Atom("UID"), Atom("RFC822.SIZE"), Atom("FLAGS")]
        if self.proto.has("OBJECTID"):
            items.append(Atom("EMAILID"))
        return self.proto.command(Atom("UID"), Atom("FETCH"), Atom("1:*"), items)

    @staticmethod
    def _index_entries(response: Response) -> list[IndexedMessage]:
        entries: list[IndexedMessage] = []
        # Few distinct flag combinations occur in a mailbox: share one frozenset for each.
        flag_sets: dict[bytes, frozenset[str]] = {}
        for item in response.untagged:
            if isinstance(item, FetchBatch):
                for _, uid, size, raw_flags, emailid in item.rows:
                    flags = flag_sets.get(raw_flags)
                    if flags is None:
                        flags = frozenset(raw_flags.decode("utf-8", "replace").split())
                        flag_sets[raw_flags] = flags
                    entries.append(
                        IndexedMessage(int(uid), int(size), flags, emailid.decode() or None)
                    )
            elif isinstance(item, Data) and len(item.tokens) >= 3:
                entry = _indexed_from_tokens(item)
                if entry is not None:
                    entries.append(entry)
        entries.sort(key=lambda e: e.uid)
        return entries

    def fetch_body(self, uid: int, sink: BodySink) -> Deferred[Response]:
        """Stream the message to ``sink`` without setting \\Seen (BODY.PEEK)."""
        return self.fetch_bodies({uid: sink})

    def fetch_bodies(self, sinks: Mapping[int, BodySink]) -> Deferred[Response]:
        """Several messages in one command, each body to its own sink.

        The server answers in mailbox order, whatever the order of ``sinks``; a UID that no
        longer exists is left out of the answer, and its sink is never called.
        """
        uid_set = Atom(format_uid_set(sinks))
        return self.proto.command(_UID, _FETCH, uid_set, _BODY_ITEMS, sinks=sinks)

    async def add_flags(self, uids: Iterable[int], flags: Iterable[str]) -> None:
        uid_set = format_uid_set(uids)
        if uid_set:
            await self.proto.command(
                Atom("UID"),
                Atom("STORE"),
                Atom(uid_set),
                Atom("+FLAGS.SILENT"),
                [Atom(f) for f in flags],
            )

    async def list_mailboxes(self) -> list[MailboxEntry]:
        """Every mailbox with its attributes, lower-cased (Cyrus sends ``\\sent``)."""
        if self.proto.has("SPECIAL-USE"):
            response = await self.proto.command(
                Atom("LIST"), "", "*", Atom("RETURN"), [Atom("SPECIAL-USE")]
            )
        else:
            response = await self.proto.command(Atom("LIST"), "", "*")
        entries = []
        for item in response.untagged:
            if not isinstance(item, Data) or len(item.tokens) < 4:
                continue
            if str(item.tokens[0]).upper() != "LIST" or not isinstance(item.tokens[1], list):
                continue
            raw = item.tokens[3]
            name = raw if isinstance(raw, bytes) else str(raw).encode()
            attributes = frozenset(str(a).lower() for a in item.tokens[1])
            entries.append(MailboxEntry(decode_mailbox(name), attributes))
        return entries

    async def find_special_use(self, use: str) -> str | None:
        """The mailbox marked with SPECIAL-USE ``use`` (e.g. ``\\Trash``), if any."""
        wanted = use.lower()
        for entry in await self.list_mailboxes():
            if wanted in entry.attributes:
                return entry.name
        return None

    async def create_mailbox(self, name: str) -> None:
        """Create ``name`` unless it exists already."""
        try:
            await self.proto.command(Atom("CREATE"), encode_mailbox(name))
        except ImapCommandFailed as e:
            if e.status.code_name == "ALREADYEXISTS":
                return
            if any(entry.name == name for entry in await self.list_mailboxes()):
                return  # servers without RFC 5530 codes
            raise

    async def search_keyword(self, keyword: str) -> list[int]:
        response = await self.proto.command(
            Atom("UID"), Atom("SEARCH"), Atom("KEYWORD"), Atom(keyword)
        )
        return search_result(response)

    async def fetch_arrivals_all(self) -> list[tuple[int, int, datetime]]:
        """(UID, size, INTERNALDATE) of every message in the selected mailbox."""
        return await self.fetch_arrivals((), everything=True)

    async def fetch_arrivals(
        self, uids: Iterable[int], *, everything: bool = False
    ) -> list[tuple[int, int, datetime]]:
        """(UID, size, INTERNALDATE) of ``uids``: what retention decides on."""
        uid_set = "1:*" if everything else format_uid_set(uids)
        if not uid_set:
            return []
        response = await self.proto.command(
            Atom("UID"),
            Atom("FETCH"),
            Atom(uid_set),
            [Atom("UID"), Atom("RFC822.SIZE"), Atom("INTERNALDATE")],
        )
        result = []
        for fields in fetched(response):
            uid, size, date = (
                fields.get("UID"),
                fields.get("RFC822.SIZE"),
                fields.get("INTERNALDATE"),
            )
            if uid is None or size is None or not isinstance(date, bytes):
                continue
            result.append((int(str(uid)), int(str(size)), parse_internaldate(date)))
        return sorted(result)

    async def storage_quota(self, mailbox: str) -> tuple[int, int] | None:
        """(used, limit) in KiB of the STORAGE resource of ``mailbox``'s quota root, if any."""
        if not self.proto.has("QUOTA"):
            return None
        response = await self.proto.command(Atom("GETQUOTAROOT"), encode_mailbox(mailbox))
        for item in response.untagged:
            if not isinstance(item, Data) or len(item.tokens) < 3:
                continue
            if str(item.tokens[0]).upper() != "QUOTA" or not isinstance(item.tokens[2], list):
                continue
            resources = item.tokens[2]
            for i in range(0, len(resources) - 2, 3):
                if str(resources[i]).upper() == "STORAGE":
                    return int(str(resources[i + 1])), int(str(resources[i + 2]))
        return None

    async def move(self, uids: Iterable[int], target: str) -> None:
        """Move messages of the selected mailbox to ``target``: once, even across retries.

        A MOVE is not atomic on every server (Dovecot copies, then expunges): a link that
        breaks half way can leave copies in ``target`` with the sources still here, and the
        retry would copy them again. So messages move in batches of MOVE_BATCH, each marked
        with MOVE_MARKER first (copies carry it). Sources found already marked may have a copy
        in ``target`` from an attempt that was cut off; those whose copy is there (marked, same
        Message-ID, size and INTERNALDATE) are expunged instead of moved again. A source without
        a Message-ID is moved again: a possible duplicate, never a loss. Where keywords cannot
        be stored, batches are moved without this safeguard.
        """
        selected = self.selected
        guarded = selected is not None and not selected.readonly and selected.info.keywords_allowed
        ordered = sorted(set(uids))
        for i in range(0, len(ordered), MOVE_BATCH):
            batch = ordered[i : i + MOVE_BATCH]
            if guarded:
                assert selected is not None
                copied = await self._copied_before(batch, selected.name, target)
                if copied:
                    await self.expunge(copied)
                    batch = [uid for uid in batch if uid not in copied]
                await self.add_flags(batch, [MOVE_MARKER])
            await self._move_batch(batch, target)

    async def _move_batch(self, uids: list[int], target: str) -> None:
        """UID MOVE where offered; else COPY, flag and UID EXPUNGE of exactly these UIDs;
        without UIDPLUS the originals are left flagged \\Deleted rather than risk a plain
        EXPUNGE."""
        uid_set = Atom(format_uid_set(uids))
        if not uid_set:
            return
        if self.proto.has("MOVE"):
            await self.proto.command(Atom("UID"), Atom("MOVE"), uid_set, encode_mailbox(target))
            return
        await self.proto.command(Atom("UID"), Atom("COPY"), uid_set, encode_mailbox(target))
        await self.expunge(uids)

    async def _copied_before(self, batch: list[int], source: str, target: str) -> set[int]:
        """Those of ``batch`` an interrupted earlier move already copied to ``target``.

        Leaves ``source`` selected read-write again.
        """
        response = await self.proto.command(
            Atom("UID"),
            Atom("SEARCH"),
            Atom("UID"),
            Atom(format_uid_set(batch)),
            Atom("KEYWORD"),
            Atom(MOVE_MARKER),
        )
        suspects = search_result(response)
        if not suspects:
            return set()
        sources = await self._identities(suspects)
        if not sources:
            return set()
        await self.examine(target)
        try:
            searches = [
                self.proto.command(
                    Atom("UID"),
                    Atom("SEARCH"),
                    Atom("KEYWORD"),
                    Atom(MOVE_MARKER),
                    Atom("HEADER"),
                    "Message-ID",
                    mid,
                )
                for mid in sorted({identity[0] for identity in sources.values()})
            ]
            found = sorted({uid for r in await gatherResults(searches) for uid in search_result(r)})
            copies = (await self._identities(found)).values()
        finally:
            await self.examine(source, readonly=False)
        return sources_with_copies(sources, copies)

    async def _identities(self, uids: list[int]) -> dict[int, Identity]:
        """UID → (Message-ID, RFC822.SIZE, INTERNALDATE) of those of ``uids`` that have a
        Message-ID: what a copy shares with its original."""
        if not uids:
            return {}
        headers = {uid: BodyCollector() for uid in uids}
        response = await self.proto.command(
            Atom("UID"),
            Atom("FETCH"),
            Atom(format_uid_set(uids)),
            Atom("(UID RFC822.SIZE INTERNALDATE BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])"),
            sinks=headers,
        )
        result = {}
        for fields in fetched(response):
            uid, size = fields.get("UID"), fields.get("RFC822.SIZE")
            date = fields.get("INTERNALDATE")
            if uid is None or size is None or not isinstance(date, bytes | str):
                continue
            collector = headers.get(int(str(uid)))
            found = message_id(b"".join(collector.bodies)) if collector else ""
            if found:
                date_bytes = date if isinstance(date, bytes) else date.encode()
                result[int(str(uid))] = (found, int(str(size)), date_bytes)
        return result

    async def expunge(self, uids: Iterable[int]) -> bool:
        """Remove exactly ``uids``; False when the server lacks UIDPLUS and they stay flagged
        \\Deleted (hidden from POP, visible to IMAP clients, gone at the next expunge)."""
        uids = list(uids)
        uid_set = format_uid_set(uids)
        if not uid_set:
            return True
        await self.add_flags(uids, ["\\Deleted"])
        if not self.proto.has("UIDPLUS"):
            return False
        await self.proto.command(Atom("UID"), Atom("EXPUNGE"), Atom(uid_set))
        return True

    async def get_metadata(
        self, mailbox: str, entries: Sequence[str], *, depth: str = "0", max_size: int = 0
    ) -> Metadata:
        """RFC 5464 GETMETADATA: the values of ``entries`` of ``mailbox`` (with ``depth`` "1" or
        "infinity", of the entries below them too). Values over ``max_size`` octets (when > 0)
        are left out; ``Metadata.long_entries`` is then the size of the largest of them."""
        options: list[CommandPart] = []
        if max_size > 0:
            options += [Atom("MAXSIZE"), max_size]
        if depth != "0":
            options += [Atom("DEPTH"), Atom(depth)]
        parts: list[CommandPart] = [Atom("GETMETADATA")]
        if options:
            parts.append(options)
        parts += [encode_mailbox(mailbox), list(entries)]
        response = await self.proto.command(*parts)
        values: dict[str, bytes] = {}
        streamed: list[str] = []
        for item in response.untagged:
            if not isinstance(item, Data) or len(item.tokens) < 3:
                continue
            if str(item.tokens[0]).upper() != "METADATA" or not isinstance(item.tokens[2], list):
                continue
            pairs = item.tokens[2]
            for i in range(0, len(pairs) - 1, 2):
                name, value = pairs[i], pairs[i + 1]
                if not isinstance(name, (str, bytes)):
                    continue
                text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
                if isinstance(value, bytes):
                    values[text.lower()] = value
                elif isinstance(value, StreamedLiteral):
                    streamed.append(text.lower())  # too large to keep: its bytes were dropped
        long_entries = 0
        status = response.status
        if status.code_name == "METADATA" and status.code and len(status.code) >= 3:
            if str(status.code[1]).upper() == "LONGENTRIES" and str(status.code[2]).isdigit():
                long_entries = int(str(status.code[2]))
        return Metadata(values, long_entries, streamed)

    async def set_metadata(self, mailbox: str, values: Mapping[str, bytes | None]) -> None:
        """RFC 5464 SETMETADATA: set each entry (``None`` removes it), in one command (Dovecot
        applies it as one transaction). Values always go as literals: a quoted value over
        Cyrus's ``maxquoted`` ends the connection. Fails with ImapCommandFailed; its status code
        tells ``METADATA MAXSIZE n``, ``METADATA TOOMANY`` or ``METADATA NOPRIVATE``."""
        pairs: list[CommandPart] = []
        for name, value in values.items():
            pairs += [name, Atom("NIL") if value is None else Literal(value)]
        if pairs:
            await self.proto.command(Atom("SETMETADATA"), encode_mailbox(mailbox), pairs)

    async def mailbox_messages(self, mailbox: str) -> int | None:
        """STATUS MESSAGES of ``mailbox``; None when it does not exist (or cannot be read)."""
        try:
            response = await self.proto.command(
                Atom("STATUS"), encode_mailbox(mailbox), [Atom("MESSAGES")]
            )
        except ImapCommandFailed:
            return None
        for item in response.untagged:
            if isinstance(item, Data) and len(item.tokens) >= 3:
                if str(item.tokens[0]).upper() == "STATUS" and isinstance(item.tokens[2], list):
                    attrs = item.tokens[2]
                    for i in range(0, len(attrs) - 1, 2):
                        if str(attrs[i]).upper() == "MESSAGES" and str(attrs[i + 1]).isdigit():
                            return int(str(attrs[i + 1]))
        return None

    async def delete_mailbox(self, name: str) -> None:
        await self.proto.command(Atom("DELETE"), encode_mailbox(name))

    async def unselect(self) -> None:
        """Leave the selected mailbox without expunging (UNSELECT, RFC 3691); else EXAMINE
        INBOX read-only, which has the same effect on the selection."""
        if self.proto.has("UNSELECT"):
            await self.proto.command(Atom("UNSELECT"))
        else:
            await self.examine("INBOX")

    async def logout(self) -> None:
        try:
            await self.proto.command(Atom("LOGOUT"))
        except ImapError:
            pass
        finally:
            if self.proto.transport is not None:
                self.proto.transport.loseConnection()

    def abort(self) -> None:
        _abort(self.proto)


@dataclass(frozen=True, slots=True)
class Metadata:
    """What GETMETADATA returned: entry name (lower-cased) → value; NIL entries are left out."""

    values: dict[str, bytes]
    long_entries: int = 0  # [METADATA LONGENTRIES n]: the largest value left out over MAXSIZE
    # Entries whose values came as literals too large to keep (over the parser's stream
    # threshold, 64 KiB): named, their bytes dropped unread.
    streamed: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class MailboxEntry:
    name: str
    attributes: frozenset[str]  # lower-cased, e.g. "\\trash", "\\hasnochildren"


def fetched(response: Response) -> Iterator[dict[str, Token]]:
    """The items of each FETCH line of ``response`` (keys upper-cased), in the order sent."""
    for item in response.untagged:
        if isinstance(item, Data) and len(item.tokens) >= 3:
            if str(item.tokens[1]).upper() == "FETCH":
                yield fetch_items(item.tokens)[1]


def search_result(response: Response) -> list[int]:
    uids: list[int] = []
    for item in response.untagged:
        if isinstance(item, Data) and item.tokens and str(item.tokens[0]).upper() == "SEARCH":
            uids.extend(int(str(t)) for t in item.tokens[1:] if str(t).isdigit())
    return sorted(uids)


def parse_internaldate(raw: bytes) -> datetime:
    """``17-Jul-1996 02:44:25 -0700`` → an aware datetime (RFC 3501 date-time)."""
    return datetime.strptime(raw.decode("ascii").strip(), "%d-%b-%Y %H:%M:%S %z")


def _indexed_from_tokens(item: Data) -> IndexedMessage | None:
    """The slow path for FETCH lines the parser's fast path did not take (other item order)."""
    if str(item.tokens[1]).upper() != "FETCH":
        return None
    _, fields = fetch_items(item.tokens)
    uid, size = fields.get("UID"), fields.get("RFC822.SIZE")
    if uid is None or size is None:
        return None
    flags = fields.get("FLAGS")
    return IndexedMessage(
        int(str(uid)),
        int(str(size)),
        frozenset(str(f) for f in flags) if isinstance(flags, list) else frozenset(),
        _first_str(fields.get("EMAILID")),
    )


def _first_str(token: Token) -> str | None:
    if isinstance(token, list):
        token = token[0] if token else None
    if isinstance(token, bytes):
        return token.decode("ascii", "replace")
    return str(token) if token is not None else None


Identity = tuple[str, int, bytes]  # Message-ID, RFC822.SIZE, INTERNALDATE


def sources_with_copies(sources: Mapping[int, Identity], copies: Iterable[Identity]) -> set[int]:
    """The UIDs of ``sources`` that one of ``copies`` stands for; each copy stands for one
    source only (two sources with the same identity need two copies)."""
    available = Counter(copies)
    matched = set()
    for uid, identity in sorted(sources.items()):
        if available[identity] > 0:
            available[identity] -= 1
            matched.add(uid)
    return matched


def message_id(header: bytes) -> str:
    """The Message-ID in a ``HEADER.FIELDS (MESSAGE-ID)`` answer, unfolded; "" if none."""
    text = header.decode("utf-8", "replace").replace("\r\n ", " ").replace("\r\n\t", " ")
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "message-id":
            return value.strip()
    return ""
