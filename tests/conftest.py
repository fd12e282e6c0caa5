"""Shared fixtures: the private upstream IMAP servers, fresh users on them, seeded mailboxes,
and the gateway as a subprocess.

Fixtures
--------
``upstream`` (session, one per server)
    the upstream IMAP server of the test: a running :class:`tests.support.dovecot.Dovecot` or
    :class:`tests.support.cyrus.Cyrus`. Every test that uses it (directly or through the
    fixtures below) runs once per server in ``UPSTREAMS``, with ids ``[dovecot]``/``[cyrus]``;
    ``--upstream NAME`` (repeatable) or ``POPGATE_TEST_UPSTREAMS=dovecot,cyrus`` narrows that.
``dovecot`` (session)
    the running Dovecot itself, for the tests that need Dovecot and nothing else (its own POP3,
    LMTP, quota plugin, the harness tests).
``cyrus`` (session)
    the running Cyrus itself.
``mail_user`` (function)
    a fresh :class:`MailUser` ``(name, password)`` on the upstream server.
``seeded_user`` (function)
    factory ``seeded_user(messages, mailbox="INBOX", user=None) -> SeededUser``.
``start_gateway`` (function)
    factory ``start_gateway(sections=None, *, ca_signed_cert=False, env=None, wait=True,
    timeout=30, **overrides) -> GatewayProcess``; every gateway is stopped at test end.
``pop3_endpoint`` (function)
    factory ``pop3_endpoint(target) -> Pop3Endpoint`` for target "dovecot-pop3" or
    "popgate", used to run the same client test against both ("dovecot-pop3" only exists with
    Dovecot as the upstream).

On a failed test, the upstream server's log lines written during it and every gateway log are
attached to the report.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, settings

from tests.support import reaper
from tests.support.cyrus import Cyrus
from tests.support.dovecot import Dovecot, issue_server_cert
from tests.support.gateway import GatewayProcess, merge_config
from tests.support.upstreams import UPSTREAMS, Upstream

# Property tests check what happens, not how fast: on shared CI cores Hypothesis' deadline and
# its too-slow health check fail for reasons that have nothing to do with the code under test.
settings.register_profile("popgate", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("popgate")

_upstream_log_offset = pytest.StashKey[int]()
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


# --------------------------------------------------------------------- upstream servers
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--upstream",
        action="append",
        choices=UPSTREAMS,
        help="run the upstream-facing tests against this server only (repeatable; default: "
        "POPGATE_TEST_UPSTREAMS, else all of " + ", ".join(UPSTREAMS) + ")",
    )


def selected_upstreams(config: pytest.Config) -> list[str]:
    chosen = config.getoption("--upstream") or [
        name.strip()
        for name in os.environ.get("POPGATE_TEST_UPSTREAMS", ",".join(UPSTREAMS)).split(",")
        if name.strip()
    ]
    unknown = sorted(set(chosen) - set(UPSTREAMS))
    if unknown:
        raise pytest.UsageError(f"unknown upstream server(s) {unknown}; known: {UPSTREAMS}")
    return [name for name in UPSTREAMS if name in chosen]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "upstreams(*names): run the test against these upstream servers only (say why)",
    )
    # Stops the servers the fixtures started if this process dies before they could
    # (SIGKILL, a CI timeout): tests/support/reaper.py. One per pytest process.
    reaper.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    reaper.stop()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Session scope: pytest orders the tests so that each server starts once.
    if "upstream" in metafunc.fixturenames:
        names = selected_upstreams(metafunc.config)
        only = metafunc.definition.get_closest_marker("upstreams")
        if only is not None:
            names = [name for name in names if name in only.args]
        metafunc.parametrize("upstream", names, indirect=True, scope="session", ids=names)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Dovecot's own POP3 (the "dovecot-pop3" reference target) serves Dovecot's users only: the
    # combination with a Cyrus upstream is not a test, so it is not collected (rather than
    # skipped). The popgate target of the same tests checks the bytes stored over IMAP there.
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("target") == "dovecot-pop3" and params.get("upstream") not in (
            None,
            "dovecot",
        ):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    """One private Dovecot for the whole session (stopped at the end)."""
    dc = Dovecot()
    dc.start()
    try:
        yield dc
    finally:
        dc.stop()


@pytest.fixture(scope="session")
def cyrus() -> Iterator[Cyrus]:
    """One private Cyrus for the whole session (stopped at the end)."""
    cy = Cyrus()
    cy.start()
    try:
        yield cy
    finally:
        cy.stop()


@pytest.fixture(scope="session")
def upstream(request: pytest.FixtureRequest) -> Upstream:
    """The upstream IMAP server of this run of the test (see the module docstring)."""
    name = getattr(request, "param", UPSTREAMS[0])
    server = request.getfixturevalue(name)
    assert isinstance(server, (Dovecot, Cyrus))
    return server


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:24] or "t"


@pytest.fixture
def new_mail_user(upstream: Upstream, request: pytest.FixtureRequest) -> Callable[[], MailUser]:
    """Factory for more fresh users in one test."""
    request.node.stash[_upstream_log_offset] = len(upstream.log_text())
    slug = _slug(request.node.name)

    def make() -> MailUser:
        user = MailUser(f"u{next(_user_counter)}-{slug}", f"pw-{next(_user_counter)}-secret")
        upstream.add_user(user.name, user.password)
        return user

    return make


@pytest.fixture
def mail_user(new_mail_user: Callable[[], MailUser]) -> MailUser:
    """A fresh, empty user on the upstream server: ``name, password = mail_user``."""
    return new_mail_user()


@pytest.fixture
def seeded_user(
    upstream: Upstream, new_mail_user: Callable[[], MailUser]
) -> Callable[..., SeededUser]:
    """Factory: ``seeded_user(messages, mailbox="INBOX", user=None)`` APPENDs the messages
    (to a fresh user unless ``user`` is given) and returns UIDs and the exact stored bytes."""

    def seed(
        messages: Sequence[bytes], mailbox: str = "INBOX", user: MailUser | None = None
    ) -> SeededUser:
        user = user or new_mail_user()
        uids = upstream.append_many(user.name, user.password, messages, mailbox)
        stored = upstream.fetch_bodies(user.name, user.password, mailbox)
        return SeededUser(user.name, user.password, mailbox, uids, [stored[u] for u in uids])

    return seed


# --------------------------------------------------------------------- the gateway
def base_gateway_config(upstream: Upstream, tmp: Path) -> dict[str, dict[str, Any]]:
    return {
        "upstream.imap": {
            "host": upstream.host,
            "port": upstream.imap_port,
            "security": "starttls",
            "ca_file": str(upstream.ca_file),
            "master_user": upstream.master_user,
            "master_password": upstream.master_password,
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
    upstream: Upstream, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., GatewayProcess]]:
    """Factory that starts ``python -m gateway serve -c CONFIG`` against the upstream server.

    ``start_gateway(pop3={"on_delete": "expunge"}, upstream_imap={"security": "tls",
    "port": upstream.imaps_port})`` — overrides merge per section (None drops a key or a
    section); ``sections={"upstream.imap": {...}}`` does the same with real section names.
    ``ca_signed_cert=True`` writes a cert for localhost/127.0.0.1 signed by the test CA
    (``upstream.ca_file``) instead of letting the gateway generate a self-signed one.
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
        config = base_gateway_config(upstream, workdir)
        all_overrides = dict(sections or {})
        all_overrides.update({_section_name(k): v for k, v in overrides.items()})
        config = merge_config(config, all_overrides)
        if ca_signed_cert:
            tls = config.setdefault("tls", {})
            cert = Path(tls.setdefault("cert_file", str(workdir / "popgate.crt")))
            key = Path(tls.setdefault("key_file", str(workdir / "popgate.key")))
            issue_server_cert(upstream.ca_file, upstream.ca_key_file, cert, key)
        gw = GatewayProcess(config, workdir / "popgate.toml", env=env, args=tuple(args))
        started.append(gw)
        return gw.start(timeout, wait=wait)

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def pop3_endpoint(
    upstream: Upstream, start_gateway: Callable[..., GatewayProcess]
) -> Callable[..., Pop3Endpoint]:
    """Factory: ``pop3_endpoint("dovecot-pop3" | "popgate", **gateway_overrides)``.

    Both serve the upstream server's users with certificates from the test CA, so one client
    test can run against Dovecot's own POP3 (the reference) and against popgate. Dovecot's POP3
    serves Dovecot's users only: with Cyrus upstream the "dovecot-pop3" target is not collected, and
    the tests' expectations (the bytes stored, read over IMAP) are the reference."""

    def make(target: str, **overrides: Any) -> Pop3Endpoint:
        if target == "dovecot-pop3":
            # Never collected with another upstream (pytest_collection_modifyitems).
            assert isinstance(upstream, Dovecot), "dovecot-pop3 serves Dovecot's users only"
            return Pop3Endpoint(
                target, upstream.host, upstream.pop3_port, upstream.pop3s_port, upstream.ca_file
            )
        if target == "popgate":
            gw = start_gateway(ca_signed_cert=True, **overrides)
            return Pop3Endpoint(target, gw.host, gw.pop3_port, gw.pop3s_port, upstream.ca_file, gw)
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
        offset = item.stash.get(_upstream_log_offset, None)
        server = item.funcargs.get("upstream") if hasattr(item, "funcargs") else None
        if offset is not None and isinstance(server, (Dovecot, Cyrus)):
            report.sections.append((f"{server.kind} log (this test)", server.log_text()[offset:]))
    return report
