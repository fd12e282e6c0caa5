"""The mail store and the three POP3 systems measured against it.

* the **store**: a private Dovecot with IMAP and its own POP3 on one maildir store, seeded on
  disk (much faster than APPEND: 1 GB in seconds) and kept between runs under
  ``run/bench/store-KEY`` (KEY = generator version, seed and sizes), together with its indexes;
* **direct**: that Dovecot's own POP3 — the no-hop limit;
* **popgate**: ``python -m gateway serve`` in front of the store's IMAP (plain, loopback);
* **imapc**: a second private Dovecot serving POP3 over ``imapc`` pointing at the store's IMAP
  (Dovecot's own POP-over-IMAP proxy, the nearest existing peer), its index cache kept under
  ``run/bench/peer-KEY``.

All three see the same mailboxes. Both Dovecots get ``pop3_no_flag_updates = yes`` so RETR does
not set ``\\Seen``, as popgate's default ``on_retrieve = "keep"`` does not, and process limits
that let 200 sessions in at once (Dovecot's default process limit is 100).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.bench.corpus import GENERATOR_VERSION, Corpus, Message
from tests.support.dovecot import MAIL_ID, STATE_FILE, Dovecot, DovecotError
from tests.support.gateway import GatewayProcess

SYSTEMS = ("direct", "popgate", "imapc")
SYSTEM_LABELS = {
    "direct": "Dovecot POP3 (direct)",
    "popgate": "popgate → Dovecot IMAP",
    "imapc": "Dovecot POP3 over imapc",
}
PASSWORD = "bench-secret"
USERS = {"full": "bench-full", "poll": "bench-poll", "big": "bench-big"}

# Both Dovecots: no flag changes by POP (like popgate's on_retrieve = "keep"), and room for the
# many-devices workload (default_process_limit is 100 in Dovecot 2.3).
DOVECOT_EXTRA = """
# --- benchmark settings (tests/bench/systems.py)
pop3_no_flag_updates = yes
default_process_limit = 2500
default_client_limit = 5000
# --scale: up to 2,000 sessions of one user from 127.0.0.1, POP3S (direct) and IMAPS (popgate's
# upstream) alike. Dovecot's own defaults would refuse or queue them: 10 connections per user
# and IP (the test instance says 1,000), and `service imap|pop3 { process_limit = 1024 }`, which
# default_process_limit does not raise.
protocol imap {
  mail_max_userip_connections = 10000
}
protocol pop3 {
  mail_max_userip_connections = 10000
}
service imap {
  process_limit = 5000
}
service pop3 {
  process_limit = 5000
}
# Login processes in Dovecot's high-performance mode (its documented setting for many
# connections): each serves many clients and their TLS, instead of a fork per connection.
service imap-login {
  service_count = 0
  process_min_avail = 2
  process_limit = 4
  client_limit = 5000
}
service pop3-login {
  service_count = 0
  process_min_avail = 2
  process_limit = 4
  client_limit = 5000
}
"""

_UID_RE = re.compile(rb"\bUID (\d+)")
_SIZE_RE = re.compile(rb"\bRFC822\.SIZE (\d+)")
_BENCH_ID_RE = re.compile(rb"X-Bench-Id: (\S+)", re.I)


@dataclass(frozen=True)
class Sizes:
    """How big the mailboxes are; ``quick`` ones keep the CI smoke run to seconds."""

    seed: int = 1
    full: int = 1000
    poll: int = 10_000
    big: int = 50 * 1024 * 1024

    @property
    def key(self) -> str:
        text = f"v{GENERATOR_VERSION}-seed{self.seed}-{self.full}-{self.poll}-{self.big}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class StoredMessage:
    uid: int
    bench_id: str
    size: int
    sha256: str


@dataclass
class Mailbox:
    user: str
    uidvalidity: int
    messages: list[StoredMessage]  # in UID order = POP message-number order

    def uidl(self, number: int) -> str:
        """Dovecot's ``pop3_uidl_format = %08Xu%08Xv`` for message ``number`` (1-based)."""
        return f"{self.messages[number - 1].uid:08x}{self.uidvalidity:08x}"


# --------------------------------------------------------------------- seeding on disk
def _maildir_name(index: int, size: int) -> str:
    # S= and W= (physical and virtual size; equal, as every line ends CRLF) spare Dovecot
    # from reading the file for RFC822.SIZE.
    return f"{1767225600 + index}.M{index}P0Q0.bench,S={size},W={size}:2,"


