"""load_config / render_effective: the configuration contract, one rule per test."""

from __future__ import annotations

import dataclasses
import functools
import re
import tomllib
from pathlib import Path

import pytest

from gateway.config import (
    _SCHEMA,
    REDACTED,
    SECRET_KEYS,
    Config,
    ConfigError,
    ListenAddress,
    SecuritySettings,
    env_var_name,
    load_config,
    render_effective,
)

MINIMAL = '[upstream.imap]\nhost = "imap.example.com"\n'
SECRET = "hunter2-do-not-print"


@pytest.fixture
def conf_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config directory that is *not* the working directory, to catch cwd-relative paths."""
    directory = tmp_path / "etc"
    directory.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return directory


def write(directory: Path, text: str, name: str = "popgate.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def load(directory: Path, text: str, env: dict[str, str] | None = None) -> Config:
    return load_config(write(directory, text), environ=env or {})


def problems(directory: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(directory, text, env)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


# --------------------------------------------------------------------------- defaults


def test_minimal_file_gets_contract_defaults(conf_dir: Path) -> None:
    config = load(conf_dir, MINIMAL)

    assert config.upstream.imap.host == "imap.example.com"
    assert config.upstream.imap.port == 993
    assert config.upstream.imap.security == "tls"
    assert config.upstream.imap.verify_certificate is True
    assert config.upstream.imap.ca_file is None
    assert config.upstream.smtp.port == 587
    assert config.pop3.listen == (ListenAddress("0.0.0.0", 110),)
    assert config.pop3.listen_tls == ()
    assert config.pop3.idle_timeout == 600
    assert config.pop3.tls_min_version is None
    assert config.submission.listen == ()
    assert config.tls.min_version == "TLSv1.2"
    assert config.security.insecure_auth_networks == ("127.0.0.0/8", "::1/128")
    assert config.retention.quota_target_percent == 80
    assert config.log.level == "info"
    assert config.log.format == "text"
    assert config.warnings == ()
    assert config.source == conf_dir / "popgate.toml"


def test_default_certificate_paths_are_next_to_the_file(conf_dir: Path) -> None:
    config = load(conf_dir, MINIMAL)

    assert config.tls.cert_file == conf_dir / "certs" / "popgate.crt"
    assert config.tls.key_file == conf_dir / "certs" / "popgate.key"
    assert config.tls.second_cert_file == conf_dir / "certs" / "popgate-ecdsa.crt"
    assert config.tls.second_key_file == conf_dir / "certs" / "popgate-ecdsa.key"


def test_second_pair_follows_the_first_unless_named(conf_dir: Path) -> None:
    config = load(
        conf_dir,
        MINIMAL + '[tls]\ncert_file = "/etc/ssl/gw/rsa.pem"\nsecond_key_file = "ec.key"\n',
    )

    assert config.tls.second_pair == (Path("/etc/ssl/gw/rsa-ecdsa.pem"), conf_dir / "ec.key")


@pytest.mark.parametrize(("security", "port"), [("tls", 993), ("starttls", 143), ("none", 143)])
def test_imap_port_default_follows_security(conf_dir: Path, security: str, port: int) -> None:
    config = load(conf_dir, MINIMAL + f'security = "{security}"\n')

    assert config.upstream.imap.port == port


def test_explicit_imap_port_wins(conf_dir: Path) -> None:
    config = load(conf_dir, MINIMAL + 'security = "starttls"\nport = 1143\n')

    assert config.upstream.imap.port == 1143


@pytest.mark.parametrize(("security", "port"), [("tls", 465), ("starttls", 587), ("none", 587)])
def test_smtp_port_default_follows_security(conf_dir: Path, security: str, port: int) -> None:
    config = load(conf_dir, MINIMAL + f'[upstream.smtp]\nhost = "smtp"\nsecurity = "{security}"\n')

    assert config.upstream.smtp.port == port


# --------------------------------------------------------------------------- syntax / unknown


def test_toml_syntax_error_is_one_problem_with_position(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, '[pop3]\nmailbox = "INBOX\n')

    with pytest.raises(ConfigError) as caught:
        load_config("popgate.toml", environ={})

    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("popgate.toml:2:")
    assert "(at line" not in caught.value.problems[0]


def test_syntax_error_at_end_of_document_still_has_a_position(conf_dir: Path) -> None:
    found = problems(conf_dir, "[pop3]\nmailbox =")

    assert len(found) == 1
    assert found[0].startswith(f"{conf_dir / 'popgate.toml'}:2:")


def test_file_name_is_printed_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf").mkdir()
    write(tmp_path / "conf", "[pop3]\nidle_timeout = 600\n")
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ConfigError) as caught:
        load_config("conf/popgate.toml", environ={})

    assert caught.value.problems == [
        "conf/popgate.toml: [upstream.imap] host: required (the upstream IMAP server)"
    ]


def test_every_unknown_name_is_reported(conf_dir: Path) -> None:
    text = MINIMAL + (
        "stray = 1\n"
        "[upstream.pop]\nhost = 'x'\n"
        "[pop3]\nidle_timout = 700\nlisten_ssl = []\n"
        "[tsl]\nmin_version = 'TLSv1'\n"
    )
    name = conf_dir / "popgate.toml"

    found = problems(conf_dir, text)

    assert found == [
        f"{name}: [upstream.imap] stray: unknown key",
        f"{name}: [upstream.pop]: unknown section",
        f"{name}: [pop3] idle_timout: unknown key (did you mean idle_timeout?)",
        f"{name}: [pop3] listen_ssl: unknown key (did you mean listen_tls?)",
        f"{name}: [tsl]: unknown section",
    ]


def test_top_level_key_and_non_table_section(conf_dir: Path) -> None:
    name = conf_dir / "popgate.toml"

    found = problems(conf_dir, "debug = true\npop3 = 5\n" + MINIMAL)

    assert found == [
        f"{name}: debug: unknown key outside any section",
        f"{name}: [pop3]: expected a table, got integer",
    ]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.toml", environ={})

    assert caught.value.problems == [
        f"{tmp_path / 'nope.toml'}: cannot read the file: No such file or directory"
    ]


def test_file_that_is_not_utf8(conf_dir: Path) -> None:
    path = conf_dir / "popgate.toml"
    path.write_bytes(b'[upstream.imap]\nhost = "caf\xe9"\n')

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})

    assert caught.value.problems == [f"{path}:2:1: not valid UTF-8"]


# --------------------------------------------------------------------------- types and values


def test_wrong_type_message_names_both_types(conf_dir: Path) -> None:
    name = conf_dir / "popgate.toml"

    found = problems(
        conf_dir,
        MINIMAL + 'port = true\nverify_certificate = "yes"\n[pop3]\nidle_timeout = "600"\n'
        "listen = '0.0.0.0:110'\n",
    )

    assert found == [
        f"{name}: [upstream.imap] port: expected an integer, got boolean",
        f"{name}: [upstream.imap] verify_certificate: "
        "expected a boolean (true or false), got string",
        f"{name}: [pop3] listen: expected an array of strings, got string",
        f"{name}: [pop3] idle_timeout: expected a number, got string",
    ]


def test_invalid_choice_lists_the_allowed_values(conf_dir: Path) -> None:
    found = problems(conf_dir, MINIMAL + '[pop3]\non_delete = "purge"\n')

    assert found == [
        f"{conf_dir / 'popgate.toml'}: [pop3] on_delete: must be one of "
        '"hide", "seen", "archive", "trash", "expunge", got "purge"'
    ]


def test_all_problems_are_collected_across_sections(conf_dir: Path) -> None:
    found = problems(
        conf_dir,
        '[upstream.imap]\nsecurity = "ssl"\n[log]\nlevel = "loud"\nformat = "xml"\n'
        "[retention]\ndelete_after_days = -1\n",
    )

    assert [p.split(": ", 2)[1] for p in found] == [
        "[upstream.imap] security",
        "[retention] delete_after_days",
        "[log] level",
        "[log] format",
        "[upstream.imap] host",
    ]


def test_empty_required_string_is_an_error(conf_dir: Path) -> None:
    found = problems(conf_dir, '[upstream.imap]\nhost = ""\n')

    assert found == [f"{conf_dir / 'popgate.toml'}: [upstream.imap] host: must not be empty"]


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_upstream_port_range(conf_dir: Path, port: int) -> None:
    found = problems(conf_dir, MINIMAL + f"port = {port}\n")

    assert len(found) == 1
    assert "[upstream.imap] port: must be at" in found[0]


def test_smtp_host_not_required_without_submission_listeners(conf_dir: Path) -> None:
    config = load(conf_dir, MINIMAL + "[submission]\nlisten = []\nlisten_tls = []\n")

    assert config.upstream.smtp.host == ""


@pytest.mark.parametrize("key", ["listen", "listen_tls"])
def test_smtp_host_required_with_any_submission_listener(conf_dir: Path, key: str) -> None:
    found = problems(conf_dir, MINIMAL + f'[submission]\n{key} = ["127.0.0.1:0"]\n')

    assert found == [
        f"{conf_dir / 'popgate.toml'}: [upstream.smtp] host: "
        "required when [submission] has listeners"
    ]


# --------------------------------------------------------------------------- listeners


def test_listen_addresses_parse(conf_dir: Path) -> None:
    config = load(
        conf_dir,
        MINIMAL + '[pop3]\nlisten = ["127.0.0.1:0", "[::1]:0"]\nlisten_tls = ["[::]:995"]\n',
    )

    assert config.pop3.listen == (ListenAddress("127.0.0.1", 0), ListenAddress("::1", 0))
    assert config.pop3.listen_tls == (ListenAddress("::", 995),)
    assert [str(a) for a in config.pop3.listen] == ["127.0.0.1:0", "[::1]:0"]


def test_every_bad_listen_entry_is_reported(conf_dir: Path) -> None:
    found = problems(
        conf_dir,
        MINIMAL + '[pop3]\nlisten = ["localhost:110", "::1:110", "1.2.3.4:65536", "1.2.3.4",'
        ' "[1.2.3.4]:110", "0.0.0.0:65535"]\n',
    )

    label = f"{conf_dir / 'popgate.toml'}: [pop3] listen: "
    assert found == [
        label + '"localhost:110": the host must be an IP address (0.0.0.0 or [::] for all)',
        label + '"::1:110": write IPv6 addresses in brackets, e.g. [::1]:110',
        label + '"1.2.3.4:65536": port must be 0-65535',
        label + '"1.2.3.4": expected "host:port" or "[ipv6]:port"',
        label + '"[1.2.3.4]:110": only IPv6 addresses go in brackets',
    ]


def test_same_address_twice_is_an_error_but_port_zero_is_not(conf_dir: Path) -> None:
    found = problems(
        conf_dir,
        MINIMAL + '[upstream.smtp]\nhost = "smtp"\n'
        '[pop3]\nlisten = ["127.0.0.1:0", "127.0.0.1:2110"]\n'
        '[submission]\nlisten = ["127.0.0.1:0"]\nlisten_tls = ["127.0.0.1:2110"]\n',
    )

    assert found == [
        f"{conf_dir / 'popgate.toml'}: [submission] listen_tls: "
        "127.0.0.1:2110 is also used by [pop3] listen"
    ]


# --------------------------------------------------------------------------- pop3 / tls rules


def test_short_idle_timeout_is_accepted_with_a_warning(conf_dir: Path) -> None:
    config = load(conf_dir, MINIMAL + "[pop3]\nidle_timeout = 30\n")

    assert config.pop3.idle_timeout == 30.0
    assert len(config.warnings) == 1
    assert config.warnings[0].startswith(f"{conf_dir / 'popgate.toml'}: [pop3] idle_timeout: 30 s")
    assert "RFC 1939" in config.warnings[0]


@pytest.mark.parametrize("value", ["0", "-5", "inf", "nan"])
def test_idle_timeout_must_be_positive_and_finite(conf_dir: Path, value: str) -> None:
    found = problems(conf_dir, MINIMAL + f"[pop3]\nidle_timeout = {value}\n")

    assert len(found) == 1
    assert found[0].startswith(f"{conf_dir / 'popgate.toml'}: [pop3] idle_timeout: must be")


def test_empty_strings_mean_unset(conf_dir: Path) -> None:
    config = load(
        conf_dir,
        MINIMAL + 'ca_file = ""\n[pop3]\ntls_min_version = ""\n'
        '[submission]\ntls_min_version = "TLSv1"\n[tls]\nmin_version = "TLSv1.3"\n',
    )

    assert config.upstream.imap.ca_file is None
    assert config.pop3.tls_min_version is None
    assert config.submission.tls_min_version == "TLSv1"
    assert config.tls_min_version_for("pop3") == "TLSv1.3"
    assert config.tls_min_version_for("submission") == "TLSv1"


def test_tls_floor_cannot_be_empty(conf_dir: Path) -> None:
    found = problems(conf_dir, MINIMAL + '[tls]\nmin_version = ""\n')

    assert found == [f"{conf_dir / 'popgate.toml'}: [tls] min_version: must not be empty"]


def test_device_separator_must_not_be_whitespace(conf_dir: Path) -> None:
    found = problems(conf_dir, MINIMAL + '[pop3]\ndevice_separator = " "\n')

    assert len(found) == 1
    assert "[pop3] device_separator:" in found[0]


def test_quota_target_must_be_below_high_mark(conf_dir: Path) -> None:
    ok = load(conf_dir, MINIMAL + "[retention]\nquota_high_percent = 90\n")
    found = problems(
        conf_dir, MINIMAL + "[retention]\nquota_high_percent = 70\nquota_target_percent = 70\n"
    )

    assert ok.retention.quota_high_percent == 90
    assert found == [
        f"{conf_dir / 'popgate.toml'}: [retention] quota_target_percent: "
        "must be below quota_high_percent (70), got 70"
    ]


def test_clear_text_upstream_warns_unless_loopback(conf_dir: Path) -> None:
    remote = load(conf_dir, MINIMAL + 'security = "none"\n')
    local = load(conf_dir, '[upstream.imap]\nhost = "127.0.0.1"\nsecurity = "none"\n')

    assert len(remote.warnings) == 1
    assert "[upstream.imap] security" in remote.warnings[0]
    assert local.warnings == ()


def test_disabled_verification_warns(conf_dir: Path) -> None:
    config = load(conf_dir, MINIMAL + "verify_certificate = false\n")

    assert config.upstream.imap.verify_certificate is False
    assert [w.split(": ")[1] for w in config.warnings] == ["[upstream.imap] verify_certificate"]


# --------------------------------------------------------------------------- paths


def test_relative_paths_resolve_against_the_file_directory(conf_dir: Path) -> None:
    (conf_dir / "ca.pem").write_text("placeholder")
    config = load(
        conf_dir,
        MINIMAL + 'ca_file = "ca.pem"\n[submission]\nspool_dir = "spool"\n'
        '[tls]\ncert_file = "tls/a.crt"\nkey_file = "/abs/a.key"\n',
    )

    assert config.upstream.imap.ca_file == conf_dir / "ca.pem"
    assert config.submission.spool_dir == conf_dir / "spool"
    assert config.tls.cert_file == conf_dir / "tls" / "a.crt"
    assert config.tls.key_file == Path("/abs/a.key")


def test_relative_config_path_still_gives_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, MINIMAL + '[submission]\nspool_dir = "spool"\n')
    monkeypatch.chdir(tmp_path)

    config = load_config("popgate.toml", environ={})

    assert config.submission.spool_dir == tmp_path / "spool"
    assert config.source == Path("popgate.toml")


def test_missing_ca_file_is_an_error(conf_dir: Path) -> None:
    found = problems(conf_dir, MINIMAL + 'ca_file = "missing.pem"\n')

    assert found == [
        f"{conf_dir / 'popgate.toml'}: [upstream.imap] ca_file: "
        f"{conf_dir / 'missing.pem'} does not exist or is not a file"
    ]


# --------------------------------------------------------------------------- environment


def test_env_var_names() -> None:
    assert env_var_name("upstream.imap", "host") == "POPGATE_UPSTREAM_IMAP_HOST"
    assert env_var_name("pop3", "idle_timeout") == "POPGATE_POP3_IDLE_TIMEOUT"


def test_env_overrides_file_and_is_typed(conf_dir: Path) -> None:
    config = load(
        conf_dir,
        MINIMAL + "[pop3]\nidle_timeout = 700\n",
        {
            "POPGATE_UPSTREAM_IMAP_HOST": "other.example.com",
            "POPGATE_POP3_IDLE_TIMEOUT": "900",
            "POPGATE_UPSTREAM_IMAP_VERIFY_CERTIFICATE": "No",
            "POPGATE_UPSTREAM_IMAP_PORT": " 10993 ",
            "POPGATE_POP3_LISTEN": "127.0.0.1:0, [::1]:0",
            "POPGATE_SECURITY_INSECURE_AUTH_NETWORKS": '["10.0.0.0/8"]',
            "POPGATE_LOG_FORMAT": "json",
        },
    )

    assert config.upstream.imap.host == "other.example.com"
    assert config.pop3.idle_timeout == 900.0
    assert config.upstream.imap.verify_certificate is False
    assert config.upstream.imap.port == 10993
    assert config.pop3.listen == (ListenAddress("127.0.0.1", 0), ListenAddress("::1", 0))
    assert config.security.insecure_auth_networks == ("10.0.0.0/8",)
    assert config.log.format == "json"


def test_env_can_supply_a_required_key(conf_dir: Path) -> None:
    config = load(conf_dir, "", {"POPGATE_UPSTREAM_IMAP_HOST": "imap.example.net"})

    assert config.upstream.imap.host == "imap.example.net"


def test_empty_env_list_means_no_listeners(conf_dir: Path) -> None:
    config = load(conf_dir, MINIMAL, {"POPGATE_POP3_LISTEN": ""})

    assert config.pop3.listen == ()


def test_bad_env_values_name_the_variable(conf_dir: Path) -> None:
    found = problems(
        conf_dir,
        MINIMAL,
        {
            "POPGATE_POP3_IDLE_TIMEOUT": "ten minutes",
            "POPGATE_UPSTREAM_IMAP_VERIFY_CERTIFICATE": "maybe",
            "POPGATE_POP3_LISTEN": "[oops",
            "POPGATE_LOG_LEVEL": "loud",
        },
    )

    name = conf_dir / "popgate.toml"
    assert found[0] == (
        f"{name}: [upstream.imap] verify_certificate"
        " (from POPGATE_UPSTREAM_IMAP_VERIFY_CERTIFICATE):"
        ' expected true/false/1/0/yes/no, got "maybe"'
    )
    assert found[1].startswith(
        f"{name}: [pop3] listen (from POPGATE_POP3_LISTEN): not a valid TOML array"
    )
    assert found[2] == (
        f"{name}: [pop3] idle_timeout (from POPGATE_POP3_IDLE_TIMEOUT): "
        'expected a number, got "ten minutes"'
    )
    assert found[3].startswith(f"{name}: [log] level (from POPGATE_LOG_LEVEL): must be one of")
    assert len(found) == 4


def test_unknown_popgate_env_var_is_a_warning_and_config_var_is_not(conf_dir: Path) -> None:
    config = load(conf_dir, MINIMAL, {"POPGATE_CONFIG": "/x.toml", "POPGATE_POP3_IDLE_TIMOUT": "5"})

    assert config.warnings == ("POPGATE_POP3_IDLE_TIMOUT: not a popgate setting; ignored",)


def test_environ_defaults_to_the_process_environment(
    conf_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POPGATE_POP3_MAILBOX", "Devices")

    config = load_config(write(conf_dir, MINIMAL))

    assert config.pop3.mailbox == "Devices"


def test_relative_path_from_env_is_relative_to_the_working_directory(conf_dir: Path) -> None:
    config = load(conf_dir, MINIMAL, {"POPGATE_SUBMISSION_SPOOL_DIR": "spool"})

    assert config.submission.spool_dir == Path.cwd() / "spool"


# --------------------------------------------------------------------------- secrets

MASTER = MINIMAL + 'master_user = "admin"\n'


def test_secret_keys_are_declared() -> None:
    assert "upstream.imap.master_password" in SECRET_KEYS


def test_secret_from_file_strips_one_newline(conf_dir: Path) -> None:
    (conf_dir / "master.pw").write_text(SECRET + "\n\n")

    config = load(conf_dir, MASTER + 'master_password_file = "master.pw"\n')

    assert config.upstream.imap.master_password == SECRET + "\n"


def test_secret_from_file_keeps_inner_whitespace(conf_dir: Path) -> None:
    (conf_dir / "master.pw").write_text(" a b\r\n")

    config = load(conf_dir, MASTER + 'master_password_file = "master.pw"\n')

    assert config.upstream.imap.master_password == " a b"


def test_secret_and_its_file_twin_together_is_an_error(conf_dir: Path) -> None:
    (conf_dir / "master.pw").write_text("x")

    found = problems(
        conf_dir, MASTER + f'master_password = "{SECRET}"\nmaster_password_file = "master.pw"\n'
    )

    assert found == [
        f"{conf_dir / 'popgate.toml'}: [upstream.imap] master_password_file: "
        "set either master_password or master_password_file, not both"
    ]


def test_empty_twin_does_not_conflict(conf_dir: Path) -> None:
    config = load(conf_dir, MASTER + f'master_password = "{SECRET}"\nmaster_password_file = ""\n')

    assert config.upstream.imap.master_password == SECRET


def test_unreadable_secret_file(conf_dir: Path) -> None:
    found = problems(conf_dir, MASTER + 'master_password_file = "nope"\n')

    assert found == [
        f"{conf_dir / 'popgate.toml'}: [upstream.imap] master_password_file: "
        f"cannot read {conf_dir / 'nope'}: No such file or directory"
    ]


def test_env_secret_file_replaces_the_files_secret(conf_dir: Path, tmp_path: Path) -> None:
    secret_file = tmp_path / "run-secret"
    secret_file.write_text(SECRET + "\n")

    config = load(
        conf_dir,
        MASTER + 'master_password = "from-the-file"\n',
        {"POPGATE_UPSTREAM_IMAP_MASTER_PASSWORD_FILE": str(secret_file)},
    )

    assert config.upstream.imap.master_password == SECRET


def test_env_secret_replaces_the_files_twin(conf_dir: Path) -> None:
    config = load(
        conf_dir,
        MASTER + 'master_password_file = "/does/not/matter"\n',
        {"POPGATE_UPSTREAM_IMAP_MASTER_PASSWORD": SECRET},
    )

    assert config.upstream.imap.master_password == SECRET


def test_both_twins_in_env_is_an_error(conf_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "s").write_text("x")

    found = problems(
        conf_dir,
        MASTER,
        {
            "POPGATE_UPSTREAM_IMAP_MASTER_PASSWORD": SECRET,
            "POPGATE_UPSTREAM_IMAP_MASTER_PASSWORD_FILE": str(tmp_path / "s"),
        },
    )

    assert len(found) == 1
    assert "not both" in found[0]
    assert SECRET not in found[0]


@pytest.mark.parametrize(
    ("text", "missing"),
    [
        (MASTER, "master_password"),
        (MINIMAL + f'master_password = "{SECRET}"\n', "master_user"),
    ],
)
def test_master_identity_needs_both_halves(conf_dir: Path, text: str, missing: str) -> None:
    found = problems(conf_dir, text)

    assert len(found) == 1
    assert f"[upstream.imap] {missing}: required when" in found[0]
    assert SECRET not in found[0]


def test_secret_never_appears_in_repr_or_errors(conf_dir: Path) -> None:
    config = load(conf_dir, MASTER + f'master_password = "{SECRET}"\n')
    found = problems(conf_dir, MASTER + f'master_password = "{SECRET}"\n[pop3]\nbad = 1\n')

    assert config.upstream.imap.master_password == SECRET
    assert SECRET not in repr(config)
    assert SECRET not in "\n".join(found)


def test_secret_of_the_wrong_type_does_not_echo_it(conf_dir: Path) -> None:
    found = problems(conf_dir, MASTER + "master_password = 123456789\n")

    assert found == [
        f"{conf_dir / 'popgate.toml'}: [upstream.imap] master_password: "
        "expected a string, got integer"
    ]


# --------------------------------------------------------------------------- networks


def test_insecure_auth_networks_are_normalised(conf_dir: Path) -> None:
    config = load(
        conf_dir, MINIMAL + '[security]\ninsecure_auth_networks = ["10.1.2.3/8", "fd00::1/64"]\n'
    )

    assert config.security.insecure_auth_networks == ("10.0.0.0/8", "fd00::/64")


def test_invalid_network(conf_dir: Path) -> None:
    found = problems(conf_dir, MINIMAL + '[security]\ninsecure_auth_networks = ["10.0.0.0/33"]\n')

    assert found == [
        f"{conf_dir / 'popgate.toml'}: [security] insecure_auth_networks: "
        '"10.0.0.0/33": not an IP network such as "10.0.0.0/8"'
    ]


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),  # IPv4 client on a dual-stack listener
        ("192.0.2.7", False),
        ("2001:db8::1", False),
        ("not-an-ip", False),
    ],
)
def test_allows_insecure_auth(address: str, allowed: bool) -> None:
    assert SecuritySettings().allows_insecure_auth(address) is allowed


# --------------------------------------------------------------------------- render_effective


def test_effective_config_round_trips(conf_dir: Path) -> None:
    (conf_dir / "ca.pem").write_text("placeholder")
    original = load(
        conf_dir,
        MASTER + f'master_password = "{SECRET}"\nca_file = "ca.pem"\nsecurity = "starttls"\n'
        '[upstream.smtp]\nhost = "smtp.example.com"\n'
        '[pop3]\nlisten = ["[::1]:0"]\nidle_timeout = 612.5\narchive_folder = "Old \\"POP\\""\n'
        '[submission]\nlisten_tls = ["127.0.0.1:0"]\n'
        '[tls]\nmin_version = "TLSv1"\n',
    )

    text = render_effective(original)
    reloaded = load(conf_dir, text.replace(REDACTED, "again"), {})

    assert dataclasses.replace(reloaded, upstream=original.upstream) == original
    assert reloaded.upstream.smtp == original.upstream.smtp
    assert dataclasses.replace(reloaded.upstream.imap, master_password=SECRET) == (
        original.upstream.imap
    )
    assert reloaded.upstream.imap.master_password == "again"
    assert reloaded.upstream.imap.port == 143
    assert reloaded.upstream.imap.ca_file == conf_dir / "ca.pem"
    assert reloaded.pop3.archive_folder == 'Old "POP"'


def test_effective_config_redacts_secrets_and_lists_every_key(conf_dir: Path) -> None:
    config = load(conf_dir, MASTER + f'master_password = "{SECRET}"\n')

    text = render_effective(config)
    parsed = tomllib.loads(text)

    assert SECRET not in text
    assert parsed["upstream"]["imap"]["master_password"] == REDACTED
    assert parsed["upstream"]["imap"]["port"] == 993
    assert parsed["pop3"]["listen"] == ["0.0.0.0:110"]
    assert parsed["pop3"]["tls_min_version"] == ""
    assert set(parsed) == {
        "upstream",
        "pop3",
        "submission",
        "tls",
        "security",
        "retention",
        "log",
        "http",
        "oauth2",
    }


def test_unset_secret_renders_empty(conf_dir: Path) -> None:
    parsed = tomllib.loads(render_effective(load(conf_dir, MINIMAL)))

    assert parsed["upstream"]["imap"]["master_password"] == ""


# --------------------------------------------------------------------------- documentation

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def _doc_examples() -> list[str]:
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.DOTALL)
    return [b for b in blocks if "[upstream.imap]" in b]


def test_documentation_has_the_examples_it_promises() -> None:
    examples = _doc_examples()

    assert len(examples) >= 4
    assert any('tls_min_version = "TLSv1"' in e for e in examples)


@pytest.mark.parametrize("example", _doc_examples())
def test_documented_examples_load(conf_dir: Path, tmp_path: Path, example: str) -> None:
    env: dict[str, str] = {}
    if "master_user" in example:  # the container example takes its secret from a file
        (tmp_path / "secret").write_text("x\n")
        env["POPGATE_UPSTREAM_IMAP_MASTER_PASSWORD_FILE"] = str(tmp_path / "secret")

    config = load(conf_dir, example, env)

    assert config.upstream.imap.host
    assert config.warnings == ()


def test_documentation_lists_every_key() -> None:
    text = DOCS.read_text(encoding="utf-8")

    for section, keys in _SCHEMA.items():
        assert f"### `[{section}]`" in text
        for key in keys:
            assert f"| `{key}` |" in text, f"[{section}] {key} is not documented"


def test_imap_timeout_defaults_to_60_and_must_be_positive(conf_dir: Path) -> None:
    assert load(conf_dir, MINIMAL).upstream.imap.timeout == 60
    assert load(conf_dir, MINIMAL + "timeout = 2.5\n").upstream.imap.timeout == 2.5
    env = {"POPGATE_UPSTREAM_IMAP_TIMEOUT": "7"}
    assert load(conf_dir, MINIMAL, env).upstream.imap.timeout == 7
    [problem] = problems(conf_dir, MINIMAL + "timeout = 0\n")
    assert "[upstream.imap] timeout: must be greater than 0" in problem
    [problem] = problems(conf_dir, MINIMAL + 'timeout = "soon"\n')
    assert "[upstream.imap] timeout:" in problem


# Every key that is a wait or an age: the ones a 0 would break (every upstream command failing at
# once, a busy retry loop) refuse 0 and below; the ones where 0 means "off" say so in
# docs/configuration.md and refuse only negatives.
_WAITS_ZERO_BREAKS = [
    ("upstream.imap", "timeout"),
    ("upstream.smtp", "timeout"),
    ("pop3", "idle_timeout"),
    ("submission", "retry_initial_delay"),
    ("submission", "retry_max_delay"),
    ("retention", "time_limit"),
    ("retention", "device_inactive_days"),
]
_WAITS_ZERO_IS_OFF = [
    ("security", "auth_failure_delay"),
    ("security", "auth_failure_max_delay"),
    ("retention", "delete_after_days"),
    ("retention", "after_all_devices_days"),
    ("retention", "sweep_interval"),
]


def _in_section(section: str, line: str) -> str:
    if section == "upstream.imap":
        return MINIMAL + line + "\n"
    return MINIMAL + f"[{section}]\n{line}\n"


def test_every_wait_key_is_classified() -> None:
    timing = re.compile(r"timeout|delay|interval|time_limit|_days$")
    found = {(s, k) for s, keys in _SCHEMA.items() for k in keys if timing.search(k)}
    assert found == set(_WAITS_ZERO_BREAKS) | set(_WAITS_ZERO_IS_OFF)


@pytest.mark.parametrize(("section", "key"), _WAITS_ZERO_BREAKS)
@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_wait_that_zero_would_break_refuses_zero_and_below(
    conf_dir: Path, section: str, key: str, value: str
) -> None:
    [problem] = problems(conf_dir, _in_section(section, f"{key} = {value}"))
    assert f"[{section}] {key}: must be " in problem
    assert problem.endswith(f", got {value}")


@pytest.mark.parametrize(("section", "key"), _WAITS_ZERO_IS_OFF)
def test_a_wait_where_zero_means_off_takes_zero_but_not_below(
    conf_dir: Path, section: str, key: str
) -> None:
    # The cap may only be 0 with the delay it caps (checked elsewhere).
    first = "auth_failure_delay = 0\n" if key == "auth_failure_max_delay" else ""
    config = load(conf_dir, _in_section(section, f"{first}{key} = 0"))
    assert getattr(functools.reduce(getattr, section.split("."), config), key) == 0
    [problem] = problems(conf_dir, _in_section(section, f"{first}{key} = -1"))
    assert f"[{section}] {key}: must " in problem


# --------------------------------------------------------------------------- throttling and limits


def test_limits_defaults(conf_dir: Path) -> None:
    security = load(conf_dir, MINIMAL).security

    assert security.auth_failure_delay == 2.0
    assert security.auth_failure_max_delay == 15.0
    assert security.max_connections == 2000
    assert security.max_connections_per_ip == 50


def test_failure_delay_zero_turns_it_off(conf_dir: Path) -> None:
    text = MINIMAL + "[security]\nauth_failure_delay = 0\nauth_failure_max_delay = 0\n"

    assert load(conf_dir, text).security.auth_failure_delay == 0


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        ("auth_failure_delay = -1.5", "auth_failure_delay: must not be negative, got -1.5"),
        ("auth_failure_max_delay = -1", "auth_failure_max_delay: must not be negative, got -1"),
        ("auth_failure_delay = nan", "auth_failure_delay: must be a finite number, got nan"),
        ('auth_failure_delay = "2"', "auth_failure_delay: expected a number, got string"),
        ("max_connections = 0", "max_connections: must be at least 1, got 0"),
        ("max_connections_per_ip = -5", "max_connections_per_ip: must be at least 1, got -5"),
        ("max_connections = 2.5", "max_connections: expected an integer, got float"),
        (
            "auth_failure_delay = 20.0",
            "auth_failure_max_delay: must be at least auth_failure_delay (20), got 15",
        ),
        (
            "max_connections = 10",
            "max_connections_per_ip: must not exceed max_connections (10), got 50",
        ),
    ],
)
def test_bad_limits_are_refused(conf_dir: Path, setting: str, problem: str) -> None:
    found = problems(conf_dir, MINIMAL + f"[security]\n{setting}\n")

    assert found == [f"{conf_dir / 'popgate.toml'}: [security] {problem}"]


def test_limits_from_the_environment(conf_dir: Path) -> None:
    env = {
        "POPGATE_SECURITY_MAX_CONNECTIONS": "100",
        "POPGATE_SECURITY_MAX_CONNECTIONS_PER_IP": "200",
    }

    found = problems(conf_dir, MINIMAL, env)

    assert found == [
        f"{conf_dir / 'popgate.toml'}: [security] max_connections_per_ip: "
        "must not exceed max_connections (100), got 200"
    ]


def test_retention_device_keys_default_and_parse(conf_dir: Path) -> None:
    base = '[upstream.imap]\nhost = "imap.example.org"\n'
    default = load(conf_dir, base).retention
    assert (default.wait_for_devices, default.device_inactive_days) == (True, 30)
    assert default.after_all_devices_days == 0 and not default.enabled
    custom = load(
        conf_dir,
        base + "[retention]\nwait_for_devices = false\ndevice_inactive_days = 7\n"
        "after_all_devices_days = 14\n",
    ).retention
    assert not custom.wait_for_devices and custom.device_inactive_days == 7
    assert custom.after_all_devices_days == 14 and custom.enabled  # on by itself
    found = problems(conf_dir, base + "[retention]\ndevice_inactive_days = 0\n")
    assert found == [
        f"{conf_dir / 'popgate.toml'}: [retention] device_inactive_days: must be at least 1, got 0"
    ]
