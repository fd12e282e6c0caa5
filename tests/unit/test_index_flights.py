"""One index fetch shared by the concurrent logins of a mailbox (gateway/maildrop/index_flights.py),
the rules alone and through ImapAccount.snapshot on in-memory connections."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from gateway.maildrop.index_flights import IndexFlights, Landed, same_mailbox
from gateway.maildrop.snapshot_cache import MailboxVersion, SnapshotCache
from gateway.maildrop.uidl import IndexedMessage
from gateway.upstream.imap_client import ImapTimeout
from tests.unit.imap_playbook import AccountPlaybook

KEY = ("alice", "INBOX")
V = MailboxVersion(uidvalidity=9, uidnext=3, exists=2, highestmodseq=0)
INDEX = [IndexedMessage(1, 10, frozenset()), IndexedMessage(2, 20, frozenset())]


# ----------------------------------------------------------------------------- the rules alone
def test_only_a_fetch_sent_after_the_login_is_joinable() -> None:
    flights = IndexFlights()
    early = flights.tick()  # a login starts
    flight = flights.start(KEY)  # then a fetch is sent
    late = flights.tick()  # a login that starts while it runs
    assert flights.joinable(KEY, early) is flight
    assert flights.joinable(KEY, late) is None  # could miss mail delivered before that login
    assert flights.joinable(("bob", "INBOX"), early) is None
    assert flights.joinable(("alice", "Other"), early) is None


def test_a_landed_flight_is_forgotten_and_its_waiters_get_the_index() -> None:
    flights = IndexFlights()
    since = flights.tick()
    flight = flights.start(KEY)
    got: list[Landed | None] = []
    flight.wait(got.append)
    flight.wait(got.append)
    flight.land(V, INDEX)
    assert got == [(V, tuple(INDEX))] * 2
    assert got[0] is got[1]  # one index object for every session, not a copy each
    assert flights.joinable(KEY, since) is None and len(flights) == 0


def test_a_landed_flight_serves_only_the_logins_still_on_their_way_that_began_before_it() -> None:
    flights = IndexFlights()
    slow = flights.login(KEY)  # its upstream login takes longer than the whole fetch
    leader = flights.login(KEY)
    flight = flights.start(KEY)
    flight.land(V, INDEX)
    flights.logged_in(KEY)  # the leader has its snapshot
    late = flights.login(KEY)  # began after the fetch was sent: never served by it
    assert flights.joinable(KEY, late) is None
    got: list[Landed | None] = []
    joined = flights.joinable(KEY, slow)
    assert joined is flight and leader < flight.started
    joined.wait(got.append)  # landed already: answered at once
    assert got == [(V, tuple(INDEX))]
    flights.logged_in(KEY)  # the slow one
    flights.logged_in(KEY)  # the late one: nobody that began before it is left
    assert len(flights) == 0 and flights.joinable(KEY, slow) is None


def test_a_failed_flight_tells_its_waiters_to_fetch_their_own() -> None:
    flights = IndexFlights()
    flight = flights.start(KEY)
    got: list[Landed | None] = []
    flight.wait(got.append)
    flight.fail()
    flight.land(V, INDEX)  # too late: it already failed
    assert got == [None] and len(flights) == 0


def test_a_newer_flight_replaces_the_older_for_later_joiners_only() -> None:
    flights = IndexFlights()
    first_login = flights.tick()
    older = flights.start(KEY)
    got: list[Landed | None] = []
    older.wait(got.append)
    second_login = flights.tick()
    newer = flights.start(KEY)
    assert flights.joinable(KEY, first_login) is newer
    assert flights.joinable(KEY, second_login) is newer
    older.land(V, INDEX)  # does not forget the newer one
    assert got == [(V, tuple(INDEX))] and flights.joinable(KEY, second_login) is newer


def test_same_mailbox_only_when_no_message_came_or_went() -> None:
    assert same_mailbox(V, V)
    assert same_mailbox(V, MailboxVersion(9, 3, 2, 0))
    for other in (
        MailboxVersion(9, 4, 3, 0),  # a message arrived
        MailboxVersion(9, 3, 1, 0),  # one was expunged
        MailboxVersion(9, 4, 2, 0),  # one arrived and one was expunged
        MailboxVersion(8, 3, 2, 0),  # the mailbox was rebuilt
    ):
        assert not same_mailbox(V, other)
    assert not same_mailbox(MailboxVersion(9, 0, 2, 0), MailboxVersion(9, 0, 2, 0))  # no UIDNEXT
    with_modseq = MailboxVersion(9, 3, 2, 40)
    assert same_mailbox(with_modseq, MailboxVersion(9, 3, 2, 40))
    assert not same_mailbox(with_modseq, MailboxVersion(9, 3, 2, 41))  # flags changed
    assert same_mailbox(with_modseq, V)  # one side without CONDSTORE: the set of messages


# ------------------------------------------------------------------ through ImapAccount.snapshot
EXAMINED = """
    S: * {exists} EXISTS
    S: * OK [UIDVALIDITY 9] x
    S: * OK [UIDNEXT {uidnext}] x
    S: {tag} OK [READ-ONLY] done
