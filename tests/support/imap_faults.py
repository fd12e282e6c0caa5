"""An IMAP-aware forwarder between popgate and the private Dovecot that fails on cue.

    with ImapFaults(dovecot.host, dovecot.imap_port) as faults:
        ...point popgate's [upstream.imap] at faults.port, security = "none"...
        stall = faults.stall_at("UID FETCH")            # the 1st UID FETCH of any connection
        ...log in...
        stall.wait(10)                                  # raises if it has not happened by then

It reads what the client sends as IMAP commands (tag, name, literals skipped) and counts each
command name over all connections, so a test names the Nth ``UID MOVE`` and not a byte offset.
A fault fires once, then the forwarder is transparent again:

``stall_at``  the server "hangs": nothing more is forwarded either way on that connection (the
              command itself is forwarded first unless ``forward=False``; ``answer_bytes`` of
              the answer are let through first, to hang in the middle of a literal).
``cut_at``    both sides are closed (a crash, a pulled cable) right after the command reached
              the server, or before it with ``forward=False``.
``interrupt_move_at``  a non-atomic MOVE interrupted half way, deterministically: instead of
              ``UID MOVE set box`` the server gets ``UID COPY`` of the first ``copied`` UIDs of
              the set; once that is done, both sides are closed. Dovecot's MOVE leaves exactly
              this behind when the link breaks at the wrong moment (copies made, sources kept),
              but when that happens depends on timing no test can hold.

Every fault has a ``happened`` event and ``wait(timeout)``; no test needs a sleep. Commands are
seen only in the clear: give popgate ``security = "none"`` towards the forwarder.

Without any fault it is a recorder: ``sent`` lists every command line a client sent, as
(connection number, the line without its tag and CRLF), ``sent_on(n)`` one connection's lines,
``closed`` the numbers of the connections the client has closed. Credentials are left out
(``LOGIN`` and ``AUTHENTICATE`` keep only their first word after the command name).
Threads and blocking sockets, like tests/support/tcp_proxy.py; all end when it is closed.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field

from tests.support.forwarder import LoopbackForwarder

__all__ = ["Fault", "ImapFaults"]

_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")
_MOVE = re.compile(rb"^(\S+) UID MOVE (\S+) (.*)\r\n$", re.IGNORECASE)


@dataclass(eq=False)
class Fault:
    kind: str  # "stall" | "cut" | "interrupt_move"
    command: str  # upper case, "UID MOVE" style
    nth: int
    forward: bool = True
    answer_bytes: int = 0
    contains: bytes = b""
    copied: int = 0
    happened: threading.Event = field(default_factory=threading.Event)
    line: bytes = b""  # the command line it fired on

    def wait(self, timeout: float) -> None:
        if not self.happened.wait(timeout):
            what = f"{self.kind} at {self.command} #{self.nth}"
            raise AssertionError(f"{what}: not within {timeout}s")


class _Connection:
    def __init__(
        self, owner: ImapFaults, client: socket.socket, server: socket.socket, number: int
    ) -> None:
        self.owner = owner
        self.number = number
        self.client = client
        self.server = server
        self.lock = threading.Lock()
        self.frozen = False  # nothing more is forwarded in either direction
        self.answer_budget: int | None = None  # server bytes still let through, then frozen
        self.stalling: Fault | None = None
        self.intercepted: tuple[Fault, bytes] | None = None  # (fault, tag) of a rewritten MOVE
        self.server_seen = b""

    def close(self) -> None:
        for s in (self.client, self.server):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    # -- client → server: find command lines, act on the one a fault names -----------------
    def client_to_server(self) -> None:
        pending = b""  # an incomplete line
        literal = 0  # bytes of a literal still to pass unparsed
        first_line = True  # the next line starts a command
        try:
            while True:
                data = self.client.recv(65536)
                if not data:
                    self.owner._client_closed(self.number)
                    break
                out = b""
                pos = 0
                while pos < len(data):
                    if literal:
                        take = min(literal, len(data) - pos)
                        out += data[pos : pos + take]
                        pos += take
                        literal -= take
                        continue
                    end = data.find(b"\n", pos)
                    if end < 0:
                        pending += data[pos:]
                        break
                    line = pending + data[pos : end + 1]
                    pending = b""
                    pos = end + 1
                    m = _LITERAL.search(line)
                    literal = int(m.group(1)) if m else 0
                    starts = first_line
                    first_line = literal == 0
                    fault = self.owner._match(line, self.number) if starts else None
                    if fault is None:
                        out += line
                        continue
                    if not self._act(fault, out, line):
                        return
                    out = b""
                if out and not self._send_to_server(out):
                    return
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                self.server.shutdown(socket.SHUT_WR)

    def _send_to_server(self, data: bytes) -> bool:
        with self.lock:
            if self.frozen:
                return True  # swallowed: the "server" reads nothing any more
        self.server.sendall(data)
        return True

    def _act(self, fault: Fault, before: bytes, line: bytes) -> bool:
        """Carry out ``fault`` on ``line``; False when this direction must stop."""
        fault.line = line
        if before:
            self._send_to_server(before)
        if fault.kind == "interrupt_move":
            m = _MOVE.match(line)
            assert m, f"not a UID MOVE: {line!r}"
            tag, uid_set, target = m.groups()
            subset = _first_uids(uid_set.decode(), fault.copied)
            with self.lock:
                self.intercepted = (fault, tag)
            if not subset:
                self._cut(fault)
                return False
            self.server.sendall(tag + b" UID COPY " + subset.encode() + b" " + target + b"\r\n")
            return True  # the server side closes once the COPY is answered
        if fault.kind == "cut":
            with self.lock:
                # A crash right after the command arrived: an answer the server gives before the
                # link is closed below must not reach the client either.
                self.frozen = True
            if fault.forward:
                self.server.sendall(line)
            self._cut(fault)
            return False
        # stall: the budget is set before the command goes on, or a fast answer slips through
        # uncounted and the stall never comes
        with self.lock:
            if fault.answer_bytes:
                self.answer_budget = fault.answer_bytes
                self.stalling = fault
            else:
                self.frozen = True
        if fault.forward:
            self.server.sendall(line)
        if not fault.answer_bytes:
            fault.happened.set()
        return True

    def _cut(self, fault: Fault) -> None:
        self.close()
        fault.happened.set()

    # -- server → client ------------------------------------------------------------------
    def server_to_client(self) -> None:
        try:
            while True:
                data = self.server.recv(65536)
                if not data:
                    break
                with self.lock:
                    intercepted = self.intercepted
                    if self.frozen:
                        continue
                    budget = self.answer_budget
                if intercepted is not None:
                    # The rewritten COPY's answer is for us, not for popgate: wait for its end.
                    fault, tag = intercepted
                    self.server_seen = (self.server_seen + data)[-4096:]
                    done = rb"(^|\r\n)" + re.escape(tag) + rb" \w+[^\r\n]*\r\n"
                    if re.search(done, self.server_seen):
                        self._cut(fault)
                        return
                    continue
                if budget is not None:
                    data = data[:budget]
                    with self.lock:
                        self.answer_budget = budget - len(data)
                        if self.answer_budget <= 0:
                            self.frozen = True
                            self.answer_budget = None
                    self.client.sendall(data)
                    if self.frozen and self.stalling is not None:
                        self.stalling.happened.set()
                    continue
                self.client.sendall(data)
        except OSError:
            pass
        finally:
            with self.lock:
                frozen = self.frozen
            if not frozen:
                with contextlib.suppress(OSError):
                    self.client.shutdown(socket.SHUT_WR)


def _first_uids(uid_set: str, count: int) -> str:
    """The first ``count`` UIDs of an IMAP UID set such as ``3:7,9``, as a set again."""
    taken: list[str] = []
    for part in uid_set.split(","):
        if count <= 0:
            break
        low, _, high = part.partition(":")
        a, b = int(low), int(high or low)
        a, b = min(a, b), max(a, b)
        last = min(b, a + count - 1)
        taken.append(str(a) if a == last else f"{a}:{last}")
        count -= last - a + 1
    return ",".join(taken)


class ImapFaults(LoopbackForwarder):
    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__(target_host, target_port)
        self.commands: Counter[str] = Counter()  # command name → times seen (all connections)
        self.sent: list[tuple[int, str]] = []  # (connection number, command line), in order
        self.closed: set[int] = set()  # connections whose client closed its side
        self._faults: list[Fault] = []
        self._connections: list[_Connection] = []
        self._numbers = itertools.count(1)

    def connections(self) -> list[int]:
        """The numbers of the connections that sent a command so far, in order."""
        with self._lock:
            return sorted({number for number, _ in self.sent})

    def sent_on(self, connection: int) -> list[str]:
        """The command lines the client sent on connection number ``connection``."""
        with self._lock:
            return [line for number, line in self.sent if number == connection]

    def _client_closed(self, connection: int) -> None:
        with self._lock:
            self.closed.add(connection)

    def _drop_connections(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for c in connections:
            c.close()

    # -- faults ---------------------------------------------------------------------------
    def stall_at(
        self,
        command: str,
        nth: int = 1,
        *,
        forward: bool = True,
        answer_bytes: int = 0,
        contains: bytes = b"",
    ) -> Fault:
        """Hang at the ``nth`` command named ``command`` from now on (counted from now)."""
        return self._add(Fault("stall", command, nth, forward, answer_bytes, contains))

    def cut_at(
        self, command: str, nth: int = 1, *, forward: bool = True, contains: bytes = b""
    ) -> Fault:
        return self._add(Fault("cut", command, nth, forward, contains=contains))

    def interrupt_move_at(self, nth: int = 1, *, copied: int) -> Fault:
        return self._add(Fault("interrupt_move", "UID MOVE", nth, copied=copied))

    def _add(self, fault: Fault) -> Fault:
        with self._lock:
            fault.nth += self.commands[fault.command.upper()]
            fault.command = fault.command.upper()
            self._faults.append(fault)
        return fault

    def _match(self, line: bytes, connection: int) -> Fault | None:
        """Count and record the command starting on ``line``; the fault it triggers, if any."""
        words = line.split(b" ", 3)
        if len(words) < 2:
            return None
        name = words[1].rstrip(b"\r\n").upper().decode("ascii", "replace")
        if name == "UID" and len(words) > 2:
            name += " " + words[2].rstrip(b"\r\n").upper().decode("ascii", "replace")
        shown = line.split(b" ", 1)[1].rstrip(b"\r\n")
        if name in ("LOGIN", "AUTHENTICATE"):
            shown = b" ".join(shown.split(b" ")[:2])  # never the credentials
        with self._lock:
            self.commands[name] += 1
            self.sent.append((connection, shown.decode("utf-8", "replace")))
            for fault in self._faults:
                if fault.command == name and fault.contains in line:
                    if self.commands[name] >= fault.nth:
                        self._faults.remove(fault)
                        return fault
        return None

    # -- plumbing -------------------------------------------------------------------------
    def _forward(self, client: socket.socket, server: socket.socket) -> None:
        with self._lock:
            connection = _Connection(self, client, server, next(self._numbers))
            self._connections.append(connection)
        threading.Thread(target=connection.client_to_server, daemon=True).start()
        threading.Thread(target=connection.server_to_client, daemon=True).start()
