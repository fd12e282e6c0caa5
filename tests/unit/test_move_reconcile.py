"""Telling the copies an interrupted MOVE left behind from their sources (account.move)."""

from __future__ import annotations

from gateway.upstream.account import message_id, sources_with_copies

A = ("<a@example.org>", 100, b"01-Dec-2026 00:00:00 +0000")
B = ("<b@example.org>", 200, b"01-Dec-2026 00:00:01 +0000")


def test_each_copy_stands_for_one_source_only() -> None:
    # Two sources that look alike and one copy: only one of them may go without moving.
    assert sources_with_copies({1: A, 2: A, 3: B}, [A]) == {1}
    assert sources_with_copies({1: A, 2: A, 3: B}, [A, A, B]) == {1, 2, 3}
    assert sources_with_copies({1: A}, []) == set()


def test_a_copy_must_match_in_every_part() -> None:
    other_size = (A[0], A[1] + 1, A[2])
    other_date = (A[0], A[1], b"01-Dec-2026 00:00:09 +0000")
    assert sources_with_copies({1: A}, [other_size, other_date, B]) == set()


def test_message_id_is_read_unfolded_and_case_blind() -> None:
    assert message_id(b"Message-ID: <a@example.org>\r\n\r\n") == "<a@example.org>"
    assert message_id(b"message-id:\r\n <folded@example.org>\r\n\r\n") == "<folded@example.org>"
    assert message_id(b"\r\n") == ""
