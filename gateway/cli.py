"""The ``popgate`` command line (also ``python -m gateway``).

Exit status: 0 success, 1 a runtime failure (e.g. gen-cert refusing to overwrite), 2 a usage or
configuration error, with one problem per line on stderr so scripts and humans can both read it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from gateway import __version__
from gateway.config import CONFIG_ENV, Config, ConfigError, load_config, render_effective

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

CERT_NAME = "popgate.crt"
KEY_NAME = "popgate.key"


def _error(message: str) -> None:
    print(f"popgate: {message}", file=sys.stderr)


def _report(problems: list[str]) -> bool:
    """Print each problem on its own stderr line; whether there were any."""
    for problem in problems:
        print(problem, file=sys.stderr)
    return bool(problems)


def _config_path(args: argparse.Namespace) -> str | None:
    path: str | None = args.config or os.environ.get(CONFIG_ENV) or None
    if path is None:
        _error(f"no configuration file: pass -c FILE or set {CONFIG_ENV}")
    return path


def _load(args: argparse.Namespace) -> Config | None:
    """Load the configuration, or print every problem and return None."""
    path = _config_path(args)
    if path is None:
        return None
    try:
        return load_config(path)
    except ConfigError as exc:
        _report(exc.problems)
        return None


def _certificate_problems(config: Config, *, note_missing: bool) -> list[str]:
    """What would stop serve from using ``[tls]``: half a pair, or a pair that does not match.

    A missing pair is fine (serve generates one); ``note_missing`` says so on stderr.
    """
    from gateway.tls import TLSSetupError, load_server_certificate

    name = str(config.source)
    cert, key = config.tls.cert_file, config.tls.key_file
    if cert.exists() != key.exists():
        present, missing = (cert, key) if cert.exists() else (key, cert)
        return [f"{name}: [tls] cert_file, key_file: {present} exists but {missing} does not"]
    if not cert.exists():
        if not note_missing:
            return []
        print(
            f"note: {cert} and {key} do not exist; a self-signed pair is generated at start",
            file=sys.stderr,
        )
        return []
    try:
        load_server_certificate(config.tls)
    except TLSSetupError as exc:
        return [f"{name}: [tls] cert_file, key_file: {exc}"]
    return []


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate and print the effective configuration (secrets redacted)."""
    config = _load(args)
    if config is None:
        return EXIT_CONFIG
    if _report(_certificate_problems(config, note_missing=True)):
        return EXIT_CONFIG
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    sys.stdout.write(render_effective(config))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the gateway; gateway.app is imported only here so the other commands never need it.

    The certificate pair is checked first so that half a pair is a configuration error (exit 2)
    like in check-config. app.serve sets up logging and logs the configuration's warnings.
    """
    config = _load(args)
    if config is None:
        return EXIT_CONFIG
    if _report(_certificate_problems(config, note_missing=False)):
        return EXIT_CONFIG
    from gateway.tls import TLSSetupError

    try:
        from gateway.app import serve
    except ModuleNotFoundError as exc:
        if exc.name != "gateway.app":
            raise
        _error("serve is not available: gateway.app is missing from this installation")
        return EXIT_FAILURE
    try:
        return serve(config)
    except (ConfigError, TLSSetupError) as exc:
        # Found only while starting (e.g. half a certificate pair): still a configuration error.
        for line in str(exc).splitlines():
            print(line, file=sys.stderr)
        return EXIT_CONFIG


def cmd_gen_cert(args: argparse.Namespace) -> int:
    """Write DIR/popgate.crt and DIR/popgate.key; refuse to replace a key unless --force."""
    from gateway.tls import TLSSetupError, certificate_fingerprint, generate_self_signed

    out = Path(args.out)
    cert, key = out / CERT_NAME, out / KEY_NAME
    existing = [p for p in (cert, key) if p.exists()]
    if existing and not args.force:
        _error(f"{existing[0]} already exists; pass --force to replace it")
        return EXIT_FAILURE
    try:
        generate_self_signed(args.hostname, cert, key)
    except TLSSetupError as exc:
        _error(str(exc))
        return EXIT_CONFIG
    except OSError as exc:
        _error(f"cannot write to {out}: {exc.strerror or exc}")
        return EXIT_FAILURE
    print(f"wrote {cert}")
    print(f"wrote {key}")
    print(f"SHA-256 fingerprint: {certificate_fingerprint(cert)}")
    return EXIT_OK


def _admin(args: argparse.Namespace, command: str) -> int:
    """Run one of gateway.admin's commands; its report goes to stdout, failures to stderr."""
    config = _load(args)
    if config is None:
        return EXIT_CONFIG
    from gateway import admin

    now = getattr(args, "now", None)
    if command == "device list":
        status, lines = admin.run(lambda r: admin.device_list(r, config, args.user, now))
    elif command == "device reset":
        status, lines = admin.run(lambda r: admin.device_reset(r, config, args.user, args.device))
    elif command == "device forget":
        status, lines = admin.run(lambda r: admin.device_forget(r, config, args.user, args.device))
    else:
        status, lines = admin.run(
            lambda r: admin.retention(r, config, args.user, args.dry_run, now)
        )
    print("\n".join(lines), file=sys.stdout if status == EXIT_OK else sys.stderr)
    return status


