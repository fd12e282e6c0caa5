#!/usr/bin/env python
"""The container's HEALTHCHECK: every POP3 and submission listener of the configuration answers.

Reads the same configuration as ``popgate serve`` (POPGATE_CONFIG or -c, with the POPGATE_*
environment overrides), connects to each listener on the loopback address of its family, does
the TLS handshake on implicit-TLS listeners, and waits for the greeting (``+OK`` for POP3,
``220`` for submission) before saying QUIT. It does not log in and does not touch the upstream
servers: an IMAP outage makes sessions fail, not the container unhealthy.

Exit status 0 when every listener answered, 1 otherwise (one line per listener on stdout,
which ``docker inspect`` / ``podman healthcheck run`` show).
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import sys

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
