"""Property: under hide/seen, no interleaving of sessions and devices ever loses a message.

A state machine drives the pure parts of the gateway (snapshot → Maildrop, DeviceState with its
stored message form, the delete policy's flags) over an in-memory mailbox, the way
gateway/pop3/backend.py does over IMAP: several devices with overlapping sessions (two at once
of the same device too: there is no IN-USE lock), deletes, RSET, dropped connections, QUIT in
any order, IMAP clients appending and expunging meanwhile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gateway.maildrop.device_state import DeviceState
from gateway.maildrop.numbering import Maildrop
from gateway.maildrop.policy import policy_for
from gateway.maildrop.uidl import IndexedMessage, MailboxIndex, build_maildrop, needs_state

UIDVALIDITY = 77
DEVICES = ["default", "phone", "office"]
SLOTS = [0, 1]  # two sessions of one device may be open at once


@dataclass
class Session:
    maildrop: Maildrop
    index: Sequence[IndexedMessage]
    state: DeviceState | None
    uidnext: int  # the mailbox's UIDNEXT when the snapshot was taken


@dataclass
class Upstream:
    flags: dict[int, set[str]] = field(default_factory=dict)  # the mailbox: UID -> flags
    stored_state: dict[str, list[bytes]] = field(default_factory=dict)  # device -> messages
    next_uid: int = 1
    _index: MailboxIndex | None = None

    def index(self) -> MailboxIndex:
        """One MailboxIndex per upstream state, like the snapshot cache hands logins of an
        unchanged mailbox: sessions share its view."""
        rows = tuple(
            IndexedMessage(uid, 100 + uid, frozenset(f)) for uid, f in sorted(self.flags.items())
        )
        if self._index is None or tuple(self._index) != rows:
            self._index = MailboxIndex(rows)
        return self._index

    def load_state(self, device: str) -> DeviceState:
        state = DeviceState("INBOX", device)
        for raw in self.stored_state.get(device, []):
            found = DeviceState.from_message(raw, "INBOX", device)
            assert found is not None
            state.merge(found)
        return state


class NeverLoses(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.upstream = Upstream()
        self.sessions: dict[tuple[str, int], Session] = {}
        self.alive: set[int] = set()  # what IMAP put in and did not take out
        self.hidden: dict[str, set[int]] = {d: set() for d in DEVICES}  # the model's view
        self.policy = policy_for("hide")

    @rule(policy=st.sampled_from(["hide", "seen"]))
    def choose_policy(self, policy: str) -> None:
        self.policy = policy_for(policy)

    @rule()
    def imap_append(self) -> None:
        uid = self.upstream.next_uid
        self.upstream.next_uid += 1
        self.upstream.flags[uid] = set()
        self.alive.add(uid)

    @precondition(lambda self: self.alive)
    @rule(data=st.data())
    def imap_expunge(self, data: st.DataObject) -> None:
        uid = data.draw(st.sampled_from(sorted(self.alive)))
        del self.upstream.flags[uid]
        self.alive.discard(uid)

    @rule(device=st.sampled_from(DEVICES), slot=st.sampled_from(SLOTS))
    def login(self, device: str, slot: int) -> None:
        if (device, slot) in self.sessions:
            return
        index = self.upstream.index()
        state = self.upstream.load_state(device) if needs_state(index, True) else None
        maildrop = build_maildrop(index, UIDVALIDITY, state)
        self.sessions[device, slot] = Session(maildrop, index, state, self.upstream.next_uid)

    @rule(device=st.sampled_from(DEVICES), slot=st.sampled_from(SLOTS), data=st.data())
    def dele(self, device: str, slot: int, data: st.DataObject) -> None:
        session = self.sessions.get((device, slot))
        if session is None:
            return
        numbers = [n for n, _ in session.maildrop.listing()]
        if numbers:
            session.maildrop.delete(data.draw(st.sampled_from(numbers)))

    @rule(device=st.sampled_from(DEVICES), slot=st.sampled_from(SLOTS))
    def rset(self, device: str, slot: int) -> None:
        if (device, slot) in self.sessions:
            self.sessions[device, slot].maildrop.reset()

    @rule(device=st.sampled_from(DEVICES), slot=st.sampled_from(SLOTS))
    def drop(self, device: str, slot: int) -> None:
        self.sessions.pop((device, slot), None)

    @rule(device=st.sampled_from(DEVICES), slot=st.sampled_from(SLOTS))
    def quit(self, device: str, slot: int) -> None:
        session = self.sessions.pop((device, slot), None)
        if session is None:
            return
        deleted = session.maildrop.deleted()
        if not deleted:
            return
        by_uid = {m.uid: m for m in session.index}
        # What an IMAP client expunged meanwhile is simply gone (UID STORE on it is a no-op).
        messages = [by_uid[m.uid] for m in deleted]
        for m in messages:
            if m.uid in self.upstream.flags:
                self.upstream.flags[m.uid].update(self.policy.add_flags)
        state = session.state or DeviceState("INBOX", device)
        state.hide(messages, UIDVALIDITY)
        for raw in self.upstream.stored_state.get(device, []):
            found = DeviceState.from_message(raw, "INBOX", device)
            assert found is not None
            state.merge(found)
        newer = None if self.upstream.next_uid == session.uidnext else session.uidnext
        state.prune(session.index, newer)
        self.upstream.stored_state[device] = [state.to_message(date=0, message_id="<s@test>")]
        self.hidden[device] |= {m.uid for m in messages}

    @invariant()
    def no_message_is_lost(self) -> None:
        assert set(self.upstream.flags) == self.alive
        assert all(not ({"\\Deleted"} & f) for f in self.upstream.flags.values())

    @invariant()
    def each_device_sees_what_it_did_not_delete(self) -> None:
        index = self.upstream.index()
        for device in DEVICES:
            state = self.upstream.load_state(device) if needs_state(index, True) else None
            seen = {info.uid for _, info in build_maildrop(index, UIDVALIDITY, state).listing()}
            assert seen == self.alive - self.hidden[device]

    @invariant()
    def listings_show_each_session_its_own_numbering(self) -> None:
        for session in self.sessions.values():
            drop = session.maildrop
            assert drop.listing_lines("uidl") == "".join(
                f"{n} {info.uidl}\r\n" for n, info in drop.listing()
            )
            assert drop.listing_lines("size") == "".join(
                f"{n} {info.size}\r\n" for n, info in drop.listing()
            )

    @invariant()
    def a_new_device_sees_everything(self) -> None:
        index = self.upstream.index()
        fresh = self.upstream.load_state("brand-new") if needs_state(index, True) else None
        seen = {info.uid for _, info in build_maildrop(index, UIDVALIDITY, fresh).listing()}
        assert seen == self.alive


def test_an_older_snapshot_keeps_a_delete_another_session_of_the_device_made() -> None:
    """Session 0 of phone logs in, a message arrives, session 1 logs in, hides it and quits;
    session 0 then quits: its snapshot never knew that message, which must stay hidden."""

    class Pick:
        def __init__(self, value: int) -> None:
            self.value = value

        def draw(self, _strategy: object) -> int:
            return self.value

    m = NeverLoses()
    m.imap_append()
    m.login("phone", 0)
    m.imap_append()
    m.login("phone", 1)
    m.dele("phone", 1, Pick(2))  # type: ignore[arg-type]
    m.quit("phone", 1)
    m.dele("phone", 0, Pick(1))  # type: ignore[arg-type]
    m.quit("phone", 0)
    m.each_device_sees_what_it_did_not_delete()


NeverLoses.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestNeverLoses = NeverLoses.TestCase
