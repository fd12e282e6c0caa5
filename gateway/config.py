"""Typed configuration, loaded from the TOML file described in docs/configuration.md.

The dataclasses below are the shape the rest of the gateway reads. Field names mirror the TOML keys
of the public contract (../shared/CONTRACT.md) one to one.

Loading is schema driven (``_SCHEMA``): one table says, for every section and key, what type it has
and how it is checked. File values, ``POPGATE_<SECTION>_<KEY>`` environment overrides, ``x_file``
twins of secrets and the effective-config renderer all walk that one table, so a key added there
gets all four for free. Every problem is collected before raising, because an operator fixing a
file wants the whole list at once, not one error per restart.
"""

from __future__ import annotations

import base64
import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from gateway.addresses import Networks

Security = Literal["tls", "starttls", "none"]
TLSVersion = Literal["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]

TLS_VERSIONS: tuple[TLSVersion, ...] = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")

# RFC 1939 section 3: an autologout timer "MUST be of at least 10 minutes' duration".
RFC1939_MIN_IDLE_TIMEOUT = 600

ENV_PREFIX = "POPGATE_"
CONFIG_ENV = "POPGATE_CONFIG"  # names the file for the CLI; not a key override
REDACTED = "<redacted>"


# Pending connections the kernel queues for accept() on every listener. Twisted's default of 50
# overflows when a few hundred devices poll at the same moment (measured with 200: sessions lost,
# the client's final handshake packet dropped, and POP3 clients wait for the greeting for ever).
# 2,000 devices at once overflow 1,024 too (SYN retransmits: seconds of latency); the kernel caps
# the value at net.core.somaxconn (4,096 by default since Linux 5.4).
LISTEN_BACKLOG = 4096


@dataclass(frozen=True)
class ListenAddress:
    """One ``host:port`` listener; ``host`` is an IP literal without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ImapUpstream:
    host: str
    port: int = 993
    security: Security = "tls"
    verify_certificate: bool = True
    ca_file: Path | None = None
    master_user: str = ""
    master_password: str = field(default="", repr=False)
    timeout: float = 60  # seconds: the longest wait for any one IMAP response
    auth: Literal["password", "oauth2"] = "password"  # "oauth2": [oauth2], docs/oauth2.md


@dataclass(frozen=True)
class SmtpUpstream:
    host: str = ""
    port: int = 587
    security: Security = "starttls"
    verify_certificate: bool = True
    ca_file: Path | None = None
    auth: Literal["passthrough", "none", "oauth2"] = "passthrough"
    timeout: float = 300  # seconds to wait for any one relay reply (RFC 5321 4.5.3.2: 2-10 min)


@dataclass(frozen=True)
class Upstream:
    imap: ImapUpstream
    smtp: SmtpUpstream = field(default_factory=SmtpUpstream)


@dataclass(frozen=True)
class Pop3Settings:
    listen: tuple[ListenAddress, ...] = (ListenAddress("0.0.0.0", 110),)
    listen_tls: tuple[ListenAddress, ...] = ()
    mailbox: str = "INBOX"
    on_retrieve: Literal["keep", "seen"] = "keep"
    on_delete: Literal["hide", "seen", "archive", "trash", "expunge"] = "hide"
    archive_folder: str = "POP Archive"
    trash_folder: str = "auto"  # "auto": the SPECIAL-USE \Trash mailbox, else "Trash"
    snapshot_cache_messages: int = 200_000  # index entries kept for unchanged mailboxes; 0 = off
    state_mailbox: str = "POP Device State"  # where per-device views are kept (docs/pop3.md)
    # "metadata": private IMAP METADATA entries; "mailbox": state_mailbox; "auto": METADATA
    # when the server takes it, else the mailbox (docs/pop3.md)
    state_store: Literal["auto", "metadata", "mailbox"] = "auto"
    device_separator: str = "#"
    idle_timeout: float = 600
    tls_min_version: TLSVersion | None = None  # None: inherit [tls] min_version
    proxy_protocol: bool = False  # connections must start with a PROXY header (docs/operations.md)


@dataclass(frozen=True)
class SubmissionSettings:
    listen: tuple[ListenAddress, ...] = ()
    listen_tls: tuple[ListenAddress, ...] = ()
    sent_folder: str = "auto"
    spool_dir: Path = Path("/var/spool/popgate")
    max_message_size: int = 52428800
    tls_min_version: TLSVersion | None = None
    # AES-256-GCM key of the spool (base64); empty: generated as spool_dir/spool.key at start.
    spool_key: str = field(default="", repr=False)
    retry_initial_delay: float = 60  # seconds before the first retry of a Sent copy ...
    retry_max_delay: float = 3600  # ... doubling up to this
    proxy_protocol: bool = False  # connections must start with a PROXY header (docs/operations.md)


@dataclass(frozen=True)
class TLSSettings:
    cert_file: Path = Path("certs/popgate.crt")
    key_file: Path = Path("certs/popgate.key")
    # A second pair of another key type, served next to the first (OpenSSL picks per client:
    # ECDSA where the client can, RSA for old RSA-only devices), used when both files exist.
    # None: beside the first pair, "-ecdsa" before the suffix (certs/popgate-ecdsa.crt).
    second_cert_file: Path | None = None
    second_key_file: Path | None = None
    min_version: TLSVersion = "TLSv1.2"

    @property
    def second_pair(self) -> tuple[Path, Path]:
        """The second pair's (certificate, key) files, named or derived from the first's."""
        return (
            self.second_cert_file or _beside(self.cert_file),
            self.second_key_file or _beside(self.key_file),
        )


def _beside(path: Path) -> Path:
    """``certs/popgate.crt`` -> ``certs/popgate-ecdsa.crt``: the second pair's default name."""
    return path.with_name(f"{path.stem}-ecdsa{path.suffix}")


@dataclass(frozen=True)
class SecuritySettings:
    insecure_auth_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # Throttling and limits (docs/security.md): seconds before a failed login is answered,
    # doubling per further failure from the same client address up to the maximum ...
    auth_failure_delay: float = 2.0
    auth_failure_max_delay: float = 15.0
    # ... and the client connections the process, and each client address, may hold.
    max_connections: int = 2000
    max_connections_per_ip: int = 50
    # Load balancers allowed to send PROXY headers ([pop3]/[submission] proxy_protocol).
    proxy_networks: tuple[str, ...] = ()

    @cached_property
    def proxies(self) -> Networks:
        """Peers whose PROXY header is believed (matched by gateway.addresses rules)."""
        return Networks(self.proxy_networks)

    @cached_property
    def insecure_auth(self) -> Networks:
        """Where USER/PASS or AUTH may run without TLS (matched by gateway.addresses rules)."""
        return Networks(self.insecure_auth_networks)

    def allows_insecure_auth(self, address: str | None) -> bool:
        """Whether a client at ``address`` may send credentials without TLS."""
        return address in self.insecure_auth


@dataclass(frozen=True)
class RetentionSettings:
    delete_after_days: int = 0
    action: Literal["trash", "archive", "expunge"] = "trash"
    quota_high_percent: int = 0
    quota_target_percent: int = 80
    sweep_interval: int = 3600  # seconds between sweeps over recently seen users (master only)
    time_limit: float = 20  # seconds one user's retention run may take
    # Retention that knows every device (docs/deleting-and-retention.md):
    wait_for_devices: bool = True  # only what every active device downloaded or deleted leaves
    device_inactive_days: int = 30  # a device not seen for this long holds nothing back
    after_all_devices_days: int = 0  # > 0: what every active device downloaded leaves then

    @property
    def enabled(self) -> bool:
        return (
            self.delete_after_days > 0
            or self.quota_high_percent > 0
            or self.after_all_devices_days > 0
        )


@dataclass(frozen=True)
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True)
class HttpSettings:
    listen: tuple[ListenAddress, ...] = ()  # /metrics, /healthz, /readyz; empty: none


