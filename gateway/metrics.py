"""Every metric popgate exports, defined in one place (docs/operations.md, "Monitoring").

Each Gateway has its own ``Metrics`` with a private CollectorRegistry, so tests and several
gateways in one process never share counters; ``/metrics`` (gateway/web.py) renders that
registry with prometheus_client. Names follow the Prometheus conventions and the mail servers'
own exporters: a ``popgate_`` prefix, counters ending in ``_total``, the unit in the name, and
no label that names a user or a device (unbounded cardinality, and personal data).

Instrumented code calls the attributes directly (``metrics.pop3_sessions.inc()``); the download
path adds one counter increment per message, never per chunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)

import gateway

# The ``_created`` series of every counter and histogram double the output and mean nothing to
# an operator; Dovecot's and Postfix's exporters do without them too.
disable_created_metrics()

# Seconds: from a fast local upstream (milliseconds) to one that is about to time out.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

AUTH_PROTOCOLS = ("pop3", "submission")
AUTH_RESULTS = ("ok", "fail")
# relayed: the relay accepted it; rejected: the relay refused it (5xx/4xx from the relay);
# failed: not relayed because of popgate or an unreachable relay (the client got a 4xx).
SUBMISSION_RESULTS = ("relayed", "rejected", "failed")
UPSTREAMS = ("imap", "smtp")
SENT_COPY_RESULTS = ("stored", "retry")


class Metrics:
    """The metrics of one gateway, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.build_info = Info("popgate_build", "The running popgate version.", registry=r)
        self.build_info.info({"version": gateway.__version__})

        self.pop3_sessions_active = Gauge(
            "popgate_pop3_sessions_active", "POP3 connections open now.", registry=r
        )
        self.pop3_sessions = Counter(
            "popgate_pop3_sessions", "POP3 connections accepted.", registry=r
        )
        self.auth_attempts = Counter(
            "popgate_auth_attempts",
            "Logins decided: ok, or fail (bad credentials, malformed, or refused as throttled).",
            ["protocol", "result"],
            registry=r,
        )
        for protocol in AUTH_PROTOCOLS:
            for result in AUTH_RESULTS:
                self.auth_attempts.labels(protocol, result)
        self.pop3_login_seconds = Histogram(
            "popgate_pop3_login_duration_seconds",
            "Time to log in upstream and build the maildrop (without any failure delay).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.pop3_indexes = Counter(
            "popgate_pop3_indexes",
            "Mailbox indexes taken at POP logins, by source: fetched on the session's own "
            "connection, shared (another login's fetch in flight) or cached (unchanged mailbox).",
            ["source"],
            registry=r,
        )
        self.pop3_retrieved_messages = Counter(
            "popgate_pop3_retrieved_messages", "Messages downloaded whole (RETR).", registry=r
        )
        self.pop3_retrieved_bytes = Counter(
            "popgate_pop3_retrieved_bytes",
            "Octets of the messages downloaded whole (RETR), as their sizes say.",
            registry=r,
        )
        self.pop3_retr_first_byte_seconds = Histogram(
            "popgate_pop3_retr_first_byte_seconds",
            "From a RETR or TOP to the first octet of its answer (prefetched: near zero).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.submission_messages = Counter(
            "popgate_submission_messages",
            "Messages submitted by clients, by outcome.",
            ["result"],
            registry=r,
        )
        for result in SUBMISSION_RESULTS:
            self.submission_messages.labels(result)
        self.relay_seconds = Histogram(
            "popgate_relay_duration_seconds",
            "Time the relay took to take a message (DATA to its reply).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sent_spool_entries = Gauge(
            "popgate_sent_spool_entries",
            "Relayed messages whose Sent copy is not stored yet.",
            registry=r,
        )
        self.sent_copies = Counter(
            "popgate_sent_copies",
            "Attempts to store a Sent copy: stored, or retry (failed, tried again later).",
            ["result"],
            registry=r,
        )
        for result in SENT_COPY_RESULTS:
            self.sent_copies.labels(result)
        self.sent_append_seconds = Histogram(
            "popgate_sent_append_duration_seconds",
            "Time of the IMAP APPEND that stores a Sent copy.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "popgate_upstream_errors",
            "Upstream failures a client noticed: unreachable, timed out, or broken off.",
            ["upstream"],
            registry=r,
        )
        for upstream in UPSTREAMS:
            self.upstream_errors.labels(upstream)
        self.retention_removed_messages = Counter(
            "popgate_retention_removed_messages",
            "Messages retention moved out of the mailbox or expunged.",
            registry=r,
        )
        self.retention_held_back_messages = Counter(
            "popgate_retention_held_back_messages",
            "Messages a retention run would have removed but kept: an active device of the "
            "user has not downloaded or deleted them yet (wait_for_devices).",
            registry=r,
        )
        self.retention_quota_blocked = Counter(
            "popgate_retention_quota_blocked",
            "Retention runs that found the quota above quota_high_percent and could not bring "
            "it down because every remaining candidate is still needed by an active device.",
            registry=r,
        )
        self.retention_state_unreadable = Counter(
            "popgate_retention_state_unreadable",
            "Retention runs that removed nothing for a user because a device state of that "
            "user could not be read (forged, corrupt or over the size limit).",
            registry=r,
        )
        self.readiness_probes = Counter(
            "popgate_readiness_probes",
            "Upstream IMAP probes made for /readyz, by result.",
            ["result"],
            registry=r,
        )
        for result in ("ok", "fail"):
            self.readiness_probes.labels(result)
        self.tls_certificate_expiry = Gauge(
            "popgate_tls_certificate_expiry_timestamp_seconds",
            "When the listeners' certificate in use expires (Unix time).",
            registry=r,
        )
        self.tls_reloads = Counter(
            "popgate_tls_reloads",
            "Certificate reloads on SIGHUP: ok, or fail (the pair in use was kept).",
            ["result"],
            registry=r,
        )
        for result in ("ok", "fail"):
            self.tls_reloads.labels(result)

    # -- shortcuts that keep the instrumented code to one line ------------------------------

    def auth(self, protocol: str, ok: bool) -> None:
        self.auth_attempts.labels(protocol, "ok" if ok else "fail").inc()

    def upstream_error(self, upstream: str) -> None:
        self.upstream_errors.labels(upstream).inc()

    def submitted(self, result: str) -> None:
        self.submission_messages.labels(result).inc()

    def watch_spool(self, waiting: Callable[[], int]) -> None:
        """``popgate_sent_spool_entries`` reads ``waiting()`` at each scrape: nothing to keep
        in step."""
        self.sent_spool_entries.set_function(waiting)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


def since(started: float) -> float:
    """Seconds from ``started`` (a ``time.perf_counter()`` reading) to now."""
    return time.perf_counter() - started


#: For code built without a gateway (unit tests of other things): counts into a registry that
#: nobody reads.
DISCARD = Metrics()
