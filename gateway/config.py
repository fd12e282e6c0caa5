"""Typed configuration, loaded from the TOML file described in docs/configuration.md.

The dataclasses below are the shape the rest of the gateway reads. Field names mirror the TOML keys
of the public contract (../shared/CONTRACT.md) one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Security = Literal["tls", "starttls", "none"]
TLSVersion = Literal["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]


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


@dataclass(frozen=True)
class SmtpUpstream:
    host: str = ""
    port: int = 587
    security: Security = "starttls"
    verify_certificate: bool = True
    ca_file: Path | None = None
    auth: Literal["passthrough", "none"] = "passthrough"


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
    device_separator: str = "#"
    idle_timeout: float = 600
    tls_min_version: TLSVersion | None = None  # None: inherit [tls] min_version


@dataclass(frozen=True)
class SubmissionSettings:
    listen: tuple[ListenAddress, ...] = ()
    listen_tls: tuple[ListenAddress, ...] = ()
    sent_folder: str = "auto"
    spool_dir: Path = Path("/var/spool/popgate")
    max_message_size: int = 52428800
    tls_min_version: TLSVersion | None = None


@dataclass(frozen=True)
class TLSSettings:
    cert_file: Path = Path("certs/popgate.crt")
    key_file: Path = Path("certs/popgate.key")
    min_version: TLSVersion = "TLSv1.2"


@dataclass(frozen=True)
class SecuritySettings:
    insecure_auth_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True)
class RetentionSettings:
    delete_after_days: int = 0
    action: Literal["trash", "archive", "expunge"] = "trash"
    quota_high_percent: int = 0
    quota_target_percent: int = 80


@dataclass(frozen=True)
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True)
class Config:
    upstream: Upstream
    pop3: Pop3Settings = field(default_factory=Pop3Settings)
    submission: SubmissionSettings = field(default_factory=SubmissionSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    log: LogSettings = field(default_factory=LogSettings)
    source: Path | None = None  # the file this was loaded from
    warnings: tuple[str, ...] = ()  # non-fatal findings, printed by check-config and at start


class ConfigError(Exception):
    """The file is invalid; ``problems`` holds one ``FILE: [section] key: what`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load_config(path: str | Path, environ: dict[str, str] | None = None) -> Config:
    """Read, validate and resolve ``path`` (with ``POPGATE_*`` overrides from ``environ``)."""
    raise NotImplementedError