def _write_maildir(home: Path, messages: list[Message]) -> None:
    maildir = home / "Maildir"
    for sub in ("", "cur", "new", "tmp"):
        (maildir / sub).mkdir(exist_ok=True)
        os.chmod(maildir / sub, 0o700)
        _chown(maildir / sub)
    cur = maildir / "cur"
    for m in messages:
        path = cur / _maildir_name(m.index, m.size)
        path.write_bytes(m.data)
        _chown(path)
        stamp = 1767225600 + m.index  # INTERNALDATE = mtime
        os.utime(path, (stamp, stamp))


def _chown(path: Path) -> None:
    if os.geteuid() == 0:
        os.chown(path, MAIL_ID, MAIL_ID)


def _index_mailbox(dc: Dovecot, user: str) -> Mailbox:
    """Ask the store (IMAP) for UID, size and X-Bench-Id of every message: this also makes
    Dovecot index the maildir."""
    with dc.imap(user, PASSWORD, security="none") as conn:
        typ, data = conn.select("INBOX", readonly=True)
        if typ != "OK":
            raise DovecotError(f"EXAMINE failed for {user}: {data!r}")
        _, codes = conn.response("UIDVALIDITY")
        uidvalidity = int(codes[0]) if codes and codes[0] else 0
        items = "(UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (X-Bench-Id)])"
        typ, data = conn.uid("FETCH", "1:*", items)
        if typ != "OK":
            raise DovecotError(f"FETCH failed for {user}: {data!r}")
    messages: list[StoredMessage] = []
    for item in data:
        if not isinstance(item, tuple):
            continue
        uid_m, size_m = _UID_RE.search(item[0]), _SIZE_RE.search(item[0])
        bench_id = _BENCH_ID_RE.search(item[1])
        if uid_m is None or size_m is None or bench_id is None:
            raise DovecotError(f"unexpected FETCH response {item!r}")
        uid, size = int(uid_m.group(1)), int(size_m.group(1))
        messages.append(StoredMessage(uid, bench_id.group(1).decode(), size, ""))
    messages.sort(key=lambda m: m.uid)
    return Mailbox(user, uidvalidity, messages)


def _verify_bodies(dc: Dovecot, mailbox: Mailbox, expected: dict[str, Message]) -> None:
    """The store returns exactly the generated bytes (one-time check when seeding)."""
    with dc.imap(mailbox.user, PASSWORD, security="none") as conn:
        conn.select("INBOX", readonly=True)
        for stored in mailbox.messages:
            typ, data = conn.uid("FETCH", str(stored.uid), "(BODY.PEEK[])")
            body = next((d[1] for d in data if isinstance(d, tuple)), None)
            if typ != "OK" or body != expected[stored.bench_id].data:
                raise DovecotError(f"{mailbox.user} UID {stored.uid}: stored bytes differ")


