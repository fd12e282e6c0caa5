"""A private Cyrus IMAP 3.6 for tests: the second upstream server next to Dovecot.

Each instance lives in its own base directory: its own ``imapd.conf`` and ``cyrus.conf``,
configuration directory (mailbox list, seen state, ...), mail partition, sasldb (users and the
master identity), TLS certificates (a private CA and a server certificate for
localhost/127.0.0.1), pid file and log file. It listens on loopback ports picked by the OS: IMAP
(plain + STARTTLS) and IMAPS (implicit TLS).

Cyrus logs only to syslog (``/dev/log``), so the instance runs ``master`` under
``unshare --mount`` with a private ``/dev`` whose ``log`` is a datagram socket bound by a small
sink process of ours that writes the lines to ``cyrus.log``. Root is needed for that (as for
the Debian packages); the services themselves run as the ``cyrus`` user. Where no mount
namespace can be made (a container without CAP_SYS_ADMIN) and nothing owns ``/dev/log``, the
instances share one: ``/dev/log`` becomes a symlink to a live instance's socket, every sink
appends to one file under ``/run/popgate-test-cyrus``, and each instance reads back the lines
of its own ``syslog_prefix``; the last one to stop removes the symlink.

The binaries: ``master`` and the libraries come from the ``cyrus-common`` package, ``imapd``
from ``cyrus-imapd``, which conflicts with ``dovecot-imapd`` and is therefore only unpacked
(``tests/bootstrap.sh`` puts it under ``/opt/popgate-test/cyrus``).

Use from Python::

    with Cyrus() as cy:
        cy.add_user("alice", "secret")
        uid = cy.append("alice", "secret", b"Subject: hi\\r\\n\\r\\nbody\\r\\n")

or from a shell::

    python -m tests.support.cyrus start --dir run/cyrus --user demo:demo
    python -m tests.support.cyrus log --dir run/cyrus
    python -m tests.support.cyrus stop --dir run/cyrus

Differences from Dovecot that the tests meet (all verified against 3.6.1): APPEND refuses bare
LF and NUL; a failed LOGIN has no ``[AUTHENTICATIONFAILED]``; at most 100 keywords per mailbox;
SPECIAL-USE attributes are listed in lower case; EMAILIDs are derived from the content, so
byte-identical messages share one; the master identity is a proxy server (SASL PLAIN with the
user as authzid), there is no ``user*master`` LOGIN; there is no POP3 here.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.support import reaper
from tests.support.dovecot import (
    _alive,
    _children,
    _identity,
    free_port,
    make_test_pki,
)
from tests.support.imap_access import ImapAccess

__all__ = ["Cyrus", "CyrusError", "find_cyrus"]

HOST = "127.0.0.1"
STATE_FILE = "instance.json"
CYRUS_USER = "cyrus"
#: where tests/bootstrap.sh unpacks the cyrus-imapd package (it conflicts with dovecot-imapd)
UNPACKED = Path("/opt/popgate-test/cyrus")
SPECIAL_USE = ("Drafts", "Sent", "Trash", "Junk", "Archive")
DEV_LOG = Path("/dev/log")
#: where instances that share /dev/log register their sockets and write their lines
SHARED_LOG_DIR = Path("/run/popgate-test-cyrus")
_private_dev: bool | None = None


def private_dev_possible() -> bool:
    """Whether this process may make a mount namespace (root with CAP_SYS_ADMIN)."""
    global _private_dev
    if os.environ.get("POPGATE_TEST_CYRUS_SHARED_DEV_LOG") == "1":  # to test the fallback
        return False
    if _private_dev is None:
        try:
            done = subprocess.run(
                ["unshare", "--mount", "true"], capture_output=True, timeout=30, check=False
            )
            _private_dev = done.returncode == 0
        except OSError:
            _private_dev = False
    return _private_dev


def _socket_alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CyrusError(RuntimeError):
    """Cyrus could not be started, stopped or talked to."""


def find_cyrus() -> tuple[Path, Path, Path]:
    """(master, imapd, saslpasswd2), or CyrusError naming what is missing."""
    master = Path("/usr/lib/cyrus/bin/master")
    imapd = next(
        (
            p
            for p in (Path("/usr/lib/cyrus/bin/imapd"), UNPACKED / "usr/lib/cyrus/bin/imapd")
            if p.exists()
        ),
        None,
    )
    saslpasswd2 = shutil.which("saslpasswd2", path="/usr/sbin:/usr/bin")
    missing = [
        what
        for what, found in (
            ("master (cyrus-common)", master.exists()),
            (f"imapd (cyrus-imapd, unpacked under {UNPACKED})", imapd is not None),
            ("saslpasswd2 (sasl2-bin)", saslpasswd2 is not None),
        )
        if not found
    ]
    if missing:
        raise CyrusError(f"Cyrus not installed: {', '.join(missing)}; run ./tests/bootstrap.sh")
    assert imapd is not None and saslpasswd2 is not None
    return master, imapd, Path(saslpasswd2)


def cyrus_available() -> str | None:
    """None when a private Cyrus can run here, else why not."""
    if os.geteuid() != 0:
        return "a private Cyrus needs root (a mount namespace for its /dev/log, the cyrus user)"
    try:
        find_cyrus()
        pwd.getpwnam(CYRUS_USER)
    except (CyrusError, KeyError) as e:
        return str(e)
    return None


class Cyrus(ImapAccess):
    """One private Cyrus IMAP instance. See the module docstring."""

    #: the value the gateway tests compare with: Cyrus has no ``user*master`` form
    kind = "cyrus"

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        host: str = HOST,
        master_user: str = "popgate-master",
        master_password: str | None = None,
        quota_kib: int = 0,
        metadata: bool = False,
        extra_config: str = "",
    ) -> None:
        """``quota_kib`` > 0 gives every user a storage quota of that many KiB.
        ``metadata=True`` lets users keep private METADATA entries Cyrus does not define itself
        (``annotation_allow_undefined``), as popgate's per-device state needs; off, the server
        refuses them, like the session Dovecot without ``metadata=True``."""
        self._owns_base_dir = base_dir is None
        if base_dir is None:
            base_dir = tempfile.mkdtemp(prefix="popgate-cyrus-")
        self._base = Path(base_dir).absolute()
        # removed by stop(); by the reaper if this pytest run dies first
        self._reaper_dir = reaper.watch_directory(self._base) if self._owns_base_dir else None
        self._reaper_master: int | None = None
        self._reaper_sink: int | None = None
        self._base.mkdir(parents=True, exist_ok=True)
        os.chmod(self._base, 0o755)
        self._host = host
        self._master_user = master_user
        self._master_password = master_password or secrets.token_urlsafe(16)
        self.extra_config = extra_config
        self.quota_kib = quota_kib
        self.metadata = metadata
        self._ports: dict[str, int] = {}
        self._pid: int | None = None
        self._sink_pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._sink: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._users: dict[str, str] = {}
        self._pki = make_test_pki(self._base / "tls")

    # ----------------------------------------------------------------- properties
    @property
    def host(self) -> str:
        return self._host

    @property
    def base_dir(self) -> Path:
        return self._base

    @property
    def imap_port(self) -> int:
        """Plain IMAP, offering STARTTLS."""
        return self._port("imap")

    @property
    def imaps_port(self) -> int:
        """IMAP over implicit TLS."""
        return self._port("imaps")

    @property
    def ca_file(self) -> Path:
        return self._pki["ca_file"]

    @property
    def ca_key_file(self) -> Path:
        return self._pki["ca_key"]

    @property
    def cert_file(self) -> Path:
        return self._pki["cert_file"]

    @property
    def master_user(self) -> str:
        return self._master_user

    @property
    def master_password(self) -> str:
        return self._master_password

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def config_file(self) -> Path:
        return self._base / "imapd.conf"

    @property
    def log_file(self) -> Path:
        return self._base / "cyrus.log"

    @property
    def users(self) -> dict[str, str]:
        return dict(self._users)

    def _port(self, name: str) -> int:
        try:
            return self._ports[name]
        except KeyError:
            raise CyrusError("Cyrus has not been started") from None

    @property
    def syslog_prefix(self) -> str:
        """This instance's syslog tag: its lines are ``<PRI>date PREFIX/imap[pid]: …``."""
        return "popgate-cyrus-" + hashlib.sha256(os.fsencode(self._base)).hexdigest()[:10]

    @property
    def _shared(self) -> bool:
        return not private_dev_possible()

    def log_text(self) -> str:
        """What Cyrus sent to syslog so far (for debugging failed tests)."""
        path = SHARED_LOG_DIR / "syslog.log" if self._shared else self.log_file
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        tag = f" {self.syslog_prefix}/"
        return "".join(line for line in text.splitlines(keepends=True) if tag in line)

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> Cyrus:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        """Write the configuration, start the log sink and master, wait for the greetings.

        master runs in the foreground in a session of its own; it outlives this process only
        if nobody stops it (the CLI's ``start`` relies on that; ``stop`` ends it by pid)."""
        if self._pid is not None and _alive(self._pid):
            raise CyrusError(f"already running (pid {self._pid})")
        reason = cyrus_available()
        if reason:
            raise CyrusError(reason)
        master, imapd, _ = find_cyrus()
        self._prepare_dirs()
        self._start_sink(timeout)
        if self._shared:
            try:
                self._join_shared_dev_log()
            except CyrusError:
                self._stop_sink()
                raise
        last_error = ""
        for _attempt in range(3):  # a picked port can be taken in between: retry with others
            self._ports = {name: free_port(self._host) for name in ("imap", "imaps")}
            self.config_file.write_text(self._imapd_conf())
            (self._base / "cyrus.conf").write_text(self._cyrus_conf(imapd))
            log_mark = len(self.log_text())
            out_path = self._base / "master.out"
            with open(out_path, "wb") as out:
                self._proc = subprocess.Popen(
                    self._master_argv(master),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self._pid = self._proc.pid
            self._reaper_master = reaper.watch_process(self._pid, group=True)
            try:
                self._wait_ready(timeout)
            except CyrusError as e:
                tail = self.log_text()[log_mark:] + out_path.read_text(errors="replace")
                last_error = f"{e}\n{tail}"
                self._stop_master()
                if "in use" in tail:
                    continue
                self._stop_sink()
                raise CyrusError(last_error) from None
            self._save_state()
            return
        self._stop_sink()
        raise CyrusError(f"cyrus could not bind its ports:\n{last_error}")

    def _master_argv(self, master: Path) -> list[str]:
        command = [
            str(master),
            "-C",
            str(self.config_file),
            "-M",
            str(self._base / "cyrus.conf"),
            "-p",
            str(self._base / "master.pid"),
        ]
        if self._shared:
            return command
        # A private /dev (tmpfs) holding the usual character devices and a log socket of ours;
        # everything else of the host stays as it is, and only this process tree sees it.
        script = (
            'set -e; hostdev="$1/hostdev"; mkdir -p "$hostdev"; mount --bind /dev "$hostdev"; '
            "mount -t tmpfs -o mode=755,size=1m popgate-cyrus-dev /dev; "
            "for d in null zero full random urandom tty; do "
            '  if [ -e "$hostdev/$d" ]; then touch "/dev/$d"; '
            '  mount --bind "$hostdev/$d" "/dev/$d"; fi; done; '
            'ln -s /proc/self/fd /dev/fd; ln -s "$1/syslog.sock" /dev/log; '
            'umount -l "$hostdev"; shift; exec "$@"'
        )
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "popgate-cyrus",
            str(self._base),
            *command,
        ]

    def _join_shared_dev_log(self) -> None:
        """Register this instance's socket and make sure /dev/log leads to a live one."""
        if DEV_LOG.exists() and not DEV_LOG.is_symlink():
            raise CyrusError(
                "cannot capture Cyrus's syslog: no mount namespace here (CAP_SYS_ADMIN) and "
                f"{DEV_LOG} belongs to the system logger"
            )
        if DEV_LOG.is_symlink() and not os.readlink(DEV_LOG).startswith("/"):
            raise CyrusError(f"{DEV_LOG} is a symlink of someone else's: not touching it")
        SHARED_LOG_DIR.mkdir(mode=0o755, exist_ok=True)
        entry = SHARED_LOG_DIR / f"{self.syslog_prefix}.sock"
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
        entry.symlink_to(self._base / "syslog.sock")
        self._point_dev_log()

    def _point_dev_log(self, leaving: Path | None = None) -> None:
        """/dev/log → a registered live socket (not ``leaving``); removed when there is none."""
        current = DEV_LOG.resolve() if DEV_LOG.is_symlink() else None
        if current is not None and current != leaving and _socket_alive(current):
            return
        live = [
            e.resolve()
            for e in sorted(SHARED_LOG_DIR.glob("popgate-cyrus-*.sock"))
            if e.resolve() != leaving and _socket_alive(e.resolve())
        ]
        tmp = DEV_LOG.with_name(f".log.popgate-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if live:
            tmp.symlink_to(live[0])
            os.replace(tmp, DEV_LOG)
        elif DEV_LOG.is_symlink():
            DEV_LOG.unlink()

    def _leave_shared_dev_log(self) -> None:
        if not self._shared or not SHARED_LOG_DIR.exists():
            return
        ours = self._base / "syslog.sock"
        with contextlib.suppress(FileNotFoundError):
            (SHARED_LOG_DIR / f"{self.syslog_prefix}.sock").unlink()
        if DEV_LOG.is_symlink():
            self._point_dev_log(leaving=ours)
        if not any(SHARED_LOG_DIR.glob("popgate-cyrus-*.sock")):
            with contextlib.suppress(FileNotFoundError):
                (SHARED_LOG_DIR / "syslog.log").unlink()

    def stop(self, timeout: float = 20.0) -> None:
        """Stop master and its services by pid (SIGTERM, then SIGKILL), then the log sink.
        Removes the base directory if this object created it."""
        self._stop_master(timeout)
        self._stop_sink()
        if self._owns_base_dir:
            shutil.rmtree(self._base, ignore_errors=True)
            reaper.unwatch(self._reaper_dir)
            self._reaper_dir = None

    def _stop_master(self, timeout: float = 20.0) -> None:
        pid, self._pid = self._pid, None
        if pid is not None and _alive(pid) and self._is_ours(pid, b"master"):
            _terminate_tree(pid, timeout)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
            self._proc = None
        reaper.unwatch(self._reaper_master)
        self._reaper_master = None

    def _stop_sink(self) -> None:
        pid, self._sink_pid = self._sink_pid, None
        if pid is not None and _alive(pid) and self._is_ours(pid, b"_syslog"):
            _terminate_tree(pid, 5)
        if self._sink is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._sink.wait(5)
            self._sink = None
        reaper.unwatch(self._reaper_sink)
        self._reaper_sink = None
        self._leave_shared_dev_log()

    def _is_ours(self, pid: int, marker: bytes) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return marker in b" ".join(cmdline) and any(
            os.fsencode(self._base) in arg for arg in cmdline
        )

    def _start_sink(self, timeout: float) -> None:
        sock = self._base / "syslog.sock"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        log = SHARED_LOG_DIR / "syslog.log" if self._shared else self.log_file
        if self._shared:
            SHARED_LOG_DIR.mkdir(mode=0o755, exist_ok=True)
        self._sink = subprocess.Popen(
            [sys.executable, "-m", "tests.support.cyrus", "_syslog", str(sock), str(log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        self._sink_pid = self._sink.pid
        self._reaper_sink = reaper.watch_process(self._sink_pid, group=True)
        deadline = time.monotonic() + timeout
        while not (self._base / "syslog.ready").exists():
            if self._sink.poll() is not None or time.monotonic() > deadline:
                raise CyrusError("the syslog sink for Cyrus did not start")
            time.sleep(0.02)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for name, tls in (("imap", False), ("imaps", True)):
            last: Exception | None = None
            while True:
                if self._pid is None or not _alive(self._pid):
                    raise CyrusError(f"cyrus master exited during start-up ({last})")
                try:
                    line = self._greeting(self._ports[name], tls)
                    if line.startswith(b"* OK"):
                        break
                    last = CyrusError(f"{name}: unexpected greeting {line!r}")
                except (OSError, ssl.SSLError) as e:
                    last = e
                if time.monotonic() > deadline:
                    raise CyrusError(f"{name} port {self._ports[name]} not ready: {last}")
                time.sleep(0.05)

    def _greeting(self, port: int, tls: bool) -> bytes:
        with socket.create_connection((self._host, port), timeout=5) as raw:
            sock: socket.socket = raw
            if tls:
                sock = self.client_ssl_context().wrap_socket(raw, server_hostname=self._host)
            return sock.makefile("rb").readline()

    def client_ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    # ----------------------------------------------------------------- configuration
    def _prepare_dirs(self) -> None:
        cyrus = pwd.getpwnam(CYRUS_USER)
        for parent in self._base.parents:
            if not parent.stat().st_mode & 0o001:
                raise CyrusError(
                    f"{parent} is not searchable by others: the {CYRUS_USER} user cannot reach "
                    f"{self._base} (pytest's tmp_path is such a place: use tempfile.mkdtemp)"
                )
        for sub in ("conf", "conf/proc", "conf/lock", "conf/socket", "spool", "tls"):
            path = self._base / sub
            path.mkdir(exist_ok=True)
            os.chown(path, cyrus.pw_uid, cyrus.pw_gid)
            os.chmod(path, 0o750 if sub != "tls" else 0o755)
        for name in ("server.key", "server.crt"):
            os.chown(self._base / "tls" / name, cyrus.pw_uid, cyrus.pw_gid)
        self.log_file.touch()
        self._set_password(self._master_user, self._master_password)

    def _imapd_conf(self) -> str:
        b = self._base
        folders = "|".join(SPECIAL_USE)
        xlist = "\n".join(f"xlist-{name.lower()}: {name}" for name in SPECIAL_USE)
        return f"""# Generated by tests/support/cyrus.py: a private test instance; do not edit.
configdirectory: {b}/conf
defaultpartition: default
partition-default: {b}/spool
servername: {self.realm}
syslog_prefix: {self.syslog_prefix}
admins: {self._master_user}
# the master identity: SASL PLAIN with the user as authorization identity
proxyservers: {self._master_user}
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: {b}/sasldb2
sasl_mech_list: PLAIN LOGIN
allowplaintext: yes
# Test instance: no 3 s sleep after a failed login (every gateway login comes from one IP).
failedloginpause: 0
# Keep 8-bit header bytes as they are (the default rewrites them to 'X').
munge8bit: no
unixhierarchysep: yes
altnamespace: yes
# A user's INBOX and SPECIAL-USE folders appear at the first login (with this quota in KiB;
# 0 = none).
autocreate_quota: {self.quota_kib}
autocreate_inbox_folders: {folders}
autocreate_subscribe_folders: {folders}
{xlist}
# METADATA entries of popgate's own (per-device state) are not predefined: refused unless on.
annotation_allow_undefined: {1 if self.metadata else 0}
tls_server_cert: {b}/tls/server.crt
tls_server_key: {b}/tls/server.key
tls_versions: tls1_2 tls1_3
proc_path: {b}/conf/proc
mboxname_lockpath: {b}/conf/lock
idlesocket: {b}/conf/socket/idle
notifysocket: {b}/conf/socket/notify
lmtpsocket: {b}/conf/socket/lmtp
statuscache: no
conversations: no
{self.extra_config}
"""

    def _cyrus_conf(self, imapd: Path) -> str:
        h, p, c = self._host, self._ports, self.config_file
        return f"""# Generated by tests/support/cyrus.py: a private test instance; do not edit.
START {{
  recover cmd="/usr/lib/cyrus/bin/ctl_cyrusdb -C {c} -r"
}}
SERVICES {{
  imap cmd="{imapd} -C {c}" listen="{h}:{p["imap"]}" prefork=1 maxchild=200
  imaps cmd="{imapd} -C {c} -s" listen="{h}:{p["imaps"]}" prefork=0 maxchild=100
}}
EVENTS {{
}}
"""

    @property
    def realm(self) -> str:
        return "popgate-cyrus"

    # ----------------------------------------------------------------- users
    def _set_password(self, name: str, password: str) -> None:
        _, _, saslpasswd2 = find_cyrus()
        sasldb = self._base / "sasldb2"
        subprocess.run(
            [str(saslpasswd2), "-f", str(sasldb), "-u", self.realm, "-p", "-c", name],
            input=password.encode(),
            check=True,
            capture_output=True,
            timeout=30,
        )
        cyrus = pwd.getpwnam(CYRUS_USER)
        os.chown(sasldb, cyrus.pw_uid, cyrus.pw_gid)
        os.chmod(sasldb, 0o600)

    def add_user(self, name: str, password: str) -> None:
        """Add a user: a sasldb entry now, the INBOX and SPECIAL-USE folders at its first
        login (done here, so the user looks like Dovecot's: folders already there)."""
        if not _NAME_RE.match(name):
            raise ValueError(f"unsupported user name for the test sasldb: {name!r}")
        if any(c in password for c in "\r\n\0"):
            raise ValueError("password must not contain line breaks or NUL")
        if name in self._users and self._users[name] != password:
            raise ValueError(f"user {name!r} exists (passwords are not changed in place)")
        with self._lock:
            self._set_password(name, password)
            self._users[name] = password
            self._save_state()
        with self.imap_as_master(name):
            pass  # autocreate (imaplib's LOGIN could not send a non-ASCII password)

    def password(self, name: str) -> str:
        return self._users[name]

    # ----------------------------------------------------------------- state for the CLI
    def _save_state(self) -> None:
        state = {
            "base_dir": str(self._base),
            "host": self._host,
            "ports": self._ports,
            "pid": self._pid,
            "sink_pid": self._sink_pid,
            "master_user": self._master_user,
            "master_password": self._master_password,
            "users": self._users,
            "extra_config": self.extra_config,
            "quota_kib": self.quota_kib,
            "metadata": self.metadata,
        }
        path = self._base / STATE_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=2)

    @classmethod
    def attach(cls, base_dir: str | os.PathLike[str]) -> Cyrus:
        """An object for an instance started earlier (e.g. by the CLI) in ``base_dir``."""
        state = json.loads((Path(base_dir) / STATE_FILE).read_text())
        cy = cls(
            state["base_dir"],
            host=state["host"],
            master_user=state["master_user"],
            master_password=state["master_password"],
            extra_config=state.get("extra_config", ""),
            quota_kib=state.get("quota_kib", 0),
            metadata=state.get("metadata", False),
        )
        cy._ports = {k: int(v) for k, v in state["ports"].items()}
        cy._pid = state["pid"]
        cy._sink_pid = state.get("sink_pid")
        cy._users = dict(state["users"])
        return cy

    def shell_vars(self) -> dict[str, str]:
        return {
            "CYRUS_HOST": self._host,
            "CYRUS_IMAP_PORT": str(self.imap_port),
            "CYRUS_IMAPS_PORT": str(self.imaps_port),
            "CYRUS_CA_FILE": str(self.ca_file),
            "CYRUS_BASE_DIR": str(self._base),
            "CYRUS_PID": str(self._pid or ""),
            "CYRUS_MASTER_USER": self._master_user,
            "CYRUS_MASTER_PASSWORD": self._master_password,
            "CYRUS_LOG": str(self.log_file),
        }


def _terminate_tree(pid: int, timeout: float) -> None:
    """SIGTERM ``pid``, wait for it and the children it had, SIGKILL what is left."""
    procs = [i for i in (_identity(p) for p in (pid, *_children(pid))) if i is not None]
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    killed = False
    while any(_alive(ident[0], ident) for ident in procs):
        if time.monotonic() > deadline:
            if killed:
                raise CyrusError(f"cyrus processes {procs} did not exit")
            for ident in procs:
                if _alive(ident[0], ident):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(ident[0], signal.SIGKILL)
            killed, deadline = True, time.monotonic() + 5
        time.sleep(0.02)


# --------------------------------------------------------------------- the syslog sink
def _run_syslog_sink(sock_path: str, log_path: str) -> int:
    """Receive syslog datagrams on ``sock_path`` and append them, one per line, to
    ``log_path`` until SIGTERM. Writes ``syslog.ready`` next to the socket once bound."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    os.chmod(sock_path, 0o666)  # the services run as the cyrus user
    Path(sock_path).with_name("syslog.ready").touch()
    with open(log_path, "ab", buffering=0) as log:
        while True:
            data = sock.recv(65536)
            # "<PRI>Mon dd hh:mm:ss tag[pid]: text" — keep it whole, one line each
            log.write(data.rstrip(b"\0\n").replace(b"\n", b" ") + b"\n")


# --------------------------------------------------------------------- CLI
def _cmd_start(args: argparse.Namespace) -> int:
    base = Path(args.dir)
    if (base / STATE_FILE).exists():
        with contextlib.suppress(Exception):
            old = Cyrus.attach(base)
            old._stop_master()
            old._stop_sink()
    cy = Cyrus(base)
    cy.start()
    try:
        for spec in args.user:
            name, _, password = spec.partition(":")
            cy.add_user(name, password)
    except BaseException:
        cy._stop_master()
        cy._stop_sink()
        raise
    for key, value in cy.shell_vars().items():
        print(f"{key}={shlex.quote(value)}")
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    base = Path(args.dir)
    if not (base / STATE_FILE).exists():
        print(f"no Cyrus instance state in {base}", file=sys.stderr)
        return 1
    cy = Cyrus.attach(base)
    cy._stop_master()
    cy._stop_sink()
    return 0


def _cmd_log(args: argparse.Namespace) -> int:
    sys.stdout.write(Cyrus.attach(args.dir).log_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["_syslog"] and len(argv) == 3:
        return _run_syslog_sink(argv[1], argv[2])
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.cyrus", description="Run a private Cyrus IMAP."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start", help="start (in the background); prints shell variables")
    p.add_argument("--dir", required=True, help="base directory of the instance")
    p.add_argument("--user", action="append", default=[], metavar="NAME:PASSWORD")
    p.set_defaults(func=_cmd_start)
    p = sub.add_parser("stop", help="stop the instance in --dir by pid")
    p.add_argument("--dir", required=True)
    p.set_defaults(func=_cmd_stop)
    p = sub.add_parser("log", help="print the instance's log")
    p.add_argument("--dir", required=True)
    p.set_defaults(func=_cmd_log)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
