"""Just enough PromQL to evaluate the Grafana dashboard's queries over scraped samples.

docker/grafana/popgate-dashboard.json uses a small part of the language: selectors with label
matchers and a range, ``rate``, ``increase``, ``sum``/``sum by (...)`` and
``histogram_quantile``. This evaluates exactly those, over samples kept in memory
(``Series``: one list of ``(time, value)`` per metric and label set), so tests/bench/dashboard.py
can draw each panel from the dashboard's own query text instead of a second copy of it.

Deviations from Prometheus, fine for one process with no counter reset in the run:
``rate``/``increase`` take the last minus the first sample of the window (no extrapolation to the
window's edges, no reset handling); a matcher on ``instance`` is ignored (one instance).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable

Labels = tuple[tuple[str, str], ...]
# (name, labels) -> [(time, value)], times ascending
Series = dict[tuple[str, Labels], list[tuple[float, float]]]
Vector = dict[Labels, float]

_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d+)?)(?![a-zA-Z])|(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"|(?P<str>\"(?:[^\"\\]|\\.)*\")|(?P<range>\[[0-9]+[smh]\])|(?P<op>=~|!=|[(){},=]))"
)
_UNITS = {"s": 1, "m": 60, "h": 3600}


class PromQLError(ValueError):
    """A query outside the subset this module evaluates."""


def tokenize(text: str) -> list[str]:
    tokens, position = [], 0
    text = text.strip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match or match.end() == position:
            raise PromQLError(f"cannot read {text[position:]!r}")
        tokens.append(match.group(0).strip())
        position = match.end()
    return tokens


class Query:
    """A parsed query; :meth:`at` evaluates it at one time over ``series``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._tokens = tokenize(text)
        self._i = 0
        self.tree = self._expr()
        if self._i != len(self._tokens):
            raise PromQLError(f"unexpected {self._tokens[self._i]!r} in {text!r}")

    # -- parser ---------------------------------------------------------------------------
    def _peek(self) -> str | None:
        return self._tokens[self._i] if self._i < len(self._tokens) else None

    def _take(self, expected: str | None = None) -> str:
        token = self._peek()
        if token is None or (expected is not None and token != expected):
            raise PromQLError(f"expected {expected!r}, got {token!r} in {self.text!r}")
        self._i += 1
        return token

    def _expr(self) -> tuple:  # type: ignore[type-arg]
        token = self._take()
        if token == "sum":
            by: tuple[str, ...] = ()
            if self._peek() == "by":
                self._take()
                self._take("(")
                names = []
                while self._peek() != ")":
                    names.append(self._take())
                    if self._peek() == ",":
                        self._take()
                self._take(")")
                by = tuple(names)
            self._take("(")
            inner = self._expr()
            self._take(")")
            return ("sum", by, inner)
        if token in ("rate", "increase"):
            self._take("(")
            inner = self._expr()
            self._take(")")
            if inner[0] != "range":
                raise PromQLError(f"{token} needs a range selector in {self.text!r}")
            return (token, inner)
        if token == "histogram_quantile":
            self._take("(")
            q = float(self._take())
            self._take(",")
            inner = self._expr()
            self._take(")")
            return ("quantile", q, inner)
        if re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", token):
            matchers: list[tuple[str, str, str]] = []
            if self._peek() == "{":
                self._take()
                while self._peek() != "}":
                    label, op, value = self._take(), self._take(), self._take()
                    matchers.append((label, op, value[1:-1]))
                    if self._peek() == ",":
                        self._take()
                self._take("}")
            selector = ("selector", token, tuple(matchers))
            following = self._peek()
            if following is not None and following.startswith("["):
                self._take()
                seconds = int(following[1:-2]) * _UNITS[following[-2]]
                return ("range", selector, float(seconds))
            return selector
        raise PromQLError(f"unsupported {token!r} in {self.text!r}")

    # -- evaluation -----------------------------------------------------------------------
    def at(self, series: Series, t: float) -> Vector:
        return _eval(self.tree, series, t)


def _matches(labels: Labels, matchers: Iterable[tuple[str, str, str]]) -> bool:
    values = dict(labels)
    for label, op, value in matchers:
        if label == "instance":
            continue
        have = values.get(label, "")
        if op == "=" and have != value:
            return False
        if op == "!=" and have == value:
            return False
        if op == "=~" and not re.fullmatch(value, have):
            return False
    return True


def _selected(node: tuple, series: Series) -> Iterable[tuple[Labels, list[tuple[float, float]]]]:  # type: ignore[type-arg]
    _, name, matchers = node
    for (series_name, labels), points in series.items():
        if series_name == name and _matches(labels, matchers):
            yield labels, points


def _eval(node: tuple, series: Series, t: float) -> Vector:  # type: ignore[type-arg]
    kind = node[0]
    if kind == "selector":
        out: Vector = {}
        for labels, points in _selected(node, series):
            latest = [v for (ts, v) in points if ts <= t]
            if latest:
                out[labels] = latest[-1]
        return out
    if kind in ("rate", "increase"):
        _, (_, selector, window) = node
        out = {}
        for labels, points in _selected(selector, series):
            inside = [(ts, v) for (ts, v) in points if t - window < ts <= t]
            if len(inside) < 2:
                continue
            (t0, v0), (t1, v1) = inside[0], inside[-1]
            out[labels] = (v1 - v0) / (t1 - t0) if kind == "rate" else v1 - v0
        return out
    if kind == "sum":
        _, by, inner = node
        sums: dict[Labels, float] = defaultdict(float)
        for labels, value in _eval(inner, series, t).items():
            key = tuple((k, v) for k, v in labels if k in by)
            sums[key] += value
        return dict(sums)
    if kind == "quantile":
        _, q, inner = node
        groups: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
        for labels, value in _eval(inner, series, t).items():
            le = dict(labels).get("le")
            if le is None:
                continue
            key = tuple((k, v) for k, v in labels if k != "le")
            groups[key].append((float(le), value))
        return {key: histogram_quantile(q, buckets) for key, buckets in groups.items()}
    raise PromQLError(f"cannot evaluate {kind}")


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's estimate: linear inside the bucket that holds the rank; NaN without data;
    the highest finite bound when the rank falls into the +Inf bucket."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][0] != math.inf:
        return math.nan
    total = buckets[-1][1]
    if total <= 0:
        return math.nan
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == math.inf:
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound
