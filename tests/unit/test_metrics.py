"""The metrics module, the /readyz probe and the HTTP resources, in memory; ``[http]`` config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.testing import Clock
from twisted.web.test.requesthelper import DummyRequest

import gateway
from gateway.config import ListenAddress
from gateway.metrics import Metrics
from gateway.upstream.account import UpstreamUnavailable
from gateway.web import READY_CACHE, ReadinessProbe, site
from tests.unit.test_config import MINIMAL, conf_dir, load, problems

__all__ = ["conf_dir"]  # a fixture, imported for these tests

# CONTRACT.md, "Operations": the metrics every popgate exports, with their labels.
CONTRACT = {
    "popgate_pop3_sessions_active": set(),
    "popgate_pop3_sessions_total": set(),
    "popgate_auth_attempts_total": {"protocol", "result"},
    "popgate_pop3_retrieved_bytes_total": set(),
    "popgate_submission_messages_total": {"result"},
    "popgate_sent_spool_entries": set(),
    "popgate_upstream_errors_total": {"upstream"},
    "popgate_retention_removed_messages_total": set(),
    "popgate_build_info": {"version"},
}


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, tuple(sorted(labels.items())))]


# --------------------------------------------------------------------------- Metrics
def test_every_contract_metric_is_exported_from_the_start() -> None:
    found = samples(Metrics())
    names = {name for name, _ in found}
    for name, labels in CONTRACT.items():
        assert name in names, name
        assert {key for n, keyed in found if n == name for key, _ in keyed} == labels, name
    assert found[("popgate_build_info", (("version", gateway.__version__),))] == 1
    # Every label combination is there at 0, so rate() and alerts work before the first event.
    for protocol in ("pop3", "submission"):
        for result in ("ok", "fail"):
            labels = (("protocol", protocol), ("result", result))
            assert found[("popgate_auth_attempts_total", labels)] == 0
    for upstream in ("imap", "smtp"):
        assert found[("popgate_upstream_errors_total", (("upstream", upstream),))] == 0


def test_names_follow_the_prometheus_conventions_and_no_label_names_a_person() -> None:
    metrics = Metrics()
    for family in metrics.registry.collect():
        assert family.name.startswith("popgate_")
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        for sample in family.samples:
            assert set(sample.labels) <= {
                "protocol",
                "result",
                "upstream",
                "version",
                "le",
                "source",
            }
    # No _created series: they double the output and mean nothing to an operator.
    assert b"_created" not in metrics.render()


def test_each_gateway_counts_in_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.auth("pop3", ok=False)
    first.pop3_retrieved_bytes.inc(120)

    assert value(first, "popgate_auth_attempts_total", protocol="pop3", result="fail") == 1
    assert value(first, "popgate_pop3_retrieved_bytes_total") == 120
    assert value(second, "popgate_auth_attempts_total", protocol="pop3", result="fail") == 0
    assert value(second, "popgate_pop3_retrieved_bytes_total") == 0
    assert not any(name.startswith("popgate_") for name in REGISTRY._names_to_collectors)


def test_shortcuts_count_under_the_right_labels() -> None:
    metrics = Metrics()
    metrics.auth("submission", ok=True)
    metrics.upstream_error("smtp")
    metrics.submitted("rejected")

    assert value(metrics, "popgate_auth_attempts_total", protocol="submission", result="ok") == 1
    assert value(metrics, "popgate_upstream_errors_total", upstream="smtp") == 1
    assert value(metrics, "popgate_upstream_errors_total", upstream="imap") == 0
    assert value(metrics, "popgate_submission_messages_total", result="rejected") == 1
    assert value(metrics, "popgate_submission_messages_total", result="relayed") == 0


def test_spool_gauge_reads_the_spool_at_each_scrape() -> None:
    metrics = Metrics()
    waiting = [3]
    metrics.watch_spool(lambda: waiting[0])
    assert value(metrics, "popgate_sent_spool_entries") == 3
    waiting[0] = 0
    assert value(metrics, "popgate_sent_spool_entries") == 0


def test_histogram_buckets_count_observations() -> None:
    metrics = Metrics()
    metrics.pop3_login_seconds.observe(0.2)
    metrics.pop3_login_seconds.observe(3.0)

    name = "popgate_pop3_login_duration_seconds"
    assert value(metrics, f"{name}_count") == 2
    assert value(metrics, f"{name}_sum") == pytest.approx(3.2)
    assert value(metrics, f"{name}_bucket", le="0.25") == 1
    assert value(metrics, f"{name}_bucket", le="5.0") == 2


# --------------------------------------------------------------------------- readiness
class Upstream:
    """A readiness check whose answers the test gives, one per probe."""

    def __init__(self) -> None:
        self.probes: list[Deferred[None]] = []

    def check(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.probes.append(d)
        return d


def verdicts(probe: ReadinessProbe, n: int = 1) -> list[tuple[bool, str]]:
    got: list[tuple[bool, str]] = []
    for _ in range(n):
        probe.verdict().addCallback(got.append)
    return got


def test_concurrent_requests_share_one_probe_and_its_verdict_is_cached() -> None:
    clock, upstream, metrics = Clock(), Upstream(), Metrics()
    probe = ReadinessProbe(clock, upstream.check, metrics)

    first = verdicts(probe, 3)
    assert len(upstream.probes) == 1 and first == []
    upstream.probes[0].callback(None)
    assert first == [(True, "upstream IMAP server answers")] * 3

    clock.advance(READY_CACHE - 0.1)
    assert verdicts(probe) == [(True, "upstream IMAP server answers")]
    assert len(upstream.probes) == 1  # from the cache

    clock.advance(0.1)
    again = verdicts(probe)
    assert len(upstream.probes) == 2 and again == []
    upstream.probes[1].errback(UpstreamUnavailable("cannot reach IMAP server imap: refused"))
    assert again == [(False, "cannot reach IMAP server imap: refused")]
    assert value(metrics, "popgate_readiness_probes_total", result="ok") == 1
    assert value(metrics, "popgate_readiness_probes_total", result="fail") == 1


# --------------------------------------------------------------------------- HTTP resources
def render(metrics: Metrics, probe: ReadinessProbe, path: bytes) -> DummyRequest:
    request = DummyRequest([path])
    resource = site(metrics, probe).resource.getChildWithDefault(path, request)
    body = resource.render(request)
    if isinstance(body, bytes):
        request.write(body)
        request.finish()
    return request


def test_metrics_and_healthz_answer_at_once() -> None:
    metrics = Metrics()
    metrics.pop3_sessions.inc()
    probe = ReadinessProbe(Clock(), Upstream().check, metrics)

    scraped = render(metrics, probe, b"metrics")
    assert scraped.responseCode == 200
    [content_type] = scraped.responseHeaders.getRawHeaders(b"content-type")
    assert content_type.startswith(b"text/plain; version=")
    assert b"popgate_pop3_sessions_total 1.0\n" in b"".join(scraped.written)

    health = render(metrics, probe, b"healthz")
    assert (health.responseCode, b"".join(health.written)) == (200, b"ok\n")


@pytest.mark.parametrize("ready", [True, False])
def test_readyz_answers_once_the_probe_has_a_verdict(ready: bool) -> None:
    upstream, metrics = Upstream(), Metrics()
    probe = ReadinessProbe(Clock(), upstream.check, metrics)

    request = render(metrics, probe, b"readyz")
    assert request.finished == 0  # waiting for the upstream
    if ready:
        upstream.probes[0].callback(None)
    else:
        upstream.probes[0].errback(UpstreamUnavailable("IMAP server does not offer STARTTLS"))
    assert request.finished == 1
    if ready:
        expected = (200, b"ready: upstream IMAP server answers\n")
    else:
        expected = (503, b"not ready: IMAP server does not offer STARTTLS\n")
    assert (request.responseCode, b"".join(request.written)) == expected


def test_readyz_for_a_client_that_left_writes_nothing() -> None:
    upstream, metrics = Upstream(), Metrics()
    probe = ReadinessProbe(Clock(), upstream.check, metrics)
    request = render(metrics, probe, b"readyz")
    request.processingFailed(Exception("connection lost"))  # fails notifyFinish's Deferreds
    upstream.probes[0].callback(None)
    assert request.written == []


# --------------------------------------------------------------------------- [http] config
def test_http_listen_defaults_to_none_and_parses(conf_dir: Path) -> None:
    assert load(conf_dir, MINIMAL).http.listen == ()
    config = load(conf_dir, MINIMAL + '[http]\nlisten = ["127.0.0.1:9110", "[::1]:9110"]\n')
    assert config.http.listen == (ListenAddress("127.0.0.1", 9110), ListenAddress("::1", 9110))


def test_http_listen_is_checked_like_every_listener(conf_dir: Path) -> None:
    found = problems(
        conf_dir,
        MINIMAL + '[pop3]\nlisten = ["127.0.0.1:9110"]\n[http]\nlisten = ["127.0.0.1:9110", "x"]\n',
    )
    label = f"{conf_dir / 'popgate.toml'}: [http] listen"
    assert found == [f'{label}: "x": expected "host:port" or "[ipv6]:port"']
    found = problems(
        conf_dir,
        MINIMAL + '[pop3]\nlisten = ["127.0.0.1:9110"]\n[http]\nlisten = ["127.0.0.1:9110"]\n',
    )
    assert found == [f"{label}: 127.0.0.1:9110 is also used by [pop3] listen"]


def test_http_listen_from_the_environment(conf_dir: Path) -> None:
    config = load(conf_dir, MINIMAL, env={"POPGATE_HTTP_LISTEN": "127.0.0.1:9110"})
    assert config.http.listen == (ListenAddress("127.0.0.1", 9110),)


# --------------------------------------------------------------------------- the dashboard
def test_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = Path(__file__).parents[2] / "docker" / "grafana" / "popgate-dashboard.json"
    text = dashboard.read_text()
    used = set(re.findall(r"popgate_[a-z0-9_]+", text))
    exported = {name for name, _ in samples(Metrics())}
    assert used and used <= exported, used - exported
