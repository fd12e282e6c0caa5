"""The throttling and limits policy (gateway/limits.py), on a clock the tests move by hand."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

import pytest

from gateway.config import SecuritySettings
from gateway.limits import (
    FORGET_AFTER,
    MAX_QUEUED_SLOTS,
    REFUSAL_LOG_INTERVAL,
    Attempt,
    ClientLimits,
    ConnectionLimits,
    FailureThrottle,
    LogBudget,
    Refusal,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def throttle(clock: Clock) -> FailureThrottle:
    return FailureThrottle(2.0, 15.0, clock)


def fail_serially(throttle: FailureThrottle, clock: Clock, key: str = "192.0.2.1") -> float:
    """One client: waits for its turn, fails, waits for the answer. Returns the answer delay."""
    attempt = throttle.begin(key)
    assert not attempt.refused
    clock.advance(attempt.wait)
    delay = throttle.failed(attempt)
    clock.advance(delay)
    return delay


# --------------------------------------------------------------------------- the delays


def test_delay_doubles_per_failure_up_to_the_cap(throttle: FailureThrottle, clock: Clock) -> None:
    delays = [fail_serially(throttle, clock) for _ in range(6)]

    assert delays == [2.0, 4.0, 8.0, 15.0, 15.0, 15.0]


def test_a_serial_client_never_waits_before_its_check(
    throttle: FailureThrottle, clock: Clock
) -> None:
    fail_serially(throttle, clock)

    assert throttle.begin("192.0.2.1").wait == 0.0


def test_a_success_starts_the_doubling_again(throttle: FailureThrottle, clock: Clock) -> None:
    for _ in range(4):
        fail_serially(throttle, clock)
    attempt = throttle.begin("192.0.2.1")
    clock.advance(attempt.wait)
    throttle.succeeded(attempt)
    clock.advance(attempt.slot_end - clock.now if attempt.slot_end else 0)

    assert fail_serially(throttle, clock) == 2.0


def test_other_addresses_are_never_delayed(throttle: FailureThrottle, clock: Clock) -> None:
    for _ in range(5):
        fail_serially(throttle, clock, "192.0.2.1")
    for _ in range(20):  # and a queue of waiting attempts there
        throttle.begin("192.0.2.1")

    other = throttle.begin("198.51.100.9")
    assert other == Attempt("198.51.100.9")
    assert throttle.failed(other) == 2.0


def test_a_burst_of_failures_is_answered_one_delay_apart(
    throttle: FailureThrottle, clock: Clock
) -> None:
    """30 connections check at once (nothing on record yet): their answers still come one at a
    time, on the address's schedule, not all after 2 s."""
    attempts = [throttle.begin("192.0.2.1") for _ in range(30)]
    assert all(a.wait == 0 for a in attempts)

    answers = [throttle.failed(a) for a in attempts]

    assert answers[:5] == [2.0, 6.0, 14.0, 29.0, 44.0]
    gaps = [b - a for a, b in itertools.pairwise(answers)]
    assert all(gap >= 4.0 for gap in gaps)
    assert gaps[-1] == 15.0


def test_waiting_attempts_are_checked_one_turn_apart(
    throttle: FailureThrottle, clock: Clock
) -> None:
    for _ in range(4):
        fail_serially(throttle, clock)

    waits = [throttle.begin("192.0.2.1").wait for _ in range(5)]

    assert waits == [0.0, 15.0, 30.0, 45.0, 60.0]


def test_a_success_does_not_free_the_queue(throttle: FailureThrottle, clock: Clock) -> None:
    """An attacker with one valid account cannot reset away the turns of his guesses."""
    for _ in range(4):
        fail_serially(throttle, clock)
    queued = [throttle.begin("192.0.2.1") for _ in range(3)]
    valid = throttle.begin("192.0.2.1")
    clock.advance(valid.wait)
    throttle.succeeded(valid)

    after = throttle.begin("192.0.2.1")
    assert queued[-1].slot_end is not None
    assert clock.now + after.wait >= queued[-1].slot_end


