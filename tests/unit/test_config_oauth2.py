"""``[oauth2]`` and ``auth = "oauth2"``: presets, validation messages, secret twins."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from gateway.config import Config, ConfigError, load_config, render_effective

OAUTH_IMAP = '[upstream.imap]\nauth = "oauth2"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "popgate.toml"
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), environ=env or {})


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    name = str(tmp_path / "popgate.toml")
    return [p.removeprefix(name + ": ") for p in caught.value.problems]


def test_defaults_without_oauth(tmp_path: Path) -> None:
    config = load(tmp_path, '[upstream.imap]\nhost = "imap.example.com"\n')
    assert config.upstream.imap.auth == "password"
    assert config.upstream.smtp.auth == "passthrough"
    assert not config.uses_oauth2
    assert config.oauth2.provider == "custom" and config.oauth2.scopes == ()
    assert config.oauth2.token_dir == Path("/var/lib/popgate/oauth")


def test_microsoft_preset_fills_urls_scopes_and_hosts(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        OAUTH_IMAP
        + '[upstream.smtp]\nauth = "oauth2"\n'
        + '[oauth2]\nprovider = "microsoft"\ntenant = "contoso.onmicrosoft.com"\n'
        + 'client_id = "00000000-1111-2222-3333-444444444444"\n',
    )
    oauth2 = config.oauth2
    assert oauth2.device_authorization_url == (
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/devicecode"
    )
    assert oauth2.token_url == (
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    )
    assert oauth2.scopes == (
        "https://outlook.office.com/IMAP.AccessAsUser.All",
        "https://outlook.office.com/SMTP.Send",
        "offline_access",
    )
    assert (config.upstream.imap.host, config.upstream.smtp.host) == (
        "outlook.office365.com",
        "smtp.office365.com",
    )
    assert config.uses_oauth2 and config.warnings == ()


def test_google_preset_and_explicit_values_win(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        '[upstream.imap]\nhost = "imap.example.net"\nauth = "oauth2"\n'
        '[oauth2]\nprovider = "google"\nclient_id = "x.apps.googleusercontent.com"\n'
        'scopes = ["https://mail.google.com/", "email"]\n',
    )
    assert config.upstream.imap.host == "imap.example.net"
    assert config.oauth2.token_url == "https://oauth2.googleapis.com/token"
    assert config.oauth2.device_authorization_url == "https://oauth2.googleapis.com/device/code"
    assert config.oauth2.scopes == ("https://mail.google.com/", "email")
    assert config.oauth2.authorization_url == "https://accounts.google.com/o/oauth2/v2/auth"


def test_microsoft_preset_fills_the_authorization_url_with_the_tenant(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        OAUTH_IMAP
        + '[oauth2]\nprovider = "microsoft"\ntenant = "organizations"\nclient_id = "c"\n',
    )
    assert config.oauth2.authorization_url == (
        "https://login.microsoftonline.com/organizations/oauth2/v2.0/authorize"
    )


def test_custom_with_only_the_browser_flow(tmp_path: Path) -> None:
    base = OAUTH_IMAP.replace("\n", '\nhost = "h"\n', 1) + '[oauth2]\nclient_id = "c"\n'
    config = load(
        tmp_path,
        base + 'authorization_url = "https://idp.example.org/authorize"\n'
        'token_url = "https://idp.example.org/token"\n',
    )
    assert config.oauth2.authorization_url == "https://idp.example.org/authorize"
    assert config.oauth2.device_authorization_url == ""
    assert problems(
        tmp_path,
        base + 'authorization_url = "http://idp.example.org/authorize"\n'
        'token_url = "https://idp.example.org/token"\n',
    ) == [
        "[oauth2] authorization_url: must be https:// (client secrets and refresh tokens travel"
        ' in it): "http://idp.example.org/authorize"',
    ]


def test_custom_needs_urls_and_client_id_when_used(tmp_path: Path) -> None:
    assert problems(tmp_path, OAUTH_IMAP) == [
        "[upstream.imap] host: required (the upstream IMAP server)",
        '[oauth2] device_authorization_url: required with provider = "custom"'
        " (or authorization_url, for the browser flow)",
        '[oauth2] token_url: required with provider = "custom"',
        "[oauth2] client_id: required (the application ID of the registration)",
    ]


def test_bad_values_are_named(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        '[upstream.imap]\nhost = "h"\n[upstream.smtp]\nauth = "oauth2"\nhost = "s"\n'
        '[oauth2]\nprovider = "microsoft"\ntenant = "bad tenant"\nclient_id = "c"\n'
        'token_url = "http://idp.example.org/token"\nscopes = ["a b", "ok"]\n'
        'mechanism = "plain"\ntoken_key = "c2hvcnQ="\n',
    )
    assert found == [
        '[oauth2] scopes: "a b": not an OAuth scope (no spaces, quotes or backslashes)',
        '[oauth2] mechanism: must be one of "xoauth2", "oauthbearer", got "plain"',
        '[oauth2] tenant: expected "common", "organizations", a domain or a tenant ID, got'
        ' "bad tenant"',
        "[oauth2] token_url: must be https:// (client secrets and refresh tokens travel in it):"
        ' "http://idp.example.org/token"',
        "[oauth2] token_key: must be 32 bytes in base64",
    ]


def test_loopback_http_is_allowed_and_secrets_come_from_files(tmp_path: Path) -> None:
    key = base64.b64encode(bytes(32)).decode()
    (tmp_path / "key").write_text(key + "\n")
    (tmp_path / "secret").write_text("client-secret-value\n")
    config = load(
        tmp_path,
        OAUTH_IMAP.replace("\n", '\nhost = "h"\n', 1)
        + '[oauth2]\ndevice_authorization_url = "http://127.0.0.1:8080/d"\n'
        'token_url = "http://localhost:8080/t"\nclient_id = "c"\n'
        'client_secret_file = "secret"\ntoken_key_file = "key"\ntoken_dir = "tok"\n',
    )
    assert config.oauth2.client_secret == "client-secret-value"
    assert config.oauth2.token_key == key
    assert config.oauth2.token_dir == tmp_path / "tok"
    rendered = render_effective(config)
    assert "client-secret-value" not in rendered and key not in rendered
    assert 'client_secret = "<redacted>"' in rendered


def test_scopes_from_the_environment(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        '[upstream.imap]\nhost = "h"\n',
        {
            "POPGATE_OAUTH2_SCOPES": "mail, offline_access",
            "POPGATE_UPSTREAM_SMTP_AUTH": "oauth2",
            "POPGATE_OAUTH2_PROVIDER": "google",
            "POPGATE_OAUTH2_CLIENT_ID": "c",
        },
    )
    assert config.oauth2.scopes == ("mail", "offline_access")
    assert config.upstream.smtp.host == "smtp.gmail.com"
