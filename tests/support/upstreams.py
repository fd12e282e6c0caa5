"""The upstream IMAP servers the integration tests run against.

Every upstream-facing test takes the ``upstream`` fixture and runs once per server: a private
Dovecot 2.3 and a private Cyrus IMAP 3.6 (``tests/support/dovecot.py``, ``tests/support/cyrus.py``),
which offer the same helper methods (users, APPEND, FETCH, LIST, master login). Where the servers
differ, ``upstream.kind`` says which one a test has.
"""

from __future__ import annotations

from tests.support.cyrus import Cyrus
from tests.support.dovecot import Dovecot

UPSTREAMS = ("dovecot", "cyrus")

Upstream = Dovecot | Cyrus