def test_too_long_a_queue_is_refused_unchecked(throttle: FailureThrottle, clock: Clock) -> None:
    fail_serially(throttle, clock)
    attempts = [throttle.begin("192.0.2.1") for _ in range(5 * MAX_QUEUED_SLOTS)]

    refused = [a for a in attempts if a.refused]
    assert refused
    assert all(a.wait <= 15.0 * (MAX_QUEUED_SLOTS + 1) for a in attempts if not a.refused)


def test_an_abandoned_last_turn_is_given_back(throttle: FailureThrottle, clock: Clock) -> None:
    for _ in range(4):
        fail_serially(throttle, clock)
    throttle.begin("192.0.2.1")
    second = throttle.begin("192.0.2.1")

    throttle.abandoned(second)

    assert throttle.begin("192.0.2.1").wait == second.wait


def test_a_quiet_address_is_forgotten(throttle: FailureThrottle, clock: Clock) -> None:
    for _ in range(5):
        fail_serially(throttle, clock)
    clock.advance(FORGET_AFTER)

    assert fail_serially(throttle, clock) == 2.0


def test_checks_under_way_per_address_are_bounded(clock: Clock) -> None:
    throttle = FailureThrottle(2.0, 15.0, clock, max_checking=50)
    attempts = [throttle.begin("192.0.2.1") for _ in range(60)]

    assert [a.refused for a in attempts] == [False] * 50 + [True] * 10
    assert not throttle.begin("198.51.100.9").refused
    throttle.failed(attempts[0])
    assert not throttle.begin("192.0.2.1").refused


def test_a_success_leaves_nothing_on_record(throttle: FailureThrottle) -> None:
    for _ in range(3):
        throttle.succeeded(throttle.begin("192.0.2.1"))

    assert len(throttle) == 0


def test_the_table_is_bounded(clock: Clock) -> None:
    throttle = FailureThrottle(2.0, 15.0, clock, max_tracked=100)
    for n in range(1000):
        throttle.failed(throttle.begin(f"10.0.{n // 256}.{n % 256}"))

    assert len(throttle) == 100


def test_zero_delay_turns_it_off(clock: Clock) -> None:
    throttle = FailureThrottle(0.0, 0.0, clock)
    for _ in range(10):
        attempt = throttle.begin("192.0.2.1")
        assert attempt == Attempt("192.0.2.1")
        assert throttle.failed(attempt) == 0.0
    assert len(throttle) == 0


# --------------------------------------------------------------------------- attackers


def checks_in(
    seconds: float, connections: int, give_up_after: float | None = None, latency: float = 0.0
) -> tuple[int, int]:
    """Simulate one address guessing for ``seconds`` with ``connections`` in parallel, each
    trying again as soon as it has its answer (or, with ``give_up_after``, as soon as no answer
    came that quickly: it hangs up and reconnects, its check still under way upstream). Each
    check takes ``latency`` seconds. Returns (credentials checked, refused)."""
    clock = Clock()
    start = clock.now
    throttle = FailureThrottle(2.0, 15.0, clock)
    events: list[tuple[float, int, Callable[[], None]]] = []
    order = itertools.count()
    checked = refused = 0

    def at(when: float, action: Callable[[], None]) -> None:
        heapq.heappush(events, (when, next(order), action))

    def attempt() -> None:
        nonlocal refused
        a = throttle.begin("192.0.2.1")
        if a.refused:
            refused += 1
            at(clock.now + 1.0, attempt)  # answered at once: reconnect and try again
            return
        if give_up_after is not None and a.wait > give_up_after:
            at(clock.now + give_up_after, lambda: (throttle.abandoned(a), attempt()))
            return
        at(clock.now + a.wait, lambda: check(a))

    def check(a: Attempt) -> None:
        nonlocal checked
        checked += 1
        asked = clock.now
        if give_up_after is not None and latency > give_up_after:
            at(asked + give_up_after, attempt)  # hung up; the check goes on upstream
            at(asked + latency, lambda: throttle.failed(a))
            return
        at(asked + latency, lambda: verdict(a))

    def verdict(a: Attempt) -> None:
        answer = throttle.failed(a)
        if give_up_after is not None and answer > give_up_after:
            at(clock.now + give_up_after, attempt)
        else:
            at(clock.now + answer, attempt)

    for _ in range(connections):
        at(clock.now, attempt)
    while events and events[0][0] < start + seconds:
        clock.now, _, action = heapq.heappop(events)
        action()
    return checked, refused


