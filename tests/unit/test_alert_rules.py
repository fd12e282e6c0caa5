"""docker/prometheus/popgate-alerts.yaml without promtool: it is the YAML shape Prometheus
loads, every expression's brackets balance, and every popgate_* series it names exists."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from gateway.metrics import Metrics

RULES = Path(__file__).resolve().parents[2] / "docker" / "prometheus" / "popgate-alerts.yaml"
DURATION = re.compile(r"^\d+[smhdwy]$")


def exported_series() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names.update(sample.name for sample in family.samples)
    return names


def balanced(expr: str) -> bool:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for char in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs:
            if not stack or stack.pop() != pairs[char]:
                return False
    return not stack


def test_the_rule_file_has_the_shape_prometheus_loads() -> None:
    document = yaml.safe_load(RULES.read_text())
    assert set(document) == {"groups"}
    [group] = document["groups"]
    assert group["name"] == "popgate"
    names = [rule["alert"] for rule in group["rules"]]
    assert len(names) == len(set(names)) >= 8
    for rule in group["rules"]:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert isinstance(rule["expr"], str) and balanced(rule["expr"]), rule["alert"]
        assert "for" not in rule or DURATION.match(rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_every_popgate_series_in_the_rules_exists() -> None:
    exported = exported_series()
    named = set(re.findall(r"\bpopgate_[a-z0-9_]+", RULES.read_text()))
    assert named, "no popgate series in the rules"
    assert named <= exported, named - exported


def test_unbalanced_or_unknown_would_be_caught() -> None:
    assert not balanced("sum(rate(x[5m])")
    assert balanced('a{b="(("} > 0')
    assert "popgate_no_such_series" not in exported_series()
