"""Run ``python -m gateway serve`` as a subprocess against a test config.

The gateway logs ``listening pop3 on 127.0.0.1:40123 (plain)`` (one line per bound
listener) to stderr; :class:`GatewayProcess` waits for those lines, so tests know the ports
without fixing them in advance (``listen = ["127.0.0.1:0"]``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tests.support import reaper

__all__ = [
    "GatewayError",
    "GatewayProcess",
    "Listener",
    "dump_toml",
    "merge_config",
]

LISTENING_RE = re.compile(r"listening (\S+) on (\S+) \((\w+)\)")
#: listener lists per protocol section, for counting the "listening" lines to expect
_LISTEN_KEYS = {
    "pop3": ("listen", "listen_tls"),
    "submission": ("listen", "listen_tls"),
    "http": ("listen",),
}


class GatewayError(RuntimeError):
    """The gateway did not start (or stop) as expected. The message holds its log."""


@dataclass(frozen=True)
class Listener:
    protocol: str  # "pop3", "submission"
    host: str
    port: int
    kind: str  # "plain" (STLS/STARTTLS offered) or "tls" (implicit)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# --------------------------------------------------------------------- TOML
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | os.PathLike):
        # a JSON string without ASCII escaping is a valid TOML basic string
        return json.dumps(os.fspath(value), ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML: {value!r}")


def dump_toml(config: Mapping[str, Mapping[str, Any]]) -> str:
    """Write ``{"upstream.imap": {"host": …}, "pop3": {…}}`` as TOML tables."""
    out = []
    for section, values in config.items():
        out.append(f"[{section}]")
        out.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        out.append("")
    return "\n".join(out)


def merge_config(
    base: Mapping[str, Mapping[str, Any]], overrides: Mapping[str, Mapping[str, Any] | None]
) -> dict[str, dict[str, Any]]:
    """Merge per section; a value of None removes that key, a section of None removes it."""
    merged = {section: dict(values) for section, values in base.items()}
    for section, values in overrides.items():
        if values is None:
            merged.pop(section, None)
            continue
        target = merged.setdefault(section, {})
        for key, value in values.items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
    return merged


def expected_listeners(config: Mapping[str, Mapping[str, Any]]) -> int:
    return sum(
        len(config.get(section, {}).get(key, []) or [])
        for section, keys in _LISTEN_KEYS.items()
        for key in keys
    )


# --------------------------------------------------------------------- the process
class GatewayProcess:
    """One ``python -m gateway serve -c CONFIG`` subprocess.

    Its stderr (the log) and stdout are drained by threads into buffers, so it never blocks.
    """

    def __init__(
        self,
        config: Mapping[str, Mapping[str, Any]],
        config_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.config = {s: dict(v) for s, v in config.items()}
        self.config_path = Path(config_path)
        self.extra_env = dict(env or {})
        self.extra_args = tuple(args)
        self.listeners: list[Listener] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: list[str] = []
        self._stdout: list[str] = []
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._runs = 0
        self._reaper_token: int | None = None

    # ----------------------------------------------------------------- ports
    def port(self, protocol: str = "pop3", kind: str = "plain") -> int:
        for listener in self.listeners:
            if listener.protocol == protocol and listener.kind == kind:
                return listener.port
        raise GatewayError(
            f"no {protocol} ({kind}) listener; have {self.listeners}\n{self.log_text()}"
        )

    @property
    def host(self) -> str:
        return self.listeners[0].host if self.listeners else "127.0.0.1"

    @property
    def pop3_port(self) -> int:
        return self.port("pop3", "plain")

    @property
    def pop3s_port(self) -> int:
        return self.port("pop3", "tls")

    @property
    def submission_port(self) -> int:
        return self.port("submission", "plain")

    @property
    def submissions_port(self) -> int:
        return self.port("submission", "tls")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    # ----------------------------------------------------------------- logs
    def log_text(self) -> str:
        """Everything the gateway wrote to stderr so far (all runs, see :meth:`restart`)."""
        with self._cond:
            return "".join(self._stderr)

    def stdout_text(self) -> str:
        with self._cond:
            return "".join(self._stdout)

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 10.0) -> re.Match[str]:
        """Block until a log line matches ``pattern``; returns the match."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self._stderr[seen:]:
                    m = regex.search(line)
                    if m:
                        return m
                seen = len(self._stderr)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GatewayError(
                        f"no log line matching {regex.pattern!r} within {timeout}s\n"
                        + "".join(self._stderr)
                    )
                self._cond.wait(remaining)

    def _drain(self, stream: IO[bytes], sink: list[str]) -> None:
        for raw in iter(stream.readline, b""):
            with self._cond:
                sink.append(raw.decode("utf-8", "replace"))
                self._cond.notify_all()
        stream.close()
        with self._cond:
            self._cond.notify_all()

    # ----------------------------------------------------------------- lifecycle
    def command(self) -> list[str]:
        return [sys.executable, "-m", "gateway", "serve", "-c", str(self.config_path)]

    def start(self, timeout: float = 30.0, *, wait: bool = True) -> GatewayProcess:
        """Write the config, start the gateway and (``wait``) block until every configured
        listener has logged its ``listening …`` line."""
        if self._proc is not None and self._proc.poll() is None:
            raise GatewayError("already running")
        self.config_path.write_text(dump_toml(self.config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("POPGATE_")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        self._runs += 1
        with self._cond:
            if self._runs > 1:
                self._stderr.append(f"----- popgate restarted (run {self._runs}) -----\n")
            first_line = len(self._stderr)
        self.listeners = []
        self._proc = subprocess.Popen(
            [*self.command(), *self.extra_args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.config_path.parent,
            env=env,
        )
        self._reaper_token = reaper.watch_process(self._proc.pid)
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._drain, args=(self._proc.stderr, self._stderr)),
            threading.Thread(target=self._drain, args=(self._proc.stdout, self._stdout)),
        ]
        for t in self._threads:
            t.daemon = True
            t.start()
        if wait:
            try:
                self._wait_listening(first_line, expected_listeners(self.config), timeout)
            except GatewayError:
                self.stop()
                raise
        return self

    def _wait_listening(self, first_line: int, expected: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self._proc is not None
        with self._cond:
            while True:
                found = []
                for line in self._stderr[first_line:]:
                    m = LISTENING_RE.search(line)
                    if m:
                        host, _, port = m.group(2).rpartition(":")
                        found.append(Listener(m.group(1), host.strip("[]"), int(port), m.group(3)))
                self.listeners = found
                if len(found) >= expected:
                    return
                if self._proc.poll() is not None and not any(t.is_alive() for t in self._threads):
                    raise GatewayError(
                        f"gateway exited with status {self._proc.returncode} before listening\n"
                        f"command: {self.command()}\nconfig:\n{self.config_path.read_text()}\n"
                        f"log:\n{''.join(self._stderr)}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GatewayError(
                        f"gateway logged {len(found)} of {expected} 'listening' lines "
                        f"in {timeout}s\nlog:\n{''.join(self._stderr)}"
                    )
                # woken by every new log line and at stream end; bounded for exit detection
                self._cond.wait(min(remaining, 0.5))

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit on its own; returns its status."""
        assert self._proc is not None
        rc = self._proc.wait(timeout)
        for t in self._threads:
            t.join(timeout)
        return rc

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit status."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with self._cond:
                    self._stderr.append("----- popgate ignored SIGTERM: killed -----\n")
                proc.kill()
                proc.wait(10)
        for t in self._threads:
            t.join(10)
        reaper.unwatch(self._reaper_token)
        self._reaper_token = None
        return proc.returncode

    def restart(self, *, keep_ports: bool = True, timeout: float = 30.0) -> GatewayProcess:
        """Stop and start again. With ``keep_ports`` the config is rewritten to listen on
        the ports bound by the previous run, so clients can reconnect to the same port."""
        if keep_ports and self.listeners:
            for section, keys in _LISTEN_KEYS.items():
                for key in keys:
                    kind = "tls" if key.endswith("_tls") else "plain"
                    bound = [
                        lst.address
                        for lst in self.listeners
                        if lst.protocol == section and lst.kind == kind
                    ]
                    if bound and section in self.config:
                        self.config[section][key] = bound
        self.stop()
        return self.start(timeout)
