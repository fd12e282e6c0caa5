"""SMTP reply text: enhanced status codes (RFC 2034/3463) and relay replies passed on."""

from __future__ import annotations

import pytest

from gateway.submission.relay import RelayCapabilities
from gateway.submission.replies import Reply, with_enhanced_code


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("250 OK", "250 2.0.0 OK"),
        ("503 Error: need MAIL command", "503 5.5.1 Error: need MAIL command"),
        ("552 Error: Too much mail data", "552 5.3.4 Error: Too much mail data"),
        ("421 4.7.0 Too many", "421 4.7.0 Too many"),
        ("550 5.1.1 Unknown", "550 5.1.1 Unknown"),
        ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
        ("334 VXNlcm5hbWU6", "334 VXNlcm5hbWU6"),
        ("250-SIZE 100", "250-2.0.0 SIZE 100"),
        ("599 Odd", "599 5.0.0 Odd"),
        ("not a reply", "not a reply"),
    ],
)
def test_with_enhanced_code(line: str, expected: str) -> None:
    assert with_enhanced_code(line) == expected


def test_relay_reply_rendered_faithfully() -> None:
    reply = Reply(550, "5.1.1 <x@y>: Recipient address rejected\nUser unknown")
    assert reply.enhanced == "5.1.1"
    assert reply.render(enhanced=False) == (
        "550-5.1.1 <x@y>: Recipient address rejected\r\n550 User unknown"
    )
    assert reply.render(enhanced=True) == (
        "550-5.1.1 <x@y>: Recipient address rejected\r\n550 5.0.0 User unknown"
    )


def test_relay_text_cannot_inject_lines_or_8bit() -> None:
    reply = Reply(451, "4.3.0 bad\r\r\x00thing \u00fc")
    assert reply.render(enhanced=False) == "451 4.3.0 bad???thing ?"
    assert Reply(250, "").render(enhanced=False) == "250 (no text)"
    assert len(Reply(250, "x" * 2000).render(enhanced=False)) < 512


def test_reply_classes() -> None:
    assert Reply(250, "ok").positive and Reply(354, "go").positive
    assert not Reply(451, "later").positive and not Reply(550, "no").positive
    assert Reply(535, "5.7.8 bad").with_code(550) == Reply(550, "5.7.8 bad")


def test_relay_capabilities_from_ehlo() -> None:
    caps = RelayCapabilities.from_extensions({"size": "10240000", "8bitmime": "", "auth": "x"})
    assert caps == RelayCapabilities(size=10240000, eightbitmime=True, smtputf8=False)
    assert RelayCapabilities.from_extensions({"size": ""}).size == 0
    assert RelayCapabilities.from_extensions({}).size is None
