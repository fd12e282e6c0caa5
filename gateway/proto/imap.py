"""IMAP4 client-side wire format, sans I/O (RFC 3501/9051): command encoding, response parsing.

Commands are built from typed parts so user input can only ever become an IMAP *string* (quoted
or literal), never protocol text: a user name of ``a" LOGOUT`` or ``{5}`` is data, not a command.

Responses are parsed incrementally. Message bodies are handed out as ``LiteralBegin``,
``LiteralChunk``..., ``LiteralEnd`` events as the bytes arrive, so a 50 MB message never has to
sit in memory whole: every literal over ``stream_threshold`` octets, and every body whose FETCH
names the UID before it (what the gateway asks for). The response line that contained it then
carries a ``StreamedLiteral`` placeholder where the literal was. Other literals are delivered
inside their response.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

# --- values ------------------------------------------------------------------------------------


class Atom(str):
    """Protocol text (a keyword, number, flag or sequence set), as opposed to a string.

    In commands an Atom is written verbatim, so it must never hold user input.
    """

    __slots__ = ()


class Literal(bytes):
    """A string always sent as a literal, never quoted: for values of any size, because servers
    bound quoted strings (Cyrus ends the connection on one over its ``maxquoted``)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class StreamedLiteral:
    """Where a literal was, in a response whose literal was streamed out as chunk events."""

    size: int


Token: TypeAlias = Atom | bytes | StreamedLiteral | list["Token"] | None


# --- command encoding -----------------------------------------------------------------------

# Characters that may appear in a quoted string (RFC 3501 QUOTED-CHAR, 7-bit, without CR/LF/NUL).
_QUOTABLE = re.compile(rb"[\x01-\x09\x0b\x0c\x0e-\x7f]*")


class UnencodableError(ValueError):
    """A value IMAP cannot carry at all (a NUL inside a string)."""


@dataclass(frozen=True, slots=True)
class EncodedCommand:
    """A command split where a synchronizing literal makes the client wait for ``+``.

    Send ``parts[0]``; for each later part wait for a continuation request first. With LITERAL+
    there is only ever one part.
    """

    tag: str
    parts: tuple[bytes, ...]


CommandPart: TypeAlias = Atom | str | bytes | int | Sequence["CommandPart"]


