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
from typing import TYPE_CHECKING, Any

from gateway import __version__
from gateway.config import CONFIG_ENV, Config, ConfigError, load_config, render_effective

if TYPE_CHECKING:  # imported at run time only by the commands that use it
    from gateway.oauth.store import TokenStore

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

CERT_NAME = "popgate.crt"
KEY_NAME = "popgate.key"
# The second pair's names, as [tls] derives them from the first's (TLSSettings.second_pair).
SECOND_CERT_NAME = "popgate-ecdsa.crt"
SECOND_KEY_NAME = "popgate-ecdsa.key"


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
    from gateway.tls import TLSSetupError, load_second_certificate, load_server_certificate

    name = str(config.source)
    cert, key = config.tls.cert_file, config.tls.key_file
    second_cert, second_key = config.tls.second_pair
    second_keys = "[tls] second_cert_file, second_key_file"
    for pair_cert, pair_key, keys in (
        (cert, key, "[tls] cert_file, key_file"),
        (second_cert, second_key, second_keys),
    ):
        if pair_cert.exists() != pair_key.exists():
            present, missing = (
                (pair_cert, pair_key) if pair_cert.exists() else (pair_key, pair_cert)
            )
            return [f"{name}: {keys}: {present} exists but {missing} does not"]
    if not cert.exists():
        if second_cert.exists():
            return [f"{name}: {second_keys}: {second_cert} exists but {cert} does not"]
        if not note_missing:
            return []
        print(
            f"note: {cert} and {key} do not exist; a self-signed pair is generated at start "
            f"(RSA there, and an ECDSA one in {second_cert} and {second_key})",
            file=sys.stderr,
        )
        return []
    try:
        first = load_server_certificate(config.tls)
    except TLSSetupError as exc:
        return [f"{name}: [tls] cert_file, key_file: {exc}"]
    try:
        load_second_certificate(config.tls, first)
    except TLSSetupError as exc:
        return [f"{name}: {second_keys}: {exc}"]
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
    """Write the RSA pair DIR/popgate.crt, DIR/popgate.key and the ECDSA pair
    DIR/popgate-ecdsa.crt, DIR/popgate-ecdsa.key; refuse to replace any unless --force."""
    from gateway.tls import KeyType, TLSSetupError, certificate_fingerprint, generate_self_signed

    out = Path(args.out)
    pairs: tuple[tuple[Path, Path, KeyType], ...] = (
        (out / CERT_NAME, out / KEY_NAME, "rsa"),
        (out / SECOND_CERT_NAME, out / SECOND_KEY_NAME, "ecdsa"),
    )
    existing = [p for cert, key, _type in pairs for p in (cert, key) if p.exists()]
    if existing and not args.force:
        _error(f"{existing[0]} already exists; pass --force to replace it")
        return EXIT_FAILURE
    try:
        for cert, key, key_type in pairs:
            generate_self_signed(args.hostname, cert, key, key_type)
    except TLSSetupError as exc:
        _error(str(exc))
        return EXIT_CONFIG
    except OSError as exc:
        _error(f"cannot write to {out}: {exc.strerror or exc}")
        return EXIT_FAILURE
    for cert, key, _key_type in pairs:
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


def _oauth_store(args: argparse.Namespace) -> tuple[Config, TokenStore] | int:
    """The configuration and the token store for ``popgate oauth list|remove``, or an exit
    status; nothing is created."""
    config = _load(args)
    if config is None:
        return EXIT_CONFIG
    store = _token_store(config, create=False)
    return store if isinstance(store, int) else (config, store)


def _token_store(config: Config, *, create: bool) -> TokenStore | int:
    """The token store, or an exit status. ``create`` may write ``token_dir/token.key``, so
    ``oauth login`` asks for it only once every check of its input has passed."""
    from gateway.oauth.store import StoreError, TokenStore, load_token_key

    settings = config.oauth2
    try:
        key = load_token_key(settings, create=create)
    except (StoreError, OSError) as exc:
        _error(str(exc))
        return EXIT_FAILURE
    if key is None:  # nothing was ever stored: an empty store under a throw-away key
        key = bytes(32)
    return TokenStore(settings.token_dir, key)


def _oauth_user_problem(config: Config, user: str) -> str:
    separator = config.pop3.device_separator
    if not user or len(user) > 255 or any(c.isspace() or ord(c) < 32 for c in user):
        return f"{user!r} is not a user name (1-255 characters, no spaces)"
    if separator in user:
        return f"{user!r}: give the user without a device ({separator!r} is the device separator)"
    return ""


MIN_DEVICE_PASSWORD = 8


