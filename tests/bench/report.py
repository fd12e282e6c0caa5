"""Medians, ratios and targets of one benchmark run: JSON, a Markdown table and a PNG chart."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bench.systems import SYSTEM_LABELS, SYSTEMS
from tests.bench.workloads import WORKLOAD_TITLES, Result

#: (workload, metric, unit, what the ratio compares); the metric the targets are about first
METRICS: tuple[tuple[str, str, str], ...] = (
    ("full", "seconds", "s"),
    ("pipelined", "seconds", "s"),
    ("poll", "seconds", "s"),
    ("devices", "p50", "s"),
    ("devices", "p99", "s"),
    ("devices", "sessions_per_s", "1/s"),
    ("devices", "errors", ""),
    ("big", "retr_seconds", "s"),
    ("big", "peak_rss_mb", "MB"),
    ("big", "rss_growth_mb", "MB"),
    ("full", "cpu_server_s", "s"),
    ("pipelined", "cpu_server_s", "s"),
    ("poll", "cpu_server_s", "s"),
    ("devices", "cpu_server_s", "s"),
    ("big", "cpu_server_s", "s"),
)


@dataclass(frozen=True)
class Target:
    name: str
    workload: str
    metric: str
    kind: str  # "ratio_direct" | "ratio_imapc" | "absolute"
    limit: float
    strict: bool = False  # "<" instead of "≤"
    text: str = ""


TARGETS = (
    Target("full ≤ 1.3x direct", "full", "seconds", "ratio_direct", 1.3),
    Target("full faster than imapc", "full", "seconds", "ratio_imapc", 1.0, strict=True),
    Target("pipelined ≤ 1.2x direct", "pipelined", "seconds", "ratio_direct", 1.2),
    Target("poll ≤ 1.5x direct", "poll", "seconds", "ratio_direct", 1.5),
    Target("devices: zero errors", "devices", "errors", "absolute", 0.0),
    Target("devices p99 ≤ 2x direct", "devices", "p99", "ratio_direct", 2.0),
    Target("big: RSS growth < 32 MB", "big", "rss_growth_mb", "absolute", 32.0, strict=True),
    Target("big: RETR ≤ 1.5x direct", "big", "retr_seconds", "ratio_direct", 1.5),
)


def summarize(results: Mapping[str, Mapping[str, Sequence[Result]]]) -> dict[str, Any]:
    """results[workload][system] = per-round results → medians, ratios, targets."""
    medians: dict[str, dict[str, dict[str, float]]] = {}
    spread: dict[str, dict[str, dict[str, list[float]]]] = {}
    for workload, by_system in results.items():
        for system, rounds in by_system.items():
            for key in sorted({k for r in rounds for k, v in r.items() if _number(v)}):
                values = [float(r[key]) for r in rounds if _number(r.get(key))]
                m = medians.setdefault(workload, {}).setdefault(key, {})
                m[system] = statistics.median(values)
                spread.setdefault(workload, {}).setdefault(key, {})[system] = values
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for workload, metrics in medians.items():
        for key, medians_by_system in metrics.items():
            pg = medians_by_system.get("popgate")
            for other in ("direct", "imapc"):
                ref = medians_by_system.get(other)
                if pg is not None and ref:
                    ratios.setdefault(workload, {}).setdefault(key, {})[other] = pg / ref
    targets = []
    for t in TARGETS:
        if t.kind == "absolute":
            rounds = results.get(t.workload, {}).get("popgate", [])
            values = [float(r[t.metric]) for r in rounds if _number(r.get(t.metric))]
            # the worst round counts for an absolute limit
            value = max(values) if values else math.nan
        else:
            reference = "direct" if t.kind == "ratio_direct" else "imapc"
            value = ratios.get(t.workload, {}).get(t.metric, {}).get(reference, math.nan)
        met = (value < t.limit) if t.strict else (value <= t.limit)
        if t.kind == "absolute" and t.limit == 0:
            met = value == 0
        targets.append(
            {
                "target": t.name,
                "workload": t.workload,
                "metric": t.metric,
                "kind": t.kind,
                "limit": t.limit,
                "value": value,
                # None: not measured in this run (a subset of workloads or systems)
                "met": None if math.isnan(value) else bool(met),
            }
        )
    return {"medians": medians, "rounds": spread, "ratios": ratios, "targets": targets}


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --------------------------------------------------------------------- output
def _fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "MB":
        return f"{value:.1f} MB"
    if unit == "1/s":
        return f"{value:.1f}/s"
    return f"{value:g}"


def table(summary: Mapping[str, Any]) -> str:
    """Markdown: one row per workload metric, medians per system and popgate's ratios."""
    medians = summary["medians"]
    ratios = summary["ratios"]
    head = (
        "| workload | metric | "
        + " | ".join(SYSTEM_LABELS[s] for s in SYSTEMS)
        + " | popgate / direct | popgate / imapc |"
    )
    lines = [head, "|" + "---|" * (len(SYSTEMS) + 4)]
    for workload, metric, unit in METRICS:
        by_system = medians.get(workload, {}).get(metric)
        if not by_system:
            continue
        cells = [_fmt(by_system.get(s), unit) for s in SYSTEMS]
        r = ratios.get(workload, {}).get(metric, {})
        ratio_cells = [
            f"{r[o]:.2f}x" if o in r and unit not in ("", "MB") else "-"
            for o in ("direct", "imapc")
        ]
        lines.append(f"| {workload} | {metric} | " + " | ".join(cells + ratio_cells) + " |")
    lines.append("")
    lines.append("| target | popgate | met |")
    lines.append("|---|---|---|")
    for t in summary["targets"]:
        value = t["value"]
        if t["met"] is None:
            lines.append(f"| {t['target']} | not measured | - |")
            continue
        shown = f"{value:.2f}x" if t["kind"] != "absolute" else f"{value:.3g}"
        lines.append(f"| {t['target']} | {shown} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, report: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")


