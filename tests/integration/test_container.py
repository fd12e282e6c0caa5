"""The container image, built from docker/Dockerfile and run with podman against the tests'
private Dovecot and an SMTP relay (the aiosmtpd sink).

podman, runc and mmdebstrap come from tests/bootstrap.sh; no Docker engine or registry is needed
(tests/support/container.py makes a stand-in for the official Python base when it cannot be
pulled). The containers use the host's network and free loopback ports set through
``POPGATE_<SECTION>_<KEY>`` variables. If podman cannot work here these tests fail; they never
skip.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import poplib
import re
import secrets
import smtplib
import ssl
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.oauth.store import KEY_FILE, SUFFIX, TokenStore
from gateway.secret_files import parse_key
from tests.conftest import MailUser, SeededUser
from tests.support.container import Podman
from tests.support.dovecot import Dovecot, free_port
from tests.support.gateway import GatewayProcess
from tests.support.oauth_provider import OAuthProvider
from tests.support.postfix import Postfix
from tests.support.smtp_sink import SmtpSink
from tests.support.submission import make_message, sent_mailbox, wait_for_sent
from tests.support.tcp_proxy import TcpProxy

pytest_plugins = ("tests.support.submission_fixtures",)
# The image is what is under test, not the upstream server: its configuration points at the
# session Dovecot, so the users it serves come from there too.
pytestmark = [pytest.mark.integration, pytest.mark.upstreams("dovecot")]

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
IMAGE_UID = 10110  # the Dockerfile's popgate user
UPSTREAM_CA = "/etc/popgate/upstream-ca.crt"
MASTER_SECRET = "/run/secrets/imap_master"
# a healthy container answers within a second or two; these only bound a hang
START_DEADLINE = 60.0
STOP_GRACE = 90  # seconds podman waits after SIGTERM before SIGKILL (as in docker/compose.yaml)


# --------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def podman() -> Podman:
    """podman that works here, or a loud failure (never a skip)."""
    engine = Podman()
    engine.check_works()
    return engine


@pytest.fixture(scope="module")
def image(podman: Podman) -> str:
    """The popgate image of this tree (built now unless an identical tree was built before)."""
    name = podman.build_image(podman.base_image())
    timings = ", ".join(f"{k} {v:.0f}s" for k, v in podman.timings.items()) or "all cached"
    print(f"\ncontainer image {name} ({timings})", file=sys.stderr)
    return name


@dataclass(frozen=True)
class Ports:
    pop3: int
    pop3s: int
    submission: int
    submissions: int

    @classmethod
    def free(cls) -> Ports:
        return cls(free_port(), free_port(), free_port(), free_port())


@dataclass
class Container:
    podman: Podman
    name: str
    ports: Ports

    def logs(self) -> str:
        out = self.podman.run("logs", self.name, check=False)
        return out.stdout + out.stderr

    def state(self) -> dict[str, object]:
        state = self.podman.inspect(self.name)["State"]
        assert isinstance(state, dict)
        return state

    def wait_healthy(self, deadline: float = START_DEADLINE) -> str:
        """Run the image's HEALTHCHECK until it passes (bounded); its last output."""
        end = time.monotonic() + deadline
        while True:
            check = self.podman.run("healthcheck", "run", self.name, check=False)
            if check.returncode == 0:
                return self.health()["Log"][-1]["Output"]
            if self.state().get("Running") is not True:
                raise AssertionError(f"the container exited before it was healthy:\n{self.logs()}")
            if time.monotonic() > end:
                raise AssertionError(
                    f"not healthy after {deadline}s: {check.stdout}{check.stderr}\n{self.logs()}"
                )
            time.sleep(0.2)

    def wait_for_log(self, text: str, deadline: float = 30.0) -> None:
        end = time.monotonic() + deadline
        while text not in (logs := self.logs()):
            assert time.monotonic() < end, f"no {text!r} in the log after {deadline}s:\n{logs}"
            time.sleep(0.05)

    def health(self) -> dict[str, Any]:
        """The HEALTHCHECK's state: Status, FailingStreak, Log (podman 4.3 calls it
        Healthcheck, Docker and later podman Health)."""
        state = self.state()
        health = state.get("Health") or state.get("Healthcheck")
        assert isinstance(health, dict), state
        return health

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.podman.run("exec", self.name, *argv)

    def stop(self) -> int:
        """``podman stop`` (SIGTERM, then SIGKILL after STOP_GRACE); the exit code."""
        self.podman.run("stop", "-t", str(STOP_GRACE), self.name, timeout=STOP_GRACE + 30)
        code = self.state()["ExitCode"]
        assert isinstance(code, int)
        return code