def encode_string(value: str | bytes, *, literal_plus: bool = False) -> list[bytes]:
    """An IMAP string: quoted when every octet allows it, otherwise a literal.

    Returns one element for a quoted string; for a literal, two: the text up to and including the
    ``{n}`` marker, and the literal data (a synchronizing literal must be sent separately).
    """
    data = value.encode("utf-8") if isinstance(value, str) else value
    if b"\0" in data:
        raise UnencodableError("IMAP strings cannot contain NUL")
    if not isinstance(value, Literal) and _QUOTABLE.fullmatch(data):
        return [b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"']
    marker = b"{%d+}" % len(data) if literal_plus else b"{%d}" % len(data)
    return [marker, data]


def encode_command(tag: str, *parts: CommandPart, literal_plus: bool = False) -> EncodedCommand:
    """Encode ``tag part part ...``; strings become IMAP strings, Atoms are written as they are."""
    chunks: list[bytes] = [tag.encode("ascii")]
    out: list[bytes] = []

    def emit(part: CommandPart) -> None:
        if isinstance(part, Atom):
            if "\r" in part or "\n" in part:
                raise UnencodableError("an Atom cannot span lines")
            chunks.append(part.encode("ascii"))
        elif isinstance(part, bool):
            raise TypeError("bool is not an IMAP value")
        elif isinstance(part, int):
            chunks.append(b"%d" % part)
        elif isinstance(part, (str, bytes)):
            encoded = encode_string(part, literal_plus=literal_plus)
            if len(encoded) == 1:
                chunks.append(encoded[0])
            elif literal_plus:
                chunks.append(encoded[0] + b"\r\n" + encoded[1])
            else:
                chunks.append(encoded[0])
                out.append(b" ".join(chunks) + b"\r\n")
                chunks.clear()
                chunks.append(encoded[1])
                return
        else:
            # A parenthesized list: elements joined by spaces, no space after "(" or before ")".
            chunks.append(b"(")
            for i, item in enumerate(part):
                before = len(chunks)
                emit(item)
                if i and len(chunks) > before:
                    chunks[before] = b" " + chunks[before]
            chunks.append(b")")
            # Merge so the outer join puts no space inside the parentheses.
            _merge_parenthesized(chunks)

    for part in parts:
        emit(part)
    out.append(b" ".join(chunks) + b"\r\n")
    return EncodedCommand(tag, tuple(out))


def _merge_parenthesized(chunks: list[bytes]) -> None:
    """Collapse the chunks from the last ``(`` to the final ``)`` into one chunk."""
    depth = 0
    for i in range(len(chunks) - 1, -1, -1):
        if chunks[i] == b")":
            depth += 1
        elif chunks[i] == b"(":
            depth -= 1
            if depth == 0:
                chunks[i:] = [b"".join(chunks[i:])]
                return


# --- response parsing -------------------------------------------------------------------------

# The events made once or more per downloaded message are plain (not frozen) slotted dataclasses:
# a frozen one costs several times as much to build, and nothing keeps or hashes them.


@dataclass(slots=True)
class Status:
    """A status response: tagged completion, or untagged OK/NO/BAD/BYE/PREAUTH."""

    tag: str  # "*" when untagged
    kind: str  # OK, NO, BAD, BYE, PREAUTH
    code: tuple[Token, ...] | None  # the [RESP-CODE args] as tokens, e.g. ("UIDVALIDITY", "42")
    text: str

    @property
    def code_name(self) -> str | None:
        return str(self.code[0]).upper() if self.code else None


@dataclass(slots=True)
class Data:
    """An untagged data response, e.g. ``* 3 FETCH (...)`` as ``["3", "FETCH", [...]]``."""

    tokens: list[Token]


@dataclass(frozen=True, slots=True)
class FetchBatch:
    """A run of ``* n FETCH (UID u RFC822.SIZE s FLAGS (...) [EMAILID (e)])`` lines.

    A mailbox snapshot is thousands of these lines; tokenizing each would cost more than
    everything else in a POP login, so consecutive lines of exactly this shape are matched in
    one go and handed out raw: ``(seq, uid, size, flags, emailid)`` as bytes, ``b""`` for a
    missing EMAILID. Lines of any other shape still arrive as ``Data``.
    """

    rows: list[tuple[bytes, bytes, bytes, bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Continuation:
    text: str


@dataclass(slots=True)
class LiteralBegin:
    size: int
    # The response line up to the literal, e.g. ``* 3 FETCH (UID 7 BODY[] ``: says whose it is.
    prefix: bytes = b""
    uid: int | None = None  # read from the prefix already, where the parser had to anyway


@dataclass(slots=True)
class LiteralChunk:
    data: bytes


@dataclass(slots=True)
class LiteralEnd:
    pass


Event = Status | Data | FetchBatch | Continuation | LiteralBegin | LiteralChunk | LiteralEnd

_STATUS_KINDS = frozenset({"OK", "NO", "BAD", "BYE", "PREAUTH"})
_FAST_FETCH = re.compile(
    rb"\* (\d+) FETCH \(UID (\d+) RFC822\.SIZE (\d+) FLAGS \(([^()\"{}\r\n]*)\)"
    rb"(?: EMAILID \(([!-~]+)\))?\)\r\n"
)
# The same line without groups, repeated: how far a run of such lines goes.
_FAST_FETCH_RUN = re.compile(
    rb"(?:\* \d+ FETCH \(UID \d+ RFC822\.SIZE \d+ FLAGS \([^()\"{}\r\n]*\)"
    rb"(?: EMAILID \([!-~]+\))?\)\r\n)+"
)
_LITERAL_AT_END = re.compile(rb"~?\{(\d+)\+?\}\Z")
# How the answer to the gateway's own body FETCH begins (one per downloaded message): matched
# in the buffer, before the general line handling below.
_BODY_HEAD = re.compile(rb"(\* (\d+) FETCH \(UID (\d+) BODY\[\] )\{(\d+)\}\r\n")
# A message body whose FETCH names the UID before it: it can go to its sink as it arrives,
# however small (collecting it into the line first and tokenizing that costs more than the
# body is worth). Without the UID up front, only the whole line could tell whose body it is.
_BODY_WITH_UID_FIRST = re.compile(
    rb"\* \d+ FETCH \((?:[^{]* )?UID \d+ (?:[^{]* )?BODY\[[^\]{]*\](?:<\d+>)? \Z"
)
_TOKEN = re.compile(
    rb' *(?:(\()|(\))|"((?:[^"\\\r\n]|\\.)*)"'
    rb"|([^ ()\"\r\n\[\]{]+(?:\[[^\]\r\n]*\](?:<[0-9.]+>)?)?)"
    rb"|(\[[^\]\r\n]*\]))"
)
_UNESCAPE = re.compile(rb"\\(.)")
_FETCH, _UID, _BODY = Atom("FETCH"), Atom("UID"), Atom("BODY[]")


class ResponseError(ValueError):
    """The server sent something that is not IMAP; the connection cannot be trusted further."""


class ResponseParser:
    # A response line without its literals; servers send far shorter ones (RFC 7162 suggests
    # clients accept at least 8 KiB), but a 10,000-message SEARCH result is one long line.
    max_line = 16 * 1024 * 1024

    def __init__(self, stream_threshold: int = 64 * 1024) -> None:
        self.stream_threshold = stream_threshold
        # Input not yet parsed: ``_data[_pos:]``. Bytes are read where they arrived, by offset:
        # a body is sliced out of the received chunk once (or handed on whole), never copied
        # into a buffer and out again; only a line cut by the end of a read is carried over.
        self._data = b""
        self._pos = 0
        self._scan_from = 0  # where to look for the end of the current line, in _data
        self._segments: list[bytes | StreamedLiteral] = []
        self._inline_need = -1  # octets of an inline literal still to arrive whole
        self._stream_left = 0
        self._end_pending = False
        # After a body that _BODY_HEAD found: the response it ends, if only ")" follows.
        self._body_response: Data | None = None

    def receive_data(self, data: bytes) -> None:
        if self._pos >= len(self._data):
            self._data, self._pos, self._scan_from = data, 0, 0
        else:
            # The rest of a line (or of a small inline literal) that the last read cut off.
            # A line that spans many reads is copied once per read: fine for the lines IMAP
            # servers send, bounded by max_line for any other.
            self._scan_from = max(0, self._scan_from - self._pos)
            self._data = self._data[self._pos :] + data
            self._pos = 0

    def next_event(self) -> Event | None:
        while True:
            data, pos = self._data, self._pos
            available = len(data) - pos
            if self._stream_left:
                if not available:
                    return None
                n = min(available, self._stream_left)
                chunk = data if n == len(data) else data[pos : pos + n]
                self._pos = pos + n
                self._stream_left -= n
                self._end_pending = self._stream_left == 0
                return LiteralChunk(chunk)
            if self._end_pending:
                self._end_pending = False
                return LiteralEnd()
            if self._inline_need >= 0:
                if available < self._inline_need:
                    return None
                self._segments.append(data[pos : pos + self._inline_need])
                self._pos = pos + self._inline_need
                self._inline_need = -1
                continue
            if self._body_response is not None and available >= 3:
                response, self._body_response = self._body_response, None
                if data.startswith(b")\r\n", pos):
                    self._pos = self._scan_from = pos + 3
                    self._segments = []
                    return response
            if not self._segments and (head := _BODY_HEAD.match(data, pos)):
                # One per downloaded message: matched where it arrived, and the response built
                # without the general tokenizer, which would cost more than all the rest.
                prefix, seq, uid, size = head.groups()
                literal = StreamedLiteral(int(size))
                self._pos = self._scan_from = head.end()
                self._segments = [prefix, literal]
                self._stream_left = literal.size
                self._end_pending = literal.size == 0
                self._body_response = Data(
                    [Atom(seq.decode()), _FETCH, [_UID, Atom(uid.decode()), _BODY, literal]]
                )
                return LiteralBegin(literal.size, prefix, int(uid))
            if (
                not self._segments
                and data.startswith(b"* ", pos)
                and (run := _FAST_FETCH_RUN.match(data, pos))
            ):
                end = run.end()
                rows = _FAST_FETCH.findall(data, pos, end)
                self._pos = self._scan_from = end
                return FetchBatch(rows)
            end = data.find(b"\r\n", max(pos, self._scan_from))
            if end < 0:
                self._scan_from = max(pos, len(data) - 1)
                if available > self.max_line:
                    raise ResponseError("response line too long")
                return None
            text = data[pos:end]
            self._pos = self._scan_from = end + 2
            m = _LITERAL_AT_END.search(text)
            if m is None:
                self._segments.append(text)
                segments, self._segments = self._segments, []
                return _parse_line(segments)
            size = int(m.group(1))
            before = text[: m.start()]
            self._segments.append(before)
            if size > self.stream_threshold or (
                len(self._segments) == 1 and _BODY_WITH_UID_FIRST.match(before)
            ):
                self._segments.append(StreamedLiteral(size))
                self._stream_left = size
                self._end_pending = size == 0
                line_start = self._segments[0]
                assert isinstance(line_start, bytes)
                return LiteralBegin(size, line_start)
            self._inline_need = size


def _parse_line(segments: list[bytes | StreamedLiteral]) -> Event:
    """Turn one response line into an event.

    ``segments`` alternates text and literal values: text, literal, text, literal, ..., text.
    """
    first = segments[0]
    assert isinstance(first, bytes)
    if first.startswith(b"+"):
        return Continuation(first[1:].strip().decode("utf-8", "replace"))
    tag, _, rest = first.partition(b" ")
    kind, _, after = rest.partition(b" ")
    kind_s = kind.decode("ascii", "replace").upper()
    if kind_s in _STATUS_KINDS and len(segments) == 1:
        return _parse_status(tag.decode("ascii", "replace"), kind_s, after)
    if tag != b"*":
        if kind_s in _STATUS_KINDS:  # a tagged status with a literal in its text: keep the text
            text = b"".join(s for s in segments[::2] if isinstance(s, bytes))
            return _parse_status(tag.decode("ascii", "replace"), kind_s, text.partition(b" ")[2])
        raise ResponseError(f"unexpected tagged response {first[:80]!r}")
    return Data(_tokenize([rest, *segments[1:]]))


def _parse_status(tag: str, kind: str, after: bytes) -> Status:
    code: tuple[Token, ...] | None = None
    if after.startswith(b"["):
        close = after.find(b"]")
        if close > 0:
            code = tuple(_tokenize([after[1:close]]))
            after = after[close + 1 :].lstrip(b" ")
    return Status(tag, kind, code, after.decode("utf-8", "replace"))


def _tokenize(segments: Sequence[bytes | StreamedLiteral]) -> list[Token]:
    top: list[Token] = []
    stack = [top]
    for index, segment in enumerate(segments):
        if index % 2:  # a literal value (even positions are text)
            stack[-1].append(segment)
            continue
        assert isinstance(segment, bytes)
        pos, end = 0, len(segment)
        while pos < end:
            m = _TOKEN.match(segment, pos)
            if m is None:
                if segment[pos:].strip(b" "):
                    raise ResponseError(f"cannot parse response near {segment[pos : pos + 40]!r}")
                break
            pos = m.end()
            if m.lastindex == 4:
                atom = m.group(4)
                stack[-1].append(None if atom == b"NIL" else Atom(atom.decode("utf-8", "replace")))
            elif m.lastindex == 1:
                inner: list[Token] = []
                stack[-1].append(inner)
                stack.append(inner)
            elif m.lastindex == 2:
                if len(stack) == 1:
                    raise ResponseError("unbalanced ')' in response")
                stack.pop()
            elif m.lastindex == 3:
                quoted = m.group(3)
                stack[-1].append(_UNESCAPE.sub(rb"\1", quoted) if b"\\" in quoted else quoted)
            else:
                stack[-1].append(Atom(m.group(5).decode("utf-8", "replace")))
    return top


_UID_IN_FETCH = re.compile(rb"\* \d+ FETCH \((?:[^{]* )?UID (\d+)")


def fetch_uid(prefix: bytes) -> int | None:
    """The UID named in a FETCH response's beginning, if it comes before the literal."""
    m = _UID_IN_FETCH.match(prefix)
    return int(m.group(1)) if m else None


def fetch_items(tokens: list[Token]) -> tuple[int, dict[str, Token]]:
    """``["3", "FETCH", ["UID", "7", ...]]`` → ``(3, {"UID": "7", ...})``, keys upper-cased."""
    if len(tokens) < 3 or not isinstance(tokens[2], list):
        raise ResponseError("malformed FETCH response")
    items = tokens[2]
    result: dict[str, Token] = {}
    for i in range(0, len(items) - 1, 2):
        key = items[i]
        result[str(key).upper()] = items[i + 1]
    seq = tokens[0]
    return int(seq) if isinstance(seq, str) else 0, result


# --- mailbox names (RFC 3501 section 5.1.3, modified UTF-7) -------------------------------------


def encode_mailbox(name: str) -> bytes:
    """A mailbox name as IMAP wants it without UTF8=ACCEPT: modified UTF-7."""
    out = bytearray()
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.extend(b"&" + base64.b64encode(raw).rstrip(b"=").replace(b"/", b",") + b"-")
            pending.clear()

    for char in name:
        if " " <= char <= "~":
            flush()
            out.extend(b"&-" if char == "&" else char.encode("ascii"))
        else:
            pending.append(char)
    flush()
    return bytes(out)


def decode_mailbox(raw: bytes) -> str:
    """The inverse of :func:`encode_mailbox`; invalid sequences are kept as they are."""
    out: list[str] = []
    i = 0
    while i < len(raw):
        amp = raw.find(b"&", i)
        if amp < 0:
            out.append(raw[i:].decode("utf-8", "replace"))
            break
        out.append(raw[i:amp].decode("utf-8", "replace"))
        end = raw.find(b"-", amp)
        if end < 0:
            out.append(raw[amp:].decode("utf-8", "replace"))
            break
        chunk = raw[amp + 1 : end]
        if not chunk:
            out.append("&")
        else:
            b64 = chunk.replace(b",", b"/")
            try:
                out.append(base64.b64decode(b64 + b"=" * (-len(b64) % 4)).decode("utf-16-be"))
            except (ValueError, UnicodeDecodeError):
                out.append(raw[amp : end + 1].decode("utf-8", "replace"))
        i = end + 1
    return "".join(out)
