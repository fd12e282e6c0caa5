"""This host's name, looked up once per process.

``socket.getfqdn`` may wait on DNS for seconds: asked at start-up (``Gateway.start``), never
again on the reactor thread when a state message or a certificate needs the name.
"""

from __future__ import annotations

import functools
import socket


@functools.cache
def host_name() -> str:
    return socket.getfqdn() or "localhost"
