"""Where a POP3 session meets the upstream mailbox: login, snapshot, download, UPDATE.

``MaildropService`` is shared by all sessions; ``Pop3Mailbox`` belongs to one session and
owns its IMAP connection.

Sessions of one user and device may run at the same time, here or on other replicas: there is
no lock to take, so a device whose old connection vanished without a FIN logs in again at once.
That is safe because nothing a session writes upstream depends on another session of the same
device: every UPDATE step is idempotent (flags, UID MOVE/EXPUNGE of UIDs that may be gone
already) and the per-device state is merged with what is stored at every write
(``device_store.save``: read, merge, append, then remove only the copies it read).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred

from gateway.config import Config
from gateway.maildrop.device_state import DeviceState
from gateway.maildrop.index_flights import IndexFlights
from gateway.maildrop.login import Login
from gateway.maildrop.numbering import Maildrop, MessageInfo
from gateway.maildrop.policy import DeletePolicy, expire_capability, policy_for
from gateway.maildrop.snapshot_cache import SnapshotCache
from gateway.maildrop.uidl import IndexedMessage, build_maildrop, needs_state
from gateway.metrics import DISCARD, Metrics
from gateway.retention import RetentionService
from gateway.upstream import device_store
from gateway.upstream.account import ImapAccount, MailboxInfo, UpstreamUnavailable
from gateway.upstream.folders import resolve_folder
from gateway.upstream.imap_client import (
    BodySink,
    ImapCommandFailed,
    ImapError,
    ReadObserver,
    Response,
)
from gateway.upstream.logins import UpstreamLogins

log = logging.getLogger("popgate.pop3")

# A login, or a session that downloaded nothing new, rewrites its device's state only to say
# the device was seen, and at most this often (seconds): inactivity is counted in days.
LAST_SEEN_EVERY = 3600


class UpdateFailed(Exception):
    """The UPDATE did not complete; ``str(self)`` says what was not done."""


class MaildropService:
    def __init__(
        self,
        reactor: Any,
        config: Config,
        metrics: Metrics = DISCARD,
        logins: UpstreamLogins | None = None,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.metrics = metrics
        self.logins = logins or UpstreamLogins(reactor, config.upstream.imap)
        self.policy: DeletePolicy = policy_for(config.pop3.on_delete)
        # What each device downloaded, and when it was last seen, matter only to retention:
        # where a message can stay after one device deleted it (hide, seen) and retention
        # waits for the others, or where it leaves once all downloaded it. Otherwise a QUIT
        # writes nothing it did not write before.
        retention = config.retention
        self.tracks_devices = retention.after_all_devices_days > 0 or (
            retention.enabled and retention.wait_for_devices and self.policy.hide_for_device
        )
        self.retention = RetentionService(reactor, config, metrics, self.logins)
        retention = config.retention
        self.capabilities = (
            expire_capability(
                retention.delete_after_days,
                retention.quota_high_percent,
                retention.after_all_devices_days,
            ),
        )
        limit = config.pop3.snapshot_cache_messages
        self.snapshots = SnapshotCache(limit) if limit else None
        # Index fetches under way, shared with logins of the same mailbox that wait for one.
        self.index_flights = IndexFlights()

    def parse_login(self, name: str) -> Login:
        return Login.parse(name, self.config.pop3.device_separator)

    async def open(self, login: Login, password: str, peer_ip: str | None) -> Pop3Mailbox:
        """Log in upstream and take the snapshot; raises LoginRejected, UpstreamUnavailable
        and, with OAuth, gateway.oauth.errors.OAuthError."""
        key = (login.user, self.config.pop3.mailbox)
        since = self.index_flights.login(key)  # only index fetches sent after this serve it
        try:
            account = await self.logins.device(login.user, password, peer_ip)
            try:
                return await self._snapshot(account, login, since)
            except BaseException:
                account.abort()
                raise
        finally:
            self.index_flights.logged_in(key)

    async def _snapshot(self, account: ImapAccount, login: Login, since: int) -> Pop3Mailbox:
        mailbox = self.config.pop3.mailbox
        # Read-only unless RETR must set \Seen: nothing can change upstream by accident.
        readonly = self.config.pop3.on_retrieve == "keep"
        # An EXAMINE reports no PERMANENTFLAGS, so after one the state is always read
        # (needs_state): its first command can go out with the EXAMINE and the index FETCH.
        ahead = (
            device_store.ask_ahead(account, self.config.pop3)
            if readonly or self.tracks_devices
            else None
        )
        try:
            info, index = await account.snapshot(
                mailbox,
                readonly=readonly,
                cache=self.snapshots,
                cache_key=(login.user, mailbox),
                flights=self.index_flights,
                since=since,
            )
            self.metrics.pop3_indexes.labels(account.index_source).inc()
            state = None
            hides = needs_state(index, info.keywords_allowed)
            if hides or self.tracks_devices:
                state = await device_store.load(
                    account,
                    self.config.pop3,
                    mailbox,
                    login.device,
                    uidvalidity=info.uidvalidity,
                    uidnext=info.uidnext,
                    ahead=ahead,
                )
                if self.tracks_devices:
                    await self._record_login(account, state, info, index)
                await self._reopen(account, mailbox, readonly, info)
        except UpstreamUnavailable:
            raise
        except ImapError as e:
            raise UpstreamUnavailable(f"cannot open {mailbox}: {e}") from e
        return Pop3Mailbox(self, account, login, info, index, state, hides=hides)

    @staticmethod
    async def _reopen(
        account: ImapAccount, mailbox: str, readonly: bool, info: MailboxInfo
    ) -> None:
        """Open ``mailbox`` again if reading or writing the device state left another one
        selected (the state mailbox), or none (a failed EXAMINE closes the open mailbox).
        METADATA and a STATUS leave it open: then nothing is sent. The snapshot stays valid
        only while the UIDVALIDITY is the one it was taken under."""
        now = account.selected
        if now is not None and now.name == mailbox and now.readonly == readonly:
            opened = now.info
        else:
            opened = await account.open_mailbox(mailbox, readonly=readonly)
        if opened.uidvalidity != info.uidvalidity:
            raise UpstreamUnavailable(f"{mailbox} changed its UIDVALIDITY during login")

    async def _record_login(
        self,
        account: ImapAccount,
        state: DeviceState,
        info: MailboxInfo,
        index: Sequence[IndexedMessage],
    ) -> None:
        """Record that the device logged in, so that from now on it holds back what it has
        not downloaded, even if this session never reaches QUIT. At most one write per
        ``LAST_SEEN_EVERY``, as at QUIT. A refused write only costs retention's knowledge."""
        now = int(self.reactor.seconds())
        if now - state.last_seen < LAST_SEEN_EVERY:
            return
        before = state.last_seen
        state.seen(now)
        newer_from = info.uidnext or max((m.uid for m in index), default=0) + 1
        try:
            await device_store.save(account, self.config.pop3, state, index, newer_from)
        except ImapCommandFailed as e:
            state.last_seen = before  # QUIT tries again
            log.warning("device %r: login not recorded: %s", state.device, e)


