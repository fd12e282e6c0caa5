"""``popgate oauth login|list|remove`` as an operator runs them: the CLI as a subprocess against
the local identity provider, asserting its transcript, exit status and what it stored."""

from __future__ import annotations

import base64
import os
import pty
import re
import select
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from gateway.oauth.store import TokenStore
from tests.support.oauth_provider import OAuthProvider, free_port_refused

pytest_plugins = ("tests.support.oauth_fixtures",)

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "scanner-pass-77"


class Cli:
    def __init__(self, tmp: Path, idp: OAuthProvider, token_url: str | None = None) -> None:
        self.tmp = tmp
        self.key = os.urandom(32)
        (tmp / "token.key").write_text(base64.b64encode(self.key).decode() + "\n")
        self.token_dir = tmp / "tokens"
        self.config = tmp / "popgate.toml"
        self.config.write_text(
            f"""[upstream.imap]
host = "127.0.0.1"
auth = "oauth2"

[oauth2]
device_authorization_url = "{idp.device_authorization_url}"
token_url = "{token_url or idp.token_url}"
client_id = "{idp.client_id}"
scopes = ["mail", "offline_access"]
token_dir = "tokens"
token_key_file = "token.key"
"""
        )
        self.password_file = tmp / "device-password"
        self.password_file.write_text(PASSWORD + "\n")

    @property
    def store(self) -> TokenStore:
        return TokenStore(self.token_dir, self.key)

    def argv(self, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "gateway",
            "oauth",
            args[0],
            "-c",
            str(self.config),
            *args[1:],
        ]

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*args),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def login(self, user: str, *extra: str) -> subprocess.Popen[str]:
        return self.start("login", user, "--device-password-file", str(self.password_file), *extra)


@pytest.fixture
def cli(tmp_path: Path, oauth_provider: OAuthProvider) -> Cli:
    return Cli(tmp_path, oauth_provider)


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


def expect_lines(text: str, patterns: Sequence[str]) -> None:
    lines = text.splitlines()
    assert len(lines) == len(patterns), text
    for line, pattern in zip(lines, patterns, strict=True):
        assert re.fullmatch(pattern, line), f"{line!r} !~ {pattern!r}"


def test_login_prints_where_to_sign_in_and_stores_the_grant(
    cli: Cli, oauth_provider: OAuthProvider
) -> None:
    process = cli.login("alice")
    code = oauth_provider.wait_for_user_code()
    oauth_provider.approve(code, "alice")
    status, out, err = finish(process)
    base = re.escape(oauth_provider.verification_uri)
    expect_lines(
        out,
        [
            r"To sign in alice, open " + base,
            r"and enter the code " + re.escape(code),
            r"\(or open " + base + r"\?user_code=" + re.escape(code) + r"\)",
            r"Waiting for the sign-in; the code expires in 10 minutes\.",
            r"Stored the grant of alice in .*/tokens\.",
            r"Devices log in as alice \(or alice#DEVICE\) with the device password\.",
        ],
    )
    assert (status, err) == (0, "")
    record = cli.store.read("alice")
    assert record is not None
    assert oauth_provider.live_refresh_tokens("alice") == [record.refresh_token]
    assert oauth_provider.is_active(record.access_token)
    assert record.password.matches(PASSWORD) and not record.password.matches("other")

    listed = cli.run("list")
    assert listed.returncode == 0
    expect_lines(
        listed.stdout,
        [
            r"USER\s+SIGNED IN\s+TOKEN AGE\s+LAST REFRESH\s+ACCESS TOKEN",
            r"alice\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ\s+\d+[sm]\s+\d+[sm] ago\s+valid 5\dm",
        ],
    )
    for secret in (record.refresh_token, record.access_token, record.password.hash):
        assert secret not in listed.stdout + out + err


def test_slow_down_is_reported_at_once_and_the_login_still_succeeds(tmp_path: Path) -> None:
    with OAuthProvider(slow_downs_per_code=1) as idp:
        cli = Cli(tmp_path, idp)
        process = cli.login("bob")
        assert process.stdout is not None
        lines = []
        while not (lines and lines[-1].startswith("(the provider asked")):
            line = process.stdout.readline()  # bounded: the CLI exits at the latest at expiry
            assert line, f"the CLI ended before reporting slow_down: {lines}"
            lines.append(line.rstrip("\n"))
        assert lines[-1] == "(the provider asked to poll more slowly: every 5 s now)"
        assert idp.count("device_code") == 1  # reported before the next poll
        idp.approve(idp.wait_for_user_code(), "bob")
        status, out, err = finish(process)
        assert (status, err) == (0, "")
        assert out.startswith("Stored the grant of bob")
        assert idp.count("device_code") >= 2


