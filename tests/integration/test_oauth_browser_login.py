"""``popgate oauth login --flow browser`` as an operator runs it: the CLI as a subprocess, the
local identity provider's real ``/authorize`` and ``/token`` endpoints, and the test as the
browser (a real HTTP request with the provider's session cookie, following the redirect to
popgate's loopback listener, or stopping there so the address can be pasted on stdin).
"""

from __future__ import annotations

import base64
import os
import queue
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from gateway.oauth.store import TokenStore
from tests.support.oauth_provider import OAuthProvider

pytest_plugins = ("tests.support.oauth_fixtures",)

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "scanner-pass-77"
DEADLINE = 60.0


class Login:
    """A running ``popgate oauth login``: its output read line by line as it comes."""

    def __init__(self, tmp: Path, idp: OAuthProvider, user: str, *extra: str) -> None:
        self.key = os.urandom(32)
        (tmp / "token.key").write_text(base64.b64encode(self.key).decode() + "\n")
        self.token_dir = tmp / "tokens"
        config = tmp / "popgate.toml"
        # custom with only the authorization endpoint: the browser flow is the default
        config.write_text(
            f"""[upstream.imap]
host = "127.0.0.1"
auth = "oauth2"

[oauth2]
authorization_url = "{idp.authorization_url}"
token_url = "{idp.token_url}"
client_id = "{idp.client_id}"
scopes = ["mail", "offline_access"]
token_dir = "tokens"
token_key_file = "token.key"
"""
        )
        password_file = tmp / "device-password"
        password_file.write_text(PASSWORD + "\n")
        argv = [sys.executable, "-m", "gateway", "oauth", "login", "-c", str(config), user]
        argv += ["--device-password-file", str(password_file), *extra]
        self.process = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.errors: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._read_errors, daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _read_errors(self) -> None:
        assert self.process.stderr is not None
        self.errors.extend(self.process.stderr)

    def wait_for(self, pattern: str) -> re.Match[str]:
        """The first output line matching ``pattern``, waiting at most DEADLINE seconds."""
        while True:
            try:
                line = self.lines.get(timeout=DEADLINE)
            except queue.Empty:
                raise AssertionError(f"no line like {pattern!r}: {self.seen}") from None
            if line is None:
                raise AssertionError(f"output ended without {pattern!r}: {self.seen}")
            self.seen.append(line)
            found = re.search(pattern, line)
            if found:
                return found

    def authorization_url(self) -> str:
        return self.wait_for(r"^  (http://\S+)$").group(1)

    def paste(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def finish(self) -> tuple[int, str, str]:
        """Exit status, all of stdout, all of stderr."""
        try:
            self.process.wait(timeout=DEADLINE)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        for reader in self.readers:
            reader.join(DEADLINE)
        rest = []
        while (line := self.lines.get(timeout=DEADLINE)) is not None:
            rest.append(line)
        return self.process.returncode, "".join(self.seen + rest), "".join(self.errors)

    def store(self) -> TokenStore:
        return TokenStore(self.token_dir, self.key)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def browse(url: str, cookie: str, *, follow: bool) -> tuple[int, str, str]:
    """GET ``url`` as the operator's browser, signed in at the provider with ``cookie``:
    (final status, final URL or the Location not followed, page text)."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if not follow:
        handlers.append(_NoRedirect())
    opener = urllib.request.build_opener(*handlers)
    request = urllib.request.Request(url, headers={"Cookie": cookie})
    try:
        with opener.open(request, timeout=DEADLINE) as answer:
            return answer.status, answer.url, answer.read().decode()
    except urllib.error.HTTPError as error:
        location = error.headers.get("Location") or error.url
        return error.code, location, error.read().decode()


def replace_param(url: str, name: str, value: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    query[name] = value
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def assert_no_secrets(idp: OAuthProvider, text: str) -> None:
    secrets = idp.issued_codes() + idp.code_verifiers
    secrets += [t for t in idp._state.access] + [t for t in idp._state.refresh]
    for secret in secrets:
        assert secret not in text


# --------------------------------------------------------------------------- tests
def test_loopback_listener_catches_the_redirect(
    tmp_path: Path, oauth_provider: OAuthProvider
) -> None:
    login = Login(tmp_path, oauth_provider, "alice")
    url = login.authorization_url()
    asked = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    redirect_uri = login.wait_for(r"browser is sent to (http://127\.0\.0\.1:\d+/),").group(1)
    assert asked["redirect_uri"] == redirect_uri
    assert asked["code_challenge_method"] == "S256"
    assert asked["response_type"] == "code"
    assert asked["scope"] == "mail offline_access"
    assert len(asked["state"]) >= 43 and len(asked["code_challenge"]) == 43

    status, final_url, page = browse(url, "session=alice", follow=True)
    assert (status, final_url.split("?")[0]) == (200, redirect_uri)
    assert "popgate received the sign-in" in page
    code, out, err = login.finish()
    assert code == 0, out + err
    assert "Stored the grant of alice" in out
    record = login.store().read("alice")
    assert record is not None and record.password.matches(PASSWORD)
    assert record.refresh_token in oauth_provider.live_refresh_tokens("alice")
    assert oauth_provider.count("authorization_code") == 1
    assert oauth_provider.authorization_requests[0]["state"] == asked["state"]
    assert_no_secrets(oauth_provider, out + err)


def test_pasted_address_completes_the_login(tmp_path: Path, oauth_provider: OAuthProvider) -> None:
    login = Login(tmp_path, oauth_provider, "bob", "--flow", "browser")
    url = login.authorization_url()
    # The browser is elsewhere: the redirect to 127.0.0.1 "can't be reached" there.
    status, location, _ = browse(url, "session=bob", follow=False)
    assert status == 302 and "code=" in location
    login.paste("something else entirely")
    login.wait_for(r"^This is not the answer to popgate's sign-in request")
    login.paste(location)
    code, out, err = login.finish()
    assert code == 0, out + err
    record = login.store().read("bob")
    assert record is not None and record.user == "bob"
    assert oauth_provider.count("authorization_code") == 1
    assert_no_secrets(oauth_provider, out + err)


def test_wrong_state_is_refused_and_nothing_stored(
    tmp_path: Path, oauth_provider: OAuthProvider
) -> None:
    login = Login(tmp_path, oauth_provider, "carol", "--flow", "browser")
    url = login.authorization_url()
    _, location, _ = browse(url, "session=carol", follow=False)
    login.paste(replace_param(location, "state", "forged-" + "x" * 40))
    code, out, err = login.finish()
    assert code == 1
    assert err.startswith(
        "popgate: login of carol failed: the redirect has the state of another sign-in,"
        " not this login's: refused"
    ), err
    assert login.store().read("carol") is None
    assert oauth_provider.count("authorization_code") == 0  # the code was never exchanged
    assert_no_secrets(oauth_provider, out + err)


def test_access_denied_redirect_ends_the_login(
    tmp_path: Path, oauth_provider: OAuthProvider
) -> None:
    login = Login(tmp_path, oauth_provider, "dan")
    url = login.authorization_url()
    status, _, page = browse(url, "session=dan; consent=deny", follow=True)
    assert status == 400 and "the sign-in was refused (access_denied)" in page
    code, _, err = login.finish()
    assert code == 1
    assert err == (
        "popgate: login of dan failed: the sign-in was refused (access_denied): the user said no\n"
    )
    assert login.store().read("dan") is None
    assert oauth_provider.count("token") == 0


def test_invalid_code_is_refused_by_the_token_endpoint(
    tmp_path: Path, oauth_provider: OAuthProvider
) -> None:
    login = Login(tmp_path, oauth_provider, "erin")
    url = login.authorization_url()
    _, location, _ = browse(url, "session=erin", follow=False)
    login.paste(replace_param(location, "code", "not-a-code-the-provider-issued"))
    code, _, err = login.finish()
    assert code == 1
    assert err == (
        "popgate: login of erin failed: the provider refused the authorization code:"
        " invalid_grant: unknown or spent code\n"
    )
    assert login.store().read("erin") is None
    assert oauth_provider.count("authorization_code") == 1


def test_redirect_port_taken_is_a_clear_failure(
    tmp_path: Path, oauth_provider: OAuthProvider
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        login = Login(tmp_path, oauth_provider, "fay", "--redirect-port", str(port))
        code, _, err = login.finish()
    assert code == 1
    assert err.startswith(f"popgate: login of fay failed: cannot listen on 127.0.0.1:{port}")
    assert oauth_provider.count("authorize") == 0


def test_browser_flow_needs_the_authorization_url(
    tmp_path: Path, oauth_provider: OAuthProvider
) -> None:
    config = tmp_path / "popgate.toml"
    config.write_text(
        f"""[upstream.imap]
host = "127.0.0.1"
auth = "oauth2"

[oauth2]
device_authorization_url = "{oauth_provider.device_authorization_url}"
token_url = "{oauth_provider.token_url}"
client_id = "{oauth_provider.client_id}"
token_dir = "tokens"
"""
    )
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    base = [sys.executable, "-m", "gateway", "oauth", "login", "-c", str(config), "gina"]
    base += ["--device-password-file", str(tmp_path / "pw")]
    for extra, message in [
        (
            ["--flow", "browser"],
            f"{config}: [oauth2] authorization_url: required for popgate oauth login"
            " --flow browser\n",
        ),
        (["--redirect-port", "70000"], "not a port number: '70000'"),
    ]:
        run = subprocess.run(
            base + extra, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=DEADLINE, check=False,
        )  # fmt: skip
        assert run.returncode == 2, run.stderr
        assert message in run.stderr
    assert oauth_provider.requests == {}
