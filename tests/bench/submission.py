"""``./tests/bench/run --submission``: a 100 KB message submitted over STARTTLS, relayed and
filed in Sent, against the same client doing what a modern mail client does without popgate.

* **popgate**: SMTP + STARTTLS + AUTH to popgate's submission listener, which relays to Postfix
  and files the copy in the sender's Sent over IMAPS;
* **pair**: SMTP + STARTTLS to Postfix, then the client's own IMAPS login and APPEND to Sent.

Postfix delivers to a private Dovecot over LMTP. ``--submitters`` clients (threads, default
100) each send ``--messages`` messages one after another; each system gets its own sender and
recipient so the two never mix. Latency is per message, connect to the last answer (for the
pair: SMTP and the APPEND). Afterwards every message must be in the recipient's INBOX and in the
sender's Sent, its body byte for byte: anything missing or different is counted as lost and
makes the exit status 1. Rounds alternate the order of the two systems.
"""

from __future__ import annotations

import argparse
import datetime
import email.parser
import email.policy
import email.utils
import hashlib
import imaplib
import json
import os
import pwd
import signal
import smtplib
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.bench import profile
from tests.bench.workloads import percentile
from tests.support.dovecot import Dovecot
from tests.support.gateway import GatewayProcess
from tests.support.postfix import Postfix

DOMAIN = "example.org"
PASSWORD = "bench-secret"
SIZE = 100 * 1024
TIMEOUT = 120.0