@pytest.mark.parametrize(
    ("control", "message"),
    [
        ("deny", "popgate: login of carol failed: the sign-in was refused (access_denied)"),
        (
            "expire_device_code",
            "popgate: login of carol failed: the code expired before the sign-in was completed;"
            " run the command again",
        ),
    ],
)
def test_denial_and_expiry_fail_with_a_message_and_store_nothing(
    cli: Cli, oauth_provider: OAuthProvider, control: str, message: str
) -> None:
    process = cli.login("carol")
    getattr(oauth_provider, control)(oauth_provider.wait_for_user_code())
    status, out, err = finish(process)
    assert status == 1
    assert err.splitlines() == [message]
    assert "To sign in carol" in out and "Stored" not in out
    assert cli.store.read("carol") is None


def test_short_lived_device_code_expires_while_polling(
    tmp_path: Path,
) -> None:
    with OAuthProvider(interval=1, device_code_lifetime=3) as idp:
        cli = Cli(tmp_path, idp)
        status, out, err = finish(cli.login("dan"))
    assert status == 1
    assert "the code expires in 3 seconds" in out
    assert "the code expired before the sign-in was completed" in err
    assert 1 <= idp.count("device_code") <= 3


def test_unreachable_provider_and_bad_input(cli: Cli, tmp_path: Path) -> None:
    no_password = cli.run("login", "erin")
    assert no_password.returncode == 2
    assert no_password.stderr == (
        "popgate: no terminal to ask the device password on: pass --device-password-file FILE\n"
    )
    short = tmp_path / "short"
    short.write_text("abc\n")
    too_short = cli.run("login", "erin", "--device-password-file", str(short))
    assert (too_short.returncode, too_short.stderr) == (
        2,
        "popgate: the device password must be one line of at least 8 characters\n",
    )
    device = cli.run("login", "erin#printer", "--device-password-file", str(cli.password_file))
    assert device.returncode == 2 and "'#' is the device separator" in device.stderr

    text = cli.config.read_text()
    port = free_port_refused()
    cli.config.write_text(
        re.sub(
            r'device_authorization_url = ".*"',
            f'device_authorization_url = "http://127.0.0.1:{port}/d"',
            text,
        )
    )
    down = cli.run("login", "erin", "--device-password-file", str(cli.password_file))
    assert down.returncode == 1
    assert down.stderr.startswith(
        "popgate: login of erin failed: the provider's device authorization endpoint:"
    )
    assert cli.store.read("erin") is None


def test_list_and_remove(cli: Cli, oauth_provider: OAuthProvider) -> None:
    assert cli.run("list").stdout == f"no grants in {cli.token_dir}\n"
    for user in ("zed", "amy"):
        process = cli.login(user)
        oauth_provider.approve(
            oauth_provider.wait_for_user_code(after=["zed", "amy"].index(user)), user
        )
        assert finish(process)[0] == 0
    listed = cli.run("list").stdout.splitlines()
    assert [line.split()[0] for line in listed] == ["USER", "amy", "zed"]

    removed = cli.run("remove", "zed")
    assert (removed.returncode, removed.stdout) == (
        0,
        "Removed the grant of zed; its devices can no longer log in.\n",
    )
    assert [line.split()[0] for line in cli.run("list").stdout.splitlines()] == ["USER", "amy"]
    again = cli.run("remove", "zed")
    assert (again.returncode, again.stderr) == (
        1,
        f"popgate: no grant stored for zed in {cli.token_dir}\n",
    )


def test_login_asks_the_device_password_twice_on_a_terminal(
    cli: Cli, oauth_provider: OAuthProvider
) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: popgate on a terminal
        os.chdir(ROOT)
        os.execv(sys.executable, cli.argv("login", "tty-user"))
    transcript = b""

    def read_until(marker: bytes) -> None:
        nonlocal transcript
        while marker not in transcript:
            ready, _, _ = select.select([fd], [], [], 30)
            assert ready, f"no {marker!r} within 30 s: {transcript!r}"
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            assert chunk, f"terminal closed before {marker!r}: {transcript!r}"
            transcript += chunk

    read_until(b"Device password")
    os.write(fd, PASSWORD.encode() + b"\n")
    read_until(b"Again: ")
    os.write(fd, PASSWORD.encode() + b"\n")
    read_until(b"Waiting for the sign-in")
    oauth_provider.approve(oauth_provider.wait_for_user_code(), "tty-user")
    read_until(b"with the device password.")
    _, wait_status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    assert PASSWORD.encode() not in transcript  # not echoed
    record = cli.store.read("tty-user")
    assert record is not None and record.password.matches(PASSWORD)