class Store:
    """The seeded store Dovecot; :meth:`open` seeds on first use and reuses it later."""

    def __init__(self, work_dir: Path, sizes: Sizes, log: object = print) -> None:
        self.sizes = sizes
        self.dir = work_dir / f"store-{sizes.key}"
        self.state_file = self.dir / "bench-store.json"
        self.log = log
        self.corpus = Corpus(sizes.seed)
        self.dovecot: Dovecot | None = None
        self.mailboxes: dict[str, Mailbox] = {}
        #: bench id → message, for every mailbox whose bodies are downloaded (full, big)
        self.messages: dict[str, Message] = {}

    def _say(self, text: str) -> None:
        self.log(text)  # type: ignore[operator]

    def _generate(self, name: str) -> list[Message]:
        if name == "big":
            return [self.corpus.big("big", self.sizes.big)]
        return self.corpus.mailbox(name, getattr(self.sizes, name))

    def open(self) -> Dovecot:
        _stop_leftover(self.dir)
        seeded = self.state_file.exists()
        if not seeded and self.dir.exists():
            shutil.rmtree(self.dir)  # a half-seeded store from an interrupted run
        dc = Dovecot(self.dir, extra_config=DOVECOT_EXTRA)
        self.dovecot = dc
        for sub in ("home", "users"):  # add_user before start needs them
            (self.dir / sub).mkdir(exist_ok=True)
            os.chmod(self.dir / sub, 0o755)
        if seeded:
            self._load()
            for name in USERS.values():
                dc.add_user(name, PASSWORD)
            dc.start()
            return dc
        started = time.monotonic()
        for name, user in USERS.items():
            dc.add_user(user, PASSWORD)
            messages = self._generate(name)
            _write_maildir(dc.base_dir / "home" / user, messages)
            total = sum(m.size for m in messages)
            self._say(f"seeded {user}: {len(messages)} messages, {total / 1e6:.1f} MB")
            if name != "poll":
                self.messages.update((m.bench_id, m) for m in messages)
        dc.start()
        for name, user in USERS.items():
            box = _index_mailbox(dc, user)
            want = getattr(self.sizes, name) if name != "big" else 1
            if len(box.messages) != want:
                raise DovecotError(f"{user}: {len(box.messages)} messages indexed, want {want}")
            if name != "poll":
                _verify_bodies(dc, box, self.messages)
                box.messages = [
                    StoredMessage(m.uid, m.bench_id, m.size, self.messages[m.bench_id].sha256)
                    for m in box.messages
                ]
            self.mailboxes[name] = box
        self._save()
        self._say(f"store seeded and verified in {time.monotonic() - started:.1f}s: {self.dir}")
        return dc

    def _save(self) -> None:
        state = {
            "sizes": self.sizes.__dict__,
            "mailboxes": {
                name: {
                    "user": box.user,
                    "uidvalidity": box.uidvalidity,
                    "messages": [[m.uid, m.bench_id, m.size, m.sha256] for m in box.messages],
                }
                for name, box in self.mailboxes.items()
            },
        }
        self.state_file.write_text(json.dumps(state))

    def _load(self) -> None:
        state = json.loads(self.state_file.read_text())
        for name, box in state["mailboxes"].items():
            self.mailboxes[name] = Mailbox(
                box["user"], box["uidvalidity"], [StoredMessage(*m) for m in box["messages"]]
            )
        for name in ("full", "big"):
            for m in self._generate(name):
                self.messages[m.bench_id] = m
        for name in ("full", "big"):
            for stored in self.mailboxes[name].messages:
                if self.messages[stored.bench_id].sha256 != stored.sha256:
                    raise DovecotError(
                        f"the generator no longer makes {stored.bench_id} as stored: bump "
                        "GENERATOR_VERSION in tests/bench/corpus.py"
                    )

    def stop(self) -> None:
        if self.dovecot is not None:
            self.dovecot.stop()


def _stop_leftover(base: Path) -> None:
    """A Dovecot left running by an interrupted run (its pid is checked to be that one)."""
    if (base / STATE_FILE).exists():
        with contextlib.suppress(Exception):
            Dovecot.attach(base)._kill_leftovers()


SCALE_USER = "bench-scale{:04d}"


def add_scale_users(store: Dovecot, count: int) -> list[str]:
    """``count`` users whose Maildir is bench-full's (a symlink): many users polling a
    1,000-message mailbox without seeding it again for each of them."""
    shared = store.base_dir / "home" / USERS["full"] / "Maildir"
    names = []
    for i in range(count):
        name = SCALE_USER.format(i)
        store.add_user(name, PASSWORD)
        link = store.base_dir / "home" / name / "Maildir"
        if not link.is_symlink():
            link.symlink_to(shared)
        names.append(name)
    return names


# --------------------------------------------------------------------- the other systems
def start_peer(work_dir: Path, store: Dovecot, key: str, tls_upstream: bool = False) -> Dovecot:
    """Dovecot POP3 over imapc in front of ``store``; its index cache persists per store.

    ``tls_upstream``: its imapc storage talks IMAPS to the store, verified against the store's
    CA, as popgate's upstream does in the TLS benchmark. (Its passdb's login check stays on the
    plain port: one short exchange per login, not the data path.)
    """
    base = work_dir / f"peer-{key}"
    _stop_leftover(base)
    extra = DOVECOT_EXTRA
    if tls_upstream:
        extra += (
            f"imapc_port = {store.imaps_port}\nimapc_ssl = imaps\n"
            f"ssl_client_ca_file = {store.ca_file}\n"
        )
    peer = Dovecot(base, imapc=(store.host, store.imap_port), extra_config=extra)
    peer.start()
    return peer