@pytest.fixture
def run_container(
    podman: Podman,
    image: str,
    dovecot: Dovecot,
    smtp_sink: SmtpSink,
    tmp_path: Path,
    volumes: Callable[[str], Path],
) -> Iterator[Callable[..., Container]]:
    """Factory: ``run_container(volumes={name: path}, **env)`` runs the image detached, on the
    host's network, against the session Dovecot (STARTTLS, its CA and master user mounted as a
    file and a secret) and the sink; every container (with its anonymous volumes) is removed at
    test end, before the named volumes of ``volumes`` (which depends on it for that order:
    removing a volume in use would remove its container without its anonymous volumes)."""
    containers: list[Container] = []
    secret = tmp_path / "imap_master"
    secret.write_text(dovecot.master_password + "\n")
    secret.chmod(0o644)  # read by the image's user

    def run(
        volumes: Mapping[str, str] | None = None, ca_file: Path | None = None, **env: str
    ) -> Container:
        """``ca_file``: the upstream's CA, when it is not the session Dovecot's."""
        ports = Ports.free()
        settings = {
            "UPSTREAM_IMAP_HOST": dovecot.host,
            "UPSTREAM_IMAP_PORT": str(dovecot.imap_port),
            "UPSTREAM_IMAP_SECURITY": "starttls",
            "UPSTREAM_IMAP_CA_FILE": UPSTREAM_CA,
            "UPSTREAM_IMAP_MASTER_USER": dovecot.master_user,
            "UPSTREAM_IMAP_MASTER_PASSWORD_FILE": MASTER_SECRET,
            "UPSTREAM_SMTP_HOST": smtp_sink.host,
            "UPSTREAM_SMTP_PORT": str(smtp_sink.port),
            "UPSTREAM_SMTP_SECURITY": "none",
            "POP3_LISTEN": f"127.0.0.1:{ports.pop3}",
            "POP3_LISTEN_TLS": f"127.0.0.1:{ports.pop3s}",
            "SUBMISSION_LISTEN": f"127.0.0.1:{ports.submission}",
            "SUBMISSION_LISTEN_TLS": f"127.0.0.1:{ports.submissions}",
            "SUBMISSION_RETRY_INITIAL_DELAY": "0.3",
            "SUBMISSION_RETRY_MAX_DELAY": "1",
            # [http] off: the healthcheck greets each listener (the image's default, /healthz,
            # is checked on the bridge network below)
            "HTTP_LISTEN": "",
            **env,
        }
        name = f"popgate-test-{secrets.token_hex(4)}"
        argv = ["run", "-d", "--name", name, "--network=host"]
        argv += ["-v", f"{ca_file or dovecot.ca_file}:{UPSTREAM_CA}:ro"]
        argv += ["-v", f"{secret}:{MASTER_SECRET}:ro"]
        for volume, path in (volumes or {}).items():
            argv += ["-v", f"{volume}:{path}"]
        for key, value in settings.items():
            argv += ["-e", f"POPGATE_{key}={value}"]
        podman.run(*argv, image, timeout=120)
        container = Container(podman, name, ports)
        containers.append(container)
        return container

    yield run
    for container in containers:
        # pytest shows a test's captured output only when it failed
        print(f"--- logs of {container.name}:\n{container.logs()}", file=sys.stderr)
        podman.remove([container.name])


@pytest.fixture
def volumes(podman: Podman) -> Iterator[Callable[[str], Path]]:
    """Factory: a named volume for this test (its directory on the host); removed at the end."""
    made: list[str] = []

    def make(purpose: str) -> Path:
        name = f"popgate-test-{purpose}-{secrets.token_hex(4)}"
        made.append(name)
        return podman.volume(name)

    yield make
    podman.remove(volumes=made)  # after run_container's containers are gone (it requests this)


def _volume_name(path: Path) -> str:
    return path.parent.name  # /var/lib/containers/storage/volumes/NAME/_data


def _pending(spool: Path) -> list[str]:
    return sorted(p.name for p in spool.iterdir() if p.name.endswith(".pending"))