"""
FETCHED = """
    S: * 1 FETCH (UID 1 RFC822.SIZE 10 FLAGS ())
    S: * 2 FETCH (UID 2 RFC822.SIZE 20 FLAGS ())
    S: {tag} OK done
"""


def snapshot(
    pb: AccountPlaybook, flights: IndexFlights, since: int, cache: SnapshotCache | None = None
) -> Deferred[object]:
    return Deferred.fromCoroutine(
        pb.account.snapshot("INBOX", cache=cache, cache_key=KEY, flights=flights, since=since)
    )


def test_logins_that_started_before_the_fetch_share_it() -> None:
    flights = IndexFlights()
    devices = [AccountPlaybook() for _ in range(4)]
    logins = [flights.tick() for _ in devices]  # four devices log in at once
    leader, *joiners = devices
    led = snapshot(leader, flights, logins[0])
    leader.play(
        """
        C: G1 EXAMINE "INBOX"
        C: G2 UID FETCH 1:* (UID RFC822.SIZE FLAGS)
        """
    )
    joined = [snapshot(pb, flights, since) for pb, since in zip(joiners, logins[1:], strict=True)]
    for pb in joiners:  # each opens the mailbox on its own connection, and fetches nothing
        pb.play('C: G1 EXAMINE "INBOX"\n' + EXAMINED.format(exists=2, uidnext=3, tag="G1"))
        assert pb.account.selected is not None
    assert not any(d.called for d in joined)  # they wait for the leader's index
    leader.play(EXAMINED.format(exists=2, uidnext=3, tag="G1") + FETCHED.format(tag="G2"))
    _, index = led.result  # type: ignore[misc]
    assert [m.uid for m in index] == [1, 2]
    for d, pb in zip(joined, joiners, strict=True):
        info, shared = d.result  # type: ignore[misc]
        assert shared is index and info.uidnext == 3
        assert pb.account.index_source == "shared"
    assert leader.account.index_source == "fetched"
    assert len(flights) == 0


def test_a_login_after_the_fetch_was_sent_fetches_its_own() -> None:
    flights = IndexFlights()
    leader, late = AccountPlaybook(), AccountPlaybook()
    led = snapshot(leader, flights, flights.tick())
    leader.written()
    own = snapshot(late, flights, flights.tick())  # started after the leader's FETCH went out
    late.play(  # pipelined as usual: not waiting for the leader
        """
        C: G1 EXAMINE "INBOX"
        C: G2 UID FETCH 1:* (UID RFC822.SIZE FLAGS)
        """
        + EXAMINED.format(exists=2, uidnext=3, tag="G1")
        + FETCHED.format(tag="G2")
    )
    assert late.account.index_source == "fetched" and own.called
    leader.play(EXAMINED.format(exists=2, uidnext=3, tag="G1") + FETCHED.format(tag="G2"))
    assert led.called


def test_a_joiner_that_sees_new_mail_fetches_its_own() -> None:
    flights = IndexFlights()
    leader, joiner = AccountPlaybook(), AccountPlaybook()
    first, second = flights.tick(), flights.tick()
    led = snapshot(leader, flights, first)
    leader.play(
        """
        C: G1 EXAMINE "INBOX"
        C: G2 UID FETCH 1:* (UID RFC822.SIZE FLAGS)
        """
        + EXAMINED.format(exists=2, uidnext=3, tag="G1")
        + """
        S: * 1 FETCH (UID 1 RFC822.SIZE 10 FLAGS ())
        """
    )
    joined = snapshot(joiner, flights, second)
    # A third message arrived before the joiner's EXAMINE: the leader's index may lack it.
    joiner.play('C: G1 EXAMINE "INBOX"\n' + EXAMINED.format(exists=3, uidnext=4, tag="G1"))
    leader.play(
        """
        S: * 2 FETCH (UID 2 RFC822.SIZE 20 FLAGS ())
        S: G2 OK done
        """
    )
    assert led.called and not joined.called
    joiner.play(
        """
        C: G2 UID FETCH 1:* (UID RFC822.SIZE FLAGS)
        S: * 1 FETCH (UID 1 RFC822.SIZE 10 FLAGS ())
        S: * 2 FETCH (UID 2 RFC822.SIZE 20 FLAGS ())
        S: * 3 FETCH (UID 3 RFC822.SIZE 30 FLAGS ())
        S: G2 OK done
        """
    )
    _, index = joined.result  # type: ignore[misc]
    assert [m.uid for m in index] == [1, 2, 3]
    assert joiner.account.index_source == "fetched"


def test_when_the_leader_times_out_the_joiners_fetch_their_own() -> None:
    clock = Clock()
    flights = IndexFlights()
    leader = AccountPlaybook(clock=clock, timeout=60)
    joiner = AccountPlaybook(clock=clock, timeout=60)
    first, second = flights.tick(), flights.tick()
    led = snapshot(leader, flights, first)
    leader.play(
        """
        C: G1 EXAMINE "INBOX"
        C: G2 UID FETCH 1:* (UID RFC822.SIZE FLAGS)
        """
        + EXAMINED.format(exists=2, uidnext=3, tag="G1")
    )
    joined = snapshot(joiner, flights, second)
    joiner.play('C: G1 EXAMINE "INBOX"\n' + EXAMINED.format(exists=2, uidnext=3, tag="G1"))
    clock.advance(61)  # the leader's server never answers the FETCH
    assert isinstance(led.result.value, ImapTimeout)  # type: ignore[union-attr]
    led.addErrback(lambda f: None)
    joiner.play("C: G2 UID FETCH 1:* (UID RFC822.SIZE FLAGS)\n" + FETCHED.format(tag="G2"))
    _, index = joined.result  # type: ignore[misc]
    assert [m.uid for m in index] == [1, 2]
    assert joiner.account.index_source == "fetched" and len(flights) == 0


def test_a_joiner_that_gives_up_does_not_disturb_the_others() -> None:
    """A device that hangs up while it waits cancels its login; the flight still lands for
    the leader and for the other joiners."""
    flights = IndexFlights()
    leader, quitter, joiner = AccountPlaybook(), AccountPlaybook(), AccountPlaybook()
    logins = [flights.tick() for _ in range(3)]
    led = snapshot(leader, flights, logins[0])
    leader.play(
        """
        C: G1 EXAMINE "INBOX"
        C: G2 UID FETCH 1:* (UID RFC822.SIZE FLAGS)
        """
    )
    gave_up = snapshot(quitter, flights, logins[1])
    joined = snapshot(joiner, flights, logins[2])
    for pb in (quitter, joiner):
        pb.play('C: G1 EXAMINE "INBOX"\n' + EXAMINED.format(exists=2, uidnext=3, tag="G1"))
    gave_up.cancel()
    gave_up.addErrback(lambda f: None)
    leader.play(EXAMINED.format(exists=2, uidnext=3, tag="G1") + FETCHED.format(tag="G2"))
    assert [m.uid for m in led.result[1]] == [1, 2]  # type: ignore[index]
    assert [m.uid for m in joined.result[1]] == [1, 2]  # type: ignore[index]
