"""Throttling and limits for listeners on the open internet, as policy without I/O.

- :class:`FailureThrottle`: failed logins from one client address are answered late, the delay
  doubling per further failure up to a cap, on one schedule shared by all of that address's
  connections. While an address has failures on record, its next login attempt is not even
  checked upstream before its turn: otherwise a client that hangs up when no quick ``+OK``
  comes (or simply runs 50 connections in parallel) would guess at the upstream's speed and
  never wait for an answer.
- :class:`ConnectionLimits`: how many client connections the process and each address may hold.
- :class:`LogBudget`: a flood of refusals makes a few log lines, not one per refusal.

Addresses are keyed by :func:`gateway.addresses.limit_key`. Time comes from an injected clock,
so the unit tests drive it by hand; the protocol glue turns the returned delays into timers.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the policy itself needs nothing from the configuration's loader
    from gateway.config import SecuritySettings

Clock = Callable[[], float]

#: Failed logins allowed in one connection before it is closed (POP3 and SMTP AUTH alike).
MAX_AUTH_FAILURES = 3

#: An address quiet this long after its last scheduled answer starts again from the first delay.
FORGET_AFTER = 900.0
#: Addresses with failures on record at most; beyond this the least recently active are
#: forgotten (about 100 bytes each, so the table stays under a few tens of MB).
MAX_TRACKED_ADDRESSES = 100_000
#: Attempts one address may have waiting, counted in capped delays: beyond that a login is
#: refused at once, unchecked, so that hanging up and reconnecting cannot queue without end.
MAX_QUEUED_SLOTS = 8

#: Seconds between two log lines about refused connections of one kind.
REFUSAL_LOG_INTERVAL = 10.0


@dataclass(slots=True)
class _Record:
    failures: int  # since the last success
    free_at: float  # no login from this address is checked before this (clock time)
    waiting: int = 0  # attempts handed a turn and not yet answered
    checking: int = 0  # attempts begun and without a verdict yet, turn or not


@dataclass(frozen=True, slots=True)
class Attempt:
    """One login attempt's place in its address's schedule.

    ``wait``: seconds before its credentials may be checked. ``refused``: the address has too
    many attempts waiting; answer at once without checking. ``slot_end``: when its failure is
    answered, for an attempt that had to take a turn.
    """

    key: str
    wait: float = 0.0
    slot_end: float | None = None
    refused: bool = False


class FailureThrottle:
    def __init__(
        self,
        delay: float,
        max_delay: float,
        clock: Clock,
        *,
        forget_after: float = FORGET_AFTER,
        max_tracked: int = MAX_TRACKED_ADDRESSES,
        max_checking: int = 50,
    ) -> None:
        self.delay = delay
        # Checks one address may have under way at once. A client cannot hold more connections
        # than max_connections_per_ip, but one that hangs up and reconnects leaves its checks
        # running: without this, before the first failure is back from a slow upstream it
        # could start as many as it can reconnect.
        self.max_checking = max_checking
        self.max_delay = max(delay, max_delay)
        self.clock = clock
        self.forget_after = forget_after
        self.max_tracked = max_tracked
        self._records: OrderedDict[str, _Record] = OrderedDict()  # least recently active first

    def __len__(self) -> int:
        return len(self._records)

    @property
    def enabled(self) -> bool:
        return self.delay > 0

    def delay_after(self, failures: int) -> float:
        """The delay of the ``failures``-th failure in a row: doubling from ``delay``, capped."""
        if failures < 1:
            return 0.0
        return min(self.delay * 2.0 ** min(failures - 1, 64), self.max_delay)

    def begin(self, key: str) -> Attempt:
        """A login attempt from ``key`` is about to be checked: when may it be?"""
        if not self.enabled:
            return Attempt(key)
        now = self.clock()
        self._prune(now)
        record = self._records.get(key)
        if record is None:
            record = self._add(key, now)
        if record.checking >= self.max_checking:
            return Attempt(key, refused=True)
        if record.failures == 0 and record.free_at <= now:
            record.checking += 1
            return Attempt(key)
        if record.free_at - now > self.max_delay * MAX_QUEUED_SLOTS:
            return Attempt(key, refused=True)
        start = max(now, record.free_at)
        # Each attempt already waiting will most likely fail too: count it, so that a queue
        # of parallel attempts doubles its delays as a series of failures would.
        slot_end = start + self.delay_after(record.failures + record.waiting + 1)
        record.free_at = slot_end
        record.waiting += 1
        record.checking += 1
        self._records.move_to_end(key)
        return Attempt(key, start - now, slot_end)

    def failed(self, attempt: Attempt) -> float:
        """The attempt's credentials were wrong: seconds until its answer may go out."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        record = self._records.get(attempt.key) or self._add(attempt.key, now)
        record.checking = max(0, record.checking - 1)
        record.failures += 1
        if attempt.slot_end is not None:
            record.waiting = max(0, record.waiting - 1)
            answer_at = attempt.slot_end
        else:
            # Checked without a turn (the first failures of a burst): each still takes its own
            # place at the end of the schedule, so a burst is answered one delay apart.
            answer_at = max(now, record.free_at) + self.delay_after(record.failures)
        record.free_at = max(record.free_at, answer_at)
        self._records.move_to_end(attempt.key)
        return max(0.0, answer_at - now)

    def succeeded(self, attempt: Attempt) -> None:
        """The credentials were right: the doubling starts again from ``delay``. Turns already
        handed out stay, so a valid login does not free a queue of guesses."""
        record = self._records.get(attempt.key)
        if record is None:
            return
        record.failures = 0
        record.checking = max(0, record.checking - 1)
        if attempt.slot_end is not None:
            record.waiting = max(0, record.waiting - 1)
        self._drop_if_idle(attempt.key, record)

    def abandoned(self, attempt: Attempt) -> None:
        """The attempt ended without a verdict (the client left while it waited, the upstream
        could not say): give its turn back if it was the last one handed out."""
        record = self._records.get(attempt.key)
        if record is None or attempt.refused:
            return
        record.checking = max(0, record.checking - 1)
        if attempt.slot_end is not None:
            record.waiting = max(0, record.waiting - 1)
            if record.free_at == attempt.slot_end:
                record.free_at = attempt.slot_end - self.delay_after(
                    record.failures + record.waiting + 1
                )
        self._drop_if_idle(attempt.key, record)

    def _add(self, key: str, now: float) -> _Record:
        record = self._records[key] = _Record(0, now)
        while len(self._records) > self.max_tracked:
            self._records.popitem(last=False)
        return record

    def _drop_if_idle(self, key: str, record: _Record) -> None:
        """Nothing on record that matters any more: no failures, nothing under way."""
        idle = record.failures == 0 and record.waiting == 0 and record.checking == 0
        if idle and record.free_at <= self.clock():
            del self._records[key]

    def _prune(self, now: float) -> None:
        while self._records:
            key, record = next(iter(self._records.items()))
            if record.free_at + self.forget_after > now:
                break
            del self._records[key]