CHART_ROWS = (
    ("full", "seconds", "full download"),
    ("pipelined", "seconds", "pipelined download"),
    ("poll", "seconds", "poll (UIDL)"),
    ("devices", "p50", "many devices p50"),
    ("devices", "p99", "many devices p99"),
    ("big", "retr_seconds", "big message RETR"),
)


def chart(path: Path, summary: Mapping[str, Any], title: str) -> bool:
    """A bar chart of popgate's ratios to both references; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ratios = summary["ratios"]
    limits = {
        (t["workload"], t["metric"]): t["limit"]
        for t in summary["targets"]
        if t["kind"] == "ratio_direct"
    }
    rows = [r for r in CHART_ROWS if r[1] in ratios.get(r[0], {})]
    labels = [label for _, _, label in rows]
    direct = [ratios[w][m].get("direct", math.nan) for w, m, _ in rows]
    imapc = [ratios[w][m].get("imapc", math.nan) for w, m, _ in rows]
    fig, ax = plt.subplots(figsize=(9, 5.2), dpi=110)
    ys = range(len(rows))
    h = 0.38
    ax.barh(
        [y - h / 2 for y in ys], direct, h, label="popgate / Dovecot POP3 direct", color="#4c72b0"
    )
    ax.barh(
        [y + h / 2 for y in ys],
        imapc,
        h,
        label="popgate / Dovecot POP3 over imapc",
        color="#dd8452",
    )
    for y, (w, m, _) in zip(ys, rows, strict=True):
        limit = limits.get((w, m))
        if limit is not None:
            ax.plot([limit, limit], [y - h, y], color="black", linewidth=2)
    for y, value in zip(ys, direct, strict=True):
        if not math.isnan(value):
            ax.text(value, y - h / 2, f" {value:.2f}x", va="center", fontsize=8)
    for y, value in zip(ys, imapc, strict=True):
        if not math.isnan(value):
            ax.text(value, y + h / 2, f" {value:.2f}x", va="center", fontsize=8)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(list(ys), labels)
    ax.invert_yaxis()
    ax.set_xlabel("time ratio (lower is better; 1 = as fast as the reference; black tick = target)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def workload_titles() -> dict[str, str]:
    return dict(WORKLOAD_TITLES)


def scale_table(results: Mapping[str, Mapping[str, Sequence[Result]]]) -> str:
    """Markdown for ``--scale``: per step, errors and latencies of both systems, popgate's
    p99 ratio, its RSS growth per session and server CPU per session (``cpu_server_s``)."""
    lines = [
        "| devices | logins | errors (direct / popgate) | p50 direct | p50 popgate | p99 direct "
        "| p99 popgate | p99 ratio | popgate RSS / session | CPU / session direct "
        "| CPU / session popgate |",
        "|" + "---|" * 11,
    ]
    for workload, by_system in results.items():
        _, count, mode = workload.split("-")
        n = int(count)
        d = (by_system.get("direct") or [{}])[0]
        g = (by_system.get("popgate") or [{}])[0]

        def ms(r: Mapping[str, Any], k: str) -> str:
            v = r.get(k)
            return f"{v * 1000:.0f} ms" if _number(v) else "-"

        ratio = f"{g['p99'] / d['p99']:.2f}x" if _number(g.get("p99")) and d.get("p99") else "-"
        rss = f"{g['rss_growth_mb'] * 1024 / n:.0f} KiB" if _number(g.get("rss_growth_mb")) else "-"
        logins = "one user, #device" if mode == "one" else "a user each"
        lines.append(
            f"| {n} | {logins} | {d.get('errors', '-'):g} / {g.get('errors', '-'):g} "
            f"| {ms(d, 'p50')} | {ms(g, 'p50')} | {ms(d, 'p99')} | {ms(g, 'p99')} | {ratio} "
            f"| {rss} | {ms({'v': d.get('cpu_server_s', math.nan) / n}, 'v')} "
            f"| {ms({'v': g.get('cpu_server_s', math.nan) / n}, 'v')} |"
        )
    return "\n".join(lines) + "\n"
