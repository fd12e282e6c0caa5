"""An SMTP server that keeps what it receives: the upstream relay of the submission tests.

aiosmtpd in a thread of its own (``Controller``) on a free loopback port, plain SMTP with AUTH
allowed in clear (it is loopback only), recording every accepted message with its envelope and
the AUTH identity. Faults are injected per test::

    with SmtpSink(users={"alice": "pw"}) as sink:
        sink.rcpt_replies["nobody@example.org"] = "550 5.1.1 No such user"
        sink.data_reply = "451 4.3.0 Try later"       # refuse at the end of DATA
        sink.drop_at = "DATA"                          # close the connection instead
        sink.delays["DATA"] = 2.0                      # answer slowly
        ...
        sink.wait_for(1)                               # bounded wait for one message
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.support.dovecot import HOST, free_port

__all__ = ["Received", "SmtpSink"]


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes  # as received, after un-dot-stuffing
    auth_user: str | None
    mail_options: tuple[str, ...]


@dataclass
class _Faults:
    mail_reply: str | None = None
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    drop_at: str | None = None  # "MAIL", "RCPT" or "DATA": close the connection there
    delays: dict[str, float] = field(default_factory=dict)


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def _fault(self, server: SMTP, command: str) -> bool:
        delay = self.sink.faults.delays.get(command)
        if delay:
            await asyncio.sleep(delay)
        if self.sink.faults.drop_at == command:
            assert server.transport is not None
            server.transport.abort()  # type: ignore[attr-defined]
            return True
        return False

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if await self._fault(server, "MAIL"):
            return "421 dropped"
        if self.sink.faults.mail_reply:
            return self.sink.faults.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Sender ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if await self._fault(server, "RCPT"):
            return "421 dropped"
        reply = self.sink.faults.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if await self._fault(server, "DATA"):
            return "421 dropped"
        if self.sink.faults.data_reply:
            return self.sink.faults.data_reply
        auth = session.auth_data
        user = auth.login.decode() if isinstance(auth, LoginPassword) else None
        received = Received(
            envelope.mail_from or "",
            tuple(envelope.rcpt_tos),
            envelope.original_content or b"",
            user,
            tuple(envelope.mail_options),
        )
        with self.sink.cond:
            self.sink.messages.append(received)
            queue_id = len(self.sink.messages)
            self.sink.cond.notify_all()
        return f"250 2.0.0 Ok: queued as SINK{queue_id}"


class SmtpSink:
    def __init__(
        self,
        users: Mapping[str, str] | None = None,
        *,
        smtputf8: bool = True,
        data_size_limit: int | None = None,
    ) -> None:
        self.users = dict(users or {})
        self.host = HOST
        self.port = free_port()
        self.messages: list[Received] = []
        self.auth_attempts: list[str] = []
        self.faults = _Faults()
        self.cond = threading.Condition()
        self._smtputf8 = smtputf8
        self._size = data_size_limit
        self._controller: Controller | None = None

    # convenient aliases for the faults
    @property
    def rcpt_replies(self) -> dict[str, str]:
        return self.faults.rcpt_replies

    @property
    def delays(self) -> dict[str, float]:
        return self.faults.delays

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("mail_reply", "data_reply", "drop_at"):
            setattr(self.faults, name, value)
        else:
            super().__setattr__(name, value)

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        login, password = data.login.decode(), data.password.decode()
        self.auth_attempts.append(login)
        ok = self.users.get(login) == password
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    def start(self) -> SmtpSink:
        handler = _Handler(self)
        kwargs: dict[str, Any] = {
            "authenticator": self._authenticate,
            "auth_require_tls": False,
            "enable_SMTPUTF8": self._smtputf8,
        }
        if self._size is not None:
            kwargs["data_size_limit"] = self._size
        self._controller = Controller(handler, hostname=self.host, port=self.port, **kwargs)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        """Block until at least ``count`` messages arrived (bounded); returns them all."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"the sink got {len(self.messages)} of {count} messages in {timeout}s"
                    )
                self.cond.wait(remaining)
            return list(self.messages)
