#!/usr/bin/env python
"""The container's HEALTHCHECK: popgate answers ``/healthz``, or else every listener greets.

Reads the same configuration as ``popgate serve`` (POPGATE_CONFIG or -c, with the POPGATE_*
environment overrides). With ``[http] listen`` configured (the image's own configuration does)
it asks ``GET /healthz`` on each HTTP listener and wants ``200 ok``: no POP3 or SMTP session is
opened, so the probe every 30 seconds neither shows in the session counters nor in the logs.
Without it, it connects to each POP3 and submission listener, does the TLS handshake on
implicit-TLS listeners, and waits for the greeting (``+OK`` for POP3, ``220`` for submission)
before saying QUIT. Either way it does not log in and does not touch the upstream servers: an
IMAP outage makes sessions fail (and ``/readyz`` say so), not the container unhealthy.

Listeners are reached on the loopback address of their family. Exit status 0 when every probe
answered, 1 otherwise (one line per probe on stdout, which ``docker inspect`` / ``podman
healthcheck run`` show).
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import ssl
import sys
import urllib.error
import urllib.request

from gateway.config import ConfigError, ListenAddress, load_config

TIMEOUT = 4.0
GREETING = {"pop3": b"+OK", "submission": b"220"}


def _target(listener: ListenAddress) -> str:
    """A wildcard listener is reached on loopback."""
    if listener.host == "0.0.0.0":
        return "127.0.0.1"
    if listener.host == "::":
        return "::1"
    return listener.host


def probe(protocol: str, listener: ListenAddress, tls: bool) -> str | None:
    """None when the listener greets as ``protocol`` should; else what went wrong."""
    try:
        with socket.create_connection((_target(listener), listener.port), TIMEOUT) as raw:
            sock: socket.socket = raw
            if tls:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE  # our own certificate, possibly self-signed
                sock = context.wrap_socket(raw)
            line = sock.makefile("rb").readline(512)
            if not line.startswith(GREETING[protocol]):
                return f"unexpected greeting {line[:60]!r}"
            sock.sendall(b"QUIT\r\n")
    except (OSError, ssl.SSLError) as e:
        return str(e) or type(e).__name__
    return None


def probe_healthz(listener: ListenAddress) -> str | None:
    """None when ``GET /healthz`` on the HTTP listener answers ``200 ok``; else what it got."""
    host = _target(listener)
    url = f"http://{f'[{host}]' if ':' in host else host}:{listener.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            body = response.read(64)
            if response.status != 200 or body.strip() != b"ok":
                return f"unexpected answer {response.status} {body[:60]!r}"
    except urllib.error.HTTPError as e:
        return f"unexpected answer {e.code}"
    except (OSError, ValueError, http.client.HTTPException) as e:
        return str(getattr(e, "reason", None) or e) or type(e).__name__
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default=os.environ.get("POPGATE_CONFIG"))
    args = parser.parse_args(argv)
    if not args.config:
        print("unhealthy: no configuration (-c or POPGATE_CONFIG)")
        return 1
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print("unhealthy: configuration invalid:", *e.problems, sep="\n  ")
        return 1
    if config.http.listen:
        failed = 0
        for listener in config.http.listen:
            problem = probe_healthz(listener)
            print(f"http {listener} /healthz: {problem or 'ok'}")
            failed += problem is not None
        return 1 if failed else 0
    listeners = [
        (protocol, listener, tls)
        for protocol, settings in (("pop3", config.pop3), ("submission", config.submission))
        for tls, addresses in ((False, settings.listen), (True, settings.listen_tls))
        for listener in addresses
    ]
    if not listeners:
        print("unhealthy: no listener configured")
        return 1
    failed = 0
    for protocol, listener, tls in listeners:
        problem = probe(protocol, listener, tls)
        kind = "tls" if tls else "plain"
        print(f"{protocol} {listener} ({kind}): {problem or 'ok'}")
        failed += problem is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