def _client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def message(system: str, n: int) -> tuple[str, bytes, bytes]:
    """(Message-ID, the whole message, its body): a 100 KB text body unique to ``n``."""
    mid = f"<bench-{system}-{n}-{time.time_ns()}@bench.{DOMAIN}>"
    seed = hashlib.sha256(mid.encode()).hexdigest()
    line = (seed + seed)[:76]
    body = "".join(f"{i:05d} {line}\r\n" for i in range(SIZE // 84)).encode()
    head = (
        f"From: sender-{system}@{DOMAIN}\r\nTo: rcpt-{system}@{DOMAIN}\r\n"
        f"Subject: bench {n}\r\nMessage-ID: {mid}\r\n"
        f"Date: {email.utils.format_datetime(datetime.datetime.now(datetime.UTC))}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    return mid, head + body, body


#: (phase, seconds since the message's start) as a submitter passes each step
Marks = list[tuple[str, float]]


def send_via_popgate(
    host: str, port: int, device: int, data: bytes, system: str, marks: Marks, began: float
) -> None:
    def mark(phase: str) -> None:
        marks.append((phase, time.perf_counter() - began))

    with smtplib.SMTP(host, port, timeout=TIMEOUT) as smtp:
        mark("connect")
        smtp.starttls(context=_client_tls())
        mark("starttls")
        smtp.login(f"sender-{system}#dev{device:03d}", PASSWORD)
        mark("auth")
        smtp.mail(f"sender-{system}@{DOMAIN}")
        mark("mail")
        smtp.rcpt(f"rcpt-{system}@{DOMAIN}")
        mark("rcpt")
        code, text = smtp.data(data)
        if code != 250:
            raise RuntimeError(f"DATA: {code} {text!r}")
        mark("data")
    mark("quit")


def send_as_pair(
    mta: Postfix,
    dc: Dovecot,
    device: int,
    data: bytes,
    system: str,
    marks: Marks,
    began: float,
    auth: bool,
) -> None:
    def mark(phase: str) -> None:
        marks.append((phase, time.perf_counter() - began))

    with smtplib.SMTP(mta.host, mta.port, timeout=TIMEOUT) as smtp:
        mark("connect")
        smtp.starttls(context=_client_tls())
        mark("starttls")
        if auth:
            smtp.login(f"sender-{system}", PASSWORD)
            mark("auth")
        smtp.mail(f"sender-{system}@{DOMAIN}")
        mark("mail")
        smtp.rcpt(f"rcpt-{system}@{DOMAIN}")
        mark("rcpt")
        code, text = smtp.data(data)
        if code != 250:
            raise RuntimeError(f"DATA: {code} {text!r}")
        mark("data")
    mark("quit")
    imap = imaplib.IMAP4_SSL(dc.host, dc.imaps_port, ssl_context=_client_tls(), timeout=TIMEOUT)
    try:
        mark("imap_connect")
        imap.login(f"sender-{system}", PASSWORD)
        mark("imap_login")
        typ, answer = imap.append("Sent", "(\\Seen)", None, data)
        if typ != "OK":
            raise RuntimeError(f"APPEND: {answer!r}")
        mark("append")
    finally:
        imap.logout()
    mark("logout")


Send = Callable[[int, bytes, Marks, float], None]


def run_round(
    system: str, send: Send, submitters: int, per: int
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Every submitter in its own thread; returns the figures and Message-ID -> body sent."""
    latencies: list[float] = []
    steps: dict[str, list[float]] = {}
    errors: list[str] = []
    sent: dict[str, bytes] = {}
    lock = threading.Lock()
    start_together = threading.Barrier(submitters)

    def submitter(device: int) -> None:
        start_together.wait()
        for k in range(per):
            mid, data, body = message(system, device * 1000 + k)
            marks: Marks = []
            began = time.perf_counter()
            try:
                send(device, data, marks, began)
            except Exception as e:  # a failed submission is counted, never hidden
                with lock:
                    errors.append(f"{type(e).__name__}: {e}"[:200])
                continue
            with lock:
                latencies.append(time.perf_counter() - began)
                sent[mid] = body
                previous = 0.0
                for phase, at in marks:
                    steps.setdefault(phase, []).append(at - previous)
                    previous = at

    threads = [threading.Thread(target=submitter, args=(d,)) for d in range(submitters)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    latencies.sort()
    return {
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "messages_per_s": len(latencies) / wall,
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "wall": wall,
        # the median time of each step (from the previous one's end), in the order taken
        "steps_p50": {k: statistics.median(v) for k, v in steps.items()},
    }, sent


def _by_message_id(bodies: dict[int, bytes]) -> dict[str, bytes]:
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    found = {}
    for raw in bodies.values():
        mid = parser.parsebytes(raw).get("Message-ID", "").strip()
        found[mid] = raw.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in raw else b""
    return found


def check_arrival(
    dc: Dovecot, system: str, sent: dict[str, bytes], deadline: float
) -> dict[str, int]:
    """Wait (bounded) for every message in the recipient's INBOX and the sender's Sent, then
    compare the bodies byte for byte."""
    places = {"inbox": (f"rcpt-{system}", "INBOX"), "sent": (f"sender-{system}", "Sent")}
    result = {}
    for name, (user, mailbox) in places.items():
        while True:
            found = _by_message_id(dc.fetch_bodies(user, PASSWORD, mailbox=mailbox))
            missing = [m for m in sent if m not in found]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        differ = [m for m in sent if m in found and found[m] != sent[m]]
        result[f"{name}_missing"] = len(missing)
        result[f"{name}_differ"] = len(differ)
    return result


def _start_py_spy(gw: GatewayProcess, out: Path) -> tuple[subprocess.Popen[bytes], Path]:
    exe = profile.py_spy()
    if exe is None or gw.pid is None:
        raise RuntimeError("py-spy is not installed (pip install -e '.[bench]')")
    argv = [exe, "record", "--pid", str(gw.pid), "--rate", str(profile.RATE), "--format", "raw"]
    proc = subprocess.Popen(
        [*argv, "--nonblocking", "--output", str(out)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # attach
    return proc, out


def _stop_py_spy(proc: subprocess.Popen[bytes], out: Path, wall: float) -> dict[str, Any]:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if not out.exists():
        raise RuntimeError(f"py-spy wrote no profile: {err.decode(errors='replace')}")
    return profile.summarize(out, wall, top=25)


def _gateway_config(
    work: Path, dc: Dovecot, mta: Postfix, relay_auth: str, same_cert: bool
) -> dict[str, dict[str, Any]]:
    """popgate's settings; ``same_cert``: the certificate and key Postfix serves (the test
    PKI's ECDSA P-256 pair), else popgate's own self-signed RSA-2048 default."""
    if same_cert:
        tls = {"cert_file": str(dc.cert_file), "key_file": str(dc._pki["key_file"])}
    else:
        tls = {"cert_file": str(work / "popgate.crt"), "key_file": str(work / "popgate.key")}
    return {
        "upstream.imap": {
            "host": dc.host,
            "port": dc.imaps_port,
            "security": "tls",
            "ca_file": str(dc.ca_file),
            "master_user": dc.master_user,
            "master_password": dc.master_password,
        },
        "upstream.smtp": {
            "host": mta.host,
            "port": mta.port,
            "security": "none",
            "auth": relay_auth,
        },
        "submission": {"listen": ["127.0.0.1:0"], "spool_dir": str(work / "spool")},
        "pop3": {"listen": []},
        "tls": tls,
        "security": {
            "auth_failure_delay": 0,
            "max_connections": 5000,
            "max_connections_per_ip": 5000,
        },
        "log": {"level": "info"},
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="tests/bench/run --submission", description=__doc__)
    p.add_argument("--submission", action="store_true")
    p.add_argument("--submitters", type=int, default=100)
    p.add_argument("--messages", type=int, default=3, help="per submitter per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="5 submitters, 1 message, 1 round")
    p.add_argument(
        "--auth",
        choices=("none", "sasl"),
        default="none",
        help="sasl: Postfix requires AUTH (Dovecot's auth service), the pair logs in to it and "
        "popgate relays with auth = passthrough; none: Postfix relays for loopback",
    )
    p.add_argument(
        "--cert",
        choices=("same", "own"),
        default="same",
        help="same: popgate serves Postfix's certificate (ECDSA P-256), so both sides do the "
        "same TLS; own: popgate's self-signed RSA-2048 default (the first runs, before 12-01)",
    )
    p.add_argument(
        "--base",
        type=Path,
        default=None,
        help="a source tree (its gateway/ package) to run as a third system, 'base', "
        "alternated with the others: e.g. `git archive main gateway | tar -x -C DIR`",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy on each gateway while its rounds run (profile-SYSTEM-ROUND.txt, .md)",
    )
    p.add_argument("--out", type=Path, default=Path("run/bench/submission"))
    args, _rest = p.parse_known_args(argv)
    if args.quick:
        args.submitters, args.messages, args.rounds = 5, 1, 1
    args.out = args.out.resolve()  # the gateway runs in its config's directory
    args.out.mkdir(parents=True, exist_ok=True)
    systems = ["popgate", "pair"] + (["base"] if args.base else [])
    load_before = os.getloadavg()
    sasl = args.auth == "sasl"
    dc = Dovecot(lmtp=True, auth_port=sasl, extra_config="default_process_limit = 2500\n")
    dc.start()
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    failed = False
    gateways: dict[str, GatewayProcess] = {}
    try:
        for r in range(args.rounds):
            for system in systems:
                for who in ("sender", "rcpt"):
                    dc.add_user(f"{who}-{system}{r}", PASSWORD)
        # The Dovecot test PKI's server pair serves Postfix too; smtpd reads it as "postfix".
        tls_dir = args.out / "postfix-tls"
        tls_dir.mkdir(parents=True, exist_ok=True)
        cert_file, key_file = tls_dir / "cert.pem", tls_dir / "key.pem"
        cert_file.write_bytes(dc.cert_file.read_bytes())
        key_file.write_bytes(dc._pki["key_file"].read_bytes())
        postfix_ids = pwd.getpwnam("postfix")
        for f in (cert_file, key_file):
            os.chown(f, postfix_ids.pw_uid, postfix_ids.pw_gid)
        os.chmod(key_file, 0o600)
        with Postfix(
            lmtp=(dc.host, dc.lmtp_port),
            domains=[DOMAIN],
            tls=(cert_file, key_file),
            sasl=(dc.host, dc.auth_port) if sasl else None,
        ) as mta:
            try:
                for system in systems:
                    if system == "pair":
                        continue
                    work = args.out / system
                    work.mkdir(parents=True, exist_ok=True)
                    relay_auth = "passthrough" if sasl else "none"
                    config = _gateway_config(work, dc, mta, relay_auth, args.cert == "same")
                    env = {"PYTHONPATH": str(args.base.resolve())} if system == "base" else {}
                    gateways[system] = GatewayProcess(
                        config, work / "popgate.toml", env=env
                    ).start()
                for r in range(args.rounds):
                    order = systems[r % len(systems) :] + systems[: r % len(systems)]
                    for system in order:
                        name = f"{system}{r}"
                        if system == "pair":

                            def send(
                                d: int, data: bytes, marks: Marks, t0: float, n: str = name
                            ) -> None:
                                send_as_pair(mta, dc, d, data, n, marks, t0, sasl)
                        else:
                            gw = gateways[system]

                            def send(
                                d: int,
                                data: bytes,
                                marks: Marks,
                                t0: float,
                                n: str = name,
                                gw: GatewayProcess = gw,
                            ) -> None:
                                send_via_popgate(gw.host, gw.submission_port, d, data, n, marks, t0)

                        load = os.getloadavg()[0]
                        spy = None
                        if args.profile and system != "pair":
                            spy = _start_py_spy(gateways[system], args.out / f"profile-{name}.txt")
                        figures, sent = run_round(name, send, args.submitters, args.messages)
                        if spy is not None:
                            figures["profile"] = _stop_py_spy(*spy, figures["wall"])
                            summary_text = profile.format_summary(name, figures["profile"])
                            (args.out / f"profile-{name}.md").write_text(summary_text)
                        figures |= check_arrival(dc, name, sent, time.monotonic() + 180)
                        figures["delivered_checked"] = len(sent)
                        figures["load"] = load
                        lost = sum(
                            figures[k] for k in figures if k.endswith(("_missing", "_differ"))
                        )
                        figures["lost"] = lost
                        failed |= bool(lost or figures["errors"])
                        results[system].append(figures)
                        steps = " ".join(
                            f"{k}={v * 1000:.0f}" for k, v in figures["steps_p50"].items()
                        )
                        print(
                            f"[{time.strftime('%H:%M:%S')}] round {r + 1} {system:8} "
                            f"p50={figures['p50']:.3f}s p99={figures['p99']:.3f}s "
                            f"{figures['messages_per_s']:.1f} msg/s errors={figures['errors']} "
                            f"lost={lost} load={load:.1f}\n    steps p50 ms: {steps}",
                            flush=True,
                        )
            finally:
                for system, gw in gateways.items():
                    gw.stop()
                    (args.out / f"{system}.log").write_text(gw.log_text())
    finally:
        dc.stop()
    summary = {
        s: {
            k: statistics.median(r[k] for r in rs)
            for k in ("p50", "p99", "messages_per_s", "errors", "lost", "load")
        }
        for s, rs in results.items()
        if rs
    }
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "submitters": args.submitters,
        "messages_per_submitter": args.messages,
        "size": SIZE,
        "auth": args.auth,
        "cert": args.cert,
        "base": str(args.base) if args.base else None,
        "results": results,
        "medians": summary,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    pair = summary.get("pair", {})
    for system in systems:
        pg = summary.get(system, {})
        if system != "pair" and pg and pair and pair["p50"] == pair["p50"]:
            print(
                f"p50 {system}/pair {pg['p50'] / pair['p50']:.2f}x, "
                f"messages/s {system}/pair {pg['messages_per_s'] / pair['messages_per_s']:.2f}x"
            )
    if "base" in summary and "popgate" in summary:
        pg, base = summary["popgate"], summary["base"]
        print(
            f"p50 popgate/base {pg['p50'] / base['p50']:.2f}x, "
            f"messages/s popgate/base {pg['messages_per_s'] / base['messages_per_s']:.2f}x"
        )
    print(json.dumps(summary, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