class Pop3Mailbox:
    """One POP3 session's mailbox: its IMAP connection, the snapshot taken at login, the
    numbered maildrop built from it, and the device's state."""

    def __init__(
        self,
        service: MaildropService,
        account: ImapAccount,
        login: Login,
        info: MailboxInfo,
        index: Sequence[IndexedMessage],
        state: DeviceState | None,
        *,
        hides: bool = True,
    ) -> None:
        """``hides``: whether ``state`` decides what the device sees (else it was read only
        to record the login: a message without the keyword is never hidden, see uidl.py)."""
        self.service = service
        self.account = account
        self.login = login
        self.uidvalidity = info.uidvalidity
        self.uidnext = info.uidnext  # at the snapshot; 0 if the server did not say
        self.index = index
        self.state = state
        # The numbered messages the POP session sees (RFC 1939 maildrop).
        self.numbered: Maildrop = build_maildrop(index, self.uidvalidity, state if hides else None)
        self.downloads: list[int] = []  # UIDs whose whole body a RETR sent, this session
        self._closed = False

    @property
    def imap_transport(self) -> object:
        """What to pause while the POP client is slow (push producer): the IMAP client, which
        pauses its transport and stops its response timer meanwhile."""
        return self.account.producer

    def fetch(self, info: MessageInfo, sink: BodySink) -> Deferred[Response]:
        return self.account.fetch_body(info.uid, sink)

    def observe_reads(self, observer: ReadObserver | None) -> None:
        """Tell ``observer`` when each read from upstream starts and ends being handled."""
        self.account.observe_reads(observer)

    def fetch_many(self, sinks: Mapping[int, BodySink]) -> Deferred[Response]:
        """Several bodies in one command (by UID), for fetching ahead."""
        return self.account.fetch_bodies(sinks)

    def record_retrieved(self, info: MessageInfo, whole: bool) -> None:
        """A download completed: a whole one (RETR, not TOP) counts as downloaded by the
        device (recorded after QUIT), and with ``on_retrieve = "seen"`` marks it read.

        The STORE is pipelined behind whatever comes next rather than awaited: the device
        does not wait for it, and a failure only costs the flag.
        """
        if whole:
            self.downloads.append(info.uid)
        if not whole or self.service.config.pop3.on_retrieve != "seen":
            return
        d = Deferred.fromCoroutine(self.account.add_flags([info.uid], ["\\Seen"]))
        d.addErrback(lambda f: log.warning("could not set \\Seen on UID %d: %s", info.uid, f.value))

    async def update(self, deleted: Sequence[MessageInfo]) -> None:
        """Carry out the delete policy for ``deleted``; raises UpdateFailed naming what is left.

        Every step is idempotent (adding flags, adding to a set, moving or expunging UIDs that
        may already be gone), so a client that retries the same deletes ends in the same state.
        """
        if not deleted:
            return
        policy = self.service.policy
        config = self.service.config.pop3
        by_uid = {m.uid: m for m in self.index}
        messages = [by_uid[m.uid] for m in deleted if m.uid in by_uid]
        uids = [m.uid for m in messages]
        step = f"selecting {config.mailbox}"
        try:
            info = await self.account.select(config.mailbox)
            if info.uidvalidity != self.uidvalidity:
                raise UpdateFailed(f"{config.mailbox} was rebuilt upstream; nothing was deleted")
            flags = [f for f in policy.add_flags if info.keywords_allowed or f.startswith("\\")]
            if flags:
                step = "flagging the deleted messages"
                await self.account.add_flags(uids, flags)
            if policy.move_to is not None:
                step = f"finding the {policy.move_to} mailbox"
                target = await resolve_folder(self.account, policy.move_to, config)
                step = f"moving the deleted messages to {target}"
                await self.account.move(uids, target)
            if policy.expunge:
                step = "expunging the deleted messages"
                if not await self.account.expunge(uids):
                    log.warning(
                        "server lacks UIDPLUS: %d messages left flagged \\Deleted, not expunged",
                        len(uids),
                    )
            if policy.hide_for_device:
                step = f"recording the deletes of device {self.login.device}"
                state = self.state or DeviceState(config.mailbox, self.login.device)
                state.hide(messages, self.uidvalidity)
                if self.downloads:
                    state.download(self.downloads, self.uidvalidity)
                state.seen(int(self.service.reactor.seconds()))
                self.state = state
                await device_store.save(
                    self.account,
                    self.service.config.pop3,
                    state,
                    self.index,
                    self._arrived_since_snapshot(info),
                )
        except ImapError as e:
            raise UpdateFailed(f"{len(uids)} deletes not applied ({step} failed: {e})") from e

    def _arrived_since_snapshot(self, now: MailboxInfo) -> int | None:
        """The snapshot's UIDNEXT if messages may have arrived since (then the snapshot cannot
        tell what left the mailbox from what another session of the device hid meanwhile);
        None when it is still complete."""
        if self.uidnext and now.uidnext == self.uidnext:
            return None
        return self.uidnext or max((m.uid for m in self.index), default=0) + 1

    async def after_quit(self, deleted_any: bool) -> None:
        """After QUIT was answered: record what the device downloaded and that it was seen,
        then retention on this connection if due (it sees those downloads), then log out."""
        if self._closed:
            return
        try:
            if self.service.tracks_devices:
                await self.record_device()
        except ImapError as e:
            # Only costs retention's knowledge: the device holds back a little longer.
            log.warning("device %r: downloads not recorded: %s", self.login.device, e)
        await self.service.retention.after_quit(self.account, self.login.user, deleted_any)
        await self.close()

    async def record_device(self) -> None:
        """Merge this session's completed RETRs and its time into the device state.

        Written only when something is new to the stored state: a download it does not hold,
        or a last-seen time more than ``LAST_SEEN_EVERY`` old. The clock is the reactor's.
        """
        config = self.service.config.pop3
        now = int(self.service.reactor.seconds())
        state = self.state
        if state is None:
            state = await device_store.load(
                self.account,
                config,
                config.mailbox,
                self.login.device,
                uidvalidity=self.uidvalidity,
                uidnext=self.uidnext,
            )
        new = bool(self.downloads) and state.download(self.downloads, self.uidvalidity)
        if not new and now - state.last_seen < LAST_SEEN_EVERY:
            return
        state.seen(now)
        self.state = state
        info = await self.account.examine(config.mailbox)
        if info.uidvalidity != self.uidvalidity:
            return  # rebuilt upstream: what this session downloaded names nothing now
        await device_store.save(
            self.account, config, state, self.index, self._arrived_since_snapshot(info)
        )

    async def close(self) -> None:
        """Log out; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        await self.account.logout()

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self.account.abort()