OAuthProvider = Literal["microsoft", "google", "custom"]


@dataclass(frozen=True)
class OAuthPreset:
    """What a provider preset fills in when the key is empty (docs/oauth2.md cites each)."""

    device_authorization_url: str
    token_url: str
    scopes: tuple[str, ...]
    imap_host: str
    smtp_host: str
    authorization_url: str  # the browser flow's (authorization code with PKCE)


# Microsoft identity platform v2.0 endpoints ({tenant}: common, organizations, a domain or the
# tenant's GUID) and the Exchange Online scopes for IMAP and SMTP AUTH; offline_access asks for
# the refresh token. Google: the device and token endpoints and the one mail scope.
OAUTH_PRESETS: dict[str, OAuthPreset] = {
    "microsoft": OAuthPreset(
        "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/devicecode",
        "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
        (
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "https://outlook.office.com/SMTP.Send",
            "offline_access",
        ),
        "outlook.office365.com",
        "smtp.office365.com",
        "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize",
    ),
    "google": OAuthPreset(
        "https://oauth2.googleapis.com/device/code",
        "https://oauth2.googleapis.com/token",
        ("https://mail.google.com/",),
        "imap.gmail.com",
        "smtp.gmail.com",
        "https://accounts.google.com/o/oauth2/v2/auth",
    ),
}


@dataclass(frozen=True)
class OAuth2Settings:
    """``[oauth2]``, with the provider preset already applied (URLs and scopes filled in)."""

    provider: OAuthProvider = "custom"
    tenant: str = "common"
    device_authorization_url: str = ""
    token_url: str = ""
    # RFC 6749 authorization endpoint, for `popgate oauth login --flow browser` (PKCE).
    authorization_url: str = ""
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    scopes: tuple[str, ...] = ()
    mechanism: Literal["xoauth2", "oauthbearer"] = "xoauth2"
    token_dir: Path = Path("/var/lib/popgate/oauth")
    # AES-256-GCM key of the token store (base64); empty: generated as token_dir/token.key.
    token_key: str = field(default="", repr=False)


