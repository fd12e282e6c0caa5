"""Real POP3 clients download a seeded mailbox; every byte must survive.

Each test runs against ``dovecot-pop3`` (Dovecot's own POP3 on the same user: proves the
test and the client handling right) and ``popgate`` (the gateway in front of the same
server over IMAP), once with Dovecot and once with Cyrus upstream; Cyrus users have no
Dovecot POP3, so there the ``dovecot-pop3`` target is not collected, and the stored bytes read
over IMAP, which every test compares with, are the reference. The mailbox holds lines starting
with "." and "..", a ~300 KB message with a base64 attachment, a body without a final newline,
and 8-bit UTF-8.

What the clients legitimately change, and what the tests undo, precisely:
- POP3 itself: a message that does not end with CRLF gets one (the terminating "." must
  start a line), so the expected download is ``message + CRLF`` for that message;
- fetchmail (MDA), mpop and getmail (maildir) store LF line ends;
- getmail prepends ``Return-Path: <unknown>`` (POP3 has no envelope sender);
- Received headers are switched off (fetchmail ``set invisible``, mpop
  ``--received-header=off``, getmail ``received = false``, ``delivered_to = false``).
"""

from __future__ import annotations

import os
import poplib
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import TARGETS, Pop3Endpoint, SeededUser
from tests.support import messages
from tests.support.upstreams import Upstream

pytestmark = pytest.mark.integration

CLIENT_TIMEOUT = 120  # seconds for one client run; the whole mailbox is ~420 KB
CRLF = b"\r\n"
_MESSAGE_ID_RE = re.compile(rb"^Message-ID: *(<[^>\r\n]+>)", re.MULTILINE | re.IGNORECASE)


# --------------------------------------------------------------------- helpers
def pop3_form(message: bytes) -> bytes:
    """What a POP3 client receives for ``message`` after un-dot-stuffing."""
    return message if message.endswith(CRLF) else message + CRLF


def lf_form(message: bytes) -> bytes:
    """What a client that stores Unix line ends writes for ``message``."""
    return pop3_form(message).replace(CRLF, b"\n")


def message_id(message: bytes) -> bytes:
    m = _MESSAGE_ID_RE.search(message)
    assert m, f"no Message-ID in {message[:200]!r}"
    return m.group(1)


