"""The ``popgate`` command line, run as operators run it (``python -m gateway`` in a subprocess),
plus the logging setup that ``serve`` relies on (gateway.log).
"""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.logger import Logger

import gateway
import gateway.log
from gateway.cli import main
from gateway.config import LogSettings
from gateway.log import setup_logging
from gateway.tls import generate_self_signed

MINIMAL = '[upstream.imap]\nhost = "imap.example.com"\n'
SECRET = "hunter2-do-not-print"


def popgate(
    *args: str, cwd: Path, env: dict[str, str] | None = None, umask: int = -1
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m gateway ARGS`` with no POPGATE_* variables but those in ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("POPGATE_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        umask=umask,
        check=False,
    )


# --------------------------------------------------------------------------- version / usage


def test_version(tmp_path: Path) -> None:
    result = popgate("version", cwd=tmp_path)

    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"popgate {gateway.__version__}\n",
        "",
    )


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: popgate" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["frobnicate"])

    assert caught.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# --------------------------------------------------------------------------- check-config


def test_check_config_prints_the_effective_configuration(tmp_path: Path) -> None:
    (tmp_path / "master.pw").write_text(SECRET + "\n")
    (tmp_path / "popgate.toml").write_text(
        MINIMAL + 'master_user = "admin"\nmaster_password_file = "master.pw"\n'
        "[pop3]\nidle_timeout = 120\n"
    )

    result = popgate("check-config", "-c", "popgate.toml", cwd=tmp_path)

    assert result.returncode == 0
    effective = tomllib.loads(result.stdout)
    assert effective["upstream"]["imap"]["host"] == "imap.example.com"
    assert effective["upstream"]["imap"]["port"] == 993
    assert effective["upstream"]["imap"]["master_password"] == "<redacted>"
    assert effective["pop3"]["idle_timeout"] == 120
    assert effective["tls"]["cert_file"] == str(tmp_path / "certs" / "popgate.crt")
    assert SECRET not in result.stdout + result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        "warning: popgate.toml: [pop3] idle_timeout: 120 s is below the 600 s RFC 1939 asks for;"
        " slow clients may be cut off"
    ]
    assert "a self-signed pair is generated at start" in result.stderr


def test_check_config_reports_every_problem_and_exits_2(tmp_path: Path) -> None:
    (tmp_path / "popgate.toml").write_text(
        '[upstream.imap]\nsecurity = "ssl"\n[pop3]\nidle_timout = 5\nidle_timeout = "x"\n'
    )

    result = popgate("check-config", "-c", "popgate.toml", cwd=tmp_path)

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "popgate.toml: [pop3] idle_timout: unknown key (did you mean idle_timeout?)",
        'popgate.toml: [upstream.imap] security: must be one of "tls", "starttls", "none",'
        ' got "ssl"',
        "popgate.toml: [pop3] idle_timeout: expected a number, got string",
        "popgate.toml: [upstream.imap] host: required (the upstream IMAP server)",
    ]


def test_check_config_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "popgate.toml").write_text(MINIMAL + "port = \n")

    result = popgate("check-config", "-c", "popgate.toml", cwd=tmp_path)

    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("popgate.toml:3:")


def test_check_config_uses_popgate_config(tmp_path: Path) -> None:
    (tmp_path / "conf.toml").write_text(MINIMAL)

    result = popgate("check-config", cwd=tmp_path, env={"POPGATE_CONFIG": "conf.toml"})

    assert result.returncode == 0
    assert tomllib.loads(result.stdout)["upstream"]["imap"]["host"] == "imap.example.com"


