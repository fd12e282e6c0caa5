"""IMAP command encoding (no injection, ever) and incremental response parsing."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.proto.imap import (
    Atom,
    Continuation,
    Data,
    FetchBatch,
    LiteralBegin,
    LiteralChunk,
    LiteralEnd,
    ResponseError,
    ResponseParser,
    Status,
    StreamedLiteral,
    UnencodableError,
    encode_command,
    encode_string,
    fetch_items,
)


def events(data: bytes, *, threshold: int = 64 * 1024, step: int | None = None) -> list[object]:
    parser = ResponseParser(stream_threshold=threshold)
    out: list[object] = []
    step = step or len(data) or 1
    for i in range(0, len(data), step):
        parser.receive_data(data[i : i + step])
        while (event := parser.next_event()) is not None:
            out.append(event)
    return out


def test_login_with_hostile_user_names_stays_one_command() -> None:
    for name in ['a" LOGOUT', "a\\", "{5}", "x\r\nA2 DELETE INBOX", "ü", ")("]:
        cmd = encode_command("A1", Atom("LOGIN"), name, "pw")
        # Each part ends exactly one line; a second part is a literal announced by its size.
        assert all(part.endswith(b"\r\n") for part in cmd.parts)
        assert cmd.parts[0].count(b"\r\n") == 1
        # Read back as a server would: one command whose arguments are exactly the inputs.
        wire = b"".join(cmd.parts).replace(b"A1 ", b"* ", 1)
        (event,) = events(wire)
        assert event == Data(["LOGIN", name.encode(), b"pw"])


def test_quoted_string_escapes() -> None:
    assert encode_string('a"b\\c') == [b'"a\\"b\\\\c"']
    assert encode_string("x\ny") == [b"{3}", b"x\ny"]
    assert encode_string("x\ny", literal_plus=True) == [b"{3+}", b"x\ny"]
    with pytest.raises(UnencodableError):
        encode_string("a\0b")


def test_literal_plus_keeps_the_command_in_one_part() -> None:
    cmd = encode_command("A1", Atom("LOGIN"), "ü", "p w", literal_plus=True)
    assert cmd.parts == (b'A1 LOGIN {2+}\r\n\xc3\xbc "p w"\r\n',)


def test_lists_and_atoms() -> None:
    cmd = encode_command(
        "A2", Atom("UID"), Atom("FETCH"), Atom("1:*"), [Atom("UID"), Atom("FLAGS")]
    )
    assert cmd.parts == (b"A2 UID FETCH 1:* (UID FLAGS)\r\n",)
    assert encode_command("A3", Atom("ID"), ["k", "v"]).parts == (b'A3 ID ("k" "v")\r\n',)
    with pytest.raises(UnencodableError):
        encode_command("A4", Atom("NOOP\r\nA5 LOGOUT"))


@given(st.text(max_size=40).filter(lambda s: "\0" not in s))
def test_any_string_round_trips_through_the_parser(value: str) -> None:
    encoded = encode_string(value)
    wire = (
        b'* LIST () "/" '
        + (encoded[0] if len(encoded) == 1 else encoded[0] + b"\r\n" + encoded[1])
        + b"\r\n"
    )
    (event,) = events(wire)
    assert isinstance(event, Data)
    assert event.tokens[-1] == value.encode()


def test_status_responses_with_codes() -> None:
    evs = events(
        b"* OK [CAPABILITY IMAP4rev1 LITERAL+] hi\r\n"
        b"* OK [PERMANENTFLAGS (\\Deleted \\Seen \\*)] Flags\r\n"
        b"A1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
        b"+ ready\r\n"
    )
    assert evs[0] == Status("*", "OK", ("CAPABILITY", "IMAP4rev1", "LITERAL+"), "hi")
    assert evs[1].code == ("PERMANENTFLAGS", ["\\Deleted", "\\Seen", "\\*"])
    assert evs[2].code_name == "AUTHENTICATIONFAILED" and evs[2].kind == "NO"
    assert evs[3] == Continuation("ready")


def test_fetch_lines_parse_into_items() -> None:
    (ev,) = events(b"* 3 FETCH (FLAGS (\\Seen $POPDeleted) UID 7 RFC822.SIZE 1234)\r\n")
    assert isinstance(ev, Data)
    seq, items = fetch_items(ev.tokens)
    assert seq == 3
    assert items == {"UID": "7", "RFC822.SIZE": "1234", "FLAGS": ["\\Seen", "$POPDeleted"]}


SNAPSHOT = (
    b"* 1 FETCH (UID 5 RFC822.SIZE 100 FLAGS ())\r\n"
    b"* 2 FETCH (UID 6 RFC822.SIZE 200 FLAGS (\\Seen $POPDeleted) EMAILID (M6a))\r\n"
    b"* 3 FETCH (FLAGS () UID 7 RFC822.SIZE 300)\r\n"  # another shape: the general path
    b"* 4 FETCH (UID 8 RFC822.SIZE 400 FLAGS (\\Deleted))\r\n"
    b"A1 OK done\r\n"
)


@pytest.mark.parametrize("step", [1, 5, 50, 1000])
def test_snapshot_lines_take_the_fast_path_whatever_the_chunking(step: int) -> None:
    rows: list[tuple[bytes, ...]] = []
    data: list[Data] = []
    for ev in events(SNAPSHOT, step=step):
        if isinstance(ev, FetchBatch):
            rows.extend(ev.rows)
        elif isinstance(ev, Data):
            data.append(ev)
    assert rows == [
        (b"1", b"5", b"100", b"", b""),
        (b"2", b"6", b"200", b"\\Seen $POPDeleted", b"M6a"),
        (b"4", b"8", b"400", b"\\Deleted", b""),
    ]
    assert [fetch_items(d.tokens)[1]["UID"] for d in data] == ["7"]


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_large_literals_stream_in_chunks_whatever_the_packet_size(step: int) -> None:
    body = b"x" * 50 + b"\r\n.\r\n" + b"y" * 50
    wire = b"* 1 FETCH (UID 9 BODY[] {%d}\r\n" % len(body) + body + b")\r\nA1 OK done\r\n"
    evs = events(wire, threshold=10, step=step)
    assert isinstance(evs[0], LiteralBegin) and evs[0].size == len(body)
    chunks = [e for e in evs if isinstance(e, LiteralChunk)]
    assert b"".join(c.data for c in chunks) == body
    tail = evs[1 + len(chunks) :]
    assert isinstance(tail[0], LiteralEnd)
    assert tail[1] == Data(["1", "FETCH", ["UID", "9", "BODY[]", StreamedLiteral(len(body))]])
    assert tail[2] == Status("A1", "OK", None, "done")


@pytest.mark.parametrize("step", [1, 2, 1000])
def test_a_body_response_that_goes_on_after_the_literal(step: int) -> None:
    wire = b"* 2 FETCH (UID 9 BODY[] {3}\r\nabc FLAGS (\\Seen))\r\nA1 OK done\r\n"
    evs = events(wire, step=step)
    assert b"".join(e.data for e in evs if isinstance(e, LiteralChunk)) == b"abc"
    data = [e for e in evs if isinstance(e, Data)]
    assert data == [
        Data(["2", "FETCH", ["UID", "9", "BODY[]", StreamedLiteral(3), "FLAGS", ["\\Seen"]]])
    ]
    assert evs[-1] == Status("A1", "OK", None, "done")


def test_small_literals_arrive_inline() -> None:
    (ev,) = events(b"* 1 FETCH (BODY[] {3}\r\nabc UID 4)\r\n", step=2)
    assert ev == Data(["1", "FETCH", ["BODY[]", b"abc", "UID", "4"]])
    (ev,) = events(b'* LIST () "/" {3}\r\na b\r\n')
    assert ev == Data(["LIST", [], b"/", b"a b"])


@pytest.mark.parametrize(
    "prefix", [b"* 1 FETCH (UID 4 BODY[] ", b"* 1 FETCH (UID 4 FLAGS (\\Seen) BODY[]<0> "]
)
def test_small_bodies_stream_when_the_uid_comes_first(prefix: bytes) -> None:
    evs = events(prefix + b"{3}\r\nabc)\r\n", step=2)
    assert isinstance(evs[0], LiteralBegin) and (evs[0].size, evs[0].prefix) == (3, prefix)
    assert evs[0].uid in (4, None)  # None: the client reads it from the prefix
    assert b"".join(e.data for e in evs if isinstance(e, LiteralChunk)) == b"abc"
    assert isinstance(evs[-2], LiteralEnd) and isinstance(evs[-1], Data)


def test_nil_and_quoted_escapes() -> None:
    (ev,) = events(b'* LIST () NIL "a\\"b"\r\n')
    assert ev == Data(["LIST", [], None, b'a"b'])


def test_garbage_is_a_protocol_error() -> None:
    with pytest.raises(ResponseError):
        events(b"* 1 FETCH (UID 1))\r\n")
    with pytest.raises(ResponseError):
        events(b"A1 FOO bar\r\n")


WIRE = (
    b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready\r\n"
    + SNAPSHOT
    + b"* 1 FETCH (UID 5 BODY[] {13}\r\nhello\r\n.world)\r\n"  # the gateway's own shape
    + b"* 2 FETCH (UID 6 BODY[] {0}\r\n)\r\n"
    + b"* 3 FETCH (UID 7 BODY[] {5}\r\nabcde FLAGS (\\Seen))\r\n"
    + b"* 4 FETCH (BODY[] {4}\r\nwxyz UID 8)\r\n"  # UID after the body: collected
    + b"* 5 FETCH (UID 9 BODY[] {70}\r\n"
    + b"x" * 68
    + b"\r\n)\r\n"
    + b'* LIST (\\HasNoChildren) "/" {3}\r\na b\r\n'
    + b"+ go ahead\r\n"
    + b"A2 OK [READ-ONLY] done\r\n"
    + b"* 9 EXISTS\r\n"
)


def normalized(chunks: list[bytes], threshold: int) -> list[object]:
    """Events with chunk boundaries taken out: literal chunks joined, fetch batches merged."""
    parser = ResponseParser(stream_threshold=threshold)
    out: list[object] = []
    for chunk in chunks:
        parser.receive_data(chunk)
        while (event := parser.next_event()) is not None:
            if isinstance(event, LiteralChunk) and out and isinstance(out[-1], bytearray):
                out[-1] += event.data
            elif isinstance(event, LiteralChunk):
                out.append(bytearray(event.data))
            elif isinstance(event, FetchBatch) and out and isinstance(out[-1], FetchBatch):
                out[-1] = FetchBatch(out[-1].rows + event.rows)
            elif isinstance(event, LiteralBegin):
                out.append(("begin", event.size, event.prefix))  # uid: a shortcut, not data
            else:
                out.append(event)
    return out


@given(st.lists(st.integers(min_value=0, max_value=len(WIRE)), max_size=12), st.booleans())
def test_any_chunking_gives_the_same_events(cuts: list[int], small_threshold: bool) -> None:
    threshold = 10 if small_threshold else 64 * 1024
    bounds = [0, *sorted(cuts), len(WIRE)]
    chunks = [WIRE[a:b] for a, b in itertools.pairwise(bounds)]
    assert normalized(chunks, threshold) == normalized([WIRE], threshold)


def test_the_reference_stream_parses_as_expected() -> None:
    events = normalized([WIRE], 64 * 1024)
    bodies = [bytes(e) for e in events if isinstance(e, bytearray)]
    assert bodies == [b"hello\r\n.world", b"abcde", b"x" * 68 + b"\r\n"]
    assert Data(["4", "FETCH", ["BODY[]", b"wxyz", "UID", "8"]]) in events
    assert Data(["LIST", ["\\HasNoChildren"], b"/", b"a b"]) in events
    assert events[-3:] == [
        Continuation("go ahead"),
        Status("A2", "OK", ("READ-ONLY",), "done"),
        Data(["9", "EXISTS"]),
    ]


HOSTILE_PIECES = [
    b"* ",
    b"A1 OK done\r\n",
    b"A9 BAD [PARSE] x\r\n",
    b"{5}\r\n",
    b"{0}\r\n",
    b"{99999999999}\r\n",
    b"~{3}\r\n",
    b"(",
    b")",
    b'"',
    b"\\",
    b"[",
    b"]",
    b"NIL",
    b"+ \r\n",
    b"\r\n",
    b"\n",
    b"* 1 FETCH (UID 7 BODY[] {3}\r\nabc)\r\n",
    b"* 2 FETCH (UID 8 RFC822.SIZE 10 FLAGS (\\Seen))\r\n",
    b"* 3 FETCH (BODY[] {2}\r\nab UID 9)\r\n",
]


@given(
    st.lists(st.one_of(st.sampled_from(HOSTILE_PIECES), st.binary(max_size=30)), max_size=40),
    st.lists(st.integers(min_value=0, max_value=4000), max_size=8),
    st.booleans(),
)
def test_any_bytes_from_the_server_give_events_or_a_response_error(
    pieces: list[bytes], cuts: list[int], small_threshold: bool
) -> None:
    """A broken or hostile upstream can make the parser refuse (the client then drops the
    link), never raise anything else, and never hold more than it was sent plus one literal's
    announced size for streaming."""
    wire = b"".join(pieces)
    parser = ResponseParser(stream_threshold=10 if small_threshold else 64 * 1024)
    bounds = [0, *sorted(c for c in cuts if c <= len(wire)), len(wire)]
    held = 0
    try:
        for a, b in itertools.pairwise(bounds):
            parser.receive_data(wire[a:b])
            while (event := parser.next_event()) is not None:
                if isinstance(event, LiteralChunk):
                    held += len(event.data)
    except ResponseError:
        return
    assert held <= len(wire)
