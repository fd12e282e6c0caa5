"""SIGHUP re-reads the certificate and key (CONTRACT.md, "SIGHUP re-reads…") of a real
``popgate serve`` process: new handshakes on POP3S, STLS, submission 465 and STARTTLS get the
new pair, sessions opened before keep working on the old one, and a broken new pair is logged
in one line and the old one kept."""

from __future__ import annotations

import hashlib
import os
import poplib
import shutil
import signal
import smtplib
import ssl
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client.parser import text_string_to_metric_families

from gateway.tls import generate_self_signed
from tests.conftest import MailUser
from tests.support.dovecot import issue_server_cert
from tests.support.gateway import GatewayProcess
from tests.support.smtp_sink import SmtpSink
from tests.support.submission import client_context
from tests.support.upstreams import Upstream

pytest_plugins = ("tests.support.submission_fixtures",)
pytestmark = pytest.mark.integration

HTTP = {"listen": ["127.0.0.1:0"]}
TIMEOUT = 10


def fingerprint(der: bytes | None) -> str:
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def file_fingerprint(cert_file: Path) -> str:
    certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return fingerprint(certificate.public_bytes(Encoding.DER))


def served(gw: GatewayProcess, upstream: Upstream) -> dict[str, str]:
    """The certificate fingerprint each TLS entry of the gateway presents to a new client."""
    context = client_context(upstream)
    seen: dict[str, str] = {}
    pop = poplib.POP3_SSL(gw.host, gw.pop3s_port, context=context, timeout=TIMEOUT)
    seen["pop3s"] = fingerprint(pop.sock.getpeercert(binary_form=True))
    pop.quit()
    pop = poplib.POP3(gw.host, gw.pop3_port, timeout=TIMEOUT)
    pop.stls(context)
    seen["stls"] = fingerprint(pop.sock.getpeercert(binary_form=True))
    pop.quit()
    smtp = smtplib.SMTP_SSL(gw.host, gw.submissions_port, context=context, timeout=TIMEOUT)
    assert smtp.sock is not None
    seen["smtps"] = fingerprint(smtp.sock.getpeercert(binary_form=True))  # type: ignore[attr-defined]
    smtp.quit()
    smtp = smtplib.SMTP(gw.host, gw.submission_port, timeout=TIMEOUT)
    smtp.starttls(context=context)
    assert smtp.sock is not None
    seen["starttls"] = fingerprint(smtp.sock.getpeercert(binary_form=True))  # type: ignore[attr-defined]
    smtp.quit()
    return seen


def metric(gw: GatewayProcess, name: str, **labels: str) -> float:
    url = f"http://{gw.host}:{gw.port('http')}/metrics"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"no sample {name} {labels}")


def replace_pair(upstream: Upstream, cert_file: Path, key_file: Path, scratch: Path) -> str:
    """Issue a new pair beside the files and rename it over them, as certbot's deploy does;
    the new certificate's fingerprint."""
    scratch.mkdir(exist_ok=True)
    new_cert, new_key = scratch / "new.crt", scratch / "new.key"
    issue_server_cert(upstream.ca_file, upstream.ca_key_file, new_cert, new_key)
    os.replace(new_key, key_file)
    os.replace(new_cert, cert_file)
    return file_fingerprint(cert_file)


