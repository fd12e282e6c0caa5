"""The ``[http]`` listener of a real popgate process: /metrics moves by exactly what a known
workload does (POP login, RETR, a failed login, a submission), /healthz, /readyz; against each
upstream IMAP server of the run."""

from __future__ import annotations

import poplib
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

import gateway
from tests.conftest import MailUser, SeededUser
from tests.support.dovecot import free_port
from tests.support.gateway import GatewayProcess
from tests.support.smtp_sink import SmtpSink
from tests.support.submission import make_message, smtp_session, wait_for_sent
from tests.support.upstreams import Upstream

pytest_plugins = ("tests.support.submission_fixtures",)
pytestmark = pytest.mark.integration

HTTP = {"listen": ["127.0.0.1:0"]}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get(gw: GatewayProcess, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of ``GET path`` on the gateway's HTTP listener."""
    url = f"http://{gw.host}:{gw.port('http')}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def scrape(gw: GatewayProcess) -> Samples:
    status, content_type, text = get(gw, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=")  # the Prometheus text format
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def scrape_until(
    gw: GatewayProcess, done: Callable[[Samples], bool], timeout: float = 10.0
) -> Samples:
    """Scrapes until ``done`` holds (what settles after the client is answered), bounded."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(gw)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_metrics_move_by_exactly_the_known_workload(
    upstream: Upstream,
    seeded_user: Callable[..., SeededUser],
    new_mail_user: Callable[[], MailUser],
    smtp_sink: SmtpSink,
    submission_gateway: Callable[..., GatewayProcess],
) -> None:
    # n = 3 RETRs, m = 2 submissions, k = 2 failed logins, over one good POP3 login
    n, m, k = 3, 2, 2
    seeded = seeded_user(
        [b"Subject: %d\r\n\r\n" % i + (b"x" * 70 + b"\r\n") * (80 * i) for i in (1, 2, 3)]
    )
    size = sum(len(message) for message in seeded.messages)
    sender = MailUser(seeded.name, seeded.password)
    gw = submission_gateway(sender, http=HTTP)
    before = scrape(gw)

    pop = poplib.POP3(gw.host, gw.pop3_port, timeout=10)
    pop.user(seeded.name)
    pop.pass_(seeded.password)
    for i in range(n):
        _, lines, _ = pop.retr(i + 1)
        assert b"\r\n".join(lines) + b"\r\n" == seeded.messages[i]
    pop.quit()

    for _ in range(k):
        bad = poplib.POP3(gw.host, gw.pop3_port, timeout=10)
        bad.user(seeded.name)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            bad.pass_("wrong-" + seeded.password)
        bad.quit()

    for i in range(m):
        message = make_message(f"{sender.name}@example.org", ["bob@example.org"], f"metrics {i}")
        with smtp_session(gw, upstream, sender) as client:
            client.sendmail(f"{sender.name}@example.org", ["bob@example.org"], message)
    smtp_sink.wait_for(m)
    wait_for_sent(upstream, sender, m)

    # Sessions close and the spool entry goes just after the clients were answered.
    after = scrape_until(
        gw,
        lambda s: (
            value(s, "popgate_pop3_sessions_active") == 0
            and value(s, "popgate_sent_copies_total", result="stored") == m
            and value(s, "popgate_sent_spool_entries") == 0
        ),
    )

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("popgate_pop3_sessions_total") == 1 + k
    assert value(after, "popgate_pop3_sessions_active") == 0
    assert moved("popgate_auth_attempts_total", protocol="pop3", result="ok") == 1
    assert moved("popgate_auth_attempts_total", protocol="pop3", result="fail") == k
    assert moved("popgate_auth_attempts_total", protocol="submission", result="ok") == m
    assert moved("popgate_auth_attempts_total", protocol="submission", result="fail") == 0
    assert moved("popgate_pop3_retrieved_messages_total") == n
    assert moved("popgate_pop3_retrieved_bytes_total") == size
    assert moved("popgate_submission_messages_total", result="relayed") == m
    assert moved("popgate_submission_messages_total", result="rejected") == 0
    assert moved("popgate_submission_messages_total", result="failed") == 0
    assert moved("popgate_sent_copies_total", result="stored") == m
    assert moved("popgate_sent_copies_total", result="retry") == 0
    assert value(after, "popgate_sent_spool_entries") == 0
    assert moved("popgate_upstream_errors_total", upstream="imap") == 0
    assert moved("popgate_upstream_errors_total", upstream="smtp") == 0
    assert moved("popgate_retention_removed_messages_total") == 0
    assert moved("popgate_tls_reloads_total", result="ok") == 0
    for histogram, observations in (
        ("popgate_pop3_login_duration_seconds", 1),
        ("popgate_pop3_retr_first_byte_seconds", n),
        ("popgate_relay_duration_seconds", m),
        ("popgate_sent_append_duration_seconds", m),
    ):
        assert moved(f"{histogram}_count") == observations, histogram
        assert moved(f"{histogram}_bucket", le="+Inf") == observations, histogram
        assert value(after, f"{histogram}_sum") > 0, histogram
    assert value(after, "popgate_build_info", version=gateway.__version__) == 1
    # No series is labelled by user or device.
    for (_name, labels), _value in after.items():
        assert {key for key, _ in labels} <= {
            "protocol",
            "result",
            "upstream",
            "version",
            "le",
            "source",
        }
        assert not any(seeded.name in text for _, text in labels)


def test_healthz_and_readyz_with_the_upstream_up(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = start_gateway(http=HTTP)
    assert get(gw, "/healthz")[::2] == (200, "ok\n")
    status, _, body = get(gw, "/readyz")
    assert (status, body) == (200, "ready: upstream IMAP server answers\n")
    assert get(gw, "/nothing-here")[0] == 404
    # The second answer is the cached verdict: the upstream was probed once.
    assert get(gw, "/readyz")[0] == 200
    assert value(scrape(gw), "popgate_readiness_probes_total", result="ok") == 1


def test_readyz_is_503_while_the_upstream_does_not_answer(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = start_gateway(http=HTTP, upstream_imap={"port": free_port()})
    assert get(gw, "/healthz")[0] == 200
    status, _, body = get(gw, "/readyz")
    assert status == 503
    assert body.startswith("not ready: cannot reach IMAP server")
    assert value(scrape(gw), "popgate_readiness_probes_total", result="fail") == 1


def test_no_http_listener_by_default(start_gateway: Callable[..., GatewayProcess]) -> None:
    gw = start_gateway()
    assert "listening http" not in gw.log_text()