class Refusal(enum.Enum):
    """Why a connection was refused; the value is the text the client is told."""

    TOO_MANY_CONNECTIONS = "Too many connections, try again later"
    TOO_MANY_FROM_ADDRESS = "Too many connections from your address, try again later"


class ConnectionLimits:
    """Counts open client connections, in total and per address key.

    One instance serves every listener of the process (POP3 and submission): the file
    descriptors they use come from one budget. Only keys with open connections are stored,
    so the table never outgrows ``max_total``.
    """

    def __init__(self, max_total: int, max_per_key: int) -> None:
        self.max_total = max_total
        self.max_per_key = max_per_key
        self.total = 0
        self._per_key: dict[str, int] = {}

    def open(self, key: str) -> Refusal | None:
        """Count a new connection, or say why it must be refused (then nothing is counted)."""
        if self.total >= self.max_total:
            return Refusal.TOO_MANY_CONNECTIONS
        count = self._per_key.get(key, 0)
        if count >= self.max_per_key:
            return Refusal.TOO_MANY_FROM_ADDRESS
        self._per_key[key] = count + 1
        self.total += 1
        return None

    def close(self, key: str) -> None:
        count = self._per_key.get(key, 0)
        if count <= 0:
            return
        if count == 1:
            del self._per_key[key]
        else:
            self._per_key[key] = count - 1
        self.total -= 1

    def count(self, key: str) -> int:
        return self._per_key.get(key, 0)


def open_files_needed(max_connections: int) -> int:
    """Descriptors the process needs with ``max_connections`` clients: each POP3 session (and
    each submission session while it relays) holds its client's and one upstream connection,
    plus listeners, log and spool files. Past the limit, accept() fails and clients see nothing
    at all: the lockout issue 9 found with 1,024."""
    return 2 * max_connections + 64


class LogBudget:
    """At most one line per ``interval``; the next line tells how many were left out."""

    def __init__(self, interval: float, clock: Clock) -> None:
        self.interval = interval
        self.clock = clock
        self._next_at: float | None = None
        self._left_out = 0

    def take(self) -> int | None:
        """None: do not log this one. Else log it, with the returned count left out before."""
        now = self.clock()
        if self._next_at is not None and now < self._next_at:
            self._left_out += 1
            return None
        self._next_at = now + self.interval
        left_out, self._left_out = self._left_out, 0
        return left_out


class ClientLimits:
    """Everything one process enforces about its clients, shared by all listeners."""

    def __init__(self, settings: SecuritySettings, clock: Clock) -> None:
        self.failures = FailureThrottle(
            settings.auth_failure_delay,
            settings.auth_failure_max_delay,
            clock,
            max_checking=settings.max_connections_per_ip,
        )
        self.connections = ConnectionLimits(
            settings.max_connections, settings.max_connections_per_ip
        )
        self._refusal_logs = {
            refusal: LogBudget(REFUSAL_LOG_INTERVAL, clock) for refusal in Refusal
        }

    def refusal_log_line(self, refusal: Refusal, service: str, peer: str) -> str | None:
        """The log line for a refused connection, or None while the budget is spent."""
        left_out = self._refusal_logs[refusal].take()
        if left_out is None:
            return None
        limit = (
            f"max_connections = {self.connections.max_total}"
            if refusal is Refusal.TOO_MANY_CONNECTIONS
            else f"max_connections_per_ip = {self.connections.max_per_key}"
        )
        line = f"{service} connection from {peer} refused: {limit} reached"
        if left_out:
            line += f" ({left_out} more refused since the last such line)"
        return line