def _unverified() -> ssl.SSLContext:
    """The image makes its own self-signed certificate; its fingerprint is what is compared."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _pop3s(container: Container) -> poplib.POP3_SSL:
    return poplib.POP3_SSL("127.0.0.1", container.ports.pop3s, context=_unverified(), timeout=30)


def _fingerprint(pop: poplib.POP3_SSL) -> str:
    sock = pop.sock
    assert isinstance(sock, ssl.SSLSocket)
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def _retr_bytes(pop: poplib.POP3, which: int) -> bytes:
    """The message as the device stores it: poplib undoes dot-stuffing and splits lines."""
    _, lines, _ = pop.retr(which)
    return b"".join(line + b"\r\n" for line in lines)


def _messages() -> list[bytes]:
    big = b"".join(b"line %06d of a large attachment, 8-bit: \xc3\xa9\r\n" % i for i in range(4000))
    return [
        b"Subject: one\r\n\r\nHello.\r\n",
        b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nend\r\n",
        b"Subject: big\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + big,
    ]


# --------------------------------------------------------------------- the image at work
def test_the_image_serves_pop3_and_submission_as_an_unprivileged_user(
    run_container: Callable[..., Container],
    seeded_user: Callable[..., SeededUser],
    dovecot: Dovecot,
    smtp_sink: SmtpSink,
) -> None:
    user = seeded_user(_messages())
    smtp_sink.users[user.name] = user.password
    container = run_container()
    health = container.wait_healthy()
    for listener in ("pop3", "pop3s", "submission", "submissions"):
        port = getattr(container.ports, listener)
        assert re.search(rf"127\.0\.0\.1:{port} \((plain|tls)\): ok", health), health
    assert container.health()["Status"] == "healthy"

    # the process is not root, inside or as the host sees it (rootful podman, no user namespace)
    assert container.exec("id", "-u").stdout.strip() == str(IMAGE_UID)
    pid = container.state()["Pid"]
    uids = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[:4]
    assert uids == [str(IMAGE_UID)] * 4
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1].endswith(b"popgate")

    # a device downloads every message byte for byte, over STLS and over implicit TLS
    pop = poplib.POP3("127.0.0.1", container.ports.pop3, timeout=30)
    pop.stls(_unverified())
    pop.user(user.name)
    pop.pass_(user.password)
    assert [_retr_bytes(pop, n) for n in (1, 2, 3)] == user.messages
    pop.quit()
    pop = _pop3s(container)
    pop.user(user.name)
    pop.pass_(user.password)
    assert pop.stat() == (3, sum(len(m) for m in user.messages))
    assert _retr_bytes(pop, 3) == user.messages[2]
    pop.quit()

    # a message submitted is relayed, and its copy lands in the user's Sent mailbox upstream
    message = make_message(f"{user.name}@example.org", ["bob@example.org"], "from the container")
    with smtplib.SMTP_SSL("127.0.0.1", container.ports.submissions, context=_unverified()) as c:
        c.login(user.name, user.password)
        assert c.sendmail(f"{user.name}@example.org", ["bob@example.org"], message) == {}
    [received] = smtp_sink.wait_for(1)
    assert received.data == message
    assert received.auth_user == user.name
    [copy] = wait_for_sent(dovecot, MailUser(user.name, user.password), 1).values()
    assert copy == message


@pytest.mark.parametrize("first", ["quit", "sigterm"])
def test_podman_stop_ends_the_container_gracefully_with_the_update_applied_fully_or_not_at_all(
    run_container: Callable[..., Container],
    seeded_user: Callable[..., SeededUser],
    dovecot: Dovecot,
    first: str,
) -> None:
    """A device's QUIT and the container's SIGTERM arrive together, in either order: popgate
    lets the UPDATE finish (or never starts it), then exits 0; the archive move is whole or
    absent, and whole whenever QUIT was answered +OK."""
    user = seeded_user([b"Subject: m%d\r\n\r\nbody %d\r\n" % (i, i) for i in range(1, 7)])
    container = run_container(POP3_ON_DELETE="archive")
    container.wait_healthy()
    pop = poplib.POP3("127.0.0.1", container.ports.pop3, timeout=30)
    pop.user(user.name)
    pop.pass_(user.password)
    for n in (1, 3, 4, 6):
        pop.dele(n)
    stopper = subprocess.Popen(
        ["podman", "stop", "-t", str(STOP_GRACE), container.name],
        env=container.podman.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        if first == "sigterm":
            container.wait_for_log("received SIGTERM, shutting down")
        pop.sock.sendall(b"QUIT\r\n")
        try:
            reply = pop.file.readline()
        except OSError:
            reply = b""
        output, _ = stopper.communicate(timeout=STOP_GRACE + 30)
    finally:
        with contextlib.suppress(OSError):
            pop.close()
    assert stopper.returncode == 0, output
    state = container.state()
    assert state["ExitCode"] == 0, container.logs()
    assert "received SIGTERM, shutting down" in container.logs()

    deleted = {user.uids[n - 1] for n in (1, 3, 4, 6)}
    bodies = {uid: body for uid, body in zip(user.uids, user.messages, strict=True)}
    inbox = set(dovecot.list_uids(user.name, user.password))
    mailboxes = {name for _, name in dovecot.list_mailboxes(user.name, user.password)}
    archived = (
        sorted(dovecot.fetch_bodies(user.name, user.password, "POP Archive").values())
        if "POP Archive" in mailboxes
        else []
    )
    applied = inbox == set(user.uids) - deleted and archived == sorted(
        bodies[uid] for uid in deleted
    )
    untouched = inbox == set(user.uids) and archived == []
    assert applied or untouched, (reply, sorted(inbox), len(archived))
    if reply.startswith(b"+OK"):
        assert applied, "QUIT was answered +OK but the deletes were not applied"


def test_certificates_and_spool_survive_recreating_the_container(
    run_container: Callable[..., Container],
    volumes: Callable[[str], Path],
    mail_user: MailUser,
    dovecot: Dovecot,
    smtp_sink: SmtpSink,
) -> None:
    certs, spool = volumes("certs"), volumes("spool")
    mounts = {_volume_name(certs): "/etc/popgate/certs", _volume_name(spool): "/var/spool/popgate"}
    smtp_sink.users[mail_user.name] = mail_user.password

    with TcpProxy(dovecot.host, dovecot.imap_port) as imap:  # an IMAP server that can go down
        first = run_container(mounts, UPSTREAM_IMAP_PORT=str(imap.port))
        first.wait_healthy()
        pop = _pop3s(first)
        fingerprint = _fingerprint(pop)
        pop.quit()
        message = make_message(f"{mail_user.name}@example.org", ["bob@example.org"], "spooled")
        with smtplib.SMTP_SSL("127.0.0.1", first.ports.submissions, context=_unverified()) as c:
            c.login(mail_user.name, mail_user.password)  # AUTH asks IMAP: still up
            imap.refuse = True  # IMAP goes down: new connections refused, open ones dropped
            imap.drop_all()  # (the login AUTH made would otherwise file the Sent copy)
            assert c.sendmail(f"{mail_user.name}@example.org", ["bob@example.org"], message) == {}
        [received] = smtp_sink.wait_for(1)
        assert received.data == message
        # the Sent copy waits in the spool (written before the relay was asked)
        [pending] = _pending(spool)
        listing = first.exec("popgate", "spool", "list").stdout
        assert "1 entries" in listing, listing
        assert first.stop() == 0
    first.podman.remove([first.name])
    assert _pending(spool) == [pending]
    assert {p.name for p in certs.iterdir()} == {
        "popgate.crt",
        "popgate.key",
        "popgate-ecdsa.crt",
        "popgate-ecdsa.key",
    }
    assert sent_mailbox(dovecot, mail_user) == {}

    second = run_container(mounts)  # a new container from the volumes; IMAP is back
    second.wait_healthy()
    pop = _pop3s(second)
    assert _fingerprint(pop) == fingerprint
    pop.quit()
    [copy] = wait_for_sent(dovecot, mail_user, 1).values()
    assert copy.startswith(message.split(b"\r\n\r\n")[0])
    deadline = time.monotonic() + 20
    while _pending(spool):
        assert time.monotonic() < deadline, "the landed entry is still in the spool"
        time.sleep(0.1)
    assert "empty" in second.exec("popgate", "spool", "list").stdout
    assert len(smtp_sink.messages) == 1  # relayed once, before the restart; never again


# --------------------------------------------------------------------- OAuth 2.0 tokens in a volume
OAUTH_DIR = "/var/lib/popgate/oauth"  # [oauth2] token_dir's default, a VOLUME of the image
DEVICE_PASSWORD = "scanner-pin-4711"
OAUTH_DOMAIN = "example.org"


@dataclass
class OAuthStack:
    provider: OAuthProvider
    dovecot: Dovecot
    postfix: Postfix


@pytest.fixture(scope="module")
def oauth_stack() -> Iterator[OAuthStack]:
    """An OAuth-only upstream on the host, as tests/integration/test_oauth2.py has it: the local
    identity provider, a private Dovecot whose oauth2 passdb introspects tokens there, and
    Postfix authenticating relay clients through that Dovecot (XOAUTH2)."""
    with (
        OAuthProvider() as provider,
        Dovecot(
            oauth2_introspection_url=provider.introspection_url, auth_port=True, lmtp=True
        ) as dc,
        Postfix(
            lmtp=(dc.host, dc.lmtp_port), domains=[OAUTH_DOMAIN], sasl=(dc.host, dc.auth_port)
        ) as mta,
    ):
        yield OAuthStack(provider, dc, mta)


def _oauth_settings(stack: OAuthStack) -> dict[str, str]:
    """``POPGATE_*`` settings of a container that logs in upstream with OAuth only: no master
    identity, token_dir left at the image's volume, its key generated there."""
    provider, dc = stack.provider, stack.dovecot
    return {
        "UPSTREAM_IMAP_HOST": dc.host,
        "UPSTREAM_IMAP_PORT": str(dc.imap_port),
        "UPSTREAM_IMAP_AUTH": "oauth2",
        "UPSTREAM_IMAP_MASTER_USER": "",
        "UPSTREAM_IMAP_MASTER_PASSWORD_FILE": "",
        "UPSTREAM_SMTP_HOST": stack.postfix.host,
        "UPSTREAM_SMTP_PORT": str(stack.postfix.port),
        "UPSTREAM_SMTP_AUTH": "oauth2",
        "OAUTH2_PROVIDER": "custom",
        "OAUTH2_DEVICE_AUTHORIZATION_URL": provider.device_authorization_url,
        "OAUTH2_TOKEN_URL": provider.token_url,
        "OAUTH2_CLIENT_ID": provider.client_id,
        "OAUTH2_SCOPES": "mail",
        "LOG_LEVEL": "debug",  # nothing secret at any level
    }


