"""What popgate does to a submitted message: pure functions on bytes."""

from __future__ import annotations

import pytest

from gateway.submission.message import (
    MessageRefused,
    check_content,
    ensure_message_id,
    envelope_only,
    header_fields,
    message_id,
    new_message_id,
    normalize_line_endings,
    sent_copy,
    split_header,
)

MSG = b"From: a@x.test\r\nTo: Bob <bob@y.test>\r\nSubject: hi\r\n\r\nbody\r\n"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"a\rb\r", b"a\r\nb\r\n"),
        (b"a\r\nb", b"a\r\nb\r\n"),
        (b"a\r\r\nb\n\r\n", b"a\r\n\r\nb\r\n\r\n"),
        (b"", b""),
    ],
)
def test_line_endings_become_crlf(raw: bytes, expected: bytes) -> None:
    assert normalize_line_endings(raw) == expected


def test_a_bare_lf_dot_line_stays_content_after_normalizing() -> None:
    """SMTP smuggling: "\\n.\\n" must not end the message at the relay. Once every line end is
    CRLF, the relay client dot-stuffs that line like any other line starting with "."."""
    normalized = normalize_line_endings(b"Subject: x\r\n\r\nfirst\n.\nMAIL FROM:<evil@x>\r\n")
    assert normalized == b"Subject: x\r\n\r\nfirst\r\n.\r\nMAIL FROM:<evil@x>\r\n"


def test_nul_is_refused() -> None:
    check_content(MSG)
    with pytest.raises(MessageRefused) as caught:
        check_content(MSG + b"\0")
    assert caught.value.reply.startswith("554 5.6.0 ")


def test_split_header_and_fields_keep_every_byte() -> None:
    message = b"A: 1\r\nB: folded\r\n  more\r\nnot a field\r\n\r\nbody: x\r\n"
    header, body = split_header(message)
    assert body == b"body: x\r\n"
    fields = header_fields(header)
    assert [name for name, _ in fields] == ["a", "b", ""]
    assert b"".join(raw for _, raw in fields) == header
    assert split_header(b"\r\nonly body\r\n") == (b"", b"only body\r\n")
    assert split_header(b"A: 1\r\n") == (b"A: 1\r\n", b"")


def test_existing_message_id_is_kept() -> None:
    message = MSG.replace(b"Subject", b"Message-Id:  <k@x.test>\r\nSubject")
    assert ensure_message_id(message, "<new@x>") == (message, "<k@x.test>", False)


def test_missing_message_id_is_added_at_the_end_of_the_header() -> None:
    out, mid, added = ensure_message_id(MSG, "<new@x.test>")
    assert added and mid == "<new@x.test>"
    assert out == MSG.replace(b"\r\n\r\n", b"\r\nMessage-ID: <new@x.test>\r\n\r\n", 1)
    assert message_id(out) == "<new@x.test>"
    header_only, _, _ = ensure_message_id(b"Subject: x\r\n", "<n@x>")
    assert header_only == b"Subject: x\r\nMessage-ID: <n@x>\r\n\r\n"


def test_new_message_id_uses_the_senders_domain() -> None:
    assert new_message_id("alice@Example.ORG", "gw.local").endswith("@Example.ORG>")
    assert new_message_id("", "gw.local").endswith("@gw.local>")
    assert new_message_id("weird@[1.2.3.4]", "gw.local").endswith("@1.2.3.4>")
    assert new_message_id("x@a b", "gw.local").endswith("@gw.local>")
    assert new_message_id("a@x.test", "h") != new_message_id("a@x.test", "h")


def test_envelope_only_recipients() -> None:
    message = (
        b'To: "Doe, John" <John@Y.test>, carol@z.test\r\n'
        b"Cc: dave@z.test,\r\n eve@z.test\r\n"
        b"Resent-To: frank@z.test\r\n"
        b"Subject: Bcc: hidden@z.test\r\n\r\nTo: ghost@z.test\r\n"
    )
    rcpts = [
        "john@y.test",
        "carol@z.test",
        "eve@z.test",
        "frank@z.test",
        "Hidden@z.test",
        "ghost@z.test",
        "hidden@z.test",
    ]
    assert envelope_only(rcpts, message) == ["Hidden@z.test", "ghost@z.test"]


def test_sent_copy_adds_a_bcc_field_and_changes_nothing_else() -> None:
    copy = sent_copy(MSG, ["c@z.test", "d@z.test"])
    assert copy == MSG.replace(b"\r\n\r\n", b"\r\nBcc: c@z.test, d@z.test\r\n\r\n", 1)
    assert sent_copy(MSG, []) is MSG


def test_sent_copy_extends_an_existing_bcc_field() -> None:
    message = b"Bcc: a@z.test\r\nTo: b@z.test\r\n\r\nx\r\n"
    assert sent_copy(message, ["c@z.test"]) == (
        b"Bcc: a@z.test, c@z.test\r\nTo: b@z.test\r\n\r\nx\r\n"
    )
    assert sent_copy(b"Bcc:\r\n\r\nx\r\n", ["c@z.test"]) == b"Bcc: c@z.test\r\n\r\nx\r\n"


def test_a_long_bcc_field_is_folded() -> None:
    many = [f"recipient-number-{i}@example.test" for i in range(8)]
    copy = sent_copy(MSG, many)
    header, _ = split_header(copy)
    bcc = next(raw for name, raw in header_fields(header) if name == "bcc")
    lines = bcc.split(b"\r\n")[:-1]
    assert len(lines) > 1 and all(len(line) <= 78 for line in lines)
    assert all(line.startswith(b" ") for line in lines[1:])
    assert envelope_only(many, copy) == []
