"""Retention that waits for every active device: the pure rule, EXPIRE, and a state machine.

The clock is an argument everywhere (``now``): days pass in a line of code, never in waiting.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from gateway.maildrop.device_state import (
    DeviceState,
    InvalidState,
    UnreadableState,
    header_key,
    state_key,
    unreadable_state,
)
from gateway.maildrop.policy import expire_capability
from gateway.maildrop.retention_plan import (
    Candidate,
    Quota,
    Removal,
    device_views,
    held_back_counts,
    plan_retention,
)
from gateway.maildrop.uidl import IndexedMessage
from gateway.retention import RetentionReport

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
UV = 7


def ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def seen(days: float) -> int:
    return int(ago(days).timestamp())


def state(device: str, *, hidden: set[int] = set(), got: set[int] = set(), days: float = 0):  # noqa: B006
    return DeviceState("INBOX", device, UV, set(hidden), downloaded=set(got), last_seen=seen(days))


def plan(candidates, states, **kw):  # type: ignore[no-untyped-def]
    args = {
        "now": NOW,
        "delete_after_days": 3,
        "quota": None,
        "quota_high_percent": 0,
        "quota_target_percent": 80,
        "uidvalidity": UV,
        "wait_for_devices": True,
        "after_all_devices_days": 0,
    }
    args.update(kw)
    inactive = args.pop("inactive_days", 30)
    views = device_views(states, now=NOW, inactive_days=inactive)
    return plan_retention(candidates, devices=views, **args)


def test_the_pc_deleted_it_but_the_weekend_laptop_has_not_got_it() -> None:
    # PC downloaded and deleted UID 1 on Monday; the laptop polls on weekends.
    msgs = [Candidate(1, 100, ago(6))]
    pc = state("pc", hidden={1}, got={1}, days=5)
    laptop = state("laptop", days=6.5)
    result = plan(msgs, [pc, laptop])
    assert result.removals == []
    assert [(h.uid, h.rule, h.devices) for h in result.held] == [(1, "age", ("laptop",))]
    # Saturday: the laptop downloaded it (RETR, no DELE): now it may go.
    laptop = state("laptop", got={1}, days=0)
    assert [r.uid for r in plan(msgs, [pc, laptop]).removals] == [1]


def test_without_wait_for_devices_the_old_rule_applies() -> None:
    msgs = [Candidate(1, 100, ago(6))]
    result = plan(msgs, [state("pc", hidden={1}), state("laptop")], wait_for_devices=False)
    assert [r.uid for r in result.removals] == [1] and result.held == []


def test_an_inactive_device_holds_nothing_back() -> None:
    msgs = [Candidate(1, 100, ago(60))]
    pc = state("pc", hidden={1})
    old_phone = state("phone", days=31)
    assert [r.uid for r in plan(msgs, [pc, old_phone]).removals] == [1]
    assert plan(msgs, [pc, old_phone], inactive_days=32).removals == []
    # A device whose last login is unknown (state from before tracking) counts as active.
    legacy = DeviceState("INBOX", "legacy", UV)
    assert plan(msgs, [pc, legacy]).removals == []


def test_downloads_under_another_uidvalidity_cover_nothing() -> None:
    msgs = [Candidate(1, 100, ago(60))]
    pc = state("pc", hidden={1})
    laptop = DeviceState("INBOX", "laptop", UV - 1, downloaded={1}, last_seen=seen(1))
    assert plan(msgs, [pc, laptop]).removals == []


def test_after_all_devices_days_frees_leave_on_server_mail() -> None:
    # Nobody deletes; both devices downloaded 1 and 2; only the PC downloaded 3.
    msgs = [Candidate(u, 100, ago(d), deleted=False) for u, d in ((1, 20), (2, 5), (3, 20))]
    pc = state("pc", got={1, 2, 3})
    laptop = state("laptop", got={1, 2})
    result = plan(msgs, [pc, laptop], delete_after_days=0, after_all_devices_days=14)
    assert [r.uid for r in result.removals] == [1]
    assert "downloaded by every active device (2), arrived 20 days ago (> 14)" in (
        result.removals[0].reason
    )
    # Off (0): nothing leaves without a DELE.
    assert plan(msgs, [pc, laptop], delete_after_days=0).removals == []


def test_a_user_with_imap_clients_only_loses_nothing() -> None:
    msgs = [Candidate(u, 100, ago(400), deleted=False) for u in (1, 2)]
    result = plan(msgs, [], delete_after_days=1, after_all_devices_days=1)
    assert result.removals == [] and result.held == []
    # Every device inactive: "downloaded by all" needs at least one active device.
    gone = state("pc", got={1, 2}, days=90)
    assert plan(msgs, [gone], after_all_devices_days=1).removals == []


def test_quota_pressure_with_everything_still_needed_removes_nothing() -> None:
    msgs = [Candidate(u, 5_000, ago(1)) for u in (1, 2, 3)]
    pc = state("pc", hidden={1, 2, 3})
    phone = state("phone", got={3})
    full = Quota(used_kib=95, limit_kib=100)
    result = plan(msgs, [pc, phone], delete_after_days=0, quota=full, quota_high_percent=90)
    assert [r.uid for r in result.removals] == [3]  # the one every device has
    assert [(h.uid, h.rule, h.devices) for h in result.held] == [
        (1, "quota", ("phone",)),
        (2, "quota", ("phone",)),
    ]
    assert result.quota_unrelieved
    # Below the high mark nothing is considered, so nothing is "held" either.
    calm = plan(msgs, [pc, phone], delete_after_days=0, quota=Quota(10, 100), quota_high_percent=90)
    assert calm.removals == [] and calm.held == [] and not calm.quota_unrelieved


def test_held_back_counts_per_device() -> None:
    msgs = [
        Candidate(1, 1, ago(1)),  # deleted by pc
        Candidate(2, 1, ago(1), deleted=False),  # downloaded by pc only
        Candidate(3, 1, ago(1), deleted=False),  # nobody's
    ]
    views = device_views(
        [state("pc", hidden={1}, got={1, 2}), state("laptop"), state("old", days=40)],
        now=NOW,
        inactive_days=30,
    )
    assert held_back_counts(msgs, views, UV) == {"laptop": 1, "old": 0, "pc": 0}
    assert held_back_counts(msgs, views, UV, after_all_devices_days=7) == {
        "laptop": 2,
        "old": 0,
        "pc": 0,
    }


@pytest.mark.parametrize(
    ("delete_after", "quota_high", "after_all", "expected"),
    [
        (0, 0, 0, "EXPIRE NEVER"),
        (3, 0, 0, "EXPIRE 3"),
        (0, 0, 14, "EXPIRE 14"),
        (30, 0, 14, "EXPIRE 14"),
        (3, 0, 14, "EXPIRE 3"),
        (0, 90, 0, "EXPIRE 0"),
        (3, 90, 14, "EXPIRE 0"),
    ],
)
def test_expire_says_the_shortest_stay_any_rule_allows(
    delete_after: int, quota_high: int, after_all: int, expected: str
) -> None:
    assert expire_capability(delete_after, quota_high, after_all) == expected


# --------------------------------------------------------------------- the state machine
def test_an_unreadable_state_withholds_every_removal() -> None:
    msgs = [Candidate(1, 100, ago(10)), Candidate(2, 100, ago(10), deleted=False)]
    pc = state("pc", hidden={1}, got={1, 2})
    result = plan(msgs, [pc], unreadable=1, after_all_devices_days=3)
    assert result.removals == []
    assert sorted(r.uid for r in result.withheld) == [1, 2]
    # Quota pressure too: nothing goes.
    full = plan(msgs, [pc], unreadable=1, quota=Quota(99, 100), quota_high_percent=80)
    assert full.removals == [] and [r.uid for r in full.withheld] == [1]
    assert [r.uid for r in plan(msgs, [pc]).removals] == [1]


def test_an_unreadable_copy_names_its_device_only_when_the_name_hashes_to_its_key() -> None:
    raw = DeviceState("INBOX", "laptop").to_message(date=0, message_id="<s@t>")
    key = state_key("INBOX", "laptop")
    assert header_key(raw) == key
    broken = raw.partition(b"\r\n\r\n")[0] + b"\r\n\r\n{not json"
    found = unreadable_state(broken, "INBOX", key, "state is not JSON")
    assert found == UnreadableState(key, "laptop", "state is not JSON")
    assert found.label == f"laptop (state {key})"
    # A copy filed under the phone's key whose Subject claims "laptop": the name is not shown.
    phone = state_key("INBOX", "phone")
    assert unreadable_state(broken, "INBOX", phone, "x").label == f"unknown device (state {phone})"
    # No well-formed key: no device's state at all.
    assert header_key(b"X-Popgate-State: pg1-zz\r\n\r\n{}") is None
    assert header_key(b"Subject: x\r\n\r\nX-Popgate-State: " + key.encode() + b"\r\n") is None


def test_the_dry_run_report_says_which_state_is_unreadable() -> None:
    key = state_key("INBOX", "laptop")
    report = RetentionReport("alice", "trash")
    report.unreadable = [UnreadableState(key, "laptop", "state is not JSON")]
    report.withheld = [Removal(7, 100, ago(10), "deleted by POP, arrived 10 days ago (> 3)")]
    head, warning, row = report.lines()
    assert head == (
        "alice: nothing to remove (trash): a device state cannot be read; "
        "1 messages would otherwise go"
    )
    assert warning == (
        f"alice: WARNING state of device laptop (state {key}) unreadable (state is not JSON); "
        "retention removes nothing for alice until that device logs in again or "
        "`popgate device forget alice laptop`"
    )
    assert row.startswith("  UID 7  100 octets") and "kept (a device state is unreadable)" in row


DEVICES = ["pc", "laptop", "phone"]
INACTIVE_DAYS = 5


@dataclass
class Session:
    device: str
    snapshot: dict[int, IndexedMessage]


@dataclass
class Message:
    arrived: datetime
    deleted: bool = False  # $POPDeleted


# A state copy nobody can read (forged, corrupt, over the size limit).
BROKEN = b"X-Popgate-State: forged\r\n\r\n{not json"
LAST_SEEN_EVERY = 3600  # gateway/pop3/backend.py


class NeverRemovesWhatAnActiveDeviceLacks(RuleBasedStateMachine):
    """Devices log in, RETR (whole), TOP, DELE, QUIT or drop, two sessions of a device at a
    time, state copies from several replicas; IMAP clients append and expunge; someone
    plants an unreadable copy of a device's state; the operator forgets a device; days pass;
    retention runs with any settings. Every message retention removes must have been
    downloaded or deleted (in a session that ended in QUIT) by every device that logged in
    within ``device_inactive_days`` (a login is recorded at once, as the backend does, even
    if its session then drops), and nothing is removed while any device state is
    unreadable."""

    def __init__(self) -> None:
        super().__init__()
        self.now = NOW
        self.mailbox: dict[int, Message] = {}
        self.next_uid = 1
        self.copies: dict[str, list[bytes]] = {}  # device -> state copies (several replicas)
        self.sessions: dict[int, Session] = {}
        self.next_session = 0
        # The model: what each device really completed, and when it last logged in.
        self.done: dict[str, set[int]] = {d: set() for d in DEVICES}
        self.last_login: dict[str, datetime] = {}

    def load(self, device: str) -> DeviceState:
        """The device's own read (device_store.merge_copies): unusable copies are skipped."""
        merged = DeviceState("INBOX", device)
        for raw in self.copies.get(device, []):
            try:
                merged.merge(DeviceState.from_message(raw, "INBOX", device))
            except InvalidState:
                continue
        return merged

    def write(self, device: str, state: DeviceState, *, keep_others: bool = False) -> None:
        raw = state.to_message(date=0, message_id="<s@test>")
        self.copies[device] = [*self.copies.get(device, []), raw] if keep_others else [raw]

    def readable(self, device: str) -> bool:
        return any(raw != BROKEN for raw in self.copies.get(device, []))

    @property
    def unreadable(self) -> list[str]:
        """What ``load_all`` reports: devices with a copy that does not parse."""
        found = []
        for device, copies in self.copies.items():
            for raw in copies:
                try:
                    DeviceState.parse(raw)
                except InvalidState:
                    found.append(device)
                    break
        return found

    @rule(device=st.sampled_from(DEVICES))
    def someone_plants_an_unreadable_copy(self, device: str) -> None:
        self.copies[device] = [*self.copies.get(device, []), BROKEN]

    @rule(device=st.sampled_from(DEVICES))
    def operator_forgets(self, device: str) -> None:
        """``popgate device forget``: its copies go; it holds nothing back until it logs in
        again, as a new device."""
        self.copies.pop(device, None)
        self.done[device] = set()
        self.last_login.pop(device, None)

    @rule()
    def imap_append(self) -> None:
        self.mailbox[self.next_uid] = Message(self.now)
        self.next_uid += 1

    @precondition(lambda self: self.mailbox)
    @rule(data=st.data())
    def imap_expunge(self, data: st.DataObject) -> None:
        del self.mailbox[data.draw(st.sampled_from(sorted(self.mailbox)))]

    @rule(hours=st.sampled_from([2, 12, 30, 80, 150]))
    def time_passes(self, hours: int) -> None:
        self.now += timedelta(hours=hours)

    @rule(device=st.sampled_from(DEVICES))
    def login(self, device: str) -> None:
        """A session opens: its snapshot is what the device sees (at most 4 open at once,
        two of one device included: there is no lock). The load repairs unusable copies,
        and the login is recorded at most once per LAST_SEEN_EVERY."""
        if len(self.sessions) >= 4:
            return
        hidden = self.load(device)
        if device in self.unreadable:
            self.write(device, hidden)
        now = int(self.now.timestamp())
        if now - hidden.last_seen >= LAST_SEEN_EVERY:
            hidden.seen(now)
            hidden.prune(
                [IndexedMessage(u, 10, frozenset()) for u in self.mailbox], newer_from=self.next_uid
            )
            self.write(device, hidden)
        self.last_login[device] = self.now
        snapshot = {
            uid: IndexedMessage(uid, 10, frozenset())
            for uid in self.mailbox
            if not (hidden.uidvalidity == UV and uid in hidden.uids)
        }
        self.sessions[self.next_session] = Session(device, snapshot)
        self.next_session += 1

    @precondition(lambda self: self.sessions)
    @rule(data=st.data(), quit=st.booleans(), replica=st.booleans())
    def session_ends(self, data: st.DataObject, quit: bool, replica: bool) -> None:
        """RETRs (whole bodies: only of messages still there), TOPs, DELEs, then QUIT or a
        dropped connection. At QUIT: UPDATE then record_device, as gateway/pop3/backend.py
        does: read every copy, merge, prune to the snapshot, write a copy; a replica that
        raced another leaves both copies (``replica``), which the next read merges."""
        key = data.draw(st.sampled_from(sorted(self.sessions)))
        session = self.sessions.pop(key)
        listed = sorted(session.snapshot)
        retr = data.draw(st.sets(st.sampled_from(listed))) if listed else set()
        got = {uid for uid in retr if uid in self.mailbox}  # a gone one answers -ERR
        deleted = data.draw(st.sets(st.sampled_from(listed))) if listed else set()
        if not quit:
            return  # no QUIT: nothing applied, nothing recorded
        device = session.device
        for uid in deleted:
            if uid in self.mailbox:
                self.mailbox[uid].deleted = True
        state = self.load(device)
        state.hide([session.snapshot[u] for u in deleted], UV)
        if got:
            state.download(got, UV)
        state.seen(int(self.now.timestamp()))
        present = [m for u, m in session.snapshot.items() if u in self.mailbox]
        state.prune(present, newer_from=max(session.snapshot, default=0) + 1)
        self.write(device, state, keep_others=replica)
        self.done[device] |= got | deleted

    @rule(
        delete_after=st.sampled_from([1, 0, 3]),
        after_all=st.sampled_from([0, 1, 3]),
        quota_full=st.booleans(),
    )
    def retention_runs(self, delete_after: int, after_all: int, quota_full: bool) -> None:
        unreadable = self.unreadable
        # As load_all reads them: only devices with a copy that parses have a state.
        states = [self.load(d) for d in DEVICES if d in self.copies and self.readable(d)]
        views = device_views(states, now=self.now, inactive_days=INACTIVE_DAYS)
        candidates = [
            Candidate(uid, 10, m.arrived, m.deleted) for uid, m in sorted(self.mailbox.items())
        ]
        result = plan_retention(
            candidates,
            now=self.now,
            delete_after_days=delete_after,
            quota=Quota(99, 100) if quota_full else None,
            quota_high_percent=90 if quota_full else 0,
            quota_target_percent=10,
            devices=views,
            uidvalidity=UV,
            wait_for_devices=True,
            after_all_devices_days=after_all,
            unreadable=len(unreadable),
        )
        assert not (unreadable and result.removals), (unreadable, result.removals)
        cutoff = self.now - timedelta(days=INACTIVE_DAYS)
        active = [d for d, t in self.last_login.items() if t >= cutoff]
        for removal in result.removals:
            lacking = [d for d in active if removal.uid not in self.done[d]]
            assert not lacking, f"UID {removal.uid} removed, {lacking} never downloaded it"
            assert self.mailbox[removal.uid].deleted or after_all, removal
            del self.mailbox[removal.uid]


NeverRemovesWhatAnActiveDeviceLacks.TestCase.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None, derandomize=True
)
TestNeverRemovesWhatAnActiveDeviceLacks = NeverRemovesWhatAnActiveDeviceLacks.TestCase