def test_sighup_gives_new_handshakes_the_new_pair_and_open_sessions_keep_theirs(
    upstream: Upstream,
    new_mail_user: Callable[[], MailUser],
    submission_gateway: Callable[..., GatewayProcess],
    tmp_path: Path,
) -> None:
    user = new_mail_user()
    gw = submission_gateway(user, http=HTTP)
    cert_file, key_file = Path(gw.config["tls"]["cert_file"]), Path(gw.config["tls"]["key_file"])
    old = file_fingerprint(cert_file)
    assert set(served(gw, upstream).values()) == {old}
    context = client_context(upstream)
    # Sessions opened on the old pair, one per protocol, logged in.
    pop = poplib.POP3_SSL(gw.host, gw.pop3s_port, context=context, timeout=TIMEOUT)
    pop.user(user.name)
    pop.pass_(user.password)
    smtp = smtplib.SMTP_SSL(gw.host, gw.submissions_port, context=context, timeout=TIMEOUT)
    smtp.login(user.name, user.password)

    new = replace_pair(upstream, cert_file, key_file, tmp_path / "rotation")
    assert new != old
    assert gw.pid is not None
    os.kill(gw.pid, signal.SIGHUP)
    serial = format(x509.load_pem_x509_certificate(cert_file.read_bytes()).serial_number, "x")
    gw.wait_for_log(f"certificate reloaded: serial {serial}, sha256 ")

    assert served(gw, upstream) == {"pop3s": new, "stls": new, "smtps": new, "starttls": new}
    # The open sessions still answer, on the pair they started with.
    assert fingerprint(pop.sock.getpeercert(binary_form=True)) == old
    assert pop.stat() == (0, 0)
    assert pop.quit().startswith(b"+OK")
    assert smtp.noop()[0] == 250
    assert smtp.quit()[0] == 221
    assert metric(gw, "popgate_tls_reloads_total", result="ok") == 1
    assert metric(gw, "popgate_tls_reloads_total", result="fail") == 0
    expiry = x509.load_pem_x509_certificate(cert_file.read_bytes()).not_valid_after_utc
    assert metric(gw, "popgate_tls_certificate_expiry_timestamp_seconds") == expiry.timestamp()


def _missing_key(cert_file: Path, key_file: Path, scratch: Path, upstream: Upstream) -> None:
    key_file.unlink()


def _key_of_another_certificate(
    cert_file: Path, key_file: Path, scratch: Path, upstream: Upstream
) -> None:
    issue_server_cert(upstream.ca_file, upstream.ca_key_file, scratch / "x.crt", scratch / "x.key")
    os.replace(scratch / "x.key", key_file)


def _garbage_certificate(
    cert_file: Path, key_file: Path, scratch: Path, upstream: Upstream
) -> None:
    cert_file.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")


BROKEN = [
    (_missing_key, r"cannot read private key .*popgate\.key: No such file"),
    (_key_of_another_certificate, r".*/popgate\.key is not the key of the certificate in "),
    (_garbage_certificate, r".*/popgate\.crt: no PEM certificate in it"),
]


def test_a_broken_new_pair_is_logged_and_the_old_one_kept(
    upstream: Upstream,
    new_mail_user: Callable[[], MailUser],
    submission_gateway: Callable[..., GatewayProcess],
    tmp_path: Path,
) -> None:
    gw = submission_gateway(new_mail_user(), http=HTTP)
    cert_file, key_file = Path(gw.config["tls"]["cert_file"]), Path(gw.config["tls"]["key_file"])
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy2(cert_file, good / "crt")
    shutil.copy2(key_file, good / "key")
    key_text = key_file.read_text()
    old = file_fingerprint(cert_file)
    assert gw.pid is not None
    for failures, (breaking, reason) in enumerate(BROKEN, start=1):
        breaking(cert_file, key_file, tmp_path, upstream)
        os.kill(gw.pid, signal.SIGHUP)
        line = gw.wait_for_log(
            r"^.*certificate not reloaded, still using the previous one: " + reason + ".*$"
        )
        assert set(served(gw, upstream).values()) == {old}, breaking.__name__
        assert metric(gw, "popgate_tls_reloads_total", result="fail") == failures
        # One line, and nothing of the key in it.
        assert "\n" not in line.group(0).rstrip("\n")
        for secret_line in key_text.splitlines()[1:-1]:
            assert secret_line not in gw.log_text()
        shutil.copy2(good / "crt", cert_file)
        shutil.copy2(good / "key", key_file)
    assert metric(gw, "popgate_tls_reloads_total", result="ok") == 0
    assert gw.returncode is None  # still serving


