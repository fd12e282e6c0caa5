"""Devices of one user logging in at once share one index fetch upstream, and each still gets
exactly its mailbox (gateway/maildrop/index_flights.py), against each upstream IMAP server."""

from __future__ import annotations

import poplib
import threading
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SeededUser
from tests.support.gateway import GatewayProcess
from tests.support.tcp_proxy import TcpProxy
from tests.support.upstreams import Upstream

pytestmark = pytest.mark.integration

DEVICES = 6


def indexes(gw: GatewayProcess) -> dict[str, float]:
    """popgate_pop3_indexes_total by source."""
    url = f"http://{gw.host}:{gw.port('http')}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        s.labels["source"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "popgate_pop3_indexes_total"
    }


def download(gw: GatewayProcess, login: str, password: str) -> tuple[list[bytes], list[bytes]]:
    """(UIDL lines, every message) of one POP session."""
    pop = poplib.POP3(gw.host, gw.pop3_port, timeout=60)
    try:
        pop.user(login)
        pop.pass_(password)
        _, uidls, _ = pop.uidl()
        bodies = [b"\r\n".join(pop.retr(i + 1)[1]) + b"\r\n" for i in range(len(uidls))]
        pop.quit()
    finally:
        pop.close()
    return uidls, bodies


def test_concurrent_device_logins_share_one_index_fetch(
    upstream: Upstream,
    seeded_user: Callable[..., SeededUser],
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    seeded = seeded_user(
        [b"Subject: %d\r\n\r\n" % i + b"line %d\r\n" % i * (i * 40 + 1) for i in range(12)]
    )
    with TcpProxy(upstream.host, upstream.imap_port) as proxy:
        gw = start_gateway(upstream_imap={"port": proxy.port}, http={"listen": ["127.0.0.1:0"]})
        before = indexes(gw)
        # Every device's login reaches the gateway before the IMAP server answers any of
        # them: each upstream connection is made after its device's PASS, and none is
        # forwarded until all have arrived.
        proxy.hold_until(DEVICES)
        results: dict[int, tuple[list[bytes], list[bytes]] | BaseException] = {}

        def device(i: int) -> None:
            try:
                results[i] = download(gw, f"{seeded.name}#dev{i}", seeded.password)
            except BaseException as e:  # reported below, with the device's number
                results[i] = e

        threads = [threading.Thread(target=device, args=(i,)) for i in range(DEVICES)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        after = indexes(gw)

    assert sorted(results) == list(range(DEVICES))
    first = results[0]
    assert not isinstance(first, BaseException), first
    for i in range(DEVICES):
        got = results[i]
        assert not isinstance(got, BaseException), (i, got)
        uidls, bodies = got
        assert bodies == seeded.messages  # byte-exact, every device, every message
        assert uidls == first[0]  # the same UIDLs for every device
    moved = {k: after.get(k, 0) - before.get(k, 0) for k in ("fetched", "shared", "cached")}
    assert moved == {"fetched": 1, "shared": DEVICES - 1, "cached": 0}
