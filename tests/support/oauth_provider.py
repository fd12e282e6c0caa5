"""A local OAuth 2.0 identity provider for the tests: a real HTTP server on 127.0.0.1.

It speaks what popgate and Dovecot's ``oauth2`` passdb use, over real sockets (stdlib
``http.server`` in a thread of the test process, so tests can drive it directly):

``POST /device_authorization``  RFC 8628 3.1/3.2: ``client_id``, ``scope`` → ``device_code``,
    ``user_code``, ``verification_uri``, ``verification_uri_complete``, ``expires_in``,
    ``interval``.
``POST /token``  RFC 6749 / RFC 8628 3.4/3.5:
    ``grant_type=urn:ietf:params:oauth:grant-type:device_code``: ``authorization_pending``
    until a test approves the user code, ``slow_down`` when polled faster than the interval
    (or when forced; the interval then grows by 5 s, as RFC 8628 says), ``expired_token``,
    ``access_denied``; then the tokens.
    ``grant_type=refresh_token``: rotation: every refresh returns a new refresh token and the
    old one is dead at once (``invalid_grant``). With ``rotation_grace`` > 0 s the previous
    refresh token keeps working for that long after it was rotated (Microsoft and Google both
    tolerate a little overlap in practice); the default is 0, the strict case.
``GET /authorize``  RFC 6749 4.1.1 with RFC 7636 (PKCE ``S256`` required): the browser's
    side of the authorization-code flow. The "browser" (a test's HTTP request) carries a
    session cookie ``session=USER`` (signed in as USER; without it: 401, no redirect) and
    ``consent=deny`` to refuse. A bad ``client_id`` or ``redirect_uri`` (only
    ``http://127.0.0.1:PORT/...`` is registered, RFC 8252 7.3) gets a 400 page, never a
    redirect (RFC 6749 4.1.2.1); otherwise a 302 to ``redirect_uri?code=..&state=..`` or
    ``?error=access_denied&state=..``.
``POST /token`` ``grant_type=authorization_code``: the code (single use, 10 minutes), the same
    ``redirect_uri`` and a ``code_verifier`` whose S256 is the challenge, else
    ``invalid_grant``.
``POST /introspect`` (also ``GET ?token=`` and ``GET`` with ``Authorization: Bearer``): RFC 7662
    ``{"active": true, "username": USER, ...}`` for a live access token, ``{"active": false}``
    otherwise. That is what Dovecot's ``passdb { driver = oauth2 }`` asks with
    ``introspection_mode = post`` (FACTS.md).

Clients are checked: ``client_id`` must match and, if the provider was made with a
``client_secret``, the secret too (form field or HTTP Basic), else ``invalid_client`` (401).

The pytest fixture ``oauth_provider`` is in tests/support/oauth_fixtures.py.

Test controls (thread-safe; all waits have deadlines, none sleeps)::

    with OAuthProvider() as idp:
        idp.token_url, idp.device_authorization_url, idp.introspection_url
        code = idp.wait_for_user_code()          # a device authorization arrived
        idp.approve(code, "alice")               # the user signed in and consented
        idp.deny(code)                           # ... or refused (access_denied)
        idp.expire_device_code(code)             # expired_token on the next poll
        idp.force_slow_down(code, 1)             # the next poll answers slow_down
        OAuthProvider(slow_downs_per_code=1)     # ... for every new code, from its first poll
        idp.access_token_lifetime = 2            # seconds, for tokens issued from now on
        idp.grant("alice")                       # a refresh token without the device flow
        idp.revoke("alice")                      # every token of alice dies (invalid_grant)
        idp.expire_access_tokens("alice")        # introspection says inactive; refresh works
        idp.outage("503")  /  idp.outage("refused")  /  idp.outage(None)
        idp.count("refresh_token"), idp.count("introspect"), idp.requests  # what was asked
        idp.authorization_url                    # GET it as a browser would (cookie above)
        idp.authorization_requests[-1]           # the parameters the last /authorize had

``outage("refused")`` closes the listening socket (connections are refused, the port stays
reserved by nobody but is rebound on ``outage(None)``); ``outage("503")`` answers every request
``503`` with a JSON error.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import json
import secrets
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from gateway.oauth.store import GrantRecord, PasswordHash, TokenStore

__all__ = ["DEVICE_GRANT", "OAuthProvider", "free_port_refused", "oauth2_section", "store_grant"]

HOST = "127.0.0.1"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
SLOW_DOWN_STEP = 5  # RFC 8628 3.5: "the interval MUST be increased by 5 seconds"


@dataclass
class _DeviceAuthorization:
    device_code: str
    user_code: str
    client_id: str
    scope: str
    expires_at: float
    interval: int
    last_poll: float | None = None
    user: str | None = None  # set by approve()
    denied: bool = False
    forced_slow_downs: int = 0
    done: bool = False  # tokens were issued: the device code is spent


@dataclass
class _AuthorizationCode:
    user: str
    client_id: str
    redirect_uri: str
    challenge: str
    scope: str
    expires_at: float
    used: bool = False


@dataclass
class _AccessToken:
    user: str
    scope: str
    client_id: str
    expires_at: float
    revoked: bool = False


@dataclass
class _RefreshToken:
    user: str
    scope: str
    client_id: str
    rotated_at: float | None = None  # when a refresh replaced it
    revoked: bool = False


@dataclass
class _State:
    devices: dict[str, _DeviceAuthorization] = field(default_factory=dict)  # by device_code
    codes: dict[str, _AuthorizationCode] = field(default_factory=dict)
    access: dict[str, _AccessToken] = field(default_factory=dict)
    refresh: dict[str, _RefreshToken] = field(default_factory=dict)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    provider: OAuthProvider


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tokens travel in these requests

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        url = urllib.parse.urlsplit(self.path)
        form = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        if method == "POST" and body:
            form.update(
                {
                    k: v[-1]
                    for k, v in urllib.parse.parse_qs(body.decode("utf-8", "replace")).items()
                }
            )
        if url.path == "/authorize" and method == "GET":
            status, location, text = self.server.provider._authorize(
                form, self.headers.get("Cookie", "")
            )
            page = text.encode()
            self.send_response(status)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return
        status, answer = self.server.provider._handle(
            method, url.path, form, self.headers.get("Authorization", "")
        )
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class OAuthProvider:
    """See the module docstring."""

    def __init__(
        self,
        *,
        client_id: str = "popgate-test",
        client_secret: str | None = None,
        interval: int = 0,
        device_code_lifetime: float = 600.0,
        access_token_lifetime: float = 3600.0,
        rotation_grace: float = 0.0,
        enforce_interval: bool = False,
        slow_downs_per_code: int = 0,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        #: what device authorizations advertise (0: poll at once; tests stay fast)
        self.interval = interval
        self.device_code_lifetime = device_code_lifetime
        #: seconds, for access tokens issued from now on
        self.access_token_lifetime = access_token_lifetime
        self.rotation_grace = rotation_grace
        #: answer slow_down when a device code is polled before its interval has passed
        self.enforce_interval = enforce_interval
        #: the first polls of every new device code answer slow_down (no race with the client)
        self.slow_downs_per_code = slow_downs_per_code
        #: refresh requests answered invalid_grant (a spent or revoked refresh token)
        self.invalid_grants = 0
        self._lock = threading.Condition()
        self._state = _State()
        self._counts: collections.Counter[str] = collections.Counter()
        #: the query parameters of every GET /authorize, in order
        self.authorization_requests: list[dict[str, str]] = []
        #: the code_verifier of every authorization_code token request (to look for in logs)
        self.code_verifiers: list[str] = []
        self._outage: str | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ------------------------------------------------------------------ life cycle
    def start(self) -> OAuthProvider:
        self._serve(self.port)
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(10)

    def __enter__(self) -> OAuthProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self, port: int) -> None:
        server = _Server((HOST, port), _Handler)
        server.provider = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name=f"oauth-provider:{self.port}", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ addresses
    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def device_authorization_url(self) -> str:
        return self.base_url + "/device_authorization"

    @property
    def authorization_url(self) -> str:
        return self.base_url + "/authorize"

    @property
    def token_url(self) -> str:
        return self.base_url + "/token"

    @property
    def introspection_url(self) -> str:
        return self.base_url + "/introspect"

    @property
    def verification_uri(self) -> str:
        return self.base_url + "/device"

    # ------------------------------------------------------------------ test controls
    def outage(self, mode: str | None) -> None:
        """``"refused"``: close the listening socket; ``"503"``: answer every request 503;
        ``None``: serve again (on the same port)."""
        if mode not in (None, "refused", "503"):
            raise ValueError(f"unknown outage mode {mode!r}")
        with self._lock:
            previous, self._outage = self._outage, mode
        if mode == "refused" and previous != "refused":
            self.stop()
        elif mode != "refused" and previous == "refused":
            self._serve(self.port)

    def wait_for_user_code(self, timeout: float = 30.0, *, after: int = 0) -> str:
        """The user code of the ``after``-th + 1 device authorization (0: the first)."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._state.devices) > after, timeout):
                raise TimeoutError(f"no device authorization #{after + 1} within {timeout} s")
            return list(self._state.devices.values())[after].user_code

    def _device_by_user_code(self, user_code: str) -> _DeviceAuthorization:
        for device in self._state.devices.values():
            if device.user_code == user_code:
                return device
        raise KeyError(f"unknown user code {user_code!r}")

    def approve(self, user_code: str, user: str) -> None:
        with self._lock:
            self._device_by_user_code(user_code).user = user

    def deny(self, user_code: str) -> None:
        with self._lock:
            self._device_by_user_code(user_code).denied = True

    def expire_device_code(self, user_code: str) -> None:
        with self._lock:
            self._device_by_user_code(user_code).expires_at = 0.0

    def force_slow_down(self, user_code: str, times: int = 1) -> None:
        with self._lock:
            self._device_by_user_code(user_code).forced_slow_downs += times

    def grant(self, user: str, scope: str = "mail") -> dict[str, Any]:
        """Issue tokens for ``user`` as if the device flow had run: the token response."""
        with self._lock:
            return self._issue(user, scope, self.client_id)

    def revoke(self, user: str) -> None:
        """Every refresh and access token of ``user`` dies."""
        with self._lock:
            for token in [*self._state.refresh.values(), *self._state.access.values()]:
                if token.user == user:
                    token.revoked = True

    def expire_access_tokens(self, user: str | None = None) -> None:
        """Access tokens (of ``user``, or everybody's) become inactive; refresh tokens live."""
        with self._lock:
            for token in self._state.access.values():
                if user is None or token.user == user:
                    token.expires_at = 0.0

    def count(self, name: str) -> int:
        """Requests seen: ``"device_authorization"``, ``"token"`` (every token request),
        ``"device_code"``, ``"authorization_code"`` and ``"refresh_token"`` (by grant type),
        ``"authorize"`` (browser requests), ``"introspect"``,
        ``"refused_503"`` (answered during a 503 outage)."""
        with self._lock:
            return self._counts[name]

    @property
    def requests(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def issued_codes(self) -> list[str]:
        """Every authorization code handed out (to look for in logs and output)."""
        with self._lock:
            return list(self._state.codes)

    def live_refresh_tokens(self, user: str) -> list[str]:
        now = time.monotonic()
        with self._lock:
            return [
                t
                for t, r in self._state.refresh.items()
                if self._refresh_ok(r, now) and r.user == user
            ]

    def is_active(self, access_token: str) -> bool:
        with self._lock:
            return self._introspect(access_token)["active"] is True

    # ------------------------------------------------------------------ protocol
    def _handle(
        self, method: str, path: str, form: dict[str, str], authorization: str
    ) -> tuple[int, dict[str, Any]]:
        with self._lock:
            if self._outage == "503":
                self._counts["refused_503"] += 1
                return 503, {"error": "temporarily_unavailable"}
            if path == "/device_authorization" and method == "POST":
                self._counts["device_authorization"] += 1
                result = self._device_authorization(form, authorization)
            elif path == "/token" and method == "POST":
                self._counts["token"] += 1
                self._counts[
                    "device_code"
                    if form.get("grant_type") == DEVICE_GRANT
                    else form.get("grant_type", "")
                ] += 1
                result = self._token(form, authorization)
            elif path == "/introspect":
                self._counts["introspect"] += 1
                token = form.get("token", "")
                if not token and authorization.lower().startswith("bearer "):
                    token = authorization[7:].strip()
                result = 200, self._introspect(token)
            else:
                result = 404, {"error": "not_found"}
            self._lock.notify_all()
            return result

    def _client_ok(self, form: dict[str, str], authorization: str) -> bool:
        client_id, secret = form.get("client_id", ""), form.get("client_secret")
        if authorization.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(authorization[6:].strip()).decode()
            except ValueError:
                return False
            basic_id, _, basic_secret = decoded.partition(":")
            client_id, secret = urllib.parse.unquote(basic_id), urllib.parse.unquote(basic_secret)
        if client_id != self.client_id:
            return False
        return self.client_secret is None or secret == self.client_secret

    def _device_authorization(
        self, form: dict[str, str], authorization: str
    ) -> tuple[int, dict[str, Any]]:
        if not self._client_ok(form, authorization):
            return 401, {"error": "invalid_client"}
        device_code = secrets.token_urlsafe(24)
        user_code = "-".join(
            "".join(secrets.choice("BCDFGHJKLMNPQRSTVWXZ") for _ in range(4)) for _ in range(2)
        )
        self._state.devices[device_code] = _DeviceAuthorization(
            device_code,
            user_code,
            form.get("client_id", self.client_id),
            form.get("scope", ""),
            time.monotonic() + self.device_code_lifetime,
            self.interval,
            forced_slow_downs=self.slow_downs_per_code,
        )
        return 200, {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": self.verification_uri,
            "verification_uri_complete": f"{self.verification_uri}?user_code={user_code}",
            "expires_in": int(self.device_code_lifetime),
            "interval": self.interval,
        }

    def _token(self, form: dict[str, str], authorization: str) -> tuple[int, dict[str, Any]]:
        if not self._client_ok(form, authorization):
            return 401, {"error": "invalid_client"}
        grant_type = form.get("grant_type")
        if grant_type == DEVICE_GRANT:
            return self._device_token(form)
        if grant_type == "refresh_token":
            return self._refresh(form)
        if grant_type == "authorization_code":
            return self._code_token(form)
        return 400, {"error": "unsupported_grant_type"}

    def _authorize(self, query: dict[str, str], cookie: str) -> tuple[int, str, str]:
        """GET /authorize: (status, Location, page text)."""
        with self._lock:
            self._counts["authorize"] += 1
            self.authorization_requests.append(dict(query))
            self._lock.notify_all()
            if self._outage == "503":
                return 503, "", "temporarily unavailable"
            redirect_uri = query.get("redirect_uri", "")
            target = urllib.parse.urlsplit(redirect_uri)
            if query.get("client_id") != self.client_id:
                return 400, "", "unknown client_id"
            if target.scheme != "http" or target.hostname != HOST or not target.port:
                return 400, "", "redirect_uri is not a registered loopback URI"

            def back(**params: str) -> tuple[int, str, str]:
                params["state"] = query.get("state", "")
                sep = "&" if target.query else "?"
                return 302, redirect_uri + sep + urllib.parse.urlencode(params), ""

            if query.get("response_type") != "code":
                return back(error="unsupported_response_type")
            challenge = query.get("code_challenge", "")
            if query.get("code_challenge_method") != "S256" or not challenge:
                return back(error="invalid_request", error_description="PKCE S256 required")
            session = {
                k.strip(): v.strip()
                for k, _, v in (p.partition("=") for p in cookie.split(";"))
                if k.strip()
            }
            user = session.get("session")
            if not user:
                return 401, "", "sign in first"
            if session.get("consent") == "deny":
                return back(error="access_denied", error_description="the user said no")
            code = secrets.token_urlsafe(24)
            self._state.codes[code] = _AuthorizationCode(
                user,
                self.client_id,
                redirect_uri,
                challenge,
                query.get("scope", ""),
                time.monotonic() + 600,
            )
            return back(code=code)

    def _code_token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        grant = self._state.codes.get(form.get("code", ""))
        if grant is None or grant.used or time.monotonic() >= grant.expires_at:
            return 400, {"error": "invalid_grant", "error_description": "unknown or spent code"}
        grant.used = True  # single use, whatever follows (RFC 6749 4.1.2)
        self.code_verifiers.append(form.get("code_verifier", ""))
        if form.get("redirect_uri") != grant.redirect_uri:
            return 400, {"error": "invalid_grant", "error_description": "redirect_uri differs"}
        digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
        computed = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        if not hmac.compare_digest(computed, grant.challenge):
            return 400, {"error": "invalid_grant", "error_description": "PKCE verification failed"}
        return 200, self._issue(grant.user, grant.scope, grant.client_id)

    def _device_token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        device = self._state.devices.get(form.get("device_code", ""))
        now = time.monotonic()
        if device is None or device.done:
            return 400, {"error": "invalid_grant"}
        if now >= device.expires_at:
            return 400, {"error": "expired_token"}
        too_fast = (
            self.enforce_interval
            and device.last_poll is not None
            and now - device.last_poll < device.interval
        )
        device.last_poll = now
        if device.forced_slow_downs or too_fast:
            device.forced_slow_downs = max(0, device.forced_slow_downs - 1)
            device.interval += SLOW_DOWN_STEP
            return 400, {"error": "slow_down"}
        if device.denied:
            device.done = True
            return 400, {"error": "access_denied"}
        if device.user is None:
            return 400, {"error": "authorization_pending"}
        device.done = True
        return 200, self._issue(device.user, device.scope, device.client_id)

    def _refresh_ok(self, token: _RefreshToken, now: float) -> bool:
        if token.revoked:
            return False
        return token.rotated_at is None or now - token.rotated_at < self.rotation_grace

    def _refresh(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        old = self._state.refresh.get(form.get("refresh_token", ""))
        now = time.monotonic()
        if old is None or not self._refresh_ok(old, now):
            self.invalid_grants += 1
            return 400, {
                "error": "invalid_grant",
                "error_description": "refresh token is not valid",
            }
        if old.rotated_at is None:
            old.rotated_at = now
        return 200, self._issue(old.user, form.get("scope") or old.scope, old.client_id)

    def _issue(self, user: str, scope: str, client_id: str) -> dict[str, Any]:
        access, refresh = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        lifetime = self.access_token_lifetime
        self._state.access[access] = _AccessToken(
            user, scope, client_id, time.monotonic() + lifetime
        )
        self._state.refresh[refresh] = _RefreshToken(user, scope, client_id)
        return {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": int(lifetime),
            "refresh_token": refresh,
            "scope": scope,
        }

    def _introspect(self, token: str) -> dict[str, Any]:
        info = self._state.access.get(token)
        if info is None or info.revoked or time.monotonic() >= info.expires_at:
            return {"active": False}
        return {
            "active": True,
            "username": info.user,
            "scope": info.scope,
            "client_id": info.client_id,
            "token_type": "Bearer",
        }


def free_port_refused() -> int:
    """A loopback port nothing listens on (for "provider unreachable" configurations)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def oauth2_section(
    provider: OAuthProvider, token_dir: Path, key: bytes, **overrides: Any
) -> dict[str, Any]:
    """An ``[oauth2]`` section for ``start_gateway(oauth2=...)`` pointing at ``provider``;
    the key is given inline (``token_key``), so the gateway generates nothing."""
    section: dict[str, Any] = {
        "provider": "custom",
        "device_authorization_url": provider.device_authorization_url,
        "authorization_url": provider.authorization_url,
        "token_url": provider.token_url,
        "client_id": provider.client_id,
        "scopes": ["mail", "offline_access"],
        "token_dir": str(token_dir),
        "token_key": base64.b64encode(key).decode(),
    }
    section.update(overrides)
    return section


def store_grant(
    provider: OAuthProvider, token_dir: Path, key: bytes, user: str, device_password: str
) -> GrantRecord:
    """What ``popgate oauth login USER`` leaves behind, without running the device flow: a
    grant issued by ``provider`` for ``user`` and the device password's scrypt hash."""
    answer = provider.grant(user)
    now = time.time()
    record = GrantRecord(
        user=user,
        refresh_token=answer["refresh_token"],
        password=PasswordHash.create(device_password),
        created=now,
        refreshed=now,
        access_token=answer["access_token"],
        access_expires=now + answer["expires_in"],
        scope=answer["scope"],
    )
    store = TokenStore(token_dir, key)
    with store.locked(user, 30):
        store.write(record)
    return record