def first_difference(got: bytes, expected: bytes) -> str:
    i = next(
        (n for n, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
        min(len(got), len(expected)),
    )
    return (
        f"lengths {len(got)} (got) vs {len(expected)} (expected); first difference at "
        f"byte {i}:\n  got      {got[max(0, i - 60) : i + 60]!r}\n"
        f"  expected {expected[max(0, i - 60) : i + 60]!r}"
    )


def assert_same_messages(
    client: str, got: Sequence[bytes], expected: Sequence[bytes], *, ordered: bool
) -> None:
    """Every expected message arrived exactly once, byte for byte."""
    assert len(got) == len(expected), (
        f"{client}: downloaded {len(got)} messages, expected {len(expected)}: "
        f"{[message_id(g) for g in got]}"
    )
    if ordered:
        pairs = list(zip(got, expected, strict=True))
    else:
        by_id = {message_id(g): g for g in got}
        assert len(by_id) == len(got), f"{client}: a message arrived twice"
        pairs = [(by_id.get(message_id(e), b""), e) for e in expected]
    for g, e in pairs:
        assert g == e, f"{client}: message {message_id(e)!r} differs: {first_difference(g, e)}"


def run_client(
    argv: Sequence[str], *, env: dict[str, str] | None = None, ok: Sequence[int] = (0,)
) -> subprocess.CompletedProcess[bytes]:
    exe = shutil.which(argv[0])
    if exe is None:
        pytest.fail(f"{argv[0]} is not installed: run ./tests/bootstrap.sh")
    proc = subprocess.run(
        [exe, *argv[1:]],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=CLIENT_TIMEOUT,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert proc.returncode in ok, (
        f"{argv[0]} exited {proc.returncode}\nargv: {list(argv)}\n"
        f"stdout:\n{proc.stdout.decode(errors='replace')[-4000:]}\n"
        f"stderr:\n{proc.stderr.decode(errors='replace')[-4000:]}"
    )
    return proc


def read_maildir(path: Path) -> list[bytes]:
    files = [p for sub in ("new", "cur") for p in sorted((path / sub).iterdir())]
    return [p.read_bytes() for p in files]


def assert_mailbox_untouched(upstream: Upstream, mailbox: SeededUser) -> None:
    """The clients ran with "keep": every message is still there, under the same UID."""
    assert upstream.list_uids(mailbox.name, mailbox.password) == mailbox.uids


DELIVER_SCRIPT = """\
import os, sys
out = sys.argv[1]
data = sys.stdin.buffer.read()
with open(os.path.join(out, "%04d.eml" % (len(os.listdir(out)) + 1)), "wb") as f:
    f.write(data)
"""


# --------------------------------------------------------------------- fixtures
@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def mailbox(seeded_user: Callable[..., SeededUser]) -> SeededUser:
    return seeded_user(messages.corpus())


@pytest.fixture
def endpoint(pop3_endpoint: Callable[..., Pop3Endpoint], target: str) -> Pop3Endpoint:
    return pop3_endpoint(target)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temp dir that uid 65534 can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="popgate-client-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------- the clients
@pytest.mark.parametrize("security", ["plain", "stls", "tls"])
def test_curl(
    endpoint: Pop3Endpoint, mailbox: SeededUser, upstream: Upstream, tmp_path: Path, security: str
) -> None:
    """curl: LIST, then RETR of every message over one connection."""
    scheme, port = ("pop3s", endpoint.tls_port) if security == "tls" else ("pop3", endpoint.port)
    base = (
        f"{scheme}://{quote(mailbox.name, safe='')}:{quote(mailbox.password, safe='')}"
        f"@{endpoint.host}:{port}"
    )
    common = ["curl", "--silent", "--show-error", "--max-time", "60"]
    if security != "plain":
        common += ["--cacert", str(endpoint.ca_file)]
    if security == "stls":
        common += ["--ssl-reqd"]

    listing = run_client([*common, f"{base}/"]).stdout
    lines = listing.split(CRLF)
    assert lines[-1] == b"", listing
    sizes = {int(n): int(s) for n, s in (line.split() for line in lines[:-1])}
    assert sizes == {n: len(m) for n, m in enumerate(mailbox.messages, 1)}

    argv = list(common)
    for n in range(1, len(mailbox.messages) + 1):
        argv += [f"{base}/{n}", "-o", str(tmp_path / f"{n}.eml")]
    run_client(argv)
    got = [(tmp_path / f"{n}.eml").read_bytes() for n in range(1, len(mailbox.messages) + 1)]
    assert_same_messages("curl", got, [pop3_form(m) for m in mailbox.messages], ordered=True)
    assert_mailbox_untouched(upstream, mailbox)


def test_poplib(endpoint: Pop3Endpoint, mailbox: SeededUser, upstream: Upstream) -> None:
    """Python's poplib: STLS, USER/PASS, STAT, LIST, UIDL, RETR every message."""
    pop = poplib.POP3(endpoint.host, endpoint.port, timeout=60)
    try:
        pop.stls(context=ssl.create_default_context(cafile=str(endpoint.ca_file)))
        pop.user(mailbox.name)
        pop.pass_(mailbox.password)
        count, total = pop.stat()
        assert count == len(mailbox.messages)
        assert total == sum(len(m) for m in mailbox.messages)
        listing = [line.split() for line in pop.list()[1]]
        assert [(int(n), int(s)) for n, s in listing] == [
            (n, len(m)) for n, m in enumerate(mailbox.messages, 1)
        ]
        uidls = [line.split()[1] for line in pop.uidl()[1]]
        assert len(set(uidls)) == count
        assert all(re.fullmatch(rb"[\x21-\x7e]{1,70}", u) for u in uidls), uidls
        got = []
        for n in range(1, count + 1):
            _resp, lines, _octets = pop.retr(n)
            got.append(b"".join(line + CRLF for line in lines))
    finally:
        pop.quit()
    assert_same_messages("poplib", got, [pop3_form(m) for m in mailbox.messages], ordered=True)
    assert_mailbox_untouched(upstream, mailbox)


def test_fetchmail(
    endpoint: Pop3Endpoint, mailbox: SeededUser, upstream: Upstream, tmp_path: Path
) -> None:
    """fetchmail over STLS with certificate check, UIDL tracking, delivery to an MDA."""
    out = tmp_path / "out"
    out.mkdir()
    deliver = tmp_path / "deliver.py"
    deliver.write_text(DELIVER_SCRIPT)

    def rc(fetchall: bool) -> Path:
        path = tmp_path / f"fetchmailrc-{int(fetchall)}"
        path.write_text(
            textwrap.dedent(
                f"""\
                set invisible
                set no bouncemail
                set no syslog
                poll {endpoint.host} with proto POP3 port {endpoint.port} uidl
                  user "{mailbox.name}" there with password "{mailbox.password}" is "root" here
                  keep {"fetchall" if fetchall else "no fetchall"} no rewrite
                  sslproto "TLS1.2+" sslcertck sslcertfile "{endpoint.ca_file}"
                  sslcommonname "localhost"
                  mda "{sys.executable} {deliver} {out}"
                """
            )
        )
        os.chmod(path, 0o600)
        return path

    env = {"FETCHMAILHOME": str(tmp_path), "HOME": str(tmp_path)}
    argv = ["fetchmail", "--nodetach", "--idfile", str(tmp_path / "ids")]
    argv += ["--pidfile", str(tmp_path / "fetchmail.pid")]
    run_client([*argv, "-f", str(rc(fetchall=True))], env=env)
    got = [p.read_bytes() for p in sorted(out.iterdir())]
    assert_same_messages("fetchmail", got, [lf_form(m) for m in mailbox.messages], ordered=True)

    # Again without "fetchall": fetchmail knows every UIDL now, so there is nothing new
    # (exit status 1 = no mail).
    run_client([*argv, "-f", str(rc(fetchall=False))], env=env, ok=(1,))
    assert len(list(out.iterdir())) == len(mailbox.messages)
    assert_mailbox_untouched(upstream, mailbox)


def test_mpop(
    endpoint: Pop3Endpoint, mailbox: SeededUser, upstream: Upstream, tmp_path: Path
) -> None:
    """mpop over STARTTLS with a trust file, maildir delivery, UIDLs in a file."""
    maildir = tmp_path / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    config = tmp_path / "mpoprc"
    config.write_text("")
    os.chmod(config, 0o600)
    argv = [
        "mpop",
        f"--file={config}",
        f"--host={endpoint.host}",
        f"--port={endpoint.port}",
        "--timeout=60",
        "--auth=user",
        f"--user={mailbox.name}",
        f"--passwordeval=printf %s '{mailbox.password}'",
        "--tls=on",
        "--tls-starttls=on",
        f"--tls-trust-file={endpoint.ca_file}",
        "--keep=on",
        "--received-header=off",
        f"--delivery=maildir,{maildir}",
        f"--uidls-file={tmp_path / 'uidls'}",
        "--half-quiet",
    ]
    run_client([*argv, "--only-new=off"])
    got = read_maildir(maildir)
    assert_same_messages("mpop", got, [lf_form(m) for m in mailbox.messages], ordered=False)

    # UIDLs are stable: a second run that takes only new mail finds none.
    run_client([*argv, "--only-new=on"])
    assert len(read_maildir(maildir)) == len(mailbox.messages)
    assert_mailbox_untouched(upstream, mailbox)


@pytest.mark.parametrize("retriever", ["SimplePOP3Retriever", "SimplePOP3SSLRetriever"])
def test_getmail(
    endpoint: Pop3Endpoint,
    mailbox: SeededUser,
    upstream: Upstream,
    tmp_path: Path,
    shared_tmp: Path,
    retriever: str,
) -> None:
    """getmail6 into a Maildir, read_all, no delete; plain POP3 and implicit TLS."""
    maildir = shared_tmp / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    deliver_as = ""
    if os.geteuid() == 0:  # getmail refuses to deliver as root
        deliver_as = "user = nobody\n"
        for p in (maildir, *(maildir / s for s in ("new", "cur", "tmp"))):
            os.chown(p, 65534, 65534)
    tls = retriever == "SimplePOP3SSLRetriever"
    port = endpoint.tls_port if tls else endpoint.port
    getmaildir = tmp_path / "getmail"
    getmaildir.mkdir()
    (getmaildir / "getmailrc").write_text(
        "[retriever]\n"
        f"type = {retriever}\n"
        f"server = {endpoint.host}\n"
        f"port = {port}\n"
        f"username = {mailbox.name}\n"
        f"password = {mailbox.password}\n"
        + (f"ca_certs = {endpoint.ca_file}\n" if tls else "")
        + "\n[destination]\n"
        "type = Maildir\n"
        f"path = {maildir}/\n"
        f"{deliver_as}"
        "\n[options]\n"
        "read_all = true\n"
        "delete = false\n"
        "received = false\n"
        "delivered_to = false\n"
        "verbose = 0\n"
    )
    run_client(["getmail", f"--getmaildir={getmaildir}", "--rcfile=getmailrc"])
    got = read_maildir(maildir)
    prefix = b"Return-Path: <unknown>\n"
    for g in got:
        assert g.startswith(prefix), g[:200]
    got = [g[len(prefix) :] for g in got]
    assert_same_messages("getmail", got, [lf_form(m) for m in mailbox.messages], ordered=False)
    assert_mailbox_untouched(upstream, mailbox)