def _login_in_container(container: Container, provider: OAuthProvider, user: str) -> str:
    """What docs/oauth2.md shows for scripts: ``podman exec -i NAME popgate oauth login USER
    --device-password-file /dev/stdin`` with the device password on stdin; the device code is
    approved at the provider as a person would in a browser. What the command printed."""
    seen = provider.count("device_authorization")
    argv = ["podman", "exec", "-i", container.name, "popgate", "oauth", "login", user]
    argv += ["--device-password-file", "/dev/stdin"]
    login = subprocess.Popen(
        argv,
        env=container.podman.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert login.stdin is not None
        login.stdin.write(DEVICE_PASSWORD + "\n")
        login.stdin.close()
        code = provider.wait_for_user_code(60, after=seen)
        provider.approve(code, user)
        login.wait(timeout=120)  # its output is a few lines: the pipe cannot fill up
        assert login.stdout is not None
        out = login.stdout.read()
    finally:
        if login.poll() is None:
            login.kill()
            login.wait()
    assert login.returncode == 0, out
    assert code in out and provider.verification_uri in out, out  # shown to the operator
    assert f"Stored the grant of {user} in {OAUTH_DIR}." in out, out
    return out


def _imap_bodies(dc: Dovecot, user: str, mailbox: str) -> list[bytes]:
    """The mailbox's messages, read with Dovecot's master identity (the users have no
    password the server accepts)."""
    with dc.imap_as_master(user) as conn:
        typ, data = conn.select(f'"{mailbox}"', readonly=True)
        if typ != "OK":
            return []
        count = int(data[0] or 0)
        if count == 0:
            return []
        typ, fetched = conn.fetch(f"1:{count}", "(BODY.PEEK[])")
        assert typ == "OK", fetched
        return [item[1] for item in fetched if isinstance(item, tuple)]


def _wait_for_bodies(dc: Dovecot, user: str, mailbox: str, n: int) -> list[bytes]:
    deadline = time.monotonic() + 60
    while len(bodies := _imap_bodies(dc, user, mailbox)) < n:
        assert time.monotonic() < deadline, f"{user}'s {mailbox}: {len(bodies)} of {n} messages"
        time.sleep(0.1)
    return bodies


def _mpop_download(container: Container, login: str, workdir: Path) -> list[bytes]:
    """An old POP client (mpop: STLS, keep, maildir) fetches everything; the files it stored."""
    maildir = workdir / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    rc = workdir / "mpoprc"
    rc.write_text("")
    rc.chmod(0o600)
    run = subprocess.run(
        [
            "mpop", f"--file={rc}", "--host=127.0.0.1", f"--port={container.ports.pop3}",
            "--auth=user", f"--user={login}", f"--passwordeval=printf %s '{DEVICE_PASSWORD}'",
            "--tls=on", "--tls-starttls=on", "--tls-certcheck=off",  # the image's own cert
            "--keep=on", "--received-header=off", f"--delivery=maildir,{maildir}",
            f"--uidls-file={workdir / 'uidls'}", "--only-new=off", "--half-quiet",
        ],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    return sorted(p.read_bytes() for sub in ("new", "cur") for p in (maildir / sub).iterdir())


def _token_dir_state(volume: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry of the token volume: (uid, gid, permission bits), the directory as "."."""
    entries = {".": volume.stat(), **{p.name: p.stat() for p in volume.iterdir()}}
    return {name: (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) for name, st in entries.items()}


def _issued_tokens(provider: OAuthProvider, user: str) -> list[str]:
    """Every access and refresh token the provider ever issued to ``user``."""
    state = provider._state
    return [t for t, a in state.access.items() if a.user == user] + [
        t for t, r in state.refresh.items() if r.user == user
    ]


def test_oauth_grant_in_a_volume_serves_pop3_and_submission_and_survives_recreation(
    run_container: Callable[..., Container],
    volumes: Callable[[str], Path],
    oauth_stack: OAuthStack,
    tmp_path: Path,
) -> None:
    """The container with tokens in a volume (issue 13): ``popgate oauth login`` run inside it
    with ``podman exec``; mpop downloads byte-exact and msmtp submits with the device password
    while the upstream accepts only tokens; the key and the grant sit in the volume, owned by
    the image's user, 0600, the grant unreadable without the key; a new container from the
    same volume uses the stored refresh token; no token or password reaches the logs."""
    stack = oauth_stack
    dc, provider = stack.dovecot, stack.provider
    user, recipient = f"cuser{secrets.token_hex(3)}", f"crcpt{secrets.token_hex(3)}"
    dc.add_user(user, "upstream-refuses-passwords")
    dc.add_user(recipient, "upstream-refuses-passwords")
    inbox = _messages()
    with dc.imap_as_master(user) as conn:
        for body in inbox:
            assert conn.append("INBOX", None, None, body)[0] == "OK"
    volume = volumes("oauth")
    mounts = {_volume_name(volume): OAUTH_DIR}
    settings = _oauth_settings(stack)

    first = run_container(mounts, ca_file=dc.ca_file, **settings)
    first.wait_healthy()
    printed = _login_in_container(first, provider, user)
    listed = first.exec("popgate", "oauth", "list").stdout
    assert re.search(rf"^{user}\s", listed, re.M), listed

    # an old POP client downloads every message through the container with the device password
    got = _mpop_download(first, f"{user}#scanner", tmp_path / "mpop")
    assert got == sorted(m.replace(b"\r\n", b"\n") for m in inbox)  # mpop stores LF
    # a scan-to-email device submits; Postfix relays after AUTH XOAUTH2; the copy lands in Sent
    sender = f"{user}@{OAUTH_DOMAIN}"
    message = make_message(sender, [f"{recipient}@{OAUTH_DOMAIN}"], "scan from the container")
    run = subprocess.run(
        [
            "msmtp", "--host=127.0.0.1", f"--port={first.ports.submission}", "--tls=on",
            "--tls-starttls=on", "--tls-certcheck=off", "--auth=plain", f"--user={user}#scanner",
            f"--passwordeval=printf %s '{DEVICE_PASSWORD}'", f"--from={sender}",
            "--domain=scanner.test", f"{recipient}@{OAUTH_DOMAIN}",
        ],
        input=message, capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    [delivered] = _wait_for_bodies(dc, recipient, "INBOX", 1)
    assert delivered.endswith(message)  # after the headers Postfix and LMTP added
    assert f"sasl_method=XOAUTH2, sasl_username={user}" in stack.postfix.log_text()
    assert _wait_for_bodies(dc, user, "Sent", 1) == [message]
    assert _imap_bodies(dc, user, "INBOX") == inbox  # POP took nothing away

    # the volume: key and grant, owned by the image's user, 0600; the grant opaque without the key
    gid = IMAGE_UID  # the image's group has the same number (docs/docker.md: chown 10110:10110)
    assert first.exec("id", "-g").stdout.strip() == str(gid)
    state = _token_dir_state(volume)
    [grant] = [name for name in state if name.endswith(SUFFIX)]
    assert state[KEY_FILE] == state[grant] == (IMAGE_UID, gid, 0o600), state
    assert state["."] == (IMAGE_UID, gid, 0o700), state
    assert all(owner == (IMAGE_UID, gid, 0o600) for n, owner in state.items() if n != "."), state
    key = parse_key((volume / KEY_FILE).read_text())
    assert [e.record.user for e in TokenStore(volume, key).listing() if e.record] == [user]
    [opaque] = TokenStore(volume, secrets.token_bytes(32)).listing()
    assert opaque.record is None and opaque.problem, opaque
    raw = (volume / grant).read_bytes()
    for plain in [*_issued_tokens(provider, user), DEVICE_PASSWORD, user]:
        assert plain.encode() not in raw

    # a new container from the same volume: the stored access token is dead by now, so the
    # first login must spend the stored refresh token (and store the rotated one)
    assert first.stop() == 0
    first_logs = first.logs()
    first.podman.remove([first.name])
    provider.expire_access_tokens(user)
    refreshes = provider.count("refresh_token")
    second = run_container(mounts, ca_file=dc.ca_file, **settings)
    second.wait_healthy()
    pop = poplib.POP3("127.0.0.1", second.ports.pop3, timeout=30)
    pop.stls(_unverified())
    pop.user(f"{user}#phone")
    pop.pass_(DEVICE_PASSWORD)
    assert [_retr_bytes(pop, n) for n in (1, 2, 3)] == inbox
    pop.quit()
    assert provider.count("refresh_token") == refreshes + 1
    assert _token_dir_state(volume) == state  # rewritten by the refresh, same owner and modes
    assert (volume / grant).read_bytes() != raw

    second_logs = second.logs()
    key_text = (volume / KEY_FILE).read_text().strip()
    for secret in [*_issued_tokens(provider, user), DEVICE_PASSWORD, key_text]:
        for where, text in (("login", printed), ("first", first_logs), ("second", second_logs)):
            assert secret not in text, f"a secret in the {where} container's output"
    assert "login ok" in second_logs, second_logs  # the log was captured at all


def test_the_images_own_configuration_serves_the_standard_ports_on_a_bridge_network(
    podman: Podman, image: str
) -> None:
    """Without listener overrides, as compose.yaml runs it: POP3 110/995 and submission
    587/465 bound by the unprivileged user (with the sysctl Docker sets by default), reached
    through published ports."""
    ports = Ports.free()
    http_port = free_port()
    name = f"popgate-test-{secrets.token_hex(4)}"
    published = {ports.pop3: 110, ports.pop3s: 995, ports.submission: 587, ports.submissions: 465}
    published[http_port] = 9110
    argv = ["run", "-d", "--name", name, "--sysctl", "net.ipv4.ip_unprivileged_port_start=0"]
    for host_port, port in published.items():
        argv += ["-p", f"127.0.0.1:{host_port}:{port}"]
    argv += ["-e", "POPGATE_UPSTREAM_IMAP_HOST=mail.invalid"]
    argv += ["-e", "POPGATE_UPSTREAM_SMTP_HOST=mail.invalid"]
    container = Container(podman, name, ports)
    try:
        podman.run(*argv, image, timeout=120)
        health = container.wait_healthy()
        # the image's own [http] listener: the healthcheck asks /healthz, no POP3 session
        assert health.strip() == "http 0.0.0.0:9110 /healthz: ok", health
        url = f"http://127.0.0.1:{http_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            metrics = response.read().decode()
        assert "\npopgate_pop3_sessions_total 0.0\n" in metrics, metrics
        pop = poplib.POP3("127.0.0.1", ports.pop3, timeout=30)
        assert pop.getwelcome().startswith(b"+OK")
        pop.stls(_unverified())
        pop.quit()
        with smtplib.SMTP("127.0.0.1", ports.submission, timeout=30) as client:
            client.starttls(context=_unverified())
            assert client.ehlo()[0] == 250
        assert container.exec("id", "-u").stdout.strip() == str(IMAGE_UID)
        assert container.stop() == 0
    finally:
        print(f"--- logs of {name}:\n{container.logs()}", file=sys.stderr)
        podman.remove([name])


# --------------------------------------------------------------------- the healthcheck itself
def test_the_healthcheck_fails_when_a_configured_submission_listener_does_not_answer(
    submission_gateway: Callable[..., GatewayProcess], mail_user: MailUser
) -> None:
    """The image's HEALTHCHECK script, run on the host against a real popgate: healthy with
    every listener answering, unhealthy when one submission listener is silent."""
    gw = submission_gateway(mail_user)
    by_kind = {(lst.protocol, lst.kind): lst.address for lst in gw.listeners}
    env = {k: v for k, v in os.environ.items() if not k.startswith("POPGATE_")}
    env |= {
        "POPGATE_POP3_LISTEN": by_kind[("pop3", "plain")],
        "POPGATE_POP3_LISTEN_TLS": by_kind[("pop3", "tls")],
        "POPGATE_SUBMISSION_LISTEN": by_kind[("submission", "plain")],
        "POPGATE_SUBMISSION_LISTEN_TLS": by_kind[("submission", "tls")],
    }

    def check(**more: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(DOCKER / "healthcheck.py"), "-c", str(gw.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env | more,
            cwd=ROOT,
        )

    healthy = check()
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert healthy.stdout.count(": ok") == 4
    silent = f"127.0.0.1:{free_port()}"
    sick = check(POPGATE_SUBMISSION_LISTEN_TLS=silent)
    assert sick.returncode == 1, sick.stdout
    assert re.search(rf"submission {re.escape(silent)} \(tls\): .*refused", sick.stdout)
    # a greeting of the other protocol is not health either (the two plain ports swapped)
    crossed = check(
        POPGATE_POP3_LISTEN=by_kind[("submission", "plain")],
        POPGATE_SUBMISSION_LISTEN=by_kind[("pop3", "plain")],
    )
    assert crossed.returncode == 1
    assert re.search(r"^pop3 .*\(plain\): unexpected greeting b'220 ", crossed.stdout, re.M)
    assert re.search(r"^submission .*\(plain\): unexpected greeting b'\+OK", crossed.stdout, re.M)


def test_the_healthcheck_asks_healthz_when_http_is_configured(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    """With ``[http]`` the HEALTHCHECK script asks /healthz and opens no POP3 session; a silent
    HTTP listener, or one that answers something else, is unhealthy."""
    gw = start_gateway(http={"listen": ["127.0.0.1:0"]})
    http = f"127.0.0.1:{gw.port('http')}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("POPGATE_")}

    def check(listen: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(DOCKER / "healthcheck.py"), "-c", str(gw.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env | {"POPGATE_HTTP_LISTEN": listen},
            cwd=ROOT,
        )

    healthy = check(http)
    assert (healthy.returncode, healthy.stdout) == (0, f"http {http} /healthz: ok\n")
    assert " connect " not in gw.log_text()  # no POP3 session was opened
    silent = f"127.0.0.1:{free_port()}"
    sick = check(silent)
    assert sick.returncode == 1, sick.stdout
    assert re.match(rf"http {re.escape(silent)} /healthz: .*refused", sick.stdout), sick.stdout
    # a POP3 port is not an HTTP health endpoint
    crossed = check(f"127.0.0.1:{gw.pop3_port}")
    assert crossed.returncode == 1, crossed.stdout
    assert re.match(r"http .* /healthz: .*\+OK", crossed.stdout), crossed.stdout + crossed.stderr


# --------------------------------------------------------------------- the files
def test_the_containers_config_is_valid_and_configures_pop3_and_submission() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("POPGATE_")}
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "-c", str(DOCKER / "popgate.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean | {"POPGATE_UPSTREAM_IMAP_HOST": "imap.example.net"},
    )
    assert result.returncode == 0, result.stderr
    assert 'host = "imap.example.net"' in result.stdout
    for line in (
        'listen = ["0.0.0.0:110"]',
        'listen_tls = ["0.0.0.0:995"]',
        'listen = ["0.0.0.0:587"]',
        'listen_tls = ["0.0.0.0:465"]',
        'spool_dir = "/var/spool/popgate"',
        'listen = ["0.0.0.0:9110"]',
    ):
        assert line in result.stdout


def test_the_dockerfile_uses_one_base_image_given_as_an_argument() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    froms = re.findall(r"^FROM (.*)$", text, flags=re.M)
    assert froms == ["${BASE} AS build", "${BASE}"]
    assert "ARG BASE=python:3.11-slim-bookworm\n" in text
    assert re.search(r"^USER popgate$", text, flags=re.M)
    assert re.search(r"^EXPOSE 110 995 587 465 9110$", text, flags=re.M)