# --------------------------------------------------------------- two pairs: RSA and ECDSA


def served_by_key_type(gw: GatewayProcess) -> dict[str, str]:
    """The certificate a TLS 1.2 client offering only RSA (``aRSA``), or only ECDSA
    (``aECDSA``), cipher suites gets from POP3S and from submission 465."""
    seen: dict[str, str] = {}
    for suites in ("aRSA", "aECDSA"):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the self-signed default pairs
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(suites)
        pop = poplib.POP3_SSL(gw.host, gw.pop3s_port, context=context, timeout=TIMEOUT)
        seen[f"pop3s {suites}"] = fingerprint(pop.sock.getpeercert(binary_form=True))
        pop.quit()
        smtp = smtplib.SMTP_SSL(gw.host, gw.submissions_port, context=context, timeout=TIMEOUT)
        assert smtp.sock is not None
        seen[f"smtps {suites}"] = fingerprint(smtp.sock.getpeercert(binary_form=True))  # type: ignore[attr-defined]
        smtp.quit()
    return seen


def test_the_default_pairs_rsa_and_ecdsa_are_both_served_and_both_reloaded(
    start_gateway: Callable[..., GatewayProcess], smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    """No certificate configured: popgate generates an RSA pair and an ECDSA one beside it,
    serves each to the clients that ask for its key type (POP3 and submission alike), and a
    SIGHUP re-reads both pairs."""
    gw = start_gateway(
        submission={"listen": [], "listen_tls": ["127.0.0.1:0"], "spool_dir": "spool"},
        upstream_smtp={"host": smtp_sink.host, "port": smtp_sink.port, "security": "none"},
    )
    cert_file, key_file = Path(gw.config["tls"]["cert_file"]), Path(gw.config["tls"]["key_file"])
    rsa_pair = (cert_file, key_file)
    # [tls] second_cert_file/second_key_file unset: beside the first, "-ecdsa" in the name.
    ecdsa_pair = (
        cert_file.with_name(cert_file.stem + "-ecdsa.crt"),
        key_file.with_name(key_file.stem + "-ecdsa.key"),
    )
    rsa_old, ecdsa_old = file_fingerprint(rsa_pair[0]), file_fingerprint(ecdsa_pair[0])
    assert served_by_key_type(gw) == {
        "pop3s aRSA": rsa_old,
        "smtps aRSA": rsa_old,
        "pop3s aECDSA": ecdsa_old,
        "smtps aECDSA": ecdsa_old,
    }

    scratch = tmp_path / "rotation"
    for (cert, key), key_type in ((rsa_pair, "rsa"), (ecdsa_pair, "ecdsa")):
        generate_self_signed("localhost", scratch / cert.name, scratch / key.name, key_type)  # type: ignore[arg-type]
        os.replace(scratch / key.name, key)
        os.replace(scratch / cert.name, cert)
    rsa_new, ecdsa_new = file_fingerprint(rsa_pair[0]), file_fingerprint(ecdsa_pair[0])
    assert gw.pid is not None
    os.kill(gw.pid, signal.SIGHUP)
    serial = format(x509.load_pem_x509_certificate(rsa_pair[0].read_bytes()).serial_number, "x")
    ecdsa_serial = format(
        x509.load_pem_x509_certificate(ecdsa_pair[0].read_bytes()).serial_number, "x"
    )
    gw.wait_for_log(
        f"certificate reloaded: serial {serial}, sha256 .*; second pair: serial {ecdsa_serial}, "
    )

    assert served_by_key_type(gw) == {
        "pop3s aRSA": rsa_new,
        "smtps aRSA": rsa_new,
        "pop3s aECDSA": ecdsa_new,
        "smtps aECDSA": ecdsa_new,
    }