def cmd_device_list(args: argparse.Namespace) -> int:
    return _admin(args, "device list")


def cmd_device_reset(args: argparse.Namespace) -> int:
    return _admin(args, "device reset")


def cmd_device_forget(args: argparse.Namespace) -> int:
    return _admin(args, "device forget")


def cmd_retention(args: argparse.Namespace) -> int:
    return _admin(args, "retention")


def _moment(text: str) -> datetime:
    """``--now``: an ISO 8601 date or time, UTC unless it says otherwise."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def cmd_spool_list(args: argparse.Namespace) -> int:
    """What waits in ``[submission] spool_dir`` and why (decrypted with the spool key)."""
    config = _load(args)
    if config is None:
        return EXIT_CONFIG
    import time

    from gateway.submission.spool import SpoolError, SpoolStore, format_listing, load_key

    settings = config.submission
    try:
        key = load_key(settings, create=False)
    except SpoolError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    # Without a key file there can be no readable entry; any file found is shown as unreadable.
    items = SpoolStore(settings.spool_dir, key or bytes(32)).listing()
    if not items:
        print(f"spool {settings.spool_dir}: empty")
        return EXIT_OK
    print(f"spool {settings.spool_dir}: {len(items)} entries")
    print("\n".join(format_listing(items, time.time())))
    return EXIT_OK


def cmd_version(args: argparse.Namespace) -> int:
    print(f"popgate {__version__}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="popgate",
        description="POP3 and SMTP submission gateway for legacy devices, over IMAP.",
    )
    parser.add_argument("--version", action="version", version=f"popgate {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    config_help = f"the TOML configuration file (default: ${CONFIG_ENV})"
    serve = commands.add_parser("serve", help="run every configured listener")
    serve.add_argument("-c", "--config", metavar="FILE", help=config_help)
    serve.set_defaults(handler=cmd_serve)

    check = commands.add_parser(
        "check-config", help="validate the configuration and print its effective values"
    )
    check.add_argument("-c", "--config", metavar="FILE", help=config_help)
    check.set_defaults(handler=cmd_check_config)

    gen_cert = commands.add_parser(
        "gen-cert", help=f"write a self-signed DIR/{CERT_NAME} and DIR/{KEY_NAME}"
    )
    gen_cert.add_argument(
        "--hostname", required=True, metavar="NAME", help="name (or IP) to certify"
    )
    gen_cert.add_argument("--out", required=True, metavar="DIR", help="directory to write to")
    gen_cert.add_argument("--force", action="store_true", help="replace existing files")
    gen_cert.set_defaults(handler=cmd_gen_cert)

    device = commands.add_parser("device", help="per-device views of a user (master identity)")
    device_commands = device.add_subparsers(dest="device_command", metavar="ACTION")
    device_commands.required = True
    now_help = "judge ages and inactivity as of this ISO 8601 time (UTC), not the clock's"
    device_list = device_commands.add_parser(
        "list", help="devices: last seen, downloaded / hidden / held back, inactive"
    )
    device_list.add_argument("-c", "--config", metavar="FILE", help=config_help)
    device_list.add_argument("--now", type=_moment, metavar="TIME", help=now_help)
    device_list.add_argument("user")
    device_list.set_defaults(handler=cmd_device_list)
    device_reset = device_commands.add_parser(
        "reset", help="forget what DEVICE has hidden, so it downloads everything again"
    )
    device_reset.add_argument("-c", "--config", metavar="FILE", help=config_help)
    device_reset.add_argument("user")
    device_reset.add_argument("device")
    device_reset.set_defaults(handler=cmd_device_reset)
    device_forget = device_commands.add_parser(
        "forget", help="retire DEVICE (a stolen phone): its state goes, it holds nothing back"
    )
    device_forget.add_argument("-c", "--config", metavar="FILE", help=config_help)
    device_forget.add_argument("user")
    device_forget.add_argument("device")
    device_forget.set_defaults(handler=cmd_device_forget)

    retention = commands.add_parser(
        "retention", help="apply [retention] to one user now, or show what it would remove"
    )
    retention.add_argument("-c", "--config", metavar="FILE", help=config_help)
    retention.add_argument("--user", required=True)
    retention.add_argument("--dry-run", action="store_true", help="change nothing, only report")
    retention.add_argument("--now", type=_moment, metavar="TIME", help=now_help)
    retention.set_defaults(handler=cmd_retention)

    spool = commands.add_parser("spool", help="the submission spool (Sent copies waiting)")
    spool_commands = spool.add_subparsers(dest="spool_command", metavar="ACTION")
    spool_commands.required = True
    spool_list = spool_commands.add_parser("list", help="what waits in the spool, and why")
    spool_list.add_argument("-c", "--config", metavar="FILE", help=config_help)
    spool_list.set_defaults(handler=cmd_spool_list)

    version = commands.add_parser("version", help="print the version")
    version.set_defaults(handler=cmd_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_CONFIG
    result: int = args.handler(args)
    return result
