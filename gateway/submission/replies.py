"""SMTP replies: the exact text a client gets, with RFC 3463 enhanced status codes (sans-IO).

When the gateway advertises ENHANCEDSTATUSCODES (RFC 2034) every 2xx/4xx/5xx reply after EHLO
must carry one, including the replies aiosmtpd writes itself ("250 OK", "503 Error: need MAIL
command"). :func:`with_enhanced_code` adds a fitting one where a line has none; a code that is
already there (the relay's own ``5.1.1``) is kept, so the client sees the upstream's verdict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}(?: |$)")
_REPLY = re.compile(r"^(\d{3})([ -])(.*)$", re.DOTALL)

# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets including the code and CRLF.
MAX_REPLY_TEXT = 480

#: The enhanced code added to a reply without one, by basic code (RFC 3463, RFC 4954).
DEFAULT_ENHANCED = {
    235: "2.7.0",
    421: "4.3.0",
    450: "4.2.0",
    451: "4.3.0",
    452: "4.3.1",
    454: "4.7.0",
    500: "5.5.2",
    501: "5.5.4",
    502: "5.5.1",
    503: "5.5.1",
    504: "5.5.4",
    521: "5.3.2",
    530: "5.7.0",
    534: "5.7.9",
    535: "5.7.8",
    538: "5.7.11",
    550: "5.0.0",
    551: "5.1.6",
    552: "5.3.4",
    553: "5.1.3",
    554: "5.0.0",
    555: "5.5.4",
}


def default_enhanced(code: int) -> str:
    return DEFAULT_ENHANCED.get(code, f"{code // 100}.0.0")


def with_enhanced_code(line: str) -> str:
    """``"250 OK"`` -> ``"250 2.0.0 OK"``; 3xx lines and lines that have one stay as they are."""
    match = _REPLY.match(line)
    if match is None:
        return line
    code, separator, text = int(match.group(1)), match.group(2), match.group(3)
    if code // 100 not in (2, 4, 5) or _ENHANCED.match(text):
        return line
    return f"{code}{separator}{default_enhanced(code)} {text}".rstrip()


def _clean(text: str) -> str:
    """Printable ASCII only: a relay's reply must not inject lines into ours, and a client that
    did not ask for SMTPUTF8 gets no 8-bit text."""
    return "".join(c if " " <= c <= "~" else "?" for c in text).strip()[:MAX_REPLY_TEXT]


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply as the relay (or the gateway) gave it: basic code and text lines."""

    code: int
    text: str  # lines separated by "\n", as aiosmtplib joins a multi-line reply

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def enhanced(self) -> str | None:
        first = self.text.split("\n", 1)[0]
        match = _ENHANCED.match(first)
        return match.group(0).strip() if match else None

    def render(self, *, enhanced: bool) -> str:
        """The reply as lines for the client (joined by CRLF, without the final one)."""
        lines = [_clean(line) for line in self.text.split("\n")] or [""]
        lines = [line for line in lines if line] or ["(no text)"]
        out = []
        for i, line in enumerate(lines):
            separator = " " if i == len(lines) - 1 else "-"
            rendered = f"{self.code}{separator}{line}"
            out.append(with_enhanced_code(rendered) if enhanced else rendered)
        return "\r\n".join(out)

    def with_code(self, code: int) -> Reply:
        """The same text under another basic code of the same class (for a command whose valid
        replies differ from what the relay said, e.g. a 535 at MAIL time)."""
        assert code // 100 == self.code // 100
        return Reply(code, self.text)