def gateway_config(
    store: Dovecot, workdir: Path, tls: str = "none", snapshot_cache: bool = True
) -> dict[str, dict[str, object]]:
    """``tls``: "none" (plain POP3, plain IMAP upstream), "client" (POP3S towards the client,
    plain upstream, as on a private network), "both" (POP3S and IMAPS upstream, verified).
    ``snapshot_cache`` False: every login fetches the index, as against a server without
    CONDSTORE or after new mail."""
    pop3: dict[str, object] = {
        "listen": ["127.0.0.1:0"],
        "listen_tls": ["127.0.0.1:0"] if tls != "none" else [],
    }
    if not snapshot_cache:
        pop3["snapshot_cache_messages"] = 0
    upstream: dict[str, object] = {"host": store.host, "port": store.imap_port, "security": "none"}
    if tls == "both":
        upstream |= {"port": store.imaps_port, "security": "tls", "ca_file": str(store.ca_file)}
    return {
        "upstream.imap": upstream,
        "pop3": pop3,
        "tls": {
            "cert_file": str(workdir / "popgate.crt"),
            "key_file": str(workdir / "popgate.key"),
        },
        "log": {"level": "info"},
        # every benchmark client comes from 127.0.0.1, up to 2,000 at once (--scale)
        "security": {"max_connections": 5000, "max_connections_per_ip": 5000},
    }


def start_gateway(
    store: Dovecot, workdir: Path, tls: str = "none", snapshot_cache: bool = True
) -> GatewayProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    config = gateway_config(store, workdir, tls, snapshot_cache)
    gw = GatewayProcess(config, workdir / "popgate.toml")
    return gw.start()


@contextlib.contextmanager
def fresh_gateway(
    store: Dovecot, workdir: Path, tls: str = "none", snapshot_cache: bool = True
) -> Iterator[GatewayProcess]:
    gw = start_gateway(store, workdir, tls, snapshot_cache)
    try:
        yield gw
    finally:
        gw.stop()


# --------------------------------------------------------------------- processes
def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM (bytes) of a process, {} when it is gone."""
    out = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def children_named(parent: int, name: str) -> list[int]:
    """Pids of ``parent``'s children whose command name is ``name`` (Dovecot's pop3, imap)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1 : stat.rfind(")")]
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        if ppid == parent and comm == name:
            found.append(int(entry.name))
    return found


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_fields(pid: int) -> tuple[float, int] | None:
    """(utime+stime+cutime+cstime in seconds, ppid), None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    # fields from state on: ppid is [1], utime..cstime are [11:15]
    return sum(int(f) for f in fields[11:15]) / _TICK, int(fields[1])


def tree_cpu(pid: int) -> float:
    """CPU seconds used by ``pid``, its reaped children and its live children.

    For a Dovecot master that is the whole instance: session processes (pop3, imap, logins)
    are its children, and once they exit their time shows up in its cutime/cstime."""
    own = _cpu_fields(pid)
    if own is None:
        return 0.0
    total = own[0]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            child = _cpu_fields(int(entry.name))
            if child is not None and child[1] == pid:
                total += child[0]
    return total


# The processes that end with their session. Not the login processes: in the high-performance
# mode of DOVECOT_EXTRA (service_count = 0, process_min_avail = 2) they live as long as the
# master, so waiting for them always ran out the whole timeout (3 s per measurement, 6 s for
# imapc); tree_cpu counts their time while they live.
_SESSION_PROCESSES = ("pop3", "imap")


def quiesce(pids: list[int], quiet: float = 0.3, timeout: float = 3.0) -> None:
    """Wait until these process trees have used no CPU for ``quiet`` seconds (at most
    ``timeout``): what a workload leaves behind (Dovecot updating its indexes after LOGOUT, the
    gateway's last writes) counts to it and does not run into the next measurement."""
    deadline = time.monotonic() + timeout
    last, since = sum(tree_cpu(p) for p in pids), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = sum(tree_cpu(p) for p in pids)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def settle(master_pid: int, timeout: float = 3.0) -> None:
    """Wait until a Dovecot's session processes of the last workload have exited and been
    reaped: only then is their CPU time in the master's cutime/cstime."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(children_named(master_pid, name) for name in _SESSION_PROCESSES):
            return
        time.sleep(0.01)
