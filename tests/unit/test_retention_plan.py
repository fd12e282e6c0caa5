"""Retention decisions and the delete-policy table, without any mailbox."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.maildrop.policy import POLICIES, expire_capability
from gateway.maildrop.retention_plan import Candidate, Quota, plan_retention

NOW = datetime(2026, 11, 23, tzinfo=UTC)


def aged(uid: int, days: int, size: int = 1000) -> Candidate:
    return Candidate(uid, size, NOW - timedelta(days=days))


def plan(candidates: list[Candidate], **kw: object) -> list[int]:
    args: dict[str, object] = {
        "now": NOW,
        "delete_after_days": 0,
        "quota": None,
        "quota_high_percent": 0,
        "quota_target_percent": 80,
    }
    args.update(kw)
    return [r.uid for r in plan_retention(candidates, **args).removals]  # type: ignore[arg-type]


def test_nothing_happens_when_retention_is_off() -> None:
    assert plan([aged(1, 1000)]) == []


def test_age_cutoff_is_strict_and_oldest_first() -> None:
    assert plan([aged(1, 10), aged(2, 31), aged(3, 30), aged(4, 400)], delete_after_days=30) == [
        4,
        2,
    ]


def test_quota_takes_oldest_until_under_the_target() -> None:
    candidates = [aged(1, 5, 100 * 1024), aged(2, 50, 100 * 1024), aged(3, 20, 100 * 1024)]
    quota = Quota(used_kib=950, limit_kib=1000)
    # 950 KiB → under 800 KiB needs two 100 KiB messages: the two oldest arrivals.
    assert plan(candidates, quota=quota, quota_high_percent=90, quota_target_percent=80) == [2, 3]
    below = Quota(used_kib=850, limit_kib=1000)
    assert plan(candidates, quota=below, quota_high_percent=90, quota_target_percent=80) == []


def test_age_and_quota_together_count_what_age_already_freed() -> None:
    candidates = [aged(1, 100, 200 * 1024), aged(2, 10, 100 * 1024), aged(3, 5, 100 * 1024)]
    quota = Quota(used_kib=950, limit_kib=1000)
    # Age removes 1 (200 KiB): 750 KiB is already under 80%, so quota adds nothing.
    assert plan(
        candidates,
        delete_after_days=30,
        quota=quota,
        quota_high_percent=90,
        quota_target_percent=80,
    ) == [1]


def test_reasons_say_why() -> None:
    (removal,) = plan_retention(
        [aged(1, 45)],
        now=NOW,
        delete_after_days=30,
        quota=None,
        quota_high_percent=0,
        quota_target_percent=80,
    ).removals
    assert removal.reason == "deleted by POP, arrived 45 days ago (> 30)"


@pytest.mark.parametrize(
    ("name", "removes", "hides"),
    [
        ("hide", False, True),
        ("seen", False, True),
        ("archive", True, False),
        ("trash", True, False),
        ("expunge", True, False),
    ],
)
def test_policy_table_matches_the_contract(name: str, removes: bool, hides: bool) -> None:
    policy = POLICIES[name]
    assert policy.removes_from_mailbox is removes
    assert policy.hide_for_device is hides
    assert ("\\Seen" in policy.add_flags) is (name == "seen")


def test_expire_capability() -> None:
    assert expire_capability(0, 0) == "EXPIRE NEVER"
    assert expire_capability(30, 0) == "EXPIRE 30"
    assert expire_capability(30, 90) == "EXPIRE 0"