def test_dash_c_wins_over_popgate_config(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(MINIMAL)

    result = popgate(
        "check-config", "-c", "a.toml", cwd=tmp_path, env={"POPGATE_CONFIG": "missing.toml"}
    )

    assert result.returncode == 0


def test_check_config_applies_env_overrides(tmp_path: Path) -> None:
    (tmp_path / "popgate.toml").write_text(MINIMAL)

    result = popgate(
        "check-config",
        "-c",
        "popgate.toml",
        cwd=tmp_path,
        env={"POPGATE_UPSTREAM_IMAP_HOST": "env.example.com", "POPGATE_POP3_LISTEN": ""},
    )

    assert result.returncode == 0
    effective = tomllib.loads(result.stdout)
    assert effective["upstream"]["imap"]["host"] == "env.example.com"
    assert effective["pop3"]["listen"] == []


def test_no_config_at_all(tmp_path: Path) -> None:
    result = popgate("check-config", cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr == "popgate: no configuration file: pass -c FILE or set POPGATE_CONFIG\n"


def test_missing_config_file(tmp_path: Path) -> None:
    result = popgate("check-config", "-c", "nope.toml", cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr == "nope.toml: cannot read the file: No such file or directory\n"


def test_check_config_rejects_half_a_certificate_pair(tmp_path: Path) -> None:
    (tmp_path / "popgate.toml").write_text(MINIMAL)
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "popgate.crt").write_text("x")

    result = popgate("check-config", "-c", "popgate.toml", cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr.startswith("popgate.toml: [tls] cert_file, key_file: ")
    assert result.stderr.endswith(
        f"popgate.crt exists but {tmp_path / 'certs' / 'popgate.key'} does not\n"
    )


def test_check_config_rejects_a_mismatched_pair(tmp_path: Path) -> None:
    (tmp_path / "popgate.toml").write_text(MINIMAL)
    generate_self_signed("a", tmp_path / "certs" / "popgate.crt", tmp_path / "x.key")
    generate_self_signed("b", tmp_path / "y.crt", tmp_path / "certs" / "popgate.key")

    result = popgate("check-config", "-c", "popgate.toml", cwd=tmp_path)

    assert result.returncode == 2
    assert "is not the key of the certificate" in result.stderr


def test_check_config_accepts_a_good_pair_silently(tmp_path: Path) -> None:
    (tmp_path / "popgate.toml").write_text(MINIMAL)
    certs = tmp_path / "certs"
    generate_self_signed("localhost", certs / "popgate.crt", certs / "popgate.key")

    result = popgate("check-config", "-c", "popgate.toml", cwd=tmp_path)

    assert (result.returncode, result.stderr) == (0, "")


def test_serve_with_an_invalid_config_exits_2_before_starting(tmp_path: Path) -> None:
    (tmp_path / "popgate.toml").write_text("[pop3]\n")

    result = popgate("serve", "-c", "popgate.toml", cwd=tmp_path)

    assert result.returncode == 2
    assert result.stdout == ""
    assert (
        result.stderr == "popgate.toml: [upstream.imap] host: required (the upstream IMAP server)\n"
    )


def test_serve_refuses_half_a_certificate_pair_before_starting(tmp_path: Path) -> None:
    (tmp_path / "popgate.toml").write_text(MINIMAL + '[pop3]\nlisten = ["127.0.0.1:0"]\n')
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "popgate.key").write_text("operator's key")

    result = popgate("serve", "-c", "popgate.toml", cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr.startswith("popgate.toml: [tls] cert_file, key_file: ")
    assert (tmp_path / "certs" / "popgate.key").read_text() == "operator's key"
    assert not (tmp_path / "certs" / "popgate.crt").exists()


# --------------------------------------------------------------------------- gen-cert


def test_gen_cert_writes_a_private_key_and_certificate(tmp_path: Path) -> None:
    result = popgate(
        "gen-cert", "--hostname", "printer-gw.lan", "--out", "out/certs", cwd=tmp_path, umask=0
    )

    cert, key = (
        tmp_path / "out" / "certs" / "popgate.crt",
        tmp_path / "out" / "certs" / "popgate.key",
    )
    assert result.returncode == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["printer-gw.lan"]
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    lines = result.stdout.splitlines()
    assert lines[:2] == ["wrote out/certs/popgate.crt", "wrote out/certs/popgate.key"]
    assert lines[3:5] == ["wrote out/certs/popgate-ecdsa.crt", "wrote out/certs/popgate-ecdsa.key"]
    assert lines[2].startswith("SHA-256 fingerprint: ")
    assert lines[5].startswith("SHA-256 fingerprint: ")
    # The second pair: ECDSA P-256, for every client that can use it (cheaper handshakes).
    ecdsa_key = tmp_path / "out" / "certs" / "popgate-ecdsa.key"
    assert stat.S_IMODE(ecdsa_key.stat().st_mode) == 0o600
    ecdsa = x509.load_pem_x509_certificate((tmp_path / "out/certs/popgate-ecdsa.crt").read_bytes())
    assert isinstance(ecdsa.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(certificate.public_key(), rsa.RSAPublicKey)
    ecdsa_san = ecdsa.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ecdsa_san.get_values_for_type(x509.DNSName) == ["printer-gw.lan"]


def test_gen_cert_does_not_replace_a_key_without_force(tmp_path: Path) -> None:
    assert popgate("gen-cert", "--hostname", "a", "--out", ".", cwd=tmp_path).returncode == 0
    key_before = (tmp_path / "popgate.key").read_bytes()

    refused = popgate("gen-cert", "--hostname", "b", "--out", ".", cwd=tmp_path)
    key_after_refusal = (tmp_path / "popgate.key").read_bytes()
    forced = popgate("gen-cert", "--hostname", "b", "--out", ".", "--force", cwd=tmp_path)

    assert refused.returncode == 1
    assert "already exists; pass --force" in refused.stderr
    assert key_after_refusal == key_before
    assert forced.returncode == 0
    assert (tmp_path / "popgate.key").read_bytes() != key_before
    assert stat.S_IMODE((tmp_path / "popgate.key").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "popgate-ecdsa.crt",
        "popgate-ecdsa.key",
        "popgate.crt",
        "popgate.key",
    ]


def test_gen_cert_rejects_an_unusable_hostname(tmp_path: Path) -> None:
    result = popgate("gen-cert", "--hostname", "two words", "--out", ".", cwd=tmp_path)

    assert result.returncode == 2
    assert "not a usable host name" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_gen_cert_requires_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["gen-cert", "--hostname", "x"])

    assert caught.value.code == 2
    assert "--out" in capsys.readouterr().err


# --------------------------------------------------------------------------- oauth login


@pytest.mark.parametrize(
    ("oauth2", "user", "password", "message"),
    [
        # No [oauth2] section at all (token_dir from the environment, kept inside tmp_path).
        ("", "alice", "long-enough-1", "[oauth2] client_id: required for popgate oauth login"),
        (
            '[oauth2]\nprovider = "microsoft"\n',
            "alice",
            "long-enough-1",
            "[oauth2] client_id: required for popgate oauth login",
        ),
        ('[oauth2]\nprovider = "bogus"\n', "alice", "long-enough-1", "[oauth2] provider:"),
        ('[oauth2]\nclient_id = "c"\n', "alice", "long-enough-1", "device_authorization_url"),
        ('[oauth2]\nprovider = "google"\nclient_id = "c"\n', "a#b", "long-enough-1", "device"),
        ('[oauth2]\nprovider = "google"\nclient_id = "c"\n', "alice", "short", "at least 8"),
    ],
)
def test_oauth_login_that_fails_its_checks_leaves_nothing_on_disk(
    tmp_path: Path, oauth2: str, user: str, password: str, message: str
) -> None:
    # Without auth = "oauth2" yet: an operator signs in before switching the upstream over.
    (tmp_path / "popgate.toml").write_text(MINIMAL + oauth2)
    (tmp_path / "password").write_text(password + "\n")
    before = sorted(tmp_path.iterdir())
    result = popgate(
        *("oauth", "login", "-c", "popgate.toml", user),
        *("--device-password-file", "password"),
        cwd=tmp_path,
        env={"POPGATE_OAUTH2_TOKEN_DIR": str(tmp_path / "tokens")},
    )

    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert result.stdout == ""
    assert sorted(tmp_path.iterdir()) == before  # no tokens/, no tokens/token.key


# --------------------------------------------------------------------------- logging (serve)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Run setup_logging into a buffer, then put the logging tree back as it was."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in ("popgate", "popgate.twisted")}
    stream = io.StringIO()
    yield stream
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    gateway.log._installed_handler = None


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_text_line_with_context_fields(log_stream: io.StringIO) -> None:
    setup_logging(LogSettings(), log_stream)

    logging.getLogger("popgate.pop3").info(
        "login %s", "ok", extra={"peer": "127.0.0.1:5555", "user": "alice", "session": "abc"}
    )

    [line] = lines(log_stream)
    timestamp, rest = line.split(" ", 1)
    assert rest == "INFO popgate.pop3 login ok session=abc user=alice peer=127.0.0.1:5555"
    assert len(timestamp) == len("2026-11-23T06:00:00Z")
    assert timestamp.endswith("Z")
    assert timestamp[10] == "T"


def test_text_values_with_spaces_are_quoted_and_newlines_escaped(
    log_stream: io.StringIO,
) -> None:
    setup_logging(LogSettings(), log_stream)

    logging.getLogger("popgate.pop3").warning(
        "bad command %r", "USER a\r\nDELE 1", extra={"device": "my phone"}
    )

    [line] = lines(log_stream)
    assert line.endswith("bad command 'USER a\\r\\nDELE 1' device=\"my phone\"")


def test_exception_stays_on_one_line(log_stream: io.StringIO) -> None:
    setup_logging(LogSettings(), log_stream)

    try:
        raise RuntimeError("upstream went away")
    except RuntimeError:
        logging.getLogger("popgate.imap").exception("fetch failed", extra={"session": "s1"})

    [line] = lines(log_stream)
    assert ' ERROR popgate.imap fetch failed session=s1 exc="Traceback' in line
    assert "RuntimeError: upstream went away" in line


def test_json_format(log_stream: io.StringIO) -> None:
    setup_logging(LogSettings(format="json"), log_stream)

    logging.getLogger("popgate.smtp").warning(
        "relay refused", extra={"user": "bob", "peer": "[::1]:2525", "code": 550}
    )

    [line] = lines(log_stream)
    event = json.loads(line)
    assert event.pop("ts").endswith("Z")
    assert event == {
        "level": "WARNING",
        "logger": "popgate.smtp",
        "msg": "relay refused",
        "user": "bob",
        "peer": "[::1]:2525",
        "code": 550,
    }


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_secret_named_extras_are_redacted(log_stream: io.StringIO, fmt: str) -> None:
    setup_logging(LogSettings(format=fmt), log_stream)  # type: ignore[arg-type]

    logging.getLogger("popgate.pop3").info(
        "login", extra={"user": "alice", "password": SECRET, "master_secret": SECRET, "pass_": 1}
    )

    output = log_stream.getvalue()
    assert SECRET not in output
    assert output.count("<redacted>") == 3
    assert "alice" in output


def test_level_filters_popgate_and_third_parties(log_stream: io.StringIO) -> None:
    setup_logging(LogSettings(level="warning"), log_stream)

    logging.getLogger("popgate.pop3").info("hidden info")
    logging.getLogger("popgate.pop3").warning("shown warning")
    logging.getLogger("mail.log").info("aiosmtpd chatter")
    logging.getLogger("mail.log").error("aiosmtpd error")

    assert [line.split(" ", 1)[1] for line in lines(log_stream)] == [
        "WARNING popgate.pop3 shown warning",
        "ERROR mail.log aiosmtpd error",
    ]


def test_third_party_debug_stays_out_even_at_debug(log_stream: io.StringIO) -> None:
    """aiosmtpd logs protocol lines (AUTH included) at debug level."""
    setup_logging(LogSettings(level="debug"), log_stream)

    logging.getLogger("mail.log").debug("AUTH PLAIN AGFsaWNlAHNlY3JldA==")
    logging.getLogger("popgate.pop3").debug("state -> TRANSACTION")

    assert [line.split(" ", 1)[1] for line in lines(log_stream)] == [
        "DEBUG popgate.pop3 state -> TRANSACTION"
    ]


def test_twisted_log_is_routed_and_formatted(log_stream: io.StringIO) -> None:
    setup_logging(LogSettings(), log_stream)

    Logger(namespace="twisted.test").error("listener failed on {port}", port=110)
    Logger(namespace="twisted.test").info("Starting factory")

    assert [line.split(" ", 1)[1] for line in lines(log_stream)] == [
        "ERROR popgate.twisted listener failed on 110"
    ]


def test_setup_logging_twice_replaces_the_handler(log_stream: io.StringIO) -> None:
    first = io.StringIO()
    setup_logging(LogSettings(), first)
    setup_logging(LogSettings(format="json"), log_stream)

    logging.getLogger("popgate").warning("once")

    assert first.getvalue() == ""
    assert [json.loads(line)["msg"] for line in lines(log_stream)] == ["once"]