def test_parallel_connections_guess_no_faster_than_one() -> None:
    period = 1200.0  # twenty minutes, in fact
    serial, _ = checks_in(period, 1)
    parallel, _ = checks_in(period, 30)

    assert serial <= period / 15 + 4
    # The first burst is checked at once (nothing on record yet); after that, one schedule.
    assert parallel <= serial + 30


def test_hanging_up_before_a_slow_upstream_answers_does_not_guess_faster() -> None:
    """An upstream that takes 3 s to refuse (Cyrus' failedloginpause): clients that hang up
    after 0.2 s and reconnect leave their checks running; still no more than a connection
    limit's worth of checks run before the first failure puts the address on the schedule."""
    period = 1200.0
    impatient, _ = checks_in(period, 30, give_up_after=0.2, latency=3.0)

    assert impatient <= period / 15 + 50


def test_hanging_up_early_does_not_guess_faster() -> None:
    period = 1200.0  # twenty minutes, in fact
    impatient, refused = checks_in(period, 30, give_up_after=1.0)

    assert impatient <= period / 15 + 30
    assert refused > 0  # the reconnecting ones that found the queue full


# --------------------------------------------------------------------------- connections


def test_connections_per_address_and_in_total() -> None:
    limits = ConnectionLimits(max_total=5, max_per_key=2)

    assert limits.open("a") is None
    assert limits.open("a") is None
    assert limits.open("a") is Refusal.TOO_MANY_FROM_ADDRESS
    assert limits.open("b") is None
    assert limits.open("c") is None
    assert limits.open("d") is None
    assert limits.open("e") is Refusal.TOO_MANY_CONNECTIONS
    assert limits.total == 5

    limits.close("a")
    assert limits.open("e") is None
    assert limits.count("a") == 1


def test_connection_table_holds_only_open_connections() -> None:
    limits = ConnectionLimits(max_total=100, max_per_key=100)
    for n in range(50):
        limits.open(f"k{n}")
    for n in range(50):
        limits.close(f"k{n}")
    limits.close("never-opened")

    assert limits.total == 0
    assert limits._per_key == {}


# --------------------------------------------------------------------------- log lines


def test_log_budget_says_what_it_left_out(clock: Clock) -> None:
    budget = LogBudget(10.0, clock)

    assert budget.take() == 0
    assert [budget.take() for _ in range(500)] == [None] * 500
    clock.advance(10.0)
    assert budget.take() == 500
    assert budget.take() is None


def test_refusal_log_lines(clock: Clock) -> None:
    limits = ClientLimits(SecuritySettings(max_connections=7, max_connections_per_ip=3), clock)

    first = limits.refusal_log_line(Refusal.TOO_MANY_FROM_ADDRESS, "pop3", "192.0.2.1:4711")
    flood = [
        limits.refusal_log_line(Refusal.TOO_MANY_FROM_ADDRESS, "pop3", "192.0.2.1:4711")
        for _ in range(1000)
    ]
    other_kind = limits.refusal_log_line(Refusal.TOO_MANY_CONNECTIONS, "submission", "[::1]:25")
    clock.advance(REFUSAL_LOG_INTERVAL)
    later = limits.refusal_log_line(Refusal.TOO_MANY_FROM_ADDRESS, "pop3", "192.0.2.9:1")

    assert (
        first == "pop3 connection from 192.0.2.1:4711 refused: max_connections_per_ip = 3 reached"
    )
    assert flood == [None] * 1000
    assert other_kind == "submission connection from [::1]:25 refused: max_connections = 7 reached"
    assert later == (
        "pop3 connection from 192.0.2.9:1 refused: max_connections_per_ip = 3 reached"
        " (1000 more refused since the last such line)"
    )
