"""A private Dovecot for tests and the demo.

Each instance lives in its own base directory: its own ``dovecot.conf``, passwd-files
(one per user, so users can be added while it runs),
maildirs, TLS certificates (a private CA and a server certificate for localhost/127.0.0.1),
runtime directory, state directory and log file. It listens on loopback ports picked by the
OS: IMAP (plain + STARTTLS), IMAPS (implicit TLS), POP3 (plain + STLS) and POP3S.

Mail is stored as uid/gid 65534 (nobody/nogroup) when run as root, since Dovecot refuses
uid 0 for mail access; as another user everything runs as that user.

Use from Python::

    with Dovecot() as dc:
        dc.add_user("alice", "secret")
        uid = dc.append("alice", "secret", b"Subject: hi\\r\\n\\r\\nbody\\r\\n")

or from a shell (the demo does this)::

    python -m tests.support.dovecot start --dir run/demo/dovecot --user demo:demo
    python -m tests.support.dovecot stop --dir run/demo/dovecot
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import grp
import ipaddress
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
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support import reaper
from tests.support.imap_access import (
    ImapAccess,
    ImapCommandError,
)

__all__ = [
    "Dovecot",
    "DovecotError",
    "free_port",
    "issue_server_cert",
    "make_test_pki",
]

HOST = "127.0.0.1"
MAIL_ID = 65534  # nobody / nogroup
STATE_FILE = "instance.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+=-]*$")


class DovecotError(ImapCommandError):
    """Dovecot could not be started, stopped or talked to."""


def free_port(host: str = HOST) -> int:
    """A port that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _find_dovecot() -> str:
    found = shutil.which("dovecot") or shutil.which("dovecot", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise DovecotError("dovecot not found: run ./tests/bootstrap.sh (installs dovecot-imapd)")
    return found


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _new_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "popgate test CA")])
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_server_cert(
    ca_file: str | os.PathLike[str],
    ca_key_file: str | os.PathLike[str],
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    hostnames: Iterable[str] = ("localhost",),
) -> None:
    """Write a server certificate for ``hostnames`` + 127.0.0.1 + ::1 signed by the CA
    (PEM files; the key gets mode 0600)."""
    ca_cert = x509.load_pem_x509_certificate(Path(ca_file).read_bytes())
    ca_key = serialization.load_pem_private_key(Path(ca_key_file).read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    names = list(hostnames)
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(Path(key_file), _key_pem(key))
    Path(cert_file).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(cert_file, 0o644)


def make_test_pki(directory: Path, *, hostnames: Iterable[str] = ("localhost",)) -> dict[str, Path]:
    """Create a private CA and a server certificate for ``hostnames`` + 127.0.0.1/::1.

    Returns paths: ``ca_file``, ``ca_key``, ``cert_file``, ``key_file``. Existing files are
    kept, so a directory can be reused.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "ca_file": directory / "ca.crt",
        "ca_key": directory / "ca.key",
        "cert_file": directory / "server.crt",
        "key_file": directory / "server.key",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    ca_cert, ca_key = _new_ca()
    _write_private(paths["ca_key"], _key_pem(ca_key))
    paths["ca_file"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(paths["ca_file"], 0o644)
    issue_server_cert(
        paths["ca_file"], paths["ca_key"], paths["cert_file"], paths["key_file"], hostnames
    )
    return paths


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on, or None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # "pid (comm) S ppid ..." — comm may hold spaces and parentheses.
    return stat.rsplit(")", 1)[1].split()


def _identity(pid: int) -> tuple[int, str] | None:
    """(pid, start time): tells a process apart from a later one that reuses its pid."""
    fields = _stat_fields(pid)
    return None if fields is None else (pid, fields[19])


def _alive(pid: int, identity: tuple[int, str] | None = None) -> bool:
    """Running (zombies count as gone) and, with ``identity``, still the same process."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return identity is None or identity == (pid, fields[19])


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


class Dovecot(ImapAccess):
    """One private Dovecot instance. See the module docstring."""

    #: which server this is, for tests that meet a difference (tests/support/upstreams.py)
    kind = "dovecot"

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        quota: bool = False,
        quota_storage: str = "10M",
        host: str = HOST,
        master_user: str = "popgate-master",
        master_password: str | None = None,
        lmtp: bool = False,
        imapc: tuple[str, int] | None = None,
        metadata: bool = False,
        extra_config: str = "",
        oauth2_introspection_url: str | None = None,
        auth_port: bool = False,
    ) -> None:
        """``imapc=(host, port)`` makes this instance a proxy over another IMAP server
        (Dovecot's imapc storage): users log in with their password on that server (passdb
        imap), mail and flags stay there, only an index cache lives here (``~/imapc``).
        ``metadata=True`` turns on IMAP METADATA (RFC 5464), entries kept in
        ``~/Maildir/dovecot-attributes``; :meth:`set_metadata` switches it while running.
        ``extra_config`` is appended to the generated ``dovecot.conf`` (later settings win).
        ``oauth2_introspection_url`` makes users log in only with OAuth 2.0 access tokens
        (SASL XOAUTH2 / OAUTHBEARER, ``passdb { driver = oauth2 }`` asking that RFC 7662
        endpoint); their passwords are refused, the master user still logs in (to seed mail).
        ``auth_port=True`` opens Dovecot's auth service on a loopback TCP port
        (:attr:`auth_port`), for a Postfix with ``smtpd_sasl_type = dovecot``."""
        self._owns_base_dir = base_dir is None
        if base_dir is None:
            base_dir = tempfile.mkdtemp(prefix="popgate-dovecot-")
        self._base = Path(base_dir).absolute()
        # removed by stop(); by the reaper if this pytest run dies first
        self._reaper_dir = reaper.watch_directory(self._base) if self._owns_base_dir else None
        self._reaper_pid: int | None = None
        self._base.mkdir(parents=True, exist_ok=True)
        # mail processes (uid 65534) and Dovecot's own users must reach homes and files
        os.chmod(self._base, 0o755)
        self.quota = quota
        self.quota_storage = quota_storage
        self._host = host
        self._master_user = master_user
        self._master_password = master_password or secrets.token_urlsafe(16)
        # An LMTP listener (for a test MTA delivering here): recipients' domains are dropped.
        self.lmtp = lmtp
        self.imapc = imapc
        self.metadata = metadata
        self.extra_config = extra_config
        self.oauth2_introspection_url = oauth2_introspection_url
        self.auth_listener = auth_port
        self._ports: dict[str, int] = {}
        self._pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._users: dict[str, str] = {}
        if os.geteuid() == 0:
            self._mail_uid, self._mail_gid = MAIL_ID, MAIL_ID
            self._internal_user, self._login_user = "dovecot", "dovenull"
            self._internal_group = "dovecot"
        else:
            self._mail_uid, self._mail_gid = os.getuid(), os.getgid()
            me = pwd.getpwuid(os.getuid()).pw_name
            self._internal_user = self._login_user = me
            self._internal_group = grp.getgrgid(os.getgid()).gr_name
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
    def pop3_port(self) -> int:
        """Dovecot's own POP3 (plain, offering STLS) — the reference implementation."""
        return self._port("pop3")

    @property
    def pop3s_port(self) -> int:
        """Dovecot's own POP3 over implicit TLS."""
        return self._port("pop3s")

    @property
    def lmtp_port(self) -> int:
        """LMTP (clear text, loopback), only with ``Dovecot(lmtp=True)``."""
        if not self.lmtp:
            raise DovecotError("this instance has no LMTP listener (Dovecot(lmtp=True))")
        return self._port("lmtp")

    @property
    def auth_port(self) -> int:
        """Dovecot's auth service (SASL for Postfix), only with ``Dovecot(auth_port=True)``."""
        if not self.auth_listener:
            raise DovecotError("this instance has no auth listener (Dovecot(auth_port=True))")
        return self._port("auth")

    @property
    def ca_file(self) -> Path:
        """PEM of the private CA that signed the server certificate."""
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
        return self._base / "dovecot.conf"

    @property
    def log_file(self) -> Path:
        return self._base / "dovecot.log"

    @property
    def users(self) -> dict[str, str]:
        """Users added so far (name → password)."""
        return dict(self._users)

    def _port(self, name: str) -> int:
        try:
            return self._ports[name]
        except KeyError:
            raise DovecotError("Dovecot has not been started") from None

    def log_text(self) -> str:
        """Dovecot's log so far (for debugging failed tests)."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0, *, daemonize: bool = False) -> None:
        """Write the configuration, start Dovecot and wait for its greetings.

        By default Dovecot runs in the foreground (``-F``) as a child of this process, in a
        session of its own; ``daemonize=True`` lets it detach, so it outlives this process
        (the CLI's ``start`` does that; stop it later with :meth:`attach` + :meth:`stop`).
        """
        if self._pid is not None and _alive(self._pid):
            raise DovecotError(f"already running (pid {self._pid})")
        dovecot = _find_dovecot()
        self._prepare_dirs()
        last_error = ""
        for _attempt in range(3):  # a picked port can be taken in between: retry with others
            names = ("imap", "imaps", "pop3", "pop3s") + (("lmtp",) if self.lmtp else ())
            names += ("auth",) if self.auth_listener else ()
            self._ports = {name: free_port(self._host) for name in names}
            self.config_file.write_text(self._config_text())
            log_mark = self.log_file.stat().st_size if self.log_file.exists() else 0
            # Output goes to a file: a daemonized master keeps inherited pipes open.
            out_path = self._base / "dovecot.out"
            argv = [dovecot, "-c", str(self.config_file)]
            with open(out_path, "wb") as out:
                if daemonize:
                    rc = subprocess.run(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        timeout=timeout,
                        check=False,
                    ).returncode
                else:
                    self._proc = subprocess.Popen(
                        [*argv, "-F"],
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                    rc = 0
            if rc != 0:
                last_error = out_path.read_text(errors="replace")
                if "in use" in last_error:
                    continue
                raise DovecotError(f"dovecot failed to start:\n{last_error}\n{self.log_text()}")
            try:
                self._pid = self._wait_pid_file(timeout)
                if not daemonize:  # a daemonized one is meant to outlive this process
                    self._reaper_pid = reaper.watch_process(self._pid, group=True)
                self._wait_ready(timeout)
            except DovecotError as e:
                tail = self.log_text()[log_mark:] + out_path.read_text(errors="replace")
                last_error = f"{e}\n{tail}"
                self._kill_leftovers()
                if "in use" in tail:
                    continue
                raise DovecotError(last_error) from None
            self._save_state()
            return
        raise DovecotError(f"dovecot could not bind its ports:\n{last_error}")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop Dovecot by pid (SIGTERM, then SIGKILL) and wait until it and its children are
        gone. Removes the base directory if this object created it."""
        self._kill_leftovers(timeout)
        if self._owns_base_dir:
            shutil.rmtree(self._base, ignore_errors=True)
            reaper.unwatch(self._reaper_dir)
            self._reaper_dir = None

    def _kill_leftovers(self, timeout: float = 20.0) -> None:
        """Stop the master by pid and wait until it and its children are gone. Only
        processes proven to be this instance's are signalled (pid reuse is checked)."""
        pid = self._pid if self._pid is not None else self._read_pid_file()
        self._pid = None
        if pid is None or not _alive(pid) or not self._is_our_master(pid):
            self._reap()
            return
        procs = [i for i in (_identity(p) for p in (pid, *_children(pid))) if i is not None]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        killed = False
        while any(_alive(ident[0], ident) for ident in procs):
            if time.monotonic() > deadline:
                if killed:
                    raise DovecotError(f"dovecot processes {procs} did not exit")
                for ident in procs:
                    if _alive(ident[0], ident):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(ident[0], signal.SIGKILL)
                killed, deadline = True, time.monotonic() + 5
            time.sleep(0.02)
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
            self._proc = None
        reaper.unwatch(self._reaper_pid)
        self._reaper_pid = None

    def _is_our_master(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return os.fsencode(self.config_file) in cmdline

    def _read_pid_file(self) -> int | None:
        try:
            return int((self._base / "run" / "master.pid").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def _wait_pid_file(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self._read_pid_file()
            if pid is not None and _alive(pid) and self._is_our_master(pid):
                return pid
            if self._proc is not None and self._proc.poll() is not None:
                raise DovecotError(f"dovecot exited with status {self._proc.returncode}")
            time.sleep(0.02)
        raise DovecotError("dovecot wrote no master.pid")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        checks = [
            ("imap", False, b"* OK"),
            ("pop3", False, b"+OK"),
            ("imaps", True, b"* OK"),
            ("pop3s", True, b"+OK"),
        ]
        for name, tls, greeting in checks:
            last: Exception | None = None
            while True:
                if self._pid is None or not _alive(self._pid):
                    raise DovecotError(f"dovecot exited during start-up ({last})")
                try:
                    line = self._greeting(self._ports[name], tls)
                    if line.startswith(greeting):
                        break
                    last = DovecotError(f"{name}: unexpected greeting {line!r}")
                except (OSError, ssl.SSLError) as e:
                    last = e
                if time.monotonic() > deadline:
                    raise DovecotError(f"{name} port {self._ports[name]} not ready: {last}")
                time.sleep(0.02)

    def _greeting(self, port: int, tls: bool) -> bytes:
        with socket.create_connection((self._host, port), timeout=5) as raw:
            sock: socket.socket = raw
            if tls:
                sock = self.client_ssl_context().wrap_socket(raw, server_hostname=self._host)
            return sock.makefile("rb").readline()

    def client_ssl_context(self) -> ssl.SSLContext:
        """An SSL context that trusts this instance's private CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    # ----------------------------------------------------------------- configuration
    def _prepare_dirs(self) -> None:
        for sub in ("state", "home", "users"):
            (self._base / sub).mkdir(exist_ok=True)
            os.chmod(self._base / sub, 0o755)
        if self.imapc is not None:
            # users are not added here: their homes (index cache) are made on first login
            os.chown(self._base / "home", self._mail_uid, self._mail_gid)
        self._write_master_passwd()
        self.log_file.touch()

    def _write_master_passwd(self) -> None:
        path = self._base / "master-passwd"
        path.write_text(f"{self._master_user}:{{PLAIN}}{self._master_password}\n")
        self._chmod_readable_by_auth(path)

    def _chmod_readable_by_auth(self, path: Path) -> None:
        # Dovecot's auth process runs as the internal user and reads passwd-files itself.
        os.chmod(path, 0o640)
        if os.geteuid() == 0:
            with contextlib.suppress(KeyError):
                os.chown(path, 0, grp.getgrnam(self._internal_group).gr_gid)

    def _config_text(self) -> str:
        b = self._base
        h = self._host
        p = self._ports
        dh = "/usr/share/dovecot/dh.pem"
        ssl_dh = f"ssl_dh = <{dh}\n" if os.path.exists(dh) else ""
        quota_global = quota_imap = quota_plugin = ""
        if self.quota:
            quota_global = "mail_plugins = $mail_plugins quota\n"
            quota_imap = "  mail_plugins = $mail_plugins imap_quota\n"
            quota_plugin = (
                "plugin {\n"
                "  quota = maildir:User quota\n"
                f"  quota_rule = *:storage={self.quota_storage}\n"
                "}\n"
            )
        special = "\n".join(
            f"  mailbox {name} {{\n    special_use = \\{use}\n    auto = subscribe\n  }}"
            for name, use in (
                ("Drafts", "Drafts"),
                ("Sent", "Sent"),
                ("Trash", "Trash"),
                ("Junk", "Junk"),
                ("Archive", "Archive"),
            )
        )
        return f"""# Generated by tests/support/dovecot.py — a private test instance; do not edit.
instance_name = popgate-{os.getpid()}-{b.name}
base_dir = {b}/run
state_dir = {b}/state
log_path = {b}/dovecot.log
info_log_path = {b}/dovecot.log
debug_log_path = {b}/dovecot.log
log_timestamp = "%Y-%m-%d %H:%M:%S "
default_internal_user = {self._internal_user}
default_internal_group = {self._internal_group}
default_login_user = {self._login_user}
protocols = imap pop3{" lmtp" if self.lmtp else ""}
listen = {h}
shutdown_clients = yes

ssl = yes
ssl_cert = <{self._pki["cert_file"]}
ssl_key = <{self._pki["key_file"]}
{ssl_dh}ssl_min_protocol = TLSv1.2

# Test instance: loopback only, no brakes.
disable_plaintext_auth = no
login_trusted_networks = 127.0.0.0/8 ::1/128
auth_mechanisms = plain login{" xoauth2 oauthbearer" if self.oauth2_introspection_url else ""}
# (Dovecot 2.3 still answers a failed login on its next 500 ms failure-queue tick.)
auth_failure_delay = 0
auth_verbose = yes
auth_master_user_separator = *
mail_max_userip_connections = 1000

mail_uid = {self._mail_uid}
mail_gid = {self._mail_gid}
first_valid_uid = {min(self._mail_uid, 500)}
first_valid_gid = {min(self._mail_gid, 1)}
pop3_uidl_format = %08Xu%08Xv
{quota_global}{self._storage_and_auth_text()}
namespace inbox {{
  inbox = yes
{special}
}}

{self._metadata_global()}protocol imap {{
  mail_max_userip_connections = 1000
{quota_imap}{self._metadata_imap()}}}
protocol pop3 {{
  mail_max_userip_connections = 1000
}}
{quota_plugin}
# No anvil auth penalty (up to 15 s per failed login from one IP): without this listener
# the auth process finds no penalty socket and disables the penalty.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = {h}
    port = {p["imap"]}
  }}
  inet_listener imaps {{
    address = {h}
    port = {p["imaps"]}
    ssl = yes
  }}
}}
{self._lmtp_config()}{self._auth_listener_config()}service pop3-login {{
  inet_listener pop3 {{
    address = {h}
    port = {p["pop3"]}
  }}
  inet_listener pop3s {{
    address = {h}
    port = {p["pop3s"]}
    ssl = yes
  }}
}}
{self.extra_config}"""

    def _metadata_global(self) -> str:
        return "mail_attribute_dict = file:%h/Maildir/dovecot-attributes\n" if self.metadata else ""

    def _metadata_imap(self) -> str:
        return "  imap_metadata = yes\n" if self.metadata else ""

    def set_metadata(self, on: bool, user: str, password: str, timeout: float = 20.0) -> None:
        """Switch METADATA on or off in the running instance (same ports, same mail): rewrite
        the configuration, have the master reload it (SIGHUP), and wait until a new login of
        ``user`` sees the change in CAPABILITY."""
        self.metadata = on
        self.config_file.write_text(self._config_text())
        self._save_state()
        if self._pid is None:
            raise DovecotError("Dovecot has not been started")
        os.kill(self._pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while True:
            with self.imap(user, password) as conn:
                _, caps = conn.capability()
                if (b"METADATA" in (caps[0] or b"").split()) == on:
                    return
            if time.monotonic() > deadline:
                raise DovecotError(f"METADATA still {'off' if on else 'on'} after the reload")
            time.sleep(0.05)

    def _auth_listener_config(self) -> str:
        if not self.auth_listener:
            return ""
        return f"""service auth {{
  inet_listener auth-sasl {{
    address = {self._host}
    port = {self._ports["auth"]}
  }}
}}
"""

    def _write_oauth2_args(self) -> Path:
        """FACTS.md "OAuth2": RFC 7662 introspection by POST, the user from ``username``."""
        path = self._base / "dovecot-oauth2.conf.ext"
        path.write_text(
            "introspection_mode = post\n"
            f"introspection_url = {self.oauth2_introspection_url}\n"
            "username_attribute = username\n"
            "active_attribute = active\n"
            "active_value = true\n"
        )
        self._chmod_readable_by_auth(path)
        return path

    def _oauth2_auth_text(self) -> str:
        b = self._base
        # Users authenticate only with a token; their passwd-files serve as userdb only. A
        # password gets a plain NO (a static passdb whose password nobody knows), as Microsoft
        # 365 answers once basic authentication is off.
        return f"""mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  master = yes
  args = scheme=PLAIN {b}/master-passwd
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {self._write_oauth2_args()}
}}
passdb {{
  driver = static
  mechanisms = plain login
  args = password={secrets.token_hex(24)}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {b}/users/%u
}}
"""

    def _storage_and_auth_text(self) -> str:
        b = self._base
        if self.oauth2_introspection_url:
            return self._oauth2_auth_text()
        if self.imapc is None:
            return f"""mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  master = yes
  args = scheme=PLAIN {b}/master-passwd
  pass = yes
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {b}/users/%u
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {b}/users/%u
}}
"""
        host, port = self.imapc
        # What makes Dovecot 2.3's POP3-over-imapc work: the password is checked by logging
        # in upstream (passdb imap) and handed on to the imapc storage; an on-disk index
        # (without it each login asks for every message's size); rfc822.size (without it
        # a login fetches every body).
        return f"""mail_location = imapc:~/imapc