def _device_password(args: argparse.Namespace) -> str | None:
    """From --device-password-file, or asked twice on the terminal; None after an error."""
    if args.device_password_file:
        try:
            text = Path(args.device_password_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not valid UTF-8"
            _error(f"cannot read {args.device_password_file}: {reason}")
            return None
        password = text.removesuffix("\n").removesuffix("\r")
    elif sys.stdin.isatty():
        import getpass

        password = getpass.getpass("Device password (the devices' POP/SMTP password): ")
        if getpass.getpass("Again: ") != password:
            _error("the two passwords differ")
            return None
    else:
        _error("no terminal to ask the device password on: pass --device-password-file FILE")
        return None
    if len(password) < MIN_DEVICE_PASSWORD or "\n" in password:
        _error(f"the device password must be one line of at least {MIN_DEVICE_PASSWORD} characters")
        return None
    return password


def _port_number(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return int(text)


def cmd_oauth_login(args: argparse.Namespace) -> int:
    """Sign USER in (device flow, or the browser flow with PKCE) and store the grant with the
    device password."""
    config = _load(args)
    if config is None:
        return EXIT_CONFIG
    settings = config.oauth2
    from gateway.oauth.authcode import default_flow

    flow = args.flow or default_flow(settings)
    endpoint = "authorization_url" if flow == "browser" else "device_authorization_url"
    problems = [
        f"{config.source}: [oauth2] {key}: required for popgate oauth login --flow {flow}"
        for key in ("client_id", endpoint, "token_url")
        if not getattr(settings, key)
    ]
    problem = _oauth_user_problem(config, args.user)
    if _report(problems) or problem:
        if problem:
            _error(problem)
        return EXIT_CONFIG
    password = _device_password(args)
    if password is None:
        return EXIT_CONFIG
    store = _token_store(config, create=True)  # the first thing written to disk
    if isinstance(store, int):
        return store

    from twisted.internet import task
    from twisted.internet.defer import Deferred

    from gateway.oauth.login import LoginFailed, run_browser_login, run_login

    outcome: list[int] = []

    async def login(reactor: Any) -> None:
        try:
            if flow == "browser":
                await run_browser_login(
                    reactor,
                    settings,
                    store,
                    args.user,
                    password,
                    sys.stdout,
                    port=args.redirect_port,
                    paste=0,  # stdin; a closed one just leaves the listener
                )
            else:
                await run_login(reactor, settings, store, args.user, password, sys.stdout)
        except LoginFailed as exc:
            _error(f"login of {args.user} failed: {exc}")
            outcome.append(EXIT_FAILURE)
            return
        print(f"Stored the grant of {args.user} in {settings.token_dir}.")
        print(
            f"Devices log in as {args.user} (or {args.user}{config.pop3.device_separator}DEVICE)"
            " with the device password."
        )
        outcome.append(EXIT_OK)

    try:
        task.react(lambda reactor: Deferred.fromCoroutine(login(reactor)))
    except SystemExit as exc:
        if not outcome:  # react's own exit: an unexpected error, already printed
            return exc.code if isinstance(exc.code, int) else EXIT_FAILURE
    return outcome[0] if outcome else EXIT_FAILURE


def cmd_oauth_list(args: argparse.Namespace) -> int:
    """Users with a stored grant and the grant's state; never a token."""
    loaded = _oauth_store(args)
    if isinstance(loaded, int):
        return loaded
    config, store = loaded
    import time

    from gateway.oauth.login import format_listing

    lines = format_listing(store, time.time())
    if len(lines) == 1:
        print(f"no grants in {config.oauth2.token_dir}")
        return EXIT_OK
    print("\n".join(lines))
    return EXIT_OK


def cmd_oauth_remove(args: argparse.Namespace) -> int:
    """Forget USER's grant (the provider's grant itself is revoked at the provider)."""
    loaded = _oauth_store(args)
    if isinstance(loaded, int):
        return loaded
    config, store = loaded
    from gateway.oauth.store import StoreError

    try:
        with store.locked(args.user, 60):
            removed = store.remove(args.user)
    except (StoreError, OSError) as exc:
        _error(str(exc))
        return EXIT_FAILURE
    if not removed:
        _error(f"no grant stored for {args.user} in {config.oauth2.token_dir}")
        return EXIT_FAILURE
    print(f"Removed the grant of {args.user}; its devices can no longer log in.")
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
        "gen-cert",
        help=f"write self-signed pairs: RSA DIR/{CERT_NAME}, DIR/{KEY_NAME} and ECDSA "
        f"DIR/{SECOND_CERT_NAME}, DIR/{SECOND_KEY_NAME}",
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
        "list", help="devices: last login, downloaded / hidden / held back, inactive"
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

    oauth = commands.add_parser("oauth", help="OAuth 2.0 grants of [oauth2] (docs/oauth2.md)")
    oauth_commands = oauth.add_subparsers(dest="oauth_command", metavar="ACTION")
    oauth_commands.required = True
    oauth_login = oauth_commands.add_parser(
        "login", help="sign USER in (device or browser flow) and set the device password"
    )
    oauth_login.add_argument("-c", "--config", metavar="FILE", help=config_help)
    oauth_login.add_argument("user")
    oauth_login.add_argument(
        "--device-password-file",
        metavar="FILE",
        help="read the device password from FILE (first line) instead of asking",
    )
    oauth_login.add_argument(
        "--flow",
        choices=("device", "browser"),
        help="device: RFC 8628 code to enter on any device; browser: authorization code with"
        " PKCE and a loopback redirect (default: browser for google, else device)",
    )
    oauth_login.add_argument(
        "--redirect-port",
        type=_port_number,
        default=0,
        metavar="PORT",
        help="browser flow: listen for the redirect on 127.0.0.1:PORT (default: any free port)",
    )
    oauth_login.set_defaults(handler=cmd_oauth_login)
    oauth_list = oauth_commands.add_parser("list", help="users with a grant (never a token)")
    oauth_list.add_argument("-c", "--config", metavar="FILE", help=config_help)
    oauth_list.set_defaults(handler=cmd_oauth_list)
    oauth_remove = oauth_commands.add_parser("remove", help="forget USER's grant")
    oauth_remove.add_argument("-c", "--config", metavar="FILE", help=config_help)
    oauth_remove.add_argument("user")
    oauth_remove.set_defaults(handler=cmd_oauth_remove)

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
