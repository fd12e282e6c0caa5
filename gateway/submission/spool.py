"""The durable spool of submissions whose Sent copy is not stored yet.

One submission is one file in ``spool_dir``, sealed with AES-256-GCM (``cryptography``), mode
0600, fsync'ed together with its directory before anything depends on it (the client's 250):

``ID.relaying``
    written before the message goes to the relay. If the relay refuses, it is removed. If the
    gateway dies while relaying, the client never got its 250, so by RFC 5321 6.1 the message is
    still the client's to retry: the entry is dropped at the next start (logged), never copied.
``ID.pending``
    renamed from ``.relaying`` (atomically) once the relay accepted, before the client hears 250.
    It leaves only after the Sent copy is stored; until then it is retried with backoff, across
    restarts and crashes.
``ID.status``
    sealed too: attempts so far, the last error, when the next attempt is due. Only for
    ``popgate spool list``; losing it loses nothing.

The entry holds the user's password only when no master identity is configured, since a retry
then has no other way in; it never exists outside the sealed file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway import secret_files
from gateway.config import SubmissionSettings
from gateway.metrics import DISCARD, Metrics

log = logging.getLogger("popgate.submission")

MAGIC = b"POPGATE-SPOOL-1\n"
NONCE_SIZE = 12
KEY_FILE = "spool.key"
RELAYING, PENDING, STATUS = ".relaying", ".pending", ".status"


class SpoolError(Exception):
    """A spool file cannot be read: not ours, damaged, or sealed with another key."""


# --------------------------------------------------------------------------------------------
# Entries and their sealed form (pure)


@dataclass(frozen=True)
class SpoolEntry:
    id: str
    created: float  # Unix time of the submission
    user: str  # the upstream IMAP user (device suffix removed)
    device: str
    sender: str
    recipients: tuple[str, ...]  # the ones the relay accepted
    message_id: str
    message: bytes = field(repr=False)  # exactly as relayed (CRLF, with its Message-ID)
    peer: str = ""
    password: str | None = field(default=None, repr=False)

    def without_password(self) -> SpoolEntry:
        return replace(self, password=None)


@dataclass(frozen=True)
class SpoolStatus:
    attempts: int = 0
    last_error: str = ""
    next_attempt: float = 0.0  # Unix time


def new_entry_id() -> str:
    """Sortable by submission time, unique without coordination."""
    return f"{time.time_ns() // 1_000_000:013d}-{secrets.token_hex(6)}"


def seal(key: bytes, payload: bytes) -> bytes:
    nonce = os.urandom(NONCE_SIZE)
    return MAGIC + nonce + AESGCM(key).encrypt(nonce, payload, MAGIC)


def unseal(key: bytes, blob: bytes) -> bytes:
    if not blob.startswith(MAGIC):
        raise SpoolError("not a popgate spool file")
    nonce = blob[len(MAGIC) : len(MAGIC) + NONCE_SIZE]
    try:
        return AESGCM(key).decrypt(nonce, blob[len(MAGIC) + NONCE_SIZE :], MAGIC)
    except InvalidTag:
        raise SpoolError("cannot decrypt: damaged, or sealed with another spool key") from None


def encode_entry(entry: SpoolEntry) -> bytes:
    """One JSON line of metadata, then the message bytes as they are."""
    meta = asdict(entry)
    del meta["message"]
    meta["recipients"] = list(entry.recipients)
    meta["v"] = 1
    return json.dumps(meta, ensure_ascii=True).encode("ascii") + b"\n" + entry.message


def decode_entry(data: bytes) -> SpoolEntry:
    line, newline, message = data.partition(b"\n")
    try:
        meta = json.loads(line)
        if not newline or meta.pop("v") != 1:
            raise ValueError("unknown version")
        meta["recipients"] = tuple(meta["recipients"])
        return SpoolEntry(message=message, **meta)
    except (ValueError, KeyError, TypeError) as e:
        raise SpoolError(f"damaged spool entry: {e}") from None


def backoff_delay(attempts: int, initial: float, maximum: float) -> float:
    """Seconds to wait after ``attempts`` failures: initial, 2x, 4x ... capped at maximum."""
    if attempts <= 0:
        return 0.0
    return float(min(maximum, initial * 2 ** min(attempts - 1, 40)))


def parse_key(text: str) -> bytes:
    try:
        return secret_files.parse_key(text)
    except secret_files.InvalidKey as e:
        raise SpoolError(f"the spool key {e}") from None


def load_key(settings: SubmissionSettings, *, create: bool) -> bytes | None:
    """The spool key: ``spool_key`` from the configuration, else ``spool_dir/spool.key``,
    generated (32 random bytes, base64, mode 0600) on first start when ``create``."""
    path = settings.spool_dir / KEY_FILE
    try:
        return secret_files.load_key(settings.spool_key, path, create=create, what="spool key")
    except secret_files.InvalidKey as e:
        raise SpoolError(f"the spool key {e}") from None


@dataclass(frozen=True)
class Listed:
    """One line of ``popgate spool list``."""

    id: str
    state: str  # "relaying" | "pending" | "unreadable"
    entry: SpoolEntry | None
    status: SpoolStatus | None
    problem: str = ""


class SpoolStore:
    """The files of one spool directory; blocking I/O (callers run it in a thread)."""

    def __init__(self, directory: Path, key: bytes) -> None:
        self.directory = directory
        self.key = key

    def prepare(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, entry_id: str, suffix: str) -> Path:
        if not entry_id or "/" in entry_id or entry_id.startswith("."):
            raise SpoolError(f"bad entry id {entry_id!r}")
        return self.directory / f"{entry_id}{suffix}"

    def write_relaying(self, entry: SpoolEntry, keep_password: bool) -> None:
        """The file and its contents are fsync'ed, its name is not yet: until mark_relayed
        makes the rename durable, a crash may lose the entry, and that is what a crash while
        relaying does to it anyway (the client has no 250; the next start drops ``.relaying``).
        One directory fsync per message, not two."""
        stored = entry if keep_password else entry.without_password()
        secret_files.write_new(self._path(entry.id, RELAYING), seal(self.key, encode_entry(stored)))

    def mark_relayed(self, entry_id: str) -> None:
        """Durable before the client hears 250: the directory fsync commits the entry's name
        (created in write_relaying) and its rename together."""
        os.rename(self._path(entry_id, RELAYING), self._path(entry_id, PENDING))
        secret_files.fsync_dir(self.directory)

    def remove(self, entry_id: str) -> None:
        """Not fsync'ed: an entry that comes back after a crash is harmless. A ``.relaying``
        one is dropped again at start, and a ``.pending`` one whose copy is stored is found in
        Sent by the next attempt (sent.py) and not stored twice."""
        for suffix in (RELAYING, PENDING, STATUS):
            with contextlib.suppress(FileNotFoundError):
                self._path(entry_id, suffix).unlink()

    def load(self, entry_id: str, state: str = PENDING) -> SpoolEntry:
        return decode_entry(unseal(self.key, self._path(entry_id, state).read_bytes()))

    def ids(self, state: str) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(n[: -len(state)] for n in names if n.endswith(state) and n[0] != ".")

    def write_status(self, entry_id: str, status: SpoolStatus) -> None:
        path = self._path(entry_id, STATUS)
        temporary = path.with_name(f".{path.name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        secret_files.write_new(temporary, seal(self.key, json.dumps(asdict(status)).encode()))
        os.replace(temporary, path)

    def read_status(self, entry_id: str) -> SpoolStatus | None:
        try:
            data = unseal(self.key, self._path(entry_id, STATUS).read_bytes())
            return SpoolStatus(**json.loads(data))
        except (FileNotFoundError, SpoolError, ValueError, TypeError):
            return None

    def listing(self) -> list[Listed]:
        out = []
        for state, suffix in (("relaying", RELAYING), ("pending", PENDING)):
            for entry_id in self.ids(suffix):
                try:
                    entry: SpoolEntry | None = self.load(entry_id, suffix)
                    problem = ""
                except (OSError, SpoolError) as e:
                    entry, problem, state = None, str(e), "unreadable"
                out.append(Listed(entry_id, state, entry, self.read_status(entry_id), problem))
        return sorted(out, key=lambda item: item.id)


# --------------------------------------------------------------------------------------------
# The retry loop

#: Stores the Sent copy of an entry unless the same copy is there already (an earlier attempt
#: may have stored it just before it failed, or the device sent the message twice).
#: Returns a short description for the log ("uid 7 in Sent"); raises on failure.
StoreCopy = Callable[[SpoolEntry], Awaitable[str]]


class SentSpool:
    """Keeps trying to store the Sent copy of every pending entry, with exponential backoff.

    ``submit`` is called right after the relay accepted a message, with the entry in memory (and
    the user's password, even when the file holds none); retries read the entry back from disk.
    An entry is worked on by one attempt at a time, so two copies never race each other.
    """

    def __init__(
        self,
        store: SpoolStore,
        store_copy: StoreCopy,
        initial_delay: float,
        max_delay: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.store = store
        self.store_copy = store_copy
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.loop = loop
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._attempts: dict[str, int] = {}
        self._stopping = False
        self.metrics: Metrics = DISCARD

    async def start(self) -> None:
        """Drop entries whose relay outcome is unknown; schedule every pending one now."""
        relaying = await asyncio.to_thread(self.store.ids, RELAYING)
        for entry_id in relaying:
            # The client did not get 250 for it, so it still holds the message and retries.
            log.warning(
                "spool entry %s was being relayed when the gateway stopped; the client was not"
                " told it was accepted, so it is not copied to Sent",
                entry_id,
            )
            await asyncio.to_thread(self.store.remove, entry_id)
        pending = await asyncio.to_thread(self.store.ids, PENDING)
        for entry_id in pending:
            status = await asyncio.to_thread(self.store.read_status, entry_id)
            self._attempts[entry_id] = max(1, status.attempts if status else 1)
            self._schedule(entry_id, 0.0)
        if pending:
            log.info("spool: %d Sent copies to store", len(pending))

    def submit(self, entry: SpoolEntry) -> None:
        """A freshly relayed entry: try at once, from memory."""
        self._attempts.setdefault(entry.id, 0)
        self._run(entry.id, entry)

    @property
    def waiting(self) -> int:
        return len(self._attempts)

    def _schedule(self, entry_id: str, delay: float) -> None:
        if self._stopping:
            return
        old = self._timers.pop(entry_id, None)
        if old is not None:
            old.cancel()
        self._timers[entry_id] = self.loop.call_later(delay, self._run, entry_id, None)

    def _run(self, entry_id: str, entry: SpoolEntry | None) -> None:
        self._timers.pop(entry_id, None)
        if entry_id in self._running or self._stopping:
            return
        task = self.loop.create_task(self._attempt(entry_id, entry))
        self._running[entry_id] = task
        task.add_done_callback(lambda _t: self._running.pop(entry_id, None))

    async def _attempt(self, entry_id: str, entry: SpoolEntry | None) -> None:
        attempts = self._attempts.get(entry_id, 0)
        try:
            if entry is None:
                entry = await asyncio.to_thread(self.store.load, entry_id)
            done = await self.store_copy(entry)
        except asyncio.CancelledError:
            raise
        except FileNotFoundError:
            self._attempts.pop(entry_id, None)  # removed by someone else (an operator)
            return
        except Exception as e:
            self.metrics.sent_copies.labels("retry").inc()
            attempts += 1
            self._attempts[entry_id] = attempts
            delay = backoff_delay(attempts, self.initial_delay, self.max_delay)
            reason = _reason(e)
            log.warning(
                "Sent copy of spool entry %s not stored (attempt %d): %s; next try in %gs",
                entry_id,
                attempts,
                reason,
                delay,
                extra={"user": entry.user if entry else None},
            )
            status = SpoolStatus(attempts, reason, time.time() + delay)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.store.write_status, entry_id, status)
            self._schedule(entry_id, delay)
            return
        self.metrics.sent_copies.labels("stored").inc()
        await asyncio.to_thread(self.store.remove, entry_id)
        self._attempts.pop(entry_id, None)
        log.info("Sent copy stored: %s", done, extra={"user": entry.user, "spool_entry": entry_id})

    async def stop(self, grace: float) -> None:
        """Stop scheduling; give running attempts ``grace`` seconds. Files stay for next start."""
        self._stopping = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        running = list(self._running.values())
        if running:
            _done, late = await asyncio.wait(running, timeout=grace)
            for task in late:
                task.cancel()


def _reason(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:300] if text else type(error).__name__


# --------------------------------------------------------------------------------------------
# popgate spool list


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def why_waiting(item: Listed, now: float) -> str:
    if item.state == "unreadable":
        return f"unreadable: {item.problem}"
    if item.state == "relaying":
        return "being relayed now (dropped at the next start if the gateway stops first)"
    status = item.status
    if status is None or status.attempts == 0:
        return "Sent copy: first attempt not finished yet"
    due = status.next_attempt - now
    when = f"next try in {_age(due)}" if due > 0 else "next try due now"
    tries = "1 attempt" if status.attempts == 1 else f"{status.attempts} attempts"
    return f"Sent copy not stored after {tries}: {status.last_error}; {when}"


def format_listing(items: list[Listed], now: float) -> list[str]:
    """The table ``popgate spool list`` prints, one entry a line, oldest first."""
    rows = [("ID", "STATE", "AGE", "USER", "SIZE", "RCPTS", "MESSAGE-ID", "WHY IT WAITS")]
    for item in items:
        entry = item.entry
        rows.append(
            (
                item.id,
                item.state,
                _age(now - entry.created) if entry else "?",
                entry.user if entry else "?",
                str(len(entry.message)) if entry else "?",
                str(len(entry.recipients)) if entry else "?",
                entry.message_id if entry else "?",
                why_waiting(item, now),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join([*(v.ljust(w) for v, w in zip(row[:-1], widths, strict=True)), row[-1]])
        for row in rows
    ]
