"""Runs the benchmark: set up the store and the three systems, alternate them over the rounds,
check every byte, write the report. ``./tests/bench/run --help`` lists the options."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import os
import platform
import ssl
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import gateway
from tests.bench import profile, report
from tests.bench.systems import (
    SYSTEM_LABELS,
    SYSTEMS,
    Sizes,
    Store,
    add_scale_users,
    fresh_gateway,
    quiesce,
    settle,
    start_gateway,
    start_peer,
    tree_cpu,
)
from tests.bench.workloads import (
    WORKLOAD_TITLES,
    WORKLOADS,
    Checker,
    Expected,
    Result,
    Target,
    big_message,
    client_tls,
    devices,
    dovecot_target,
    full_download,
    gateway_target,
    pipelined_download,
    poll,
    scale,
)
from tests.support.dovecot import Dovecot
from tests.support.gateway import GatewayProcess
from tests.support.haproxy import HAProxy, Route

ROOT = Path(__file__).resolve().parents[2]
QUICK = Sizes(full=20, poll=20, big=2 * 1024 * 1024)


def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tests/bench/run",
        description="popgate side by side with Dovecot POP3 (direct) and Dovecot POP3 over "
        "imapc, on one mail store.",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 20 messages, 1 round")
    p.add_argument(
        "--tls",
        nargs="?",
        const="both",
        default="none",
        choices=("none", "both", "client"),
        help="POP3S towards the client for all three systems (Dovecot's own POP3S, popgate, the "
        "imapc peer); 'both' (the default with --tls) also IMAPS upstream for popgate and the "
        "peer, 'client' keeps their upstream plain (a private network)",
    )
    p.add_argument("--rounds", type=int, help="measured rounds (default 5; quick: 1)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    p.add_argument("--devices", type=int, help="concurrent polls (default 200; quick: 10)")
    p.add_argument("--poll-repeats", type=int, help="polls per round (default 10; quick: 2)")
    p.add_argument("--seed", type=int, default=1, help="corpus seed (default 1)")
    p.add_argument("--no-warmup", action="store_true", help="skip the unmeasured first pass")
    p.add_argument(
        "--no-snapshot-cache",
        action="store_true",
        help="popgate fetches the index at every login ([pop3] snapshot_cache_messages = 0),"
        " as against a server without CONDSTORE or after new mail",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="afterwards, run each workload once more on popgate under py-spy",
    )
    p.add_argument(
        "--scale",
        nargs="?",
        const="50,200,1000,2000",
        metavar="STEPS",
        help="instead of the workloads: that many devices (default 50,200,1000,2000) polling the "
        "1,000-message mailbox at once, over TLS (implies --tls unless given), one round each, "
        "against Dovecot POP3S and popgate",
    )
    p.add_argument(
        "--gateways",
        type=int,
        default=1,
        help="popgate processes behind a private HAProxy (TCP mode, leastconn); 1: no HAProxy",
    )
    p.add_argument(
        "--scale-users",
        metavar="MODES",
        help="with --scale: 'one' (one user, #device logins), 'many' (a user per device) or "
        "'one,many' (both, in that order; the default)",
    )
    p.add_argument(
        "--submission",
        action="store_true",
        help="the submission benchmark instead (tests/bench/submission.py: --submitters N, "
        "--messages N, --rounds N, --quick)",
    )
    p.add_argument("--work-dir", type=Path, default=ROOT / "run" / "bench")
    p.add_argument("--out", type=Path, help="results directory (default WORK_DIR/results/TIME)")
    args = p.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.systems = [s for s in args.systems.split(",") if s]
    for w in args.workloads:
        if w not in WORKLOADS:  # scale-N-MODE workloads come only from --scale
            p.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    for s in args.systems:
        if s not in SYSTEMS:
            p.error(f"unknown system {s!r}; choose from {', '.join(SYSTEMS)}")
    if args.scale_users is not None and args.scale is None:
        p.error("--scale-users applies only with --scale")
    if args.scale is not None:
        args.scale = _scale_steps(p, args.scale)
        modes = "one,many" if args.scale_users is None else args.scale_users
        args.scale_users = _scale_users(p, modes)
        if args.tls == "none" and "--tls" not in (argv if argv is not None else sys.argv):
            args.tls = "both"
        if "--systems" not in (argv if argv is not None else sys.argv):
            args.systems = ["direct", "popgate"]
        args.workloads = [f"scale-{n}-{m}" for n in args.scale for m in args.scale_users]
        args.rounds = args.rounds or 1
        args.no_warmup = True
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.devices = args.devices or (10 if args.quick else 200)
    args.poll_repeats = args.poll_repeats or (2 if args.quick else 10)
    return args


def _scale_steps(p: argparse.ArgumentParser, value: str) -> list[int]:
    steps = value.split(",")
    if not all(n.isdigit() and int(n) > 0 for n in steps):
        p.error(f"--scale: {value!r} is not a comma-separated list of device counts (e.g. 50,200)")
    return [int(n) for n in steps]


def _scale_users(p: argparse.ArgumentParser, value: str) -> list[str]:
    modes = value.split(",")
    if not modes or any(m not in ("one", "many") for m in modes) or len(set(modes)) < len(modes):
        p.error(f"--scale-users: {value!r} is not 'one', 'many' or 'one,many'")
    return modes


class Bench:
    def __init__(self, args: argparse.Namespace, store: Store, exp: Expected) -> None:
        self.args = args
        self.store = store
        self.exp = exp
        self.checker = Checker()
        self.failures: list[str] = []
        self.targets: dict[str, Target] = {}
        self.gateway: GatewayProcess | None = None
        self.replicas: list[GatewayProcess] = []  # --gateways N > 1: all of them
        self.balancer: HAProxy | None = None
        self.peer: Dovecot | None = None
        self.profiles: dict[str, Any] = {}
        self.scale_users: list[str] = []

    @property
    def dovecot(self) -> Dovecot:
        assert self.store.dovecot is not None
        return self.store.dovecot

    @property
    def tls(self) -> ssl.SSLContext | None:
        return client_tls() if self.args.tls != "none" else None

    def pop3_port(self, server: Dovecot | GatewayProcess) -> int:
        return server.pop3s_port if self.args.tls != "none" else server.pop3_port

    def start(self) -> None:
        dc = self.dovecot
        assert dc.pid is not None
        tls = self.tls
        if self.args.scale and "many" in self.args.scale_users:
            self.scale_users = add_scale_users(dc, max(self.args.scale))
        if "direct" in self.args.systems:
            self.targets["direct"] = dovecot_target(
                "direct", dc.host, self.pop3_port(dc), dc.pid, tls
            )
        if "imapc" in self.args.systems:
            self.peer = start_peer(
                self.args.work_dir, dc, self.store.sizes.key, self.args.tls == "both"
            )
            assert self.peer.pid is not None
            self.targets["imapc"] = dovecot_target(
                "imapc", self.peer.host, self.pop3_port(self.peer), self.peer.pid, tls
            )
        if "popgate" in self.args.systems:
            self.replicas = [
                start_gateway(
                    dc,
                    self.args.work_dir / f"popgate{'' if i == 0 else i}",
                    self.args.tls,
                    not self.args.no_snapshot_cache,
                )
                for i in range(max(1, self.args.gateways))
            ]
            self.gateway = self.replicas[0]
            assert self.gateway.pid is not None
            host, port = self.gateway.host, self.pop3_port(self.gateway)
            if len(self.replicas) > 1:
                # One process per core behind a TCP balancer, as docs/operations.md describes.
                route = Route("pop3", [(g.host, self.pop3_port(g)) for g in self.replicas], None)
                self.balancer = HAProxy(
                    self.args.work_dir / "haproxy", [route], maxconn=9000, balance="leastconn"
                )
                self.balancer.directory.mkdir(parents=True, exist_ok=True)
                self.balancer.start()
                host, port = "127.0.0.1", self.balancer.port("pop3")
            self.targets["popgate"] = gateway_target("popgate", host, port, self.gateway.pid, tls)

    def stop(self, out: Path) -> None:
        if self.balancer is not None:
            self.balancer.stop()
        for i, gw in enumerate(self.replicas):
            gw.stop()
            (out / f"popgate{'' if i == 0 else i}.log").write_text(gw.log_text())
        if self.peer is not None:
            self.peer.stop()

    # ----------------------------------------------------------------- one measurement
    async def measure(self, workload: str, system: str) -> Result:
        if workload == "big" and system == "popgate":
            # A fresh gateway, so its peak RSS (VmHWM) is this download's and nothing older.
            with fresh_gateway(
                self.dovecot,
                self.args.work_dir / "popgate-big",
                self.args.tls,
                not self.args.no_snapshot_cache,
            ) as gw:
                assert gw.pid is not None
                t = gateway_target("popgate", gw.host, self.pop3_port(gw), gw.pid, self.tls)
                return await self._with_cpu(workload, t, gw.pid)
        gw_pid = self.gateway.pid if self.gateway is not None else None
        return await self._with_cpu(workload, self.targets[system], gw_pid)

    async def _with_cpu(self, workload: str, t: Target, gateway_pid: int | None) -> Result:
        """The workload, plus the CPU seconds each process tree used meanwhile: the servers'
        cost, which the shared cores make less noisy than wall time."""
        trees = {"store": self.dovecot.pid}
        if t.name == "imapc" and self.peer is not None:
            trees["peer"] = self.peer.pid
        if t.name == "popgate":
            trees["gateway"] = gateway_pid
            for i, gw in enumerate(self.replicas[1:], 1):  # --gateways N
                trees[f"gateway{i}"] = gw.pid
            if self.balancer is not None:
                trees["balancer"] = self.balancer.pid
        before = {k: tree_cpu(pid) for k, pid in trees.items() if pid}
        client_before = time.process_time()
        result = await self._run(workload, t)
        result["cpu_client_s"] = time.process_time() - client_before
        for name in ("store", "peer"):
            pid = trees.get(name)
            if pid:
                settle(pid)
        quiesce([pid for pid in trees.values() if pid])
        server = 0.0
        for k, pid in trees.items():
            if pid:
                used = tree_cpu(pid) - before[k]
                result[f"cpu_{k}_s"] = used
                server += used
        result["cpu_server_s"] = server
        return result

    async def _run(self, workload: str, t: Target) -> Result:
        a, exp, chk = self.args, self.exp, self.checker
        if workload == "full":
            return await full_download(t, exp, chk)
        if workload == "pipelined":
            return await pipelined_download(t, exp, chk)
        if workload == "poll":
            return await poll(t, exp, chk, a.poll_repeats)
        if workload == "devices":
            return await devices(t, exp, chk, a.devices)
        if workload == "big":
            return await big_message(t, exp, chk)
        if workload.startswith("scale-"):
            _, count, mode = workload.split("-")
            users = self.scale_users[: int(count)] if mode == "many" else None
            pids = [g.pid for g in self.replicas if g.pid] if t.name == "popgate" else []
            return await scale(t, exp, chk, int(count), users, pids)
        raise ValueError(workload)

    async def rounds(self) -> dict[str, dict[str, list[Result]]]:
        a = self.args
        systems = [s for s in SYSTEMS if s in a.systems]
        results: dict[str, dict[str, list[Result]]] = {
            w: {s: [] for s in systems} for w in a.workloads
        }
        passes = [("warm-up", False)] if not a.no_warmup else []
        passes += [(f"round {r + 1}/{a.rounds}", True) for r in range(a.rounds)]
        for index, (label, recorded) in enumerate(passes):
            for workload in a.workloads:
                order = systems[index % len(systems) :] + systems[: index % len(systems)]
                for system in order:
                    try:
                        result = await self.measure(workload, system)
                    except Exception as e:
                        self.failures.append(f"{label} {workload} {system}: {e!r}")
                        _say(f"{label} {workload:9} {system:8} FAILED: {e!r}")
                        traceback.print_exc()
                        continue
                    _say(f"{label} {workload:9} {system:8} {_brief(result)}")
                    if recorded:
                        results[workload][system].append(result)
        return results

    async def profile_all(self, out: Path) -> None:
        """Each workload once more on popgate, with py-spy on the gateway process."""
        for workload in self.args.workloads:
            path = out / f"profile-{workload}.txt"
            if workload == "big":
                with fresh_gateway(
                    self.dovecot,
                    self.args.work_dir / "popgate-big",
                    self.args.tls,
                    not self.args.no_snapshot_cache,
                ) as gw:
                    assert gw.pid is not None
                    t = gateway_target("popgate", gw.host, self.pop3_port(gw), gw.pid, self.tls)
                    result, summary = await profile.record(gw.pid, self._run(workload, t), path)
            else:
                assert self.gateway is not None and self.gateway.pid is not None
                work = self._run(workload, self.targets["popgate"])
                result, summary = await profile.record(self.gateway.pid, work, path)
            summary["result"] = result
            self.profiles[workload] = summary
            _say(profile.format_summary(workload, summary))


def _brief(result: Result) -> str:
    keys = ("seconds", "p50", "p99", "errors", "retr_seconds", "peak_rss_mb", "rss_growth_mb")
    parts = []
    for k in keys:
        v = result.get(k)
        if isinstance(v, float):
            parts.append(f"{k}={v:.3f}" if "mb" not in k else f"{k}={v:.1f}")
    return " ".join(parts)


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
    }


def _version(argv: list[str]) -> str:
    with contextlib.suppress(Exception):
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()
    return ""


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    if "--submission" in raw:  # its own systems and checks: tests/bench/submission.py
        from tests.bench import submission

        return submission.main(raw)
    args = parse_args(argv)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out: Path = args.out or args.work_dir / "results" / stamp
    out.mkdir(parents=True, exist_ok=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    sizes = dataclasses.replace(QUICK if args.quick else Sizes(), seed=args.seed)
    _say(f"store: {sizes} (key {sizes.key}); results in {out}")
    store = Store(args.work_dir, sizes, log=_say)
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    bench: Bench | None = None
    try:
        store.open()
        exp = Expected(store)
        bench = Bench(args, store, exp)
        bench.start()
        _say("systems: " + ", ".join(f"{s} {t.host}:{t.port}" for s, t in bench.targets.items()))
        results = asyncio.run(bench.rounds())
        if args.profile and "popgate" in args.systems:
            asyncio.run(bench.profile_all(out))
    finally:
        if bench is not None:
            bench.stop(out)
        store.stop()
    summary = report.summarize(results)
    chk = bench.checker
    full_box = store.mailboxes["full"]
    data: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine() | {"loadavg_before": load_before},
        "versions": {
            "popgate": gateway.__version__,
            "commit": _version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
            # uncommitted changes to gateway/ measured along with the commit
            "gateway_changes": _version(
                ["git", "-C", str(ROOT), "status", "--porcelain", "--", "gateway"]
            ).splitlines(),
            "dovecot": _version(["dovecot", "--version"]),
        },
        "settings": {
            "rounds": args.rounds,
            "warmup": not args.no_warmup,
            "snapshot_cache": not args.no_snapshot_cache,
            "devices": args.devices,
            "poll_repeats": args.poll_repeats,
            "systems": {s: SYSTEM_LABELS[s] for s in args.systems},
            "workloads": {w: WORKLOAD_TITLES.get(w, w) for w in args.workloads},
            "quick": args.quick,
            "tls": args.tls,
        },
        "corpus": {
            "seed": sizes.seed,
            "full_messages": len(full_box.messages),
            "full_octets": exp.octets["full"],
            "poll_messages": len(store.mailboxes["poll"].messages),
            "poll_octets": exp.octets["poll"],
            "big_octets": exp.octets["big"],
        },
        "checks": {
            "retr_checked": chk.retr_checked,
            "retr_octets": chk.retr_bytes,
            "uidl_checked": chk.uidl_checked,
            "mismatches": chk.mismatches[:50],
            "mismatch_count": len(chk.mismatches),
            "uidl_identical_to_dovecot": chk.uidl_exact,
            "bytes_ok": not chk.mismatches and (chk.retr_checked > 0 or bool(args.scale)),
        },
        "failures": bench.failures,
        "results": results,
        **summary,
        "profiles": bench.profiles,
    }
    data["machine"]["loadavg_after"] = os.getloadavg()
    report.write_json(out / "report.json", data)
    text = report.table(summary) if not args.scale else report.scale_table(results)
    (out / "table.md").write_text(text)
    over = {"none": "", "both": ", POP3S + IMAPS upstream", "client": ", POP3S, plain upstream"}
    title = (
        f"popgate vs Dovecot 2.3{over[args.tls]}, medians of {args.rounds} round(s), "
        f"{started:%Y-%m-%d}, {os.cpu_count()} shared cores"
    )
    drew = not args.scale and report.chart(out / "ratios.png", summary, title)
    if bench.profiles:
        (out / "profiles.md").write_text(
            "".join(profile.format_summary(w, s) + "\n" for w, s in bench.profiles.items())
        )
    print()
    print(text)
    print(
        f"checked {chk.retr_checked} RETRs ({chk.retr_bytes / 1e6:.1f} MB) and "
        f"{chk.uidl_checked} UIDL listings; mismatches: {len(chk.mismatches)}"
    )
    for m in chk.mismatches[:10]:
        print("  MISMATCH", m)
    for f in bench.failures:
        print("  FAILED", f)
    print(f"report: {out / 'report.json'}" + (f", chart: {out / 'ratios.png'}" if drew else ""))
    checked = chk.uidl_checked if args.scale else chk.retr_checked  # scale: polls (UIDL)
    return 1 if chk.mismatches or bench.failures or checked == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
