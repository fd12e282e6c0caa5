"""The Grafana dashboard's panels over a real run, drawn with matplotlib (docs/operations.md).

    python -m tests.bench.dashboard [--seconds 120] [--out docs/images/dashboard-real-run.png]

Grafana cannot be installed on the project's machines, so this is the honest equivalent of a
screenshot: a real ``popgate serve`` process runs a known workload against a private Dovecot
(reached through a TCP forwarder that can play an outage) and the tests' SMTP relay, its
``/metrics`` is scraped every second, and every panel of docker/grafana/popgate-dashboard.json is
computed from those samples with the panel's own query text (tests/bench/promql.py) and drawn
in the dashboard's layout order.

The workload (all clients are real sockets: poplib, smtplib, urllib):
- DEVICES devices, each logging in, downloading its whole mailbox (RETR of every message),
  QUIT, then pausing a second or two, over and over;
- a message submitted (STARTTLS, AUTH) every SUBMIT_EVERY seconds, relayed and filed in Sent;
- a failed login (wrong password) every BAD_LOGIN_EVERY seconds;
- ``/readyz`` asked every 5 seconds, as a balancer would;
- from 40 % to 60 % of the run the IMAP server is unreachable (new connections refused, open
  ones cut): logins fail with ``[SYS/TEMP]``, Sent copies wait in the spool and are retried,
  ``/readyz`` says 503; afterwards everything drains.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import poplib
import random
import smtplib
import ssl
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.bench.promql import Query, Series
from tests.support.dovecot import Dovecot
from tests.support.gateway import GatewayProcess
from tests.support.smtp_sink import SmtpSink
from tests.support.submission import make_message
from tests.support.tcp_proxy import TcpProxy

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docker" / "grafana" / "popgate-dashboard.json"
DEFAULT_OUT = ROOT / "docs" / "images" / "dashboard-real-run.png"
DEVICES = 4
MESSAGES = 25  # per device mailbox, 2 KB to 300 KB
SUBMIT_EVERY = 3.0
BAD_LOGIN_EVERY = 4.0
SCRAPE_EVERY = 1.0
# Grafana's $__rate_interval for a 1 s scrape at this zoom (four scrape intervals, rounded up).
RATE_INTERVAL = "15s"
PASSWORD = "dashboard-secret"
UNITS = {"Bps": "bytes/s", "reqps": "per second", "ops": "per second", "s": "seconds"}


class Scraper(threading.Thread):
    """GET /metrics every SCRAPE_EVERY seconds into ``series`` (run time -> value)."""

    def __init__(self, url: str, started: float) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.started = started
        self.series: Series = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.monotonic() - self.started
            with urllib.request.urlopen(self.url, timeout=5) as response:
                text = response.read().decode()
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    labels = {**s.labels, "instance": "popgate-1"}
                    key = (s.name, tuple(sorted(labels.items())))
                    self.series.setdefault(key, []).append((t, s.value))
            self.stop.wait(SCRAPE_EVERY)


def mailbox(rng: random.Random, n: int) -> list[bytes]:
    messages = []
    for i in range(n):
        size = int(math.exp(rng.uniform(math.log(2_000), math.log(300_000))))
        line = b"x" * 76 + b"\r\n"
        body = line * (size // len(line))
        messages.append(b"Subject: message %d\r\nFrom: a@example.org\r\n\r\n" % i + body)
    return messages


def run_workload(seconds: float, workdir: Path) -> tuple[Series, dict[str, int]]:
    rng = random.Random(1)
    counts = {"retr": 0, "submitted": 0, "bad_logins": 0, "failed_sessions": 0}
    lock = threading.Lock()
    with contextlib.ExitStack() as stack:
        dovecot = Dovecot(workdir / "dovecot")
        dovecot.start()
        stack.callback(dovecot.stop)
        users = [f"device{i}" for i in range(DEVICES)]
        for user in users:
            dovecot.add_user(user, PASSWORD)
            dovecot.append_many(user, PASSWORD, mailbox(rng, MESSAGES))
        sink = stack.enter_context(SmtpSink({u: PASSWORD for u in users}))
        proxy = stack.enter_context(TcpProxy(dovecot.host, dovecot.imap_port))
        config = {
            "upstream.imap": {
                "host": proxy.host,
                "port": proxy.port,
                "security": "starttls",
                "ca_file": str(dovecot.ca_file),
                "master_user": dovecot.master_user,
                "master_password": dovecot.master_password,
            },
            "upstream.smtp": {"host": sink.host, "port": sink.port, "security": "none"},
            "pop3": {"listen": ["127.0.0.1:0"]},
            "submission": {
                "listen": ["127.0.0.1:0"],
                "spool_dir": str(workdir / "spool"),
                "retry_initial_delay": 1.0,
                "retry_max_delay": 4.0,
            },
            "tls": {
                "cert_file": str(workdir / "popgate.crt"),
                "key_file": str(workdir / "popgate.key"),
            },
            "http": {"listen": ["127.0.0.1:0"]},
            # One client address for every device: no failure delay, so the failed logins
            # below do not slow the devices' logins.
            "security": {"auth_failure_delay": 0, "insecure_auth_networks": ["127.0.0.0/8"]},
            "log": {"level": "info"},
        }
        gw = GatewayProcess(config, workdir / "popgate.toml")
        gw.start()
        stack.callback(gw.stop)
        http = f"http://{gw.host}:{gw.port('http')}"
        started = time.monotonic()
        scraper = Scraper(f"{http}/metrics", started)
        scraper.start()
        stop = threading.Event()

        def elapsed() -> float:
            return time.monotonic() - started

        def device(user: str) -> None:
            while not stop.is_set():
                try:
                    pop = poplib.POP3(gw.host, gw.pop3_port, timeout=30)
                    pop.user(user)
                    pop.pass_(PASSWORD)
                    count, _ = pop.stat()
                    for n in range(1, count + 1):
                        pop.retr(n)
                        with lock:
                            counts["retr"] += 1
                    pop.quit()
                except (poplib.error_proto, OSError):
                    with lock:
                        counts["failed_sessions"] += 1
                stop.wait(rng.uniform(1.0, 2.0))

        def submitter() -> None:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            n = 0
            while not stop.wait(SUBMIT_EVERY):
                user = users[n % len(users)]
                n += 1
                message = make_message(f"{user}@example.org", ["bob@example.org"], f"m{n}")
                try:
                    with smtplib.SMTP(gw.host, gw.submission_port, timeout=30) as client:
                        client.starttls(context=context)
                        client.login(user, PASSWORD)
                        client.sendmail(f"{user}@example.org", ["bob@example.org"], message)
                    with lock:
                        counts["submitted"] += 1
                except (smtplib.SMTPException, OSError):
                    pass

        def bad_logins() -> None:
            while not stop.wait(BAD_LOGIN_EVERY):
                with contextlib.suppress(poplib.error_proto, OSError):
                    pop = poplib.POP3(gw.host, gw.pop3_port, timeout=30)
                    try:
                        pop.user(users[0])
                        pop.pass_("not-the-password")
                    except poplib.error_proto:
                        with lock:
                            counts["bad_logins"] += 1
                    pop.quit()

        def readiness() -> None:
            while not stop.wait(5.0):
                with contextlib.suppress(urllib.error.HTTPError):
                    urllib.request.urlopen(f"{http}/readyz", timeout=10).close()

        workers: list[Callable[[], None]] = [submitter, bad_logins, readiness]
        threads = [threading.Thread(target=device, args=(u,), daemon=True) for u in users]
        threads += [threading.Thread(target=w, daemon=True) for w in workers]
        for thread in threads:
            thread.start()
        outage = (0.4 * seconds, 0.6 * seconds)
        while elapsed() < seconds:
            down = outage[0] <= elapsed() < outage[1]
            if down and not proxy.refuse:
                print(f"{elapsed():5.1f}s IMAP unreachable", file=sys.stderr)
                proxy.refuse = True
                proxy.drop_all()
            elif not down and proxy.refuse:
                print(f"{elapsed():5.1f}s IMAP back", file=sys.stderr)
                proxy.refuse = False
            time.sleep(0.2)
        stop.set()
        for thread in threads:
            thread.join(60)
        # A few more scrapes while the last Sent copies land.
        time.sleep(5)
        scraper.stop.set()
        scraper.join(10)
        counts["relayed_by_sink"] = len(sink.messages)
        return scraper.series, counts


def render(series: Series, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p.get("targets")]
    times = sorted({t for points in series.values() for t, _ in points})
    columns = 3
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(18, 3.2 * rows), sharex=True)
    for ax, panel in zip(axes.flat, panels, strict=False):
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        for target in panel["targets"]:
            query = Query(target["expr"].replace("$__rate_interval", RATE_INTERVAL))
            lines: dict[str, list[tuple[float, float]]] = {}
            for t in times:
                for labels, value in query.at(series, t).items():
                    legend = target.get("legendFormat", "") or "{{}}"
                    for key, label_value in labels:
                        legend = legend.replace("{{" + key + "}}", label_value)
                    lines.setdefault(legend, []).append((t, value))
            for legend, points in sorted(lines.items()):
                ax.plot([p[0] for p in points], [p[1] for p in points], label=legend, lw=1.4)
        ax.set_title(panel["title"], fontsize=10, loc="left")
        ax.set_ylabel(UNITS.get(unit, ""), fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("seconds into the run", fontsize=8)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="popgate-dashboard-") as directory:
        Path(directory).chmod(0o755)  # Dovecot's own users must reach its files inside
        series, counts = run_workload(args.seconds, Path(directory))
    print(json.dumps(counts), file=sys.stderr)
    title = (
        "popgate-dashboard.json queries over a real run (not a Grafana screenshot): "
        f"{DEVICES} POP3 devices, a submission every {SUBMIT_EVERY:.0f} s, a failed login every "
        f"{BAD_LOGIN_EVERY:.0f} s, IMAP unreachable from {0.4 * args.seconds:.0f} to "
        f"{0.6 * args.seconds:.0f} s; 1 s scrapes, rate window {RATE_INTERVAL}"
    )
    render(series, args.out, title)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
