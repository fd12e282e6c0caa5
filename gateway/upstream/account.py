"""One user's logged-in connection to the upstream IMAP server, and the operations POP needs.

Connection set-up (implicit TLS, STARTTLS or clear), login (SASL PLAIN or LOGIN, never with user
input pasted into the command) and mailbox operations. Errors come out as the specific exception
types below, so the POP3 layer can turn each into the right response code in one place.
"""

from __future__ import annotations

import base64
import operator
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from twisted.internet import defer
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectError, TimeoutError
from twisted.internet.interfaces import IAddress, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory

from gateway.config import ImapUpstream
from gateway.maildrop.index_flights import Flight, IndexFlights, Landed, same_mailbox
from gateway.maildrop.snapshot_cache import MailboxVersion, SnapshotCache
from gateway.maildrop.uidl import IndexedMessage, MailboxIndex
from gateway.maildrop.uidset import format_uid_set
from gateway.proto import imap_responses as decode
from gateway.proto import sasl
from gateway.proto.imap import (
    Atom,
    CommandPart,
    Literal,
    encode_mailbox,
)
from gateway.proto.imap_responses import MailboxEntry, Metadata
from gateway.tls import ResumingClientTLS, upstream_tls
from gateway.upstream.imap_client import (
    BodyCollector,
    BodySink,
    ImapClientProtocol,
    ImapCommandFailed,
    ImapConnectionLost,
    ImapError,
    ReadObserver,
    Response,
)
from gateway.upstream.tls_transport import connect_tls

# TCP connect only. The TLS handshake and the greeting that follows are an IMAP response like
# any other and wait up to [upstream.imap] timeout: a server forking a login process per
# connection can take longer than this to greet a burst of a thousand logins.
CONNECT_TIMEOUT = 15.0
# Login may involve a slow password backend upstream, but a device should not hang for ever.
LOGIN_TIMEOUT = 60.0
# Sent once per downloaded message, so built once. UID first in the request: servers that
# answer in request order (Dovecot, Cyrus) then name the message before its literal begins, so
# pipelined bodies go to the right sink and stream without being collected first.
_BY_UID = operator.attrgetter("uid")
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


class TokenRejected(LoginRejected):
    """The server refused an OAuth access token (expired, revoked): a fresh one may work.

    A refusal whose error challenge names another cause (``insufficient_scope``) is a plain
    LoginRejected: a fresh token would be refused the same way.
    """


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


class _OneConnection(Factory):
    """Hands one protocol instance to the endpoint, once.

    Twisted's ``connectProtocol`` does the same with a class made per call, and a class is a
    reference cycle: the protocol in its closure, and so the whole session, would then wait for
    the cyclic collector instead of going when its connection closes.
    """

    noisy = False

    def __init__(self, protocol: ImapClientProtocol) -> None:
        self._protocol: ImapClientProtocol | None = protocol

    def buildProtocol(self, addr: IAddress | None) -> ImapClientProtocol | None:
        protocol, self._protocol = self._protocol, None
        return protocol


async def connect(reactor: IReactorTime, settings: ImapUpstream) -> ImapClientProtocol:
    """Connect and, for STARTTLS, secure the connection; fails with UpstreamUnavailable."""
    tls: ResumingClientTLS | None = None
    if settings.security != "none":
        tls = upstream_tls(
            settings.host, settings.port, settings.verify_certificate, settings.ca_file
        )
    endpoint: IStreamClientEndpoint = HostnameEndpoint(
        reactor, settings.host, settings.port, timeout=CONNECT_TIMEOUT
    )
    proto = ImapClientProtocol(reactor, settings.timeout)
    try:
        factory = _OneConnection(proto)
        if tls is not None and settings.security == "tls":
            await connect_tls(endpoint, tls, factory)  # whole reads, not records, to the parser
        else:
            await endpoint.connect(factory)
        greeting_timeout = settings.timeout or CONNECT_TIMEOUT
        await _with_timeout(
            proto.greeting, reactor, greeting_timeout, f"greeting from IMAP server {settings.host}"
        )
        if tls is not None and settings.security == "starttls":
            if not proto.capabilities:
                await proto.command(Atom("CAPABILITY"))
            if not proto.has("STARTTLS"):
                raise UpstreamUnavailable("IMAP server does not offer STARTTLS")
            await proto.command(Atom("STARTTLS"))
            proto.start_tls(tls)
        if not proto.capabilities or settings.security == "starttls":
            await proto.command(Atom("CAPABILITY"))
        if tls is not None:  # the server has answered over TLS: its session is good to resume
            tls.remember(proto.transport)
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