imapc_host = {host}
imapc_port = {port}
imapc_features = rfc822.size
passdb {{
  driver = imap
  args = host={host} port={port}
  default_fields = userdb_imapc_user=%u userdb_imapc_password=%w userdb_home={b}/home/%u
}}
userdb {{
  driver = prefetch
}}
"""

    def _lmtp_config(self) -> str:
        if not self.lmtp:
            return ""
        return f"""service lmtp {{
  inet_listener lmtp {{
    address = {self._host}
    port = {self._ports["lmtp"]}
  }}
}}
protocol lmtp {{
  # bob@example.org is delivered to the user bob
  auth_username_format = %Ln
}}
"""

    # ----------------------------------------------------------------- users
    def add_user(self, name: str, password: str) -> None:
        """Add a user, at once usable without a restart.

        Each user has a passwd-file of its own (``users/NAME``; the config names
        ``users/%u``): Dovecot checks a known passwd-file for changes at most once a second,
        but opens a file it has not seen yet on first use, so a new user is never missed.
        """
        if not _NAME_RE.match(name) or "*" in name or "#" in name:
            raise ValueError(f"unsupported user name for the test passwd-file: {name!r}")
        if any(c in password for c in ":\r\n\0"):
            raise ValueError("password must not contain ':' or line breaks")
        if name in self._users and self._users[name] != password:
            raise ValueError(f"user {name!r} exists (passwords are not changed in place)")
        home = self._base / "home" / name
        with self._lock:
            home.mkdir(parents=True, exist_ok=True)
            os.chown(home, self._mail_uid, self._mail_gid)
            os.chmod(home, 0o700)
            self._users[name] = password
            line = f"{name}:{{PLAIN}}{password}:{self._mail_uid}:{self._mail_gid}::{home}::\n"
            path = self._base / "users" / name
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text(line)
            self._chmod_readable_by_auth(tmp)
            os.replace(tmp, path)
            self._save_state()

    def password(self, name: str) -> str:
        return self._users[name]

    # ----------------------------------------------------------------- state for the CLI
    def _save_state(self) -> None:
        state = {
            "base_dir": str(self._base),
            "host": self._host,
            "ports": self._ports,
            "pid": self._pid,
            "quota": self.quota,
            "quota_storage": self.quota_storage,
            "lmtp": self.lmtp,
            "master_user": self._master_user,
            "master_password": self._master_password,
            "users": self._users,
            "imapc": list(self.imapc) if self.imapc else None,
            "metadata": self.metadata,
            "extra_config": self.extra_config,
        }
        _write_private(self._base / STATE_FILE, json.dumps(state, indent=2).encode())

    @classmethod
    def attach(cls, base_dir: str | os.PathLike[str]) -> Dovecot:
        """An object for an instance started earlier (e.g. by the CLI) in ``base_dir``."""
        state = json.loads((Path(base_dir) / STATE_FILE).read_text())
        dc = cls(
            state["base_dir"],
            quota=state["quota"],
            quota_storage=state["quota_storage"],
            lmtp=state.get("lmtp", False),
            host=state["host"],
            master_user=state["master_user"],
            master_password=state["master_password"],
            imapc=(state["imapc"][0], int(state["imapc"][1])) if state.get("imapc") else None,
            metadata=state.get("metadata", False),
            extra_config=state.get("extra_config", ""),
        )
        dc._ports = {k: int(v) for k, v in state["ports"].items()}
        dc._pid = state["pid"]
        dc._users = dict(state["users"])
        return dc

    def shell_vars(self) -> dict[str, str]:
        return {
            "DOVECOT_HOST": self._host,
            "DOVECOT_IMAP_PORT": str(self.imap_port),
            "DOVECOT_IMAPS_PORT": str(self.imaps_port),
            "DOVECOT_POP3_PORT": str(self.pop3_port),
            "DOVECOT_POP3S_PORT": str(self.pop3s_port),
            "DOVECOT_LMTP_PORT": str(self._ports.get("lmtp", "")),
            "DOVECOT_CA_FILE": str(self.ca_file),
            "DOVECOT_CA_KEY_FILE": str(self.ca_key_file),
            "DOVECOT_BASE_DIR": str(self._base),
            "DOVECOT_PID": str(self._pid or ""),
            "DOVECOT_MASTER_USER": self._master_user,
            "DOVECOT_MASTER_PASSWORD": self._master_password,
            "DOVECOT_LOG": str(self.log_file),
        }


# --------------------------------------------------------------------- CLI
def _cmd_start(args: argparse.Namespace) -> int:
    from tests.support import messages

    base = Path(args.dir)
    if (base / STATE_FILE).exists():
        with contextlib.suppress(Exception):
            Dovecot.attach(base)._kill_leftovers()
    dc = Dovecot(base, quota=args.quota, lmtp=args.lmtp)
    dc.start(daemonize=True)
    try:
        for spec in args.user:
            name, _, password = spec.partition(":")
            dc.add_user(name, password)
        if args.demo_messages:
            for name in dc.users:
                dc.append_many(name, dc.password(name), messages.demo_corpus())
    except BaseException:
        dc._kill_leftovers()
        raise
    for key, value in dc.shell_vars().items():
        print(f"{key}={shlex.quote(value)}")
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    base = Path(args.dir)
    if not (base / STATE_FILE).exists():
        print(f"no Dovecot instance state in {base}", file=sys.stderr)
        return 1
    Dovecot.attach(base)._kill_leftovers()
    return 0


def _cmd_log(args: argparse.Namespace) -> int:
    sys.stdout.write(Dovecot.attach(args.dir).log_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.dovecot", description="Run a private Dovecot."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start", help="start (daemonized); prints shell variables")
    p.add_argument("--dir", required=True, help="base directory of the instance")
    p.add_argument("--user", action="append", default=[], metavar="NAME:PASSWORD")
    p.add_argument("--demo-messages", action="store_true", help="APPEND demo mail for each user")
    p.add_argument("--quota", action="store_true", help="enable the quota plugin")
    p.add_argument("--lmtp", action="store_true", help="add an LMTP listener (for an MTA)")
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