@dataclass(frozen=True)
class Config:
    upstream: Upstream
    pop3: Pop3Settings = field(default_factory=Pop3Settings)
    submission: SubmissionSettings = field(default_factory=SubmissionSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    log: LogSettings = field(default_factory=LogSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    oauth2: OAuth2Settings = field(default_factory=OAuth2Settings)
    source: Path | None = None  # the file this was loaded from
    warnings: tuple[str, ...] = ()  # non-fatal findings, printed by check-config and at start

    def tls_min_version_for(self, service: Literal["pop3", "submission"]) -> TLSVersion:
        """The client-facing TLS floor of ``service``: its own override, else ``[tls]``."""
        own = self.pop3.tls_min_version if service == "pop3" else self.submission.tls_min_version
        return own or self.tls.min_version

    @property
    def uses_oauth2(self) -> bool:
        """Whether an upstream logs in with OAuth 2.0 access tokens (``auth = "oauth2"``)."""
        return "oauth2" in (self.upstream.imap.auth, self.upstream.smtp.auth)


class ConfigError(Exception):
    """The file is invalid; ``problems`` holds one ``FILE: [section] key: what`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --------------------------------------------------------------------------------------------
# Schema


Kind = Literal["str", "int", "number", "bool", "choice", "path", "listen", "networks", "words"]


@dataclass(frozen=True)
class _Key:
    """How one key is typed and checked.

    ``optional`` means the empty string stands for "not set" (``None`` in the dataclass) for
    choices and paths, and is allowed at all for strings.
    """

    kind: Kind
    choices: tuple[str, ...] = ()
    optional: bool = False
    low: float | None = None  # exclusive for numbers, unless zero_allowed ...
    high: float | None = None
    secret: bool = False
    zero_allowed: bool = False  # ... for numbers where 0 means "off"


_SECURITY = ("tls", "starttls", "none")
_PORT = _Key("int", low=1, high=65535)

_SCHEMA: dict[str, dict[str, _Key]] = {
    "upstream.imap": {
        "host": _Key("str"),
        "port": _PORT,
        "security": _Key("choice", _SECURITY),
        "verify_certificate": _Key("bool"),
        "ca_file": _Key("path", optional=True),
        "master_user": _Key("str", optional=True),
        "master_password": _Key("str", optional=True, secret=True),
        "timeout": _Key("number", low=0),
        "auth": _Key("choice", ("password", "oauth2")),
    },
    "upstream.smtp": {
        "host": _Key("str", optional=True),
        "port": _PORT,
        "security": _Key("choice", _SECURITY),
        "verify_certificate": _Key("bool"),
        "ca_file": _Key("path", optional=True),
        "auth": _Key("choice", ("passthrough", "none", "oauth2")),
        "timeout": _Key("number", low=0),
    },
    "pop3": {
        "listen": _Key("listen"),
        "listen_tls": _Key("listen"),
        "mailbox": _Key("str"),
        "on_retrieve": _Key("choice", ("keep", "seen")),
        "on_delete": _Key("choice", ("hide", "seen", "archive", "trash", "expunge")),
        "archive_folder": _Key("str"),
        "trash_folder": _Key("str"),
        "state_mailbox": _Key("str"),
        "state_store": _Key("choice", ("auto", "metadata", "mailbox")),
        "snapshot_cache_messages": _Key("int", low=0),
        "device_separator": _Key("str"),
        "idle_timeout": _Key("number", low=0),
        "tls_min_version": _Key("choice", TLS_VERSIONS, optional=True),
        "proxy_protocol": _Key("bool"),
    },
    "submission": {
        "listen": _Key("listen"),
        "listen_tls": _Key("listen"),
        "sent_folder": _Key("str"),
        "spool_dir": _Key("path"),
        "max_message_size": _Key("int", low=1),
        "tls_min_version": _Key("choice", TLS_VERSIONS, optional=True),
        "spool_key": _Key("str", optional=True, secret=True),
        "retry_initial_delay": _Key("number", low=0),
        "retry_max_delay": _Key("number", low=0),
        "proxy_protocol": _Key("bool"),
    },
    "tls": {
        "cert_file": _Key("path"),
        "key_file": _Key("path"),
        "second_cert_file": _Key("path", optional=True),
        "second_key_file": _Key("path", optional=True),
        "min_version": _Key("choice", TLS_VERSIONS),
    },
    "security": {
        "insecure_auth_networks": _Key("networks"),
        "auth_failure_delay": _Key("number", low=0, zero_allowed=True),
        "auth_failure_max_delay": _Key("number", low=0, zero_allowed=True),
        "max_connections": _Key("int", low=1),
        "max_connections_per_ip": _Key("int", low=1),
        "proxy_networks": _Key("networks"),
    },
    "retention": {
        "delete_after_days": _Key("int", low=0),
        "action": _Key("choice", ("trash", "archive", "expunge")),
        "quota_high_percent": _Key("int", low=0, high=100),
        "quota_target_percent": _Key("int", low=0, high=100),
        "sweep_interval": _Key("int", low=0),
        "time_limit": _Key("number", low=0),
        "wait_for_devices": _Key("bool"),
        "device_inactive_days": _Key("int", low=1),
        "after_all_devices_days": _Key("int", low=0),
    },
    "log": {
        "level": _Key("choice", ("debug", "info", "warning", "error")),
        "format": _Key("choice", ("text", "json")),
    },
    "http": {
        "listen": _Key("listen"),
    },
    "oauth2": {
        "provider": _Key("choice", ("microsoft", "google", "custom")),
        "tenant": _Key("str"),
        "device_authorization_url": _Key("str", optional=True),
        "authorization_url": _Key("str", optional=True),
        "token_url": _Key("str", optional=True),
        "client_id": _Key("str", optional=True),
        "client_secret": _Key("str", optional=True, secret=True),
        "scopes": _Key("words"),
        "mechanism": _Key("choice", ("xoauth2", "oauthbearer")),
        "token_dir": _Key("path"),
        "token_key": _Key("str", optional=True, secret=True),
    },
}

SECRET_FILE_SUFFIX = "_file"

#: ``section.key`` of every secret. Each has a ``key_file`` twin and is redacted on output.
SECRET_KEYS: frozenset[str] = frozenset(
    f"{section}.{key}" for section, keys in _SCHEMA.items() for key, k in keys.items() if k.secret
)

# Pure containers of sections, e.g. "upstream" holds "upstream.imap" and "upstream.smtp".
_CONTAINERS = frozenset(
    ".".join(name.split(".")[:i]) for name in _SCHEMA for i in range(1, name.count(".") + 1)
)


def _secret_twins(section: str) -> dict[str, str]:
    """``{"master_password_file": "master_password"}`` for the secrets of ``section``."""
    return {key + SECRET_FILE_SUFFIX: key for key, spec in _SCHEMA[section].items() if spec.secret}


def _allowed_keys(section: str) -> list[str]:
    return [*_SCHEMA[section], *_secret_twins(section)]


def env_var_name(section: str, key: str) -> str:
    """``("upstream.imap", "host")`` -> ``POPGATE_UPSTREAM_IMAP_HOST``."""
    return f"{ENV_PREFIX}{section.replace('.', '_')}_{key}".upper()


# --------------------------------------------------------------------------------------------
# Loading


class _Invalid(Exception):
    """A value is wrong; each message says what, without repeating the key.

    Arrays carry one message per bad element, so a list of listeners is reported in full.
    """

    def __init__(self, *messages: str) -> None:
        super().__init__(*messages)
        self.messages = messages


@dataclass(frozen=True)
class _Value:
    """A raw value and where it came from (``env`` is the variable name, or None for the file)."""

    value: object
    env: str | None = None


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return "date/time"


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _convert(spec: _Key, value: object, base_dir: Path) -> Any:
    """Check ``value`` against ``spec`` and turn it into what the dataclass holds."""
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise _Invalid(f"expected a boolean (true or false), got {_toml_type(value)}")
        return value
    if spec.kind in ("int", "number"):
        return _convert_number(spec, value)
    if spec.kind in ("listen", "networks", "words"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _Invalid(f"expected an array of strings, got {_toml_type(value)}")
        parse = {"listen": _parse_listen, "networks": _parse_network, "words": _parse_word}[
            spec.kind
        ]
        items: list[Any] = []
        errors: list[str] = []
        for item in value:
            try:
                items.append(parse(item))
            except _Invalid as exc:
                errors.extend(exc.messages)
        if errors:
            raise _Invalid(*errors)
        return tuple(items)
    # The remaining kinds are all strings.
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_toml_type(value)}")
    if value == "":
        if not spec.optional:
            raise _Invalid("must not be empty")
        return None if spec.kind in ("choice", "path") else ""
    if spec.kind == "choice":
        if value not in spec.choices:
            allowed = ", ".join(_quote(c) for c in spec.choices)
            raise _Invalid(f"must be one of {allowed}, got {_quote(value)}")
        return value
    if spec.kind == "path":
        return base_dir / value
    if spec.secret:
        return value
    if value != value.strip() or any(ord(c) < 32 for c in value):
        # Folder names and host names never carry these; a stray space is a typo.
        raise _Invalid(f"must not contain leading/trailing spaces or control characters: {value!r}")
    return value


def _convert_number(spec: _Key, value: object) -> int | float:
    if spec.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected an integer, got {_toml_type(value)}")
        number: int | float = value
    else:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Invalid(f"expected a number, got {_toml_type(value)}")
        number = float(value)
        if not math.isfinite(number):
            raise _Invalid(f"must be a finite number, got {value}")
    if spec.kind == "number" and spec.zero_allowed and number <= 0:
        if number < 0:
            raise _Invalid(f"must not be negative, got {value}")
        return number
    if spec.kind == "number" and spec.low is not None and number <= spec.low:
        raise _Invalid(f"must be greater than {spec.low:g}, got {value}")
    if spec.kind == "int" and spec.low is not None and number < spec.low:
        raise _Invalid(f"must be at least {spec.low:g}, got {value}")
    if spec.high is not None and number > spec.high:
        raise _Invalid(f"must be at most {spec.high:g}, got {value}")
    return number


_LISTEN_RE = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]+)$")


def _parse_listen(text: str) -> ListenAddress:
    """``"0.0.0.0:110"`` / ``"[::]:995"`` -> ListenAddress; port 0 lets the OS pick (tests)."""
    match = _LISTEN_RE.match(text.strip())
    if match is None:
        if text.count(":") > 1 and not text.startswith("["):
            raise _Invalid(f"{_quote(text)}: write IPv6 addresses in brackets, e.g. [::1]:110")
        raise _Invalid(f'{_quote(text)}: expected "host:port" or "[ipv6]:port"')
    host = match["v6"] or match["host"]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise _Invalid(
            f"{_quote(text)}: the host must be an IP address (0.0.0.0 or [::] for all)"
        ) from None
    if match["v6"] is not None and ip.version != 6:
        raise _Invalid(f"{_quote(text)}: only IPv6 addresses go in brackets")
    port = int(match["port"])
    if port > 65535:
        raise _Invalid(f"{_quote(text)}: port must be 0-65535")
    return ListenAddress(str(ip), port)


def _parse_network(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise _Invalid(f'{_quote(text)}: not an IP network such as "10.0.0.0/8"') from None


# RFC 6749 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN_RE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")


def _parse_word(text: str) -> str:
    if not _SCOPE_TOKEN_RE.match(text):
        raise _Invalid(f"{_quote(text)}: not an OAuth scope (no spaces, quotes or backslashes)")
    return text


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _coerce_env(spec: _Key, text: str) -> object:
    """Turn an environment string into the TOML-typed value the file would have held."""
    if spec.kind == "bool":
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise _Invalid(f"expected true/false/1/0/yes/no, got {_quote(text)}")
    if spec.kind == "int":
        try:
            return int(text.strip())
        except ValueError:
            raise _Invalid(f"expected an integer, got {_quote(text)}") from None
    if spec.kind == "number":
        try:
            return float(text.strip())
        except ValueError:
            raise _Invalid(f"expected a number, got {_quote(text)}") from None
    if spec.kind in ("listen", "networks", "words"):
        stripped = text.strip()
        if stripped.startswith("["):
            try:
                return tomllib.loads(f"v = {stripped}")["v"]
            except tomllib.TOMLDecodeError as exc:
                raise _Invalid(f"not a valid TOML array: {exc}") from None
        return [item.strip() for item in stripped.split(",") if item.strip()]
    return text


class _Loader:
    """One load: the file name as given, the collected problems and warnings."""

    def __init__(self, path: str | Path, environ: Mapping[str, str]) -> None:
        self.name = str(path)
        self.path = Path(path)
        self.file_dir = self.path.absolute().parent
        self.environ = environ
        self.problems: list[str] = []
        self.warnings: list[str] = []
        # Keys already reported, so cross-key rules do not pile a second, derived problem on them.
        self.failed: set[tuple[str, str]] = set()

    def label(self, section: str, key: str, env: str | None = None) -> str:
        origin = f" (from {env})" if env else ""
        return f"{self.name}: [{section}] {key}{origin}"

    def problem(self, section: str, key: str, message: str, env: str | None = None) -> None:
        self.problems.append(f"{self.label(section, key, env)}: {message}")
        self.failed.add((section, _secret_twins(section).get(key, key)))

    def warn(self, section: str, key: str, message: str, env: str | None = None) -> None:
        self.warnings.append(f"{self.label(section, key, env)}: {message}")

    # -- reading ---------------------------------------------------------------------------

    def read(self) -> dict[str, Any] | None:
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            self.problems.append(f"{self.name}: cannot read the file: {exc.strerror or exc}")
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            self.problems.append(f"{self.name}:{line}:1: not valid UTF-8")
            return None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            self.problems.append(self._syntax_problem(str(exc), text))
            return None

    def _syntax_problem(self, message: str, text: str) -> str:
        # Python 3.11's TOMLDecodeError only carries the position inside its message.
        match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
        if match:
            return f"{self.name}:{match[1]}:{match[2]}: {message[: match.start()]}"
        end = re.search(r"\s*\(at end of document\)$", message)
        if end:
            lines = text.split("\n")
            return f"{self.name}:{len(lines)}:{len(lines[-1]) + 1}: {message[: end.start()]}"
        return f"{self.name}: {message}"

    def collect(self, table: dict[str, Any], prefix: str = "") -> dict[str, dict[str, _Value]]:
        """Sort the parsed file into known sections; report what is unknown."""
        found: dict[str, dict[str, _Value]] = {}
        for key, value in table.items():
            name = f"{prefix}.{key}" if prefix else key
            if name in _SCHEMA or name in _CONTAINERS:
                if not isinstance(value, dict):
                    self.problems.append(
                        f"{self.name}: [{name}]: expected a table, got {_toml_type(value)}"
                    )
                elif name in _CONTAINERS:
                    found.update(self.collect(value, name))
                else:
                    found[name] = self.section_values(name, value)
            elif isinstance(value, dict):
                self.problems.append(f"{self.name}: [{name}]: unknown section")
            elif prefix:
                self.problems.append(f"{self.label(prefix, key)}: unknown key")
            else:
                self.problems.append(f"{self.name}: {key}: unknown key outside any section")
        return found

    def section_values(self, section: str, table: dict[str, Any]) -> dict[str, _Value]:
        allowed = _allowed_keys(section)
        values: dict[str, _Value] = {}
        for key, value in table.items():
            if key in allowed:
                values[key] = _Value(value)
            elif isinstance(value, dict):
                self.problems.append(f"{self.name}: [{section}.{key}]: unknown section")
            else:
                hint = difflib.get_close_matches(key, allowed, n=1, cutoff=0.75)
                suffix = f" (did you mean {hint[0]}?)" if hint else ""
                self.problem(section, key, f"unknown key{suffix}")
        return values

    def apply_environment(self, sections: dict[str, dict[str, _Value]]) -> None:
        known: set[str] = {CONFIG_ENV}
        for section in _SCHEMA:
            twins = _secret_twins(section)
            values = sections.setdefault(section, {})
            env_values: dict[str, _Value] = {}
            for key in _allowed_keys(section):
                var = env_var_name(section, key)
                known.add(var)
                if var not in self.environ:
                    continue
                spec = _SCHEMA[section][twins.get(key, key)]
                if key in twins:
                    spec = _Key("path", optional=True)
                try:
                    env_values[key] = _Value(_coerce_env(spec, self.environ[var]), var)
                except _Invalid as exc:
                    # Reported by convert_section, so problems come out in section order.
                    env_values[key] = _Value(exc, var)
            # An override of either twin of a secret replaces both twins from the file:
            # the environment wins as a whole, it does not combine with the file.
            for twin, secret in twins.items():
                if twin in env_values or secret in env_values:
                    values.pop(twin, None)
                    values.pop(secret, None)
            values.update(env_values)
        for var in sorted(self.environ):
            if var.startswith(ENV_PREFIX) and var not in known:
                self.warnings.append(f"{var}: not a popgate setting; ignored")

    # -- converting ------------------------------------------------------------------------

    def convert_section(self, section: str, values: dict[str, _Value]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        self.resolve_secrets(section, values, out)
        for key, spec in _SCHEMA[section].items():
            if key not in values or key in out:
                continue
            raw = values[key]
            base_dir = Path.cwd() if raw.env else self.file_dir
            try:
                if isinstance(raw.value, _Invalid):
                    raise raw.value
                out[key] = _convert(spec, raw.value, base_dir)
            except _Invalid as exc:
                for message in exc.messages:
                    self.problem(section, key, message, raw.env)
        return out

    def resolve_secrets(self, section: str, values: dict[str, _Value], out: dict[str, Any]) -> None:
        """Read ``x_file`` twins; setting both twins is ambiguous, so it is an error."""
        for twin, secret in _secret_twins(section).items():
            direct, from_file = values.get(secret), values.get(twin)
            if direct is not None and from_file is not None:
                if direct.value != "" and from_file.value != "":
                    env = direct.env or from_file.env
                    self.problem(section, twin, f"set either {secret} or {twin}, not both", env)
                    out[secret] = ""
                    continue
                # One twin is empty ("not set"): use the other.
                if from_file.value == "":
                    from_file = None
            if from_file is None:
                continue
            values.pop(secret, None)
            base_dir = Path.cwd() if from_file.env else self.file_dir
            try:
                if isinstance(from_file.value, _Invalid):
                    raise from_file.value
                path = _convert(_Key("path", optional=True), from_file.value, base_dir)
            except _Invalid as exc:
                self.problem(section, twin, "; ".join(exc.messages), from_file.env)
                continue
            if path is None:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not valid UTF-8"
                self.problem(section, twin, f"cannot read {path}: {reason}", from_file.env)
                continue
            # Exactly one line ending goes: `echo secret > file` adds it, the secret never has it.
            out[secret] = text.removesuffix("\n").removesuffix("\r")

    # -- cross-key rules -------------------------------------------------------------------

    def check_imap(self, imap: dict[str, Any], raw: dict[str, _Value]) -> None:
        section = "upstream.imap"
        if "host" not in raw and "host" not in imap:
            self.problem(section, "host", "required (the upstream IMAP server)")
        if "port" not in raw:
            imap["port"] = 993 if imap.get("security", "tls") == "tls" else 143
        self.check_master(imap)
        self.check_upstream_common(section, imap)

    def check_master(self, imap: dict[str, Any]) -> None:
        """The master identity is SASL PLAIN user + password: one without the other is a typo."""
        user, password = imap.get("master_user", ""), imap.get("master_password", "")
        if {("upstream.imap", "master_user"), ("upstream.imap", "master_password")} & self.failed:
            return
        if user and not password:
            self.problem("upstream.imap", "master_password", "required when master_user is set")
        if password and not user:
            self.problem("upstream.imap", "master_user", "required when master_password is set")

    def check_smtp(self, smtp: dict[str, Any], submission: dict[str, Any]) -> None:
        section = "upstream.smtp"
        listeners = submission.get("listen", ()) + submission.get("listen_tls", ())
        if listeners and not smtp.get("host"):
            self.problem(section, "host", "required when [submission] has listeners")
        if "port" not in smtp:
            # Implicit TLS submission lives on 465 (RFC 8314); 587 is the STARTTLS port.
            smtp["port"] = 465 if smtp.get("security", "starttls") == "tls" else 587
        if smtp.get("host"):
            self.check_upstream_common(section, smtp)

    def check_upstream_common(self, section: str, values: dict[str, Any]) -> None:
        host = values.get("host", "")
        if values.get("security") == "none" and not _is_loopback(host):
            self.warn(section, "security", '"none": passwords travel to the upstream in clear text')
        if values.get("verify_certificate") is False and values.get("security") != "none":
            self.warn(section, "verify_certificate", "false: the upstream is not authenticated")
        ca_file = values.get("ca_file")
        if ca_file is not None and not ca_file.is_file():
            self.problem(section, "ca_file", f"{ca_file} does not exist or is not a file")

    def check_pop3(self, pop3: dict[str, Any]) -> None:
        timeout = pop3.get("idle_timeout")
        if timeout is not None and timeout < RFC1939_MIN_IDLE_TIMEOUT:
            self.warn(
                "pop3",
                "idle_timeout",
                f"{timeout:g} s is below the {RFC1939_MIN_IDLE_TIMEOUT} s RFC 1939 asks for;"
                " slow clients may be cut off",
            )
        separator = pop3.get("device_separator")
        if separator is not None and any(c.isspace() for c in separator):
            self.problem("pop3", "device_separator", "must not contain spaces")

    def check_submission(self, submission: dict[str, Any]) -> None:
        key = submission.get("spool_key", "")
        if key and ("submission", "spool_key") not in self.failed:
            try:
                raw = base64.b64decode(key.strip(), validate=True)
            except ValueError:
                raw = b""
            if len(raw) != 32:
                # The value itself is a secret: say what is wrong, never what it is.
                self.problem("submission", "spool_key", "must be 32 bytes in base64")
        initial = submission.get("retry_initial_delay", 60)
        if initial > submission.get("retry_max_delay", 3600):
            self.problem(
                "submission",
                "retry_max_delay",
                f"must be at least retry_initial_delay ({initial:g})",
            )

    def check_security(self, security: dict[str, Any]) -> None:
        defaults = SecuritySettings()
        delay = security.get("auth_failure_delay", defaults.auth_failure_delay)
        max_delay = security.get("auth_failure_max_delay", defaults.auth_failure_max_delay)
        if max_delay < delay and ("security", "auth_failure_delay") not in self.failed:
            self.problem(
                "security",
                "auth_failure_max_delay",
                f"must be at least auth_failure_delay ({delay:g}), got {max_delay:g}",
            )
        total = security.get("max_connections", defaults.max_connections)
        per_ip = security.get("max_connections_per_ip", defaults.max_connections_per_ip)
        if per_ip > total and ("security", "max_connections") not in self.failed:
            self.problem(
                "security",
                "max_connections_per_ip",
                f"must not exceed max_connections ({total}), got {per_ip}",
            )

    def check_proxy_protocol(self, converted: dict[str, dict[str, Any]]) -> None:
        """A PROXY listener believes headers only from proxy_networks: with none, it could
        accept no connection at all."""
        submission = converted["submission"]
        if submission.get("proxy_protocol") and submission.get("listen_tls"):
            # aiosmtpd reads the header after asyncio's TLS handshake, where HAProxy never
            # sends it; a PROXY layer below asyncio's TLS is not built yet.
            self.problem(
                "submission",
                "proxy_protocol",
                "true is not supported with listen_tls yet (use listen with STARTTLS)",
            )
        if converted["security"].get("proxy_networks"):
            return
        for section in ("pop3", "submission"):
            if converted[section].get("proxy_protocol"):
                self.problem(
                    section, "proxy_protocol", "true needs [security] proxy_networks (empty)"
                )

    def check_retention(self, retention: dict[str, Any]) -> None:
        high = retention.get("quota_high_percent", 0)
        target = retention.get("quota_target_percent", 80)
        if high and target >= high:
            self.problem(
                "retention",
                "quota_target_percent",
                f"must be below quota_high_percent ({high}), got {target}",
            )

    def check_listeners(self, converted: dict[str, dict[str, Any]]) -> None:
        """Two listeners on one address fail at bind time; say so now, with both names."""
        seen: dict[tuple[str, int], str] = {}
        for section, key in _LISTENERS:
            for address in converted[section].get(key, ()):
                if address.port == 0:  # the OS picks a distinct port for each
                    continue
                endpoint = (address.host, address.port)
                if endpoint in seen:
                    self.problem(section, key, f"{address} is also used by {seen[endpoint]}")
                else:
                    seen[endpoint] = f"[{section}] {key}"

    def fill_oauth2_hosts(self, imap: dict[str, Any], smtp: dict[str, Any], provider: str) -> None:
        """A provider preset names the upstream hosts of an ``auth = "oauth2"`` upstream."""
        preset = OAUTH_PRESETS.get(provider)
        if preset is None:
            return
        if imap.get("auth") == "oauth2" and not imap.get("host"):
            imap["host"] = preset.imap_host
        if smtp.get("auth") == "oauth2" and not smtp.get("host"):
            smtp["host"] = preset.smtp_host

    def check_oauth2(
        self, oauth2: dict[str, Any], raw: dict[str, _Value], uses_oauth2: bool
    ) -> None:
        """Apply the provider preset, then check what a login and a refresh will need."""
        section = "oauth2"
        provider = oauth2.get("provider", "custom")
        tenant = oauth2.get("tenant", "common")
        if provider != "microsoft" and tenant != "common":
            self.warn(section, "tenant", f'used only with provider = "microsoft", not {provider}')
        if provider == "microsoft" and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", tenant):
            self.problem(
                section,
                "tenant",
                'expected "common", "organizations", a domain or a tenant ID, got '
                + _quote(tenant),
            )
        preset = OAUTH_PRESETS.get(provider)
        for key in ("device_authorization_url", "authorization_url", "token_url"):
            if (section, key) in self.failed:
                continue
            if not oauth2.get(key) and preset is not None:
                oauth2[key] = getattr(preset, key).format(tenant=tenant)
            url = oauth2.get(key, "")
            if url:
                problem = _url_problem(url)
                if problem:
                    self.problem(section, key, problem)
        # custom: the token endpoint, and the endpoint of at least one way to sign in.
        sign_in = ("device_authorization_url", "authorization_url")
        if uses_oauth2 and not any(oauth2.get(k) or (section, k) in self.failed for k in sign_in):
            self.problem(
                section,
                "device_authorization_url",
                'required with provider = "custom" (or authorization_url, for the browser flow)',
            )
        token_failed = (section, "token_url") in self.failed
        if uses_oauth2 and not oauth2.get("token_url") and not token_failed:
            self.problem(section, "token_url", 'required with provider = "custom"')
        if not oauth2.get("scopes") and (section, "scopes") not in self.failed:
            if preset is not None:
                oauth2["scopes"] = preset.scopes
            elif uses_oauth2:
                self.warn(section, "scopes", "empty: the provider's default scopes are asked for")
        if (
            uses_oauth2
            and not oauth2.get("client_id")
            and (section, "client_id") not in self.failed
        ):
            self.problem(section, "client_id", "required (the application ID of the registration)")
        key = oauth2.get("token_key", "")
        if key and (section, "token_key") not in self.failed:
            try:
                decoded = base64.b64decode(key.strip(), validate=True)
            except ValueError:
                decoded = b""
            if len(decoded) != 32:
                self.problem(section, "token_key", "must be 32 bytes in base64")


def _url_problem(url: str) -> str:
    """Why ``url`` cannot be a provider endpoint, or ""."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return f"not a URL: {_quote(url)}"
    del port
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return f"expected an https:// URL, got {_quote(url)}"
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        return f"must be https:// (client secrets and refresh tokens travel in it): {_quote(url)}"
    return ""


_LISTENERS = (
    ("pop3", "listen"),
    ("pop3", "listen_tls"),
    ("submission", "listen"),
    ("submission", "listen_tls"),
    ("http", "listen"),
)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, validate and resolve ``path`` (with ``POPGATE_*`` overrides from ``environ``).

    Raises ConfigError with every problem found. ``environ`` defaults to ``os.environ``;
    tests pass a dict so they never depend on the caller's environment.
    """
    loader = _Loader(path, os.environ if environ is None else environ)
    table = loader.read()
    if table is None:
        raise ConfigError(loader.problems)
    sections = loader.collect(table)
    loader.apply_environment(sections)
    converted = {name: loader.convert_section(name, sections[name]) for name in _SCHEMA}

    imap, smtp = converted["upstream.imap"], converted["upstream.smtp"]
    loader.fill_oauth2_hosts(imap, smtp, converted["oauth2"].get("provider", "custom"))
    loader.check_imap(imap, sections["upstream.imap"])
    loader.check_smtp(smtp, converted["submission"])
    loader.check_pop3(converted["pop3"])
    loader.check_submission(converted["submission"])
    loader.check_security(converted["security"])
    loader.check_retention(converted["retention"])
    loader.check_listeners(converted)
    loader.check_proxy_protocol(converted)
    uses_oauth2 = "oauth2" in (imap.get("auth"), smtp.get("auth"))
    loader.check_oauth2(converted["oauth2"], sections["oauth2"], uses_oauth2)
    for key in ("cert_file", "key_file"):
        converted["tls"].setdefault(key, loader.file_dir / getattr(TLSSettings, key))
    for key, first in (("second_cert_file", "cert_file"), ("second_key_file", "key_file")):
        if converted["tls"].get(key) is None:  # shown as the file it is in check-config
            converted["tls"][key] = _beside(converted["tls"][first])
    if loader.problems:
        raise ConfigError(loader.problems)

    return Config(
        upstream=Upstream(imap=ImapUpstream(**imap), smtp=SmtpUpstream(**smtp)),
        pop3=Pop3Settings(**converted["pop3"]),
        submission=SubmissionSettings(**converted["submission"]),
        tls=TLSSettings(**converted["tls"]),
        security=SecuritySettings(**converted["security"]),
        retention=RetentionSettings(**converted["retention"]),
        log=LogSettings(**converted["log"]),
        http=HttpSettings(**converted["http"]),
        oauth2=OAuth2Settings(**converted["oauth2"]),
        source=Path(path),
        warnings=tuple(loader.warnings),
    )


# --------------------------------------------------------------------------------------------
# Rendering


def _section_object(config: Config, section: str) -> Any:
    obj: Any = config
    for part in section.split("."):
        obj = getattr(obj, part)
    return obj


def _toml_value(value: object) -> str:
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # json escapes are valid TOML basic-string escapes, except that TOML also forbids DEL.
    return _quote(str(value)).replace("\x7f", "\\u007f")


def render_effective(config: Config) -> str:
    """The effective configuration as TOML (defaults filled in, paths resolved).

    Secrets are shown as ``"<redacted>"`` when set, so the output can be pasted into a bug
    report; it loads back with load_config except for those values.
    """
    lines: list[str] = []
    if config.source is not None:
        lines.append(f"# popgate effective configuration, from {config.source}")
    for section, keys in _SCHEMA.items():
        obj = _section_object(config, section)
        lines.append("")
        lines.append(f"[{section}]")
        for key, spec in keys.items():
            value = getattr(obj, key)
            if spec.secret and value:
                value = REDACTED
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines).lstrip("\n") + "\n"
