"""Shared fixtures: a private Dovecot, fresh users on it, seeded mailboxes, and the gateway
as a subprocess.

Fixtures
--------
``dovecot`` (session)
    a running :class:`tests.support.dovecot.Dovecot`.
``mail_user`` (function)
    a fresh :class:`MailUser` ``(name, password)`` on that Dovecot.
``seeded_user`` (function)
    factory ``seeded_user(messages, mailbox="INBOX", user=None) -> SeededUser``.
``start_gateway`` (function)
    factory ``start_gateway(sections=None, *, ca_signed_cert=False, env=None, wait=True,
    timeout=30, **overrides) -> GatewayProcess``; every gateway is stopped at test end.
``pop3_endpoint`` (function)
    factory ``pop3_endpoint(target) -> Pop3Endpoint`` for target "dovecot-pop3" or
    "popgate", used to run the same client test against both.

On a failed test, the Dovecot log lines written during it and every gateway log are
attached to the report.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, settings

from tests.support.dovecot import Dovecot, issue_server_cert
from tests.support.gateway import GatewayProcess, merge_config

# Property tests check what happens, not how fast: on shared CI cores Hypothesis' deadline and
# its too-slow health check fail for reasons that have nothing to do with the code under test.
settings.register_profile("popgate", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("popgate")

_dovecot_log_offset = pytest.StashKey[int]()
_gateways_key = pytest.StashKey[list[GatewayProcess]]()
_user_counter = itertools.count(1)

TARGETS = ("dovecot-pop3", "popgate")


class MailUser(NamedTuple):
    name: str
    password: str


@dataclass(frozen=True)
class SeededUser:
    name: str
    password: str
    mailbox: str
    uids: list[int]
    #: what ``BODY[]`` returns for each UID, in APPEND order (CRLF line ends)
    messages: list[bytes]

    @property
    def by_uid(self) -> dict[int, bytes]:
        return dict(zip(self.uids, self.messages, strict=True))


@dataclass(frozen=True)
class Pop3Endpoint:
    """Where a POP3 client connects, and what it should trust."""

    target: str  # "dovecot-pop3" | "popgate"
    host: str
    port: int  # plain, offering STLS
    tls_port: int  # implicit TLS
    ca_file: Path  # trust anchor for the server certificate (CN localhost, IP 127.0.0.1)
    gateway: GatewayProcess | None = None

    def log_text(self) -> str:
        return self.gateway.log_text() if self.gateway else ""


# --------------------------------------------------------------------- Dovecot
@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    """One private Dovecot for the whole session (stopped at the end)."""
    dc = Dovecot()
    dc.start()
    try:
        yield dc
    finally:
        dc.stop()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:24] or "t"


@pytest.fixture
def new_mail_user(dovecot: Dovecot, request: pytest.FixtureRequest) -> Callable[[], MailUser]:
    """Factory for more fresh users in one test."""
    request.node.stash[_dovecot_log_offset] = len(dovecot.log_text())
    slug = _slug(request.node.name)

    def make() -> MailUser:
        user = MailUser(f"u{next(_user_counter)}-{slug}", f"pw-{next(_user_counter)}-secret")
        dovecot.add_user(user.name, user.password)
        return user

    return make


@pytest.fixture
def mail_user(new_mail_user: Callable[[], MailUser]) -> MailUser:
    """A fresh, empty user on the session Dovecot: ``name, password = mail_user``."""
    return new_mail_user()


@pytest.fixture
def seeded_user(
    dovecot: Dovecot, new_mail_user: Callable[[], MailUser]
) -> Callable[..., SeededUser]:
    """Factory: ``seeded_user(messages, mailbox="INBOX", user=None)`` APPENDs the messages
    (to a fresh user unless ``user`` is given) and returns UIDs and the exact stored bytes."""

    def seed(
        messages: Sequence[bytes], mailbox: str = "INBOX", user: MailUser | None = None
    ) -> SeededUser:
        user = user or new_mail_user()
        uids = dovecot.append_many(user.name, user.password, messages, mailbox)
        stored = dovecot.fetch_bodies(user.name, user.password, mailbox)
        return SeededUser(user.name, user.password, mailbox, uids, [stored[u] for u in uids])

    return seed


# --------------------------------------------------------------------- the gateway
def base_gateway_config(dovecot: Dovecot, tmp: Path) -> dict[str, dict[str, Any]]:
    return {
        "upstream.imap": {
            "host": dovecot.host,
            "port": dovecot.imap_port,
            "security": "starttls",
            "ca_file": str(dovecot.ca_file),
            "master_user": dovecot.master_user,
            "master_password": dovecot.master_password,
        },
        "pop3": {"listen": ["127.0.0.1:0"], "listen_tls": ["127.0.0.1:0"]},
        "tls": {"cert_file": str(tmp / "popgate.crt"), "key_file": str(tmp / "popgate.key")},
        # Every test client comes from 127.0.0.1 and many tests fail logins on purpose: the
        # delays and per-address limits are tested where they are the subject (test_limits.py).
        "security": {"auth_failure_delay": 0, "max_connections_per_ip": 2000},
        "log": {"level": "debug"},
    }


def _section_name(kwarg: str) -> str:
    # upstream_imap -> upstream.imap; pop3, tls, log, … unchanged
    return kwarg.replace("_", ".", 1) if kwarg.startswith("upstream_") else kwarg


@pytest.fixture
def start_gateway(
    dovecot: Dovecot, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., GatewayProcess]]:
    """Factory that starts ``python -m gateway serve -c CONFIG`` against the session Dovecot.

    ``start_gateway(pop3={"on_delete": "expunge"}, upstream_imap={"security": "tls",
    "port": dovecot.imaps_port})`` — overrides merge per section (None drops a key or a
    section); ``sections={"upstream.imap": {...}}`` does the same with real section names.
    ``ca_signed_cert=True`` writes a cert for localhost/127.0.0.1 signed by the test CA
    (``dovecot.ca_file``) instead of letting the gateway generate a self-signed one.
    ``env`` adds environment variables; ``wait=False`` returns without waiting for the
    listeners (for tests of start-up failures: use ``.wait()``).
    """
    started: list[GatewayProcess] = []
    request.node.stash[_gateways_key] = started
    counter = itertools.count(1)

    def start(
        sections: Mapping[str, Mapping[str, Any] | None] | None = None,
        *,
        ca_signed_cert: bool = False,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        wait: bool = True,
        timeout: float = 30.0,
        **overrides: Mapping[str, Any] | None,
    ) -> GatewayProcess:
        n = next(counter)
        workdir = tmp_path / f"gateway{n}"
        workdir.mkdir()
        config = base_gateway_config(dovecot, workdir)
        all_overrides = dict(sections or {})
        all_overrides.update({_section_name(k): v for k, v in overrides.items()})
        config = merge_config(config, all_overrides)
        if ca_signed_cert:
            tls = config.setdefault("tls", {})
            cert = Path(tls.setdefault("cert_file", str(workdir / "popgate.crt")))
            key = Path(tls.setdefault("key_file", str(workdir / "popgate.key")))
            issue_server_cert(dovecot.ca_file, dovecot.ca_key_file, cert, key)
        gw = GatewayProcess(config, workdir / "popgate.toml", env=env, args=tuple(args))
        started.append(gw)
        return gw.start(timeout, wait=wait)

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def pop3_endpoint(
    dovecot: Dovecot, start_gateway: Callable[..., GatewayProcess]
) -> Callable[..., Pop3Endpoint]:
    """Factory: ``pop3_endpoint("dovecot-pop3" | "popgate", **gateway_overrides)``.

    Both serve the session Dovecot's users with certificates from the test CA, so one client
    test can run against Dovecot's own POP3 (the reference) and against popgate."""

    def make(target: str, **overrides: Any) -> Pop3Endpoint:
        if target == "dovecot-pop3":
            return Pop3Endpoint(
                target, dovecot.host, dovecot.pop3_port, dovecot.pop3s_port, dovecot.ca_file
            )
        if target == "popgate":
            gw = start_gateway(ca_signed_cert=True, **overrides)
            return Pop3Endpoint(target, gw.host, gw.pop3_port, gw.pop3s_port, dovecot.ca_file, gw)
        raise ValueError(f"unknown POP3 target {target!r}; expected one of {TARGETS}")

    return make


# --------------------------------------------------------------------- failure reports
@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        gateways: list[GatewayProcess] = item.stash.get(_gateways_key, [])
        for n, gw in enumerate(gateways, 1):
            report.sections.append((f"popgate log #{n} ({gw.config_path})", gw.log_text()))
        offset = item.stash.get(_dovecot_log_offset, None)
        dc = item.funcargs.get("dovecot") if hasattr(item, "funcargs") else None
        if offset is not None and isinstance(dc, Dovecot):
            report.sections.append(("dovecot log (this test)", dc.log_text()[offset:]))
    return report