async def _with_timeout(d: Deferred, reactor: IReactorTime, seconds: float, what: str) -> object:
    """``d``'s result, or UpstreamUnavailable naming ``what`` did not come in time."""
    d.addTimeout(seconds, reactor)
    try:
        return await d
    except defer.TimeoutError as e:
        raise UpstreamUnavailable(f"no {what} within {seconds:g}s") from e


@dataclass(frozen=True, slots=True)
class Selected:
    name: str
    readonly: bool
    info: MailboxInfo


class ImapAccount:
    """A logged-in connection; each POP session owns one."""

    def __init__(self, proto: ImapClientProtocol, user: str = "") -> None:
        self.proto = proto
        self.user = user  # whose mailboxes these are (the authorization identity, if any)
        # Where the last snapshot's index came from: "fetched" on this connection, "shared"
        # (another session's fetch, index_flights.py) or "cached" (snapshot_cache.py).
        self.index_source = ""
        # The mailbox open now, as the server sees it: None before the first EXAMINE/SELECT,
        # while one runs, after one failed (which closes the old one) and after UNSELECT.
        self.selected: Selected | None = None

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
    async def open_oauth(
        cls,
        reactor: IReactorTime,
        settings: ImapUpstream,
        username: str,
        token: str,
        mechanism: str,
        client_ip: str | None = None,
    ) -> ImapAccount:
        """Log in as ``username`` with an OAuth 2.0 access token (SASL XOAUTH2 or OAUTHBEARER).

        Raises TokenRejected when the server refuses the token itself.
        """
        proto = await connect(reactor, settings)
        account = cls(proto, username)
        try:
            login = account._login_oauth(username, token, mechanism, settings, client_ip)
            await _with_timeout(
                Deferred.fromCoroutine(login), reactor, LOGIN_TIMEOUT, "login answer"
            )
        except BaseException:
            _abort(proto)
            raise
        return account

    async def _login_oauth(
        self,
        username: str,
        token: str,
        mechanism: str,
        settings: ImapUpstream,
        client_ip: str | None,
    ) -> None:
        """AUTHENTICATE with the token: SASL-IR where offered, else after the server's ``+``.

        A server refusing the token sends an error challenge first; it is answered (empty for
        XOAUTH2, ^A for OAUTHBEARER) so the server finishes with its NO, and decoded to tell a
        refused token from other failures.
        """
        proto = self.proto
        name = mechanism.upper()
        if not proto.has(f"AUTH={name}"):
            raise UpstreamUnavailable(f"IMAP server does not offer AUTH={name}")
        try:
            blob = sasl.oauth_response(name, username, token, settings.host, settings.port)
        except sasl.UnusableCredential as e:
            raise LoginRejected(str(e)) from None
        if client_ip and proto.has("ID"):
            ident = proto.command(Atom("ID"), ["x-originating-ip", client_ip])
            ident.addErrback(lambda failure: failure.trap(ImapError))
        response = base64.b64encode(blob)
        after_error = base64.b64encode(sasl.oauth_error_reply(name))
        try:
            if proto.has("SASL-IR"):
                await proto.command(
                    Atom("AUTHENTICATE"),
                    Atom(name),
                    Atom(response.decode("ascii")),
                    continuation=after_error,
                )
            else:
                # Two continuations may come: "+ " for the response, then an error challenge.
                await proto.command(
                    Atom("AUTHENTICATE"), Atom(name), continuation=(response, after_error)
                )
        except ImapCommandFailed as e:
            if e.status.code_name in ("UNAVAILABLE", "SERVERBUG", "LIMIT", "INUSE"):
                raise UpstreamUnavailable(f"IMAP login deferred: {e.status.text}") from e
            challenges = e.challenges if proto.has("SASL-IR") else e.challenges[1:]
            failure = sasl.parse_oauth_challenge(challenges[-1]) if challenges else None
            if failure is None or failure.token_rejected:
                # No challenge at all (a server answering NO straight away) is taken as a
                # refused token too: the one retry with a fresh token settles it.
                raise TokenRejected(f"access token refused: {e.status.text}") from e
            raise LoginRejected(f"OAuth login refused ({failure.status}): {e.status.text}") from e
        except ImapConnectionLost as e:
            raise UpstreamUnavailable(str(e)) from e
        if not proto.capabilities or not any(c.startswith("IMAP4") for c in proto.capabilities):
            await proto.command(Atom("CAPABILITY"))

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
        account = cls(proto, authzid or username)
        try:
            login = account._login(authzid, username, password, client_ip)
            await _with_timeout(
                Deferred.fromCoroutine(login), reactor, LOGIN_TIMEOUT, "login answer"
            )
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

    async def examine(self, mailbox: str) -> MailboxInfo:
        """Open ``mailbox`` read-only (EXAMINE): nothing done there changes \\Recent or flags."""
        return await self.open_mailbox(mailbox, readonly=True)

    async def select(self, mailbox: str) -> MailboxInfo:
        """Open ``mailbox`` read-write (SELECT): for flags, moves, expunges and APPENDs."""
        return await self.open_mailbox(mailbox, readonly=False)

    async def open_mailbox(self, mailbox: str, *, readonly: bool) -> MailboxInfo:
        """EXAMINE (``readonly``) or SELECT ``mailbox``; remembered as ``selected``.

        ``selected`` is None while the command runs and stays None if it fails: a failed
        EXAMINE or SELECT closes the mailbox that was open before (RFC 3501 6.3.1, ``[CLOSED]``
        in RFC 7162), so nothing is selected any more.
        """
        verb = Atom("EXAMINE" if readonly else "SELECT")
        self.selected = None
        if self.proto.has("CONDSTORE"):
            # Reports HIGHESTMODSEQ: what lets a poll of an unchanged mailbox skip its FETCH.
            response = await self.proto.command(verb, encode_mailbox(mailbox), [Atom("CONDSTORE")])
        else:
            response = await self.proto.command(verb, encode_mailbox(mailbox))
        info = MailboxInfo(*decode.opened_mailbox(response))
        self.selected = Selected(mailbox, readonly, info)
        return info

    async def snapshot(
        self,
        mailbox: str,
        *,
        readonly: bool = True,
        cache: SnapshotCache | None = None,
        cache_key: tuple[str, str] = ("", ""),
        flights: IndexFlights | None = None,
        since: int = 0,
    ) -> tuple[MailboxInfo, Sequence[IndexedMessage]]:
        """Open ``mailbox`` and index it.

        Without a usable cached index both commands go out in one round trip (``UID FETCH
        1:*`` on an empty mailbox is simply answered OK; if the open fails, the FETCH fails
        with it and the open's error is reported). With one, the open is awaited first: if the
        mailbox is unchanged the FETCH is not needed at all.

        ``flights``: index fetches of other sessions in flight (index_flights.py). One of
        ``cache_key`` sent after ``since`` (this login's tick) is joined instead of sending
        another: this session's own open runs meanwhile, and if it saw the mailbox the
        leader saw, the leader's index is this session's too.
        """
        flight = flights.joinable(cache_key, since) if flights is not None else None
        if flight is not None:
            landed: Deferred[Landed | None] = Deferred()
            flight.wait(landed.callback)
            info = await self.open_mailbox(mailbox, readonly=readonly)
            shared = await landed
            if shared is not None and same_mailbox(shared[0], info.version):
                self.index_source = "shared"
                return info, shared[1]
            return info, await self._own_index(info, cache, cache_key, flights)
        if cache is not None and cache.known(cache_key) and self.proto.has("CONDSTORE"):
            info = await self.open_mailbox(mailbox, readonly=readonly)
            index = cache.get(cache_key, info.version)
            self.index_source = "cached"
            if index is None:
                index = await self._own_index(info, cache, cache_key, flights)
            return info, index
        opened = Deferred.fromCoroutine(self.open_mailbox(mailbox, readonly=readonly))
        indexed = self._fetch_index()
        started = flights.start(cache_key) if flights is not None else None
        try:
            try:
                info = await opened
            except BaseException:
                indexed.addErrback(lambda failure: failure.trap(ImapError))
                raise
            entries = self._index_entries(await indexed)
        except BaseException:
            if started is not None:
                started.fail()
            raise
        _publish_index(started, cache, cache_key, info.version, entries)
        return info, entries

    async def _own_index(
        self,
        info: MailboxInfo,
        cache: SnapshotCache | None,
        cache_key: tuple[str, str],
        flights: IndexFlights | None,
    ) -> Sequence[IndexedMessage]:
        """The index fetched on this connection, the mailbox being open at ``info``; shared
        with the logins that join it meanwhile."""
        indexed = self._fetch_index()
        started = flights.start(cache_key) if flights is not None else None
        try:
            entries = self._index_entries(await indexed)
        except BaseException:
            if started is not None:
                started.fail()
            raise
        _publish_index(started, cache, cache_key, info.version, entries)
        return entries

    def _fetch_index(self) -> Deferred[Response]:
        self.index_source = "fetched"
        items = [Atom("UID"), Atom("RFC822.SIZE"), Atom("FLAGS")]
        if self.proto.has("OBJECTID"):
            items.append(Atom("EMAILID"))
        return self.proto.command(Atom("UID"), Atom("FETCH"), Atom("1:*"), items)

    @staticmethod
    def _index_entries(response: Response) -> MailboxIndex:
        entries = decode.index_rows(response, IndexedMessage)
        entries.sort(key=_BY_UID)  # servers answer in UID order: one pass, no Python calls
        return MailboxIndex(entries)

    @property
    def producer(self) -> ImapClientProtocol:
        """What to pause while the reader of the bodies is slow (a push producer): the IMAP
        client, which pauses its transport and stops its response timer meanwhile."""
        return self.proto

    def observe_reads(self, observer: ReadObserver | None) -> None:
        """Tell ``observer`` when each read from upstream starts and ends being handled."""
        self.proto.read_observer = observer

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
        return decode.listed_mailboxes(response)

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

    def offers(self, capability: str) -> bool:
        """Whether the server announced ``capability`` (e.g. ``METADATA``)."""
        return self.proto.has(capability)

    async def search_header(
        self, header: str, value: str, *, charset: str | None = None
    ) -> list[int]:
        """UIDs in the selected mailbox whose ``header`` contains ``value`` (UID SEARCH
        HEADER), sorted; ``charset`` (e.g. "UTF-8") names the charset of a non-ASCII value."""
        parts: list[CommandPart] = [Atom("UID"), Atom("SEARCH")]
        if charset is not None:
            parts += [Atom("CHARSET"), Atom(charset)]
        response = await self.proto.command(*parts, Atom("HEADER"), header, value)
        return decode.search_result(response)

    async def fetch_sizes(self, uids: Sequence[int]) -> list[tuple[int, int]]:
        """(UID, RFC822.SIZE) of those of ``uids`` that exist, in the server's order."""
        response = await self.proto.command(
            Atom("UID"),
            Atom("FETCH"),
            Atom(",".join(str(u) for u in uids)),
            [Atom("UID"), Atom("RFC822.SIZE")],
        )
        return list(decode.sizes(response))

    async def fetch_body_prefixes(self, sinks: Mapping[int, BodySink], octets: int) -> None:
        """The first ``octets`` of the body of each UID of ``sinks``, to its sink (without
        setting \\Seen); a UID that no longer exists is left out."""
        await self.proto.command(
            Atom("UID"),
            Atom("FETCH"),
            Atom(",".join(str(u) for u in sinks)),
            [Atom("UID"), Atom(f"BODY.PEEK[]<0.{octets}>")],
            sinks=sinks,
        )

    async def append(
        self,
        mailbox: str,
        message: bytes,
        flags: Sequence[str] = (),
        internaldate: str | None = None,
    ) -> str | None:
        """APPEND ``message`` to ``mailbox``; the UID the server gave it (APPENDUID), if told.
        Fails with ImapCommandFailed (``TRYCREATE`` when the mailbox does not exist)."""
        parts: list[CommandPart] = [Atom("APPEND"), encode_mailbox(mailbox)]
        if flags:
            parts.append([Atom(f) for f in flags])
        if internaldate is not None:
            parts.append(internaldate)
        response = await self.proto.command(*parts, message)
        return decode.appended_uid(response.status)

    async def expunge_deleted(self) -> None:
        """A plain EXPUNGE: removes *every* message flagged \\Deleted in the selected mailbox.
        Only for mailboxes that hold nothing but the gateway's own messages."""
        await self.proto.command(Atom("EXPUNGE"))

    async def search_keyword(self, keyword: str) -> list[int]:
        response = await self.proto.command(
            Atom("UID"), Atom("SEARCH"), Atom("KEYWORD"), Atom(keyword)
        )
        return decode.search_result(response)

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
        return decode.arrivals(response)

    async def storage_quota(self, mailbox: str) -> tuple[int, int] | None:
        """(used, limit) in KiB of the STORAGE resource of ``mailbox``'s quota root, if any."""
        if not self.proto.has("QUOTA"):
            return None
        response = await self.proto.command(Atom("GETQUOTAROOT"), encode_mailbox(mailbox))
        return decode.storage_quota(response)

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
        suspects = decode.search_result(response)
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
            found = sorted(
                {uid for r in await gatherResults(searches) for uid in decode.search_result(r)}
            )
            copies = (await self._identities(found)).values()
        finally:
            await self.select(source)
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
        for uid, size, date in decode.sizes_and_dates(response):
            collector = headers.get(uid)
            found = message_id(b"".join(collector.bodies)) if collector else ""
            if found:
                result[uid] = (found, size, date)
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
        return decode.metadata(await self.proto.command(*parts))

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
            return await self.count_messages(mailbox)
        except ImapCommandFailed:
            return None

    async def count_messages(self, mailbox: str) -> int | None:
        """STATUS MESSAGES of ``mailbox`` (None if the answer lacks it), without opening it:
        the selected mailbox stays selected. Fails with ImapCommandFailed when the server
        refuses (no such mailbox)."""
        response = await self.proto.command(
            Atom("STATUS"), encode_mailbox(mailbox), [Atom("MESSAGES")]
        )
        return decode.status_messages(response)

    async def delete_mailbox(self, name: str) -> None:
        await self.proto.command(Atom("DELETE"), encode_mailbox(name))

    async def unselect(self) -> None:
        """Leave the selected mailbox without expunging (UNSELECT, RFC 3691); else EXAMINE
        INBOX read-only, which has the same effect on the selection."""
        if self.proto.has("UNSELECT"):
            await self.proto.command(Atom("UNSELECT"))
            self.selected = None
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


def _publish_index(
    started: Flight | None,
    cache: SnapshotCache | None,
    cache_key: tuple[str, str],
    version: MailboxVersion,
    entries: MailboxIndex,
) -> None:
    """Hand a fetched index to the logins waiting on its flight and to the snapshot cache."""
    if started is not None:
        started.land(version, entries)
    if cache is not None:
        cache.put(cache_key, version, entries)
