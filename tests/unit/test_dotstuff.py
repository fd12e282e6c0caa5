"""Dot-stuffing and TOP filtering hold whatever the chunk boundaries are."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.proto.dotstuff import DotStuffer, TopFilter

lines = st.lists(
    st.sampled_from([b"", b".", b"..", b".x", b"x.", b"hello", b". ", b"\r", b"a\nb"]), max_size=30
)


def unstuff(wire: bytes) -> bytes:
    """What an RFC 1939 client does: split CRLF lines until "." alone, drop one leading dot."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    body = wire[: -len(b".\r\n")]
    out = []
    for line in body.split(b"\r\n")[:-1]:
        assert line != b".", "premature terminator"
        out.append(line[1:] if line.startswith(b".") else line)
    return b"".join(x + b"\r\n" for x in out)


def stuff(message: bytes, cuts: list[int]) -> bytes:
    stuffer = DotStuffer()
    pieces, prev = [], 0
    for cut in [*sorted(c % (len(message) + 1) for c in cuts), len(message)]:
        pieces.append(stuffer.feed(message[prev:cut]))
        prev = max(prev, cut)
    return b"".join(pieces) + stuffer.finish()


@given(lines, st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_round_trip_over_any_chunking(body_lines: list[bytes], cuts: list[int]) -> None:
    message = b"".join(line.replace(b"\n", b"") + b"\r\n" for line in body_lines)
    assert unstuff(stuff(message, cuts)) == message


@given(st.binary(max_size=200), st.lists(st.integers(min_value=0, max_value=300), max_size=6))
def test_chunking_never_changes_the_output(message: bytes, cuts: list[int]) -> None:
    assert stuff(message, cuts) == stuff(message, [])


def test_dot_at_a_chunk_boundary_is_stuffed() -> None:
    s = DotStuffer()
    assert s.feed(b"a\r\n") + s.feed(b".\r\n") + s.finish() == b"a\r\n..\r\n.\r\n"


def test_message_without_final_newline_gets_one_before_the_terminator() -> None:
    s = DotStuffer()
    assert s.feed(b"no newline") + s.finish() == b"no newline\r\n.\r\n"
    assert DotStuffer().finish() == b".\r\n"


def test_dot_lines_before_a_long_dotless_tail_are_stuffed() -> None:
    """The fast path for attachments: only the part up to the last dot is searched."""
    tail = b"QUJD" * 300 + b"\r\n"
    s = DotStuffer()
    wire = s.feed(b"a\r\n.b\r\n" + tail) + s.feed(b".c\r\n" + tail) + s.feed(tail) + s.finish()
    assert wire == b"a\r\n..b\r\n" + tail + b"..c\r\n" + tail + tail + b".\r\n"
    assert unstuff(wire) == b"a\r\n.b\r\n" + tail + b".c\r\n" + tail + tail


def test_leading_dot_of_the_whole_message() -> None:
    s = DotStuffer()
    assert s.feed(b".start\r\n") == b"..start\r\n"


MESSAGE = b"From: a\r\nSubject: b\r\n\r\nline1\r\nline2\r\nline3\r\n"


def top(message: bytes, n: int, chunk: int) -> bytes:
    f = TopFilter(n)
    return b"".join(f.feed(message[i : i + chunk]) for i in range(0, len(message), chunk))


def test_top_passes_header_blank_line_and_n_lines_for_every_chunk_size() -> None:
    for chunk in range(1, len(MESSAGE) + 1):
        assert top(MESSAGE, 0, chunk) == b"From: a\r\nSubject: b\r\n\r\n", chunk
        assert top(MESSAGE, 2, chunk) == b"From: a\r\nSubject: b\r\n\r\nline1\r\nline2\r\n", chunk
        assert top(MESSAGE, 99, chunk) == MESSAGE, chunk


def test_top_of_a_message_with_empty_header_or_no_body() -> None:
    assert top(b"\r\nbody\r\nmore\r\n", 1, 3) == b"\r\nbody\r\n"
    assert top(b"Subject: x\r\n", 5, 4) == b"Subject: x\r\n"


@given(
    st.lists(st.sampled_from([b"a", b".", b"\r\n", b"\n", b"\r", b"x: y", b""]), max_size=60).map(
        b"".join
    ),
    st.integers(min_value=0, max_value=5),
    st.lists(st.integers(min_value=0, max_value=300), max_size=8),
)
def test_top_is_a_prefix_and_chunking_never_changes_it(
    message: bytes, n: int, cuts: list[int]
) -> None:
    """Hostile line ends included (bare CR/LF, blank lines split anywhere): TOP only ever cuts
    the message short, the same wherever the chunks fall, and stuffs to a well-formed answer."""
    whole = TopFilter(n).feed(message)
    assert message.startswith(whole)
    f, pieces, prev = TopFilter(n), [], 0
    for cut in [*sorted(c % (len(message) + 1) for c in cuts), len(message)]:
        pieces.append(f.feed(message[prev:cut]))
        prev = max(prev, cut)
    assert b"".join(pieces) == whole
    wire = stuff(whole, cuts)
    assert wire.endswith(b".\r\n")
    body = wire[:-3]
    # The terminator starts a line, and no line before it (split on LF, as lenient clients
    # do) is a lone "." that would end the answer early.
    assert body == b"" or body.endswith(b"\n")
    assert not any(line in (b".", b".\r") for line in body.split(b"\n"))
