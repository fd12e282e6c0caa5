"""tests/bench/promql.py, which draws the dashboard picture: its answers for hand-computed
series, and every query of the Grafana dashboard parses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.bench.promql import PromQLError, Query, Series, histogram_quantile

DASHBOARD = Path(__file__).resolve().parents[2] / "docker" / "grafana" / "popgate-dashboard.json"


def test_every_dashboard_query_parses() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert len(exprs) >= 12
    for expr in exprs:
        Query(expr.replace("$__rate_interval", "15s"))


def test_rate_increase_and_sum_by() -> None:
    series: Series = {
        ("c_total", (("result", "ok"),)): [(0.0, 0.0), (5.0, 10.0), (10.0, 30.0)],
        ("c_total", (("result", "fail"),)): [(0.0, 1.0), (5.0, 1.0), (10.0, 6.0)],
    }
    assert Query('rate(c_total{result="ok"}[10s])').at(series, 10.0) == {
        (("result", "ok"),): 4.0  # (30 - 10) / (10 - 5): the sample at 0 is outside (0, 10]
    }
    assert Query("increase(c_total[20s])").at(series, 10.0) == {
        (("result", "ok"),): 30.0,
        (("result", "fail"),): 5.0,
    }
    assert Query("sum(increase(c_total[20s]))").at(series, 10.0) == {(): 35.0}
    assert Query("sum by (result) (c_total)").at(series, 5.0) == {
        (("result", "ok"),): 10.0,
        (("result", "fail"),): 1.0,
    }
    assert Query("rate(c_total[1s])").at(series, 10.0) == {}  # one sample: no rate


def test_histogram_quantile_interpolates_as_prometheus_does() -> None:
    buckets = [(0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (math.inf, 40.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * (20 - 10) / 20)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1 * 10 / 10)
    assert histogram_quantile(0.99, [(1.0, 1.0), (math.inf, 5.0)]) == 1.0  # in +Inf
    assert math.isnan(histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]))


def test_queries_outside_the_subset_are_refused() -> None:
    with pytest.raises(PromQLError):
        Query("avg(c_total)")
    with pytest.raises(PromQLError):
        Query("rate(c_total)")
